"""Fidelity: `<tune:f:0.8>` gives the built-in Lora's `<lora:f:0.8>` image for every network type, on the tiny SD1
and SDXL checkpoints in a real webui, and the base weights are bit-identical afterwards.

The worst pixel difference per case is written to test-output/e2e-fidelity.json.
"""
import json

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
