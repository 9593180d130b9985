"""--medvram in a real webui (on the CPU its forward pre-hooks still run: modules/lowvram.py send_me_to_gpu moves
the text encoder, the UNet and the VAE in turn): `<tune:>` images, alone, scheduled and with the built-in Lora in
the same prompt, equal those of the session's webui without the flag bit for bit, and a generation without tags
gives back the model's own weights (the same hash as without the flag)."""
import pytest

from . import host as webui_host
from .images import first_image, max_abs_diff

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, checkpoints):
    from tests.fixtures import adapters
    return adapters.write_corpus("sd1", checkpoints["sd1"], tmp_path_factory.mktemp("medvram-src"), seed=3,
                                 cases=["lora", "locon", "loha"])


def _install(host, corpus):
    for case, path in corpus.items():
        adapters_dir = host.lora_dir / "medvram"
        adapters_dir.mkdir(parents=True, exist_ok=True)
        (adapters_dir / f"medvram-{case}.safetensors").write_bytes(path.read_bytes())
    host.post("/sdapi/v1/refresh-loras")
    host.post("/tune/v1/refresh")


@pytest.fixture(scope="module")
def medvram(tmp_path_factory, checkpoints, corpus):
    work = tmp_path_factory.mktemp("webui-medvram")
    host = webui_host.WebuiHost(work, checkpoints["sd1"].parent, extension=True, ckpt=checkpoints["sd1"],
                                extra_args=["--medvram"])
    try:
        host.start()
        host.set_options(live_previews_enable=False, show_progress_type="Approx cheap")
        _install(host, corpus)
        yield host
    finally:
        host.stop()


def test_medvram_images_equal_those_without_the_flag(webui, medvram, checkpoints, corpus):
    webui.load_checkpoint(checkpoints["sd1"].name)
    _install(webui, corpus)
    assert medvram.get("/sdapi/v1/cmd-flags")["medvram"] is True
    assert webui.get("/sdapi/v1/cmd-flags")["medvram"] is False
    prompts = [
        PROMPT,
        f"{PROMPT} <tune:medvram-lora:0.8>",
        f"{PROMPT} <tune:medvram-lora:0.8> <tune:medvram-loha:0.6>",
        f"{PROMPT} <tune:medvram-lora:0@0,1@0.5> <tune:medvram-locon:1:start=2>",
        f"{PROMPT} <tune:medvram-lora:0.8> <lora:medvram-locon:0.7>",
        f"{PROMPT} <tune:medvram-lora:0.8>",  # the same set again after the built-in's
    ]
    hashes = {}
    for name, host in (("without", webui), ("with", medvram)):
        host.txt2img(PROMPT, seed=11)
        hashes[name] = host.get("/tune/v1/model-hash")["sha256"]
    for prompt in prompts:
        a = first_image(medvram.txt2img(prompt, seed=11))
        b = first_image(webui.txt2img(prompt, seed=11))
        assert max_abs_diff(a, b) == 0, prompt
    base = first_image(medvram.txt2img(PROMPT, seed=11))
    assert max_abs_diff(base, first_image(medvram.txt2img(prompts[1], seed=11))) > 0
    for host in (webui, medvram):  # a generation without tags: every weight back
        host.txt2img(PROMPT, seed=11)
    assert hashes["with"] == hashes["without"]
    assert medvram.get("/tune/v1/model-hash")["sha256"] == hashes["with"]
    assert webui.get("/tune/v1/model-hash")["sha256"] == hashes["without"]
