"""Fidelity: `<tune:f:0.8>` gives the built-in Lora's `<lora:f:0.8>` image for every network type, on the tiny SD1
and SDXL checkpoints in a real webui, and the base weights are bit-identical afterwards.

The worst pixel difference per case is written to test-output/e2e-fidelity.json.

Also: a standalone textual inversion in the embeddings folder (.safetensors and .pt; SD1, and SDXL clip_l/clip_g)
used by its name gives the same image, bit for bit, as the same webui without this extension (a second webui,
started for that test), written to test-output/e2e-fidelity-ti.json.
"""
import json
import urllib.error

import pytest

from .images import first_image, max_abs_diff

PROMPT = "a photo of a cat"
TOLERANCE = 2  # of 255


@pytest.fixture(scope="module")
def corpora(webui, checkpoints):
    from tests.fixtures import adapters
    out = {}
    for arch in ("sd1", "sdxl"):
        folder = webui.lora_dir / arch
        folder.mkdir(exist_ok=True)
        out[arch] = adapters.write_corpus(arch, checkpoints[arch], folder, seed=0)
    webui.post("/sdapi/v1/refresh-loras")
    webui.post("/tune/v1/refresh")
    return out


def _prompt(net: str, name: str, case: str, token) -> str:
    p = f"{PROMPT} <{net}:{name}:0.8>"
    return f"{token} {p}" if case == "bundled_ti" and token else p


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_tune_matches_builtin_for_every_network_type(webui, checkpoints, corpora, arch, output_dir):
    from tests.fixtures import adapters
    webui.load_checkpoint(checkpoints[arch].name)
    base = first_image(webui.txt2img(PROMPT, seed=3))
    hash_before = webui.get("/tune/v1/model-hash")["sha256"]
    report = {}
    failures = []
    for case, path in sorted(corpora[arch].items()):
        name = path.stem  # the built-in finds files by stem or alias only (stems are unique across archs)
        token = adapters.bundled_token(path) if case == "bundled_ti" else None
        ours = first_image(webui.txt2img(_prompt("tune", name, case, token), seed=3))
        theirs = first_image(webui.txt2img(_prompt("lora", name, case, token), seed=3))
        d, changed = max_abs_diff(ours, theirs), max_abs_diff(ours, base)
        report[case] = {"max_abs_diff_vs_builtin": d, "max_abs_diff_vs_base": changed}
        if d > TOLERANCE:
            failures.append(f"{case}: differs from the built-in by {d}/255")
        if changed == 0:
            failures.append(f"{case}: the adapter did not change the image")
    # after a generation without tags both engines are off: the base image and every weight come back exactly
    again = first_image(webui.txt2img(PROMPT, seed=3))
    assert max_abs_diff(again, base) == 0
    assert webui.get("/tune/v1/model-hash")["sha256"] == hash_before
    path = output_dir / "e2e-fidelity.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[arch] = report
    path.write_text(json.dumps(data, indent=2))
    assert not failures, "\n".join(failures)


def test_tune_never_writes_base_weights(webui, checkpoints, corpora):
    """Only our engine: hash before, generations with several adapters, schedules and block weights, hash after."""
    webui.load_checkpoint(checkpoints["sd1"].name)
    before = webui.get("/tune/v1/model-hash")["sha256"]
    names = [p.stem for c, p in sorted(corpora["sd1"].items()) if c in ("lora", "loha", "full", "norm")]
    prompts = [
        PROMPT + "".join(f"<tune:{n}:0.5>" for n in names),
        PROMPT + f"<tune:{names[0]}:0@0,1@0.5>",
        PROMPT + f"<tune:{names[0]}:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>",
        PROMPT + f"<tune:{names[1]}:0.7:start=2>",
    ]
    images = [first_image(webui.txt2img(p, seed=5)) for p in prompts]
    assert all(img.shape == (64, 64, 3) for img in images)
    assert webui.get("/tune/v1/model-hash")["sha256"] == before


def test_bad_tags_warn_and_generation_goes_on(webui, checkpoints, corpora):
    """The API's info has no comments field in v1.10.1: the warning is checked in the console."""
    webui.load_checkpoint(checkpoints["sd1"].name)
    base = first_image(webui.txt2img(PROMPT, seed=9))
    lora = corpora["sd1"]["lora"].stem
    sdxl_lora = corpora["sdxl"]["lora"].stem
    cases = {"<tune:does-not-exist:1>": "not found", "<tune:../escape:1>": "..",
             f"<tune:{lora}:abc>": "not a number", f"<tune:{sdxl_lora}:1>": "SDXL"}
    for tag, words in cases.items():
        n = len(webui.current_log())
        r = webui.txt2img(PROMPT + " " + tag, seed=9)
        assert max_abs_diff(first_image(r), base) == 0, tag
        new_lines = [line for line in webui.current_log()[n:].splitlines() if "[sd-webui-tune]" in line]
        assert any(words in line for line in new_lines), (tag, new_lines)


# ---- textual inversion used by name: the webui's own path, untouched by this extension --------------------------
TI_NAMES = {("sd1", "safetensors"): "tunetiplain", ("sd1", "pt"): "tunetipickle",
            ("sdxl", "safetensors"): "tunetixlplain", ("sdxl", "pt"): "tunetixlpickle"}


def _write_tis(folder):
    """Standalone TI files for the tiny SD1 and SDXL models: kohya's .safetensors (``emb_params``; ``clip_l`` +
    ``clip_g``) and the webui's own .pt layout (``string_to_param``; ``clip_l`` + ``clip_g``)."""
    import torch
    from safetensors.torch import load_file

    from tests.fixtures import adapters
    for (arch, fmt), name in TI_NAMES.items():
        path = adapters.write_ti(arch, folder, name, seed=len(name))
        if fmt == "pt":
            t = load_file(str(path))
            path.unlink()
            data = dict(t) if arch == "sdxl" else {
                "string_to_token": {"*": 265}, "string_to_param": {"*": t["emb_params"]}, "name": name, "step": 0,
                "sd_checkpoint": None, "sd_checkpoint_name": None}
            torch.save(data, folder / f"{name}.pt")


@pytest.fixture(scope="module")
def ti_files(webui):
    _write_tis(webui.embeddings_dir)
    webui.post("/sdapi/v1/refresh-embeddings")
    return TI_NAMES


@pytest.fixture(scope="module")
def plain_webui(tmp_path_factory, checkpoints):
    """The same webui without this extension, with the same TI files: what the webui does on its own."""
    from . import host as webui_host
    work = tmp_path_factory.mktemp("webui-plain")
    host = webui_host.WebuiHost(work, checkpoints["sd1"].parent, extension=False, ckpt=checkpoints["sd1"])
    host.embeddings_dir.mkdir(parents=True, exist_ok=True)
    _write_tis(host.embeddings_dir)
    try:
        host.start()
        host.set_options(live_previews_enable=False, show_progress_type="Approx cheap")
        with pytest.raises(urllib.error.HTTPError):  # the extension's API is not there
            host.get("/tune/v1/status")
        yield host
    finally:
        host.stop()


def _ti_images(host, checkpoint, names):
    """{name: (image, infotext)} for "a photo of NAME cat", plus the image without any TI under None."""
    host.load_checkpoint(checkpoint)
    host.post("/sdapi/v1/refresh-embeddings")
    loaded = host.get("/sdapi/v1/embeddings")["loaded"]
    missing = [n for n in names if n not in loaded]
    assert not missing, f"embeddings not loaded: {missing}; loaded: {sorted(loaded)}"
    out = {None: (first_image(host.txt2img("a photo of a cat", seed=3)), "")}
    for name in names:
        r = host.txt2img(f"a photo of {name} cat", seed=3)
        out[name] = (first_image(r), json.loads(r["info"])["infotexts"][0])
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_textual_inversion_by_name_equals_the_webui_without_extension(webui, plain_webui, checkpoints, ti_files,
                                                                      arch, output_dir):
    names = [n for (a, _), n in ti_files.items() if a == arch]
    ours = _ti_images(webui, checkpoints[arch].name, names)
    plain = _ti_images(plain_webui, checkpoints[arch].name, names)
    # the two processes agree without any TI (else comparing them says nothing)
    assert max_abs_diff(ours[None][0], plain[None][0]) == 0
    report = {}
    for name in names:
        (img, info), (ref, ref_info) = ours[name], plain[name]
        report[name] = {"max_abs_diff_vs_plain_webui": max_abs_diff(img, ref),
                        "max_abs_diff_vs_no_ti": max_abs_diff(img, ours[None][0])}
        assert report[name]["max_abs_diff_vs_no_ti"] > 0, f"{name}: the embedding did not change the image"
        assert report[name]["max_abs_diff_vs_plain_webui"] == 0, f"{name}: differs from the webui without us"
        assert f"TI hashes: \"{name}: " in info or f"TI hashes: {name}: " in info, info
        ti = [p for p in info.split(", ") if p.startswith("TI hashes")]
        assert ti == [p for p in ref_info.split(", ") if p.startswith("TI hashes")], (info, ref_info)
        assert "Tune" not in info, info
    path = output_dir / "e2e-fidelity-ti.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[arch] = report
    path.write_text(json.dumps(data, indent=2))
