"""Settings -> Tune -> "Also handle <lora:...> tags" (tune_handle_lora_tags) over HTTP.

On: `<lora:f:0.8>` and `<lyco:f:0.8>` are served by this extension (the same image as `<tune:f:0.8>`, our "Tune"
infotext, and none of the built-in's "Lora hashes"); an unknown `<lora:nope:1>` gives our warning and the
generation goes on. Off (the session's webui, the default): `<lora:f:0.8>` is the built-in's again.

The option needs a UI reload (it decides which engine registers the `lora` extra network at UI build), so the
"on" side is a second webui started with the option already in its config.json.
"""
import json

import pytest

from . import host as webui_host
from .images import first_image, max_abs_diff

PROMPT = "a photo of a cat"
TOLERANCE = 2  # of 255: ours vs the built-in for the same file (test_fidelity.py's bound)


def _corpus(host, checkpoints, tmp):
    """Two SD1 adapters in <Lora>/takeover, under stems no other test of the session uses."""
    from tests.fixtures import adapters
    src = adapters.write_corpus("sd1", checkpoints["sd1"], tmp, cases=["lora", "loha"])
    return {case: adapters.copy_as(path, host.lora_dir / "takeover" / f"takeover-{case}.safetensors")
            for case, path in src.items()}


def _infotext(response) -> str:
    return json.loads(response["info"])["infotexts"][0]


@pytest.fixture(scope="module")
def takeover(tmp_path_factory, checkpoints):
    """A second webui with tune_handle_lora_tags on from its start, the tiny SD1 checkpoint and two adapters."""
    work = tmp_path_factory.mktemp("webui-takeover")
    host = webui_host.WebuiHost(work, checkpoints["sd1"].parent, extension=True, ckpt=checkpoints["sd1"])
    host.data_dir.mkdir(parents=True, exist_ok=True)
    (host.data_dir / "config.json").write_text(json.dumps({"tune_handle_lora_tags": True}))
    files = _corpus(host, checkpoints, tmp_path_factory.mktemp("takeover-src"))
    try:
        host.start()
        host.set_options(live_previews_enable=False, show_progress_type="Approx cheap")
        yield host, files
    finally:
        host.stop()


def test_setting_on_lora_tags_are_ours(takeover):
    host, files = takeover
    assert host.get("/sdapi/v1/options")["tune_handle_lora_tags"] is True
    assert "serving <lora:...> and <lyco:...> tags" in host.current_log()
    base = first_image(host.txt2img(PROMPT, seed=3))
    single = {}
    for case, path in sorted(files.items()):
        name = path.stem
        tune = host.txt2img(f"{PROMPT} <tune:{name}:0.8>", seed=3)
        single[case] = first_image(tune)
        lora = host.txt2img(f"{PROMPT} <lora:{name}:0.8>", seed=3)
        lyco = host.txt2img(f"{PROMPT} <lyco:{name}:0.8>", seed=3)
        assert max_abs_diff(first_image(tune), base) > 0, f"{case}: the adapter did not change the image"
        assert max_abs_diff(first_image(lora), first_image(tune)) == 0, case
        assert max_abs_diff(first_image(lyco), first_image(tune)) == 0, case
        for r in (lora, lyco):
            info = _infotext(r)
            assert f"Tune: \"{name}: " in info or f"Tune: {name}: " in info, info
            assert "Tune hashes" in info and "Lora hashes" not in info, info
    # <tune:> and <lora:> in one prompt stack in the one engine (neither replaces the other's adapter)
    a, b = files["lora"].stem, files["loha"].stem
    both_tune = first_image(host.txt2img(f"{PROMPT} <tune:{a}:0.8> <tune:{b}:0.8>", seed=3))
    mixed = host.txt2img(f"{PROMPT} <tune:{a}:0.8> <lora:{b}:0.8>", seed=3)
    assert max_abs_diff(both_tune, single["lora"]) > 0 and max_abs_diff(both_tune, single["loha"]) > 0
    assert max_abs_diff(first_image(mixed), both_tune) == 0
    info = _infotext(mixed)
    assert a in info and b in info and "Lora hashes" not in info, info


def test_setting_on_unknown_lora_warns_and_generation_goes_on(takeover):
    host, _ = takeover
    base = first_image(host.txt2img(PROMPT, seed=4))
    n = len(host.current_log())
    r = host.txt2img(f"{PROMPT} <lora:nope:1>", seed=4)
    assert max_abs_diff(first_image(r), base) == 0
    info = _infotext(r)
    assert "Lora hashes" not in info and "Tune hashes" not in info, info
    ours = [line for line in host.current_log()[n:].splitlines() if "[sd-webui-tune]" in line]
    assert any("nope" in line and "not found" in line for line in ours), ours
    # the built-in's own complaint about a missing network ("Networks not found") is not there: it was not asked
    assert "networks not found" not in host.current_log()[n:].lower()


def test_setting_off_lora_tags_are_the_builtins(webui, checkpoints, tmp_path):
    """The session's webui has the option at its default (off)."""
    assert webui.get("/sdapi/v1/options")["tune_handle_lora_tags"] is False
    webui.load_checkpoint(checkpoints["sd1"].name)
    files = _corpus(webui, checkpoints, tmp_path)
    webui.post("/sdapi/v1/refresh-loras")
    webui.post("/tune/v1/refresh")
    base = first_image(webui.txt2img(PROMPT, seed=3))
    for case, path in sorted(files.items()):
        name = path.stem
        lora = webui.txt2img(f"{PROMPT} <lora:{name}:0.8>", seed=3)
        tune = webui.txt2img(f"{PROMPT} <tune:{name}:0.8>", seed=3)
        info = _infotext(lora)
        assert "Lora hashes" in info and name in info, info
        assert "Tune:" not in info and "Tune hashes" not in info, info
        assert max_abs_diff(first_image(lora), base) > 0, case
        assert max_abs_diff(first_image(lora), first_image(tune)) <= TOLERANCE, case
