"""Training through the HTTP API in a real webui: files land in the Lora/embeddings folders, the built-in and our
engine give the same image with them, Interrupt leaves a valid file and an unchanged model, and a txt2img sent
during training completes."""
import json
import time

import pytest
from safetensors import safe_open

from tests.unit.train_fakes import write_images

from .images import first_image, max_abs_diff

# tiny-model settings (webui-host.md: tiny models need about ten times a real model's learning rate)
TINY = dict(resolution=64, min_bucket=64, max_bucket=128, unet_lr=5e-3, te_lr=1e-3, network_dim=8,
            network_alpha=4, save_every=10, seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataset")
    write_images(d)
    return str(d)


def wait(webui, job_id, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        j = webui.get(f"/tune/v1/jobs/{job_id}")
        if j["state"] in ("done", "failed", "interrupted"):
            return j
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {j}")


def train(webui, **cfg):
    r = webui.post("/tune/v1/train", cfg)
    return wait(webui, r["id"])


def test_invalid_configs_get_422_naming_the_field(webui, dataset):
    import urllib.error
    cases = [({"method": "lora", "steps": 5, "output_name": "x", "trigger": "x"}, "dataset"),
             ({"dataset": dataset, "method": "nope", "steps": 5, "output_name": "x", "trigger": "x"}, "method"),
             ({"dataset": dataset, "method": "lora", "steps": -1, "output_name": "x", "trigger": "x"}, "steps"),
             ({"dataset": "/does/not/exist", "method": "lora", "steps": 5, "output_name": "x", "trigger": "x"},
              "dataset")]
    for body, field in cases:
        with pytest.raises(urllib.error.HTTPError) as e:
            webui.post("/tune/v1/train", body)
        assert e.value.code == 422
        detail = json.loads(e.value.read())["detail"]
        assert detail["field"] == field, detail


@pytest.mark.parametrize("arch,method", [("sd1", "lora"), ("sd1", "loha"), ("sd1", "pivotal"), ("sd1", "dreambooth"),
                                         ("sdxl", "lora")])
def test_trained_file_works_in_builtin_and_tune(webui, checkpoints, dataset, arch, method):
    webui.load_checkpoint(checkpoints[arch].name)
    before = webui.get("/tune/v1/model-hash")["sha256"]
    name = f"e2e-{arch}-{method}"
    # the built-in cannot compute float16 LyCORIS factors on a CPU (torch has no CPU half matmul; it skips the
    # file as "Networks with errors"), so compare those in float32; LoRA keeps the default float16 file
    extra = {"save_dtype": "fp32"} if method == "loha" else {}
    job = train(webui, dataset=dataset, method=method, steps=20, output_name=name, trigger="zkw", overwrite=True,
                **TINY, **extra)
    assert job["state"] == "done", job
    path = job["output_path"]
    assert path.startswith(str(webui.lora_dir)) and path.endswith(f"{name}.safetensors")
    with safe_open(path, "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
    assert md["ss_output_name"] == name and md["ss_network_dim"] == "8" and "sshs_model_hash" in md
    if method == "pivotal":
        assert any(k.startswith("bundle_emb.zkw.") for k in keys)
    assert len(job["losses"]) == 20
    assert webui.get("/tune/v1/model-hash")["sha256"] == before
    webui.post("/sdapi/v1/refresh-loras")
    assert name in [x["name"] for x in webui.get("/sdapi/v1/loras")]
    prompt = "zkw, a photo"
    base = first_image(webui.txt2img(prompt, seed=4))
    builtin = first_image(webui.txt2img(prompt + f" <lora:{name}:1>", seed=4))
    ours = first_image(webui.txt2img(prompt + f" <tune:{name}:1>", seed=4))
    assert max_abs_diff(builtin, ours) <= 2
    assert max_abs_diff(ours, base) > 0


def test_textual_inversion_goes_to_embeddings_and_is_used_by_name(webui, checkpoints, dataset):
    webui.load_checkpoint(checkpoints["sd1"].name)
    job = train(webui, dataset=dataset, method="ti", steps=10, output_name="zkwti", trigger="zkwti", overwrite=True,
                resolution=64, min_bucket=64, emb_lr=0.1, seed=1)
    assert job["state"] == "done", job
    assert job["output_path"].startswith(str(webui.embeddings_dir))
    webui.post("/sdapi/v1/refresh-embeddings")
    assert "zkwti" in webui.get("/sdapi/v1/embeddings")["loaded"]
    base = first_image(webui.txt2img("a photo of something", seed=4))
    used = first_image(webui.txt2img("a photo of zkwti", seed=4))
    assert max_abs_diff(base, used) > 0


def test_interrupt_leaves_valid_file_and_unchanged_model_and_txt2img_runs_during_training(webui, checkpoints, dataset):
    webui.load_checkpoint(checkpoints["sd1"].name)
    before = webui.get("/tune/v1/model-hash")["sha256"]
    base = first_image(webui.txt2img("a photo", seed=8))
    r = webui.post("/tune/v1/train", dict(dataset=dataset, method="lora", steps=400, output_name="e2e-int",
                                          trigger="zkw", overwrite=True, **TINY))
    while webui.get(f"/tune/v1/jobs/{r['id']}")["step"] < 3:
        time.sleep(0.2)
    # a generation between training steps: completes, and sees the model without the training adapter
    during = first_image(webui.txt2img("a photo", seed=8))
    assert max_abs_diff(during, base) == 0
    live = first_image(webui.txt2img("a photo <tune:e2e-int:1>", seed=8))
    assert max_abs_diff(live, base) > 0, "the adapter under training is usable by tag mid-run"
    webui.post(f"/tune/v1/jobs/{r['id']}/interrupt")
    job = wait(webui, r["id"])
    assert job["state"] == "interrupted" and 3 <= job["step"] < 400
    with safe_open(job["output_path"], "pt") as f:
        assert len(list(f.keys())) > 0
    assert webui.get("/tune/v1/model-hash")["sha256"] == before


def test_dreambooth_generates_class_images_once_and_caches_them(webui, checkpoints, dataset):
    """DreamBooth with class_prompt + num_class_images: the webui's sampler renders the class images into a cache
    folder under its data dir before training; the same job again generates none."""
    import os
    import re

    from PIL import Image

    webui.load_checkpoint(checkpoints["sd1"].name)
    body = dict(dataset=dataset, method="dreambooth", steps=4, output_name="e2e-db-gen", trigger="zkw",
                class_prompt="a photo of a dog", num_class_images=2, overwrite=True, **TINY)
    job = train(webui, **body)
    assert job["state"] == "done", job
    planned = [re.search(r"class images: (\d+) of 2 in (.+), generating (\d+)$", ev) for ev in job["events"]]
    planned = [m for m in planned if m]
    assert len(planned) == 1 and planned[0][1] == "0" and planned[0][3] == "2", job["events"]
    folder = planned[0][2]
    assert folder.startswith(str(webui.data_dir / "tune" / "class-images")), folder
    assert any("class images: generated 2" in ev for ev in job["events"]), job["events"]
    pngs = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    assert pngs == ["class_00000.png", "class_00001.png"]
    for n in pngs:
        with open(os.path.join(folder, n[:-4] + ".txt"), encoding="utf-8") as f:
            assert f.read() == "a photo of a dog"
    images = [Image.open(os.path.join(folder, n)).convert("RGB") for n in pngs]
    assert all(im.size == (64, 64) for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # a seed per image
    stamps = [os.stat(os.path.join(folder, n)).st_mtime_ns for n in pngs]
    with safe_open(job["output_path"], "pt") as f:
        md = f.metadata()
    assert md["ss_num_reg_images"] == "2", md.get("ss_num_reg_images")

    again = train(webui, **body)
    assert again["state"] == "done", again
    assert any(f"class images: 2 of 2 in {folder}, generating 0" in ev for ev in again["events"]), again["events"]
    assert any("class images: generated 0" in ev for ev in again["events"]), again["events"]
    assert [os.stat(os.path.join(folder, n)).st_mtime_ns for n in pngs] == stamps  # not rewritten
    with safe_open(again["output_path"], "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "2"


def test_validation_best_file_and_staged_plan_in_the_webui(webui, checkpoints, dataset):
    """A staged plan with a held-out image, in a real webui: the job reports its stages and validation scores, the
    best file and the final file land in the Lora folder, carry the plan, and work in the built-in Lora."""
    webui.load_checkpoint(checkpoints["sd1"].name)
    before = webui.get("/tune/v1/model-hash")["sha256"]
    name = "e2e-staged"
    stages = [{"targets": "mid_proj", "steps": 6, "network_dim": 4, "network_alpha": 2, "name": "mid"},
              {"targets": "cross_attn", "steps": 6, "network_dim": 8, "network_alpha": 4}]
    job = train(webui, dataset=dataset, method="lora", output_name=name, trigger="zkw", overwrite=True,
                stages=stages, validation_count=1, validation_every=3, keep_best=True,
                **{k: v for k, v in TINY.items() if k not in ("network_dim", "network_alpha")})
    assert job["state"] == "done", job
    assert job["total"] == 12 and len(job["losses"]) == 12
    assert job["stage"]["of"] == 2, job["stage"]
    assert any("stage 2/2" in ev for ev in job["events"]), job["events"]
    steps = [s for s, _ in job["val_losses"]]
    assert steps == [3, 6, 9, 12], job["val_losses"]
    best = min(job["val_losses"], key=lambda sv: sv[1])
    assert job["best_step"] == best[0]
    assert job["best_path"].startswith(str(webui.lora_dir)) and job["best_path"].endswith(f"{name}-best.safetensors")
    with safe_open(job["best_path"], "pt") as f:
        assert f.metadata()["ss_tune_best_step"] == str(best[0])
    with safe_open(job["output_path"], "pt") as f:
        md, keys = f.metadata(), list(f.keys())
        ranks = {f.get_tensor(k).shape[0] for k in keys if k.endswith("lora_down.weight")}
    assert json.loads(md["ss_tune_stages"])[0]["name"] == "mid"
    assert ranks == {4, 8}
    assert any(("mid_block" in k or "middle_block" in k) and "proj_in" in k for k in keys), keys
    assert any("attn2_to_k" in k for k in keys), keys
    assert webui.get("/tune/v1/model-hash")["sha256"] == before
    webui.post("/sdapi/v1/refresh-loras")
    webui.post("/tune/v1/refresh")
    base = first_image(webui.txt2img("a red square zkw", seed=3, steps=4, size=64))
    builtin = first_image(webui.txt2img(f"a red square zkw <lora:{name}:1>", seed=3, steps=4, size=64))
    ours = first_image(webui.txt2img(f"a red square zkw <tune:{name}:1>", seed=3, steps=4, size=64))
    assert max_abs_diff(builtin, ours) <= 2
    assert max_abs_diff(base, ours) > 0
