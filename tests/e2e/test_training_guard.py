"""A checkpoint switch while a training job runs is refused (options API, txt2img override_settings), the job
finishes on the model it started on, and switching works again once it is done."""
import json
import re
import time
import urllib.error

import pytest
from safetensors import safe_open

from tests.unit.train_fakes import write_images

from .test_training import wait

TINY = dict(resolution=64, min_bucket=64, max_bucket=128, unet_lr=5e-3, te_lr=1e-3, network_dim=8,
            network_alpha=4, seed=1)
MESSAGE = "interrupt it before switching checkpoints"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard-dataset")
    write_images(d)
    return str(d)


def test_checkpoint_switch_is_refused_during_training(webui, checkpoints, dataset):
    webui.load_checkpoint(checkpoints["sd1"].name)
    loaded = webui.get("/sdapi/v1/options")["sd_model_checkpoint"]
    before = webui.get("/tune/v1/model-hash")["sha256"]
    other = checkpoints["sd2v"].name
    steps = 40
    r = webui.post("/tune/v1/train", dict(dataset=dataset, method="lora", steps=steps, output_name="e2e-guard",
                                          trigger="zkw", overwrite=True, **TINY))
    while webui.get(f"/tune/v1/jobs/{r['id']}")["step"] < 2:
        time.sleep(0.2)

    # Settings / the dropdown / the options API: the webui's Options.set gets the refusal and keeps the old value
    webui.set_options(sd_model_checkpoint=other)
    assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"] == loaded
    # a generation that overrides the checkpoint fails with the message and restores the option
    with pytest.raises(urllib.error.HTTPError) as e:
        webui.txt2img("a photo", override_settings={"sd_model_checkpoint": other})
    assert MESSAGE in json.loads(e.value.read())["errors"]
    assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"] == loaded
    # also when the request asks not to restore its overrides: the setting keeps naming the loaded checkpoint
    with pytest.raises(urllib.error.HTTPError) as e:
        webui.txt2img("a photo", override_settings={"sd_model_checkpoint": other},
                      override_settings_restore_afterwards=False)
    assert MESSAGE in json.loads(e.value.read())["errors"]
    assert webui.get("/sdapi/v1/options")["sd_model_checkpoint"].startswith(checkpoints["sd1"].name)
    mid = webui.get(f"/tune/v1/jobs/{r['id']}")
    assert mid["state"] == "running" and mid["step"] < steps, f"the job ended before the switch was tried: {mid}"

    job = wait(webui, r["id"])
    assert job["state"] == "done", job
    assert job["step"] == steps and len(job["losses"]) == steps
    assert sum("refused switching checkpoints" in ev for ev in job["events"]) >= 3, job["events"]
    with safe_open(job["output_path"], "pt") as f:
        md = f.metadata()
    assert checkpoints["sd1"].stem in md["ss_sd_model_name"], md["ss_sd_model_name"]
    log = webui.current_log()
    # the checkpoint as the webui titles it ("tiny-sd1.safetensors [a6acd2b519]")
    said = re.findall(r"sd-webui-tune: training 'e2e-guard' is running on (.+); " + re.escape(MESSAGE), log)
    assert len(said) >= 3 and all(s.startswith(checkpoints["sd1"].name) for s in said), said
    assert webui.get("/tune/v1/model-hash")["sha256"] == before  # the model trained on is unharmed

    # with no job running, switching works again
    webui.load_checkpoint(other)
    assert checkpoints["sd2v"].stem in webui.get("/sdapi/v1/options")["sd_model_checkpoint"]
    webui.load_checkpoint(checkpoints["sd1"].name)
    assert webui.get("/tune/v1/model-hash")["sha256"] == before
