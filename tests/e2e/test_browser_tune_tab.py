"""The Tune tab in a real browser: a person fills the form, validates, trains, watches progress, interrupts,
resumes, finishes, and uses the result in txt2img. Screenshots of each state go to the output_dir.

Waits are generous (the machine is a slow, shared 2-core CPU): each wait is for a state the UI must reach, never
a timing assertion.
"""
import json
import time

import pytest

from tests.unit.train_fakes import write_images

from .browser import page

# tiny-model settings (as in test_training.py: tiny models need about ten times a real model's learning rate)
TINY = dict(resolution=64, min_bucket=64, max_bucket=128, unet_lr=5e-3, te_lr=1e-3, network_dim=8, network_alpha=4,
            save_every=10, seed=1, sample_every=10, sample_steps=4)
LONG_MS = 600_000
STATE_JS = "() => document.querySelector('#tune_progress .tune-progress')?.dataset"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune-tab-dataset")
    write_images(d)
    return str(d)


def open_tune_tab(pg):
    pg.wait_for_selector("#tabs", timeout=120_000)
    pg.locator("#tabs > .tab-nav button", has_text="Tune").first.click()
    pg.locator("#tune_status").first.wait_for(state="visible", timeout=60_000)


def fill(pg, key, value):
    el = pg.locator(f"#tune_{key} input, #tune_{key} textarea").first
    el.fill(str(value))
    el.dispatch_event("blur")


def choose_method(pg, name):
    pg.locator("#tune_method").first.get_by_text(name, exact=True).click()


def fill_form(pg, dataset, output_name, steps, overwrite=False):
    adv = pg.locator("#tune_advanced .label-wrap").first
    if not pg.locator("#tune_resolution").first.is_visible():
        adv.click()
    choose_method(pg, "lora")
    fill(pg, "dataset", dataset)
    fill(pg, "trigger", "zkw")
    fill(pg, "output_name", output_name)
    fill(pg, "steps", steps)
    for key, value in TINY.items():
        fill(pg, key, value)
    fill(pg, "sample_prompts", "zkw, a photo")
    box = pg.locator("#tune_overwrite input").first
    box.set_checked(overwrite)


def wait_value(pg, key, value, timeout=60_000):
    pg.wait_for_function("([k, v]) => document.querySelector(`#tune_${k} input`)?.value === v", arg=[key, value],
                         timeout=timeout)


def job_state(pg):
    return pg.evaluate(STATE_JS) or {}


def wait_state(pg, states, timeout=LONG_MS):
    pg.wait_for_function(f"() => {json.dumps(list(states))}.includes(({STATE_JS})()?.state)", timeout=timeout)
    return job_state(pg)


def wait_step_above(pg, step, timeout=LONG_MS):
    pg.wait_for_function(f"() => Number(({STATE_JS})()?.step) > {int(step)}", timeout=timeout)
    return int(job_state(pg)["step"])


def message(pg):
    return pg.locator("#tune_message").first.inner_text()


def wait_message(pg, text, timeout=120_000):
    pg.wait_for_function("t => (document.querySelector('#tune_message')?.innerText || '').includes(t)", arg=text,
                         timeout=timeout)
    return message(pg)


def wait_images(pg, selector, n=1, timeout=LONG_MS):
    pg.wait_for_function("([sel, n]) => Array.from(document.querySelectorAll(sel))"
                         ".filter(i => i.complete && i.naturalWidth > 0).length >= n",
                         arg=[selector, n], timeout=timeout)


def test_status_validation_and_refusals(webui_js, dataset, output_dir):
    webui = webui_js
    with page(webui.url) as pg:
        open_tune_tab(pg)
        status = pg.locator("#tune_status").first.inner_text()
        assert "tiny-sd1" in status and "SD1" in status, status

        # a method brings its preset, and the preset fills the advanced fields
        choose_method(pg, "ti")
        wait_value(pg, "preset", "ti")
        wait_value(pg, "min_snr_gamma", "0")
        wait_value(pg, "num_vectors", "4")
        choose_method(pg, "lora")
        wait_value(pg, "preset", "character")
        wait_value(pg, "min_snr_gamma", "5")
        wait_value(pg, "network_dim", "16")

        # a bad config: refused with the field and the reason, nothing starts
        fill_form(pg, dataset + "-missing", "tune-ui-bad", 30)
        pg.locator("#tune_start").click()
        text = wait_message(pg, "Cannot start")
        assert "dataset" in text and "does not exist" in text, text
        assert job_state(pg).get("state") in ("none", "done", "interrupted", "failed")
        pg.screenshot(path=str(output_dir / "tune-tab-0-refused.png"), full_page=True)

        # validation: the validator's report (verdict, derived steps, buckets, per-file notes)
        fill(pg, "dataset", dataset)
        pg.locator("#tune_validate").click()
        pg.locator("#tune_report .tune-report").first.wait_for(timeout=120_000)
        report = pg.locator("#tune_report").first.inner_text()
        assert "OK: 0 error(s)" in report and "30 steps" in report and "64x64" in report, report
        assert "trigger_added" in report and "img0.png" in report, report

        # the API request text is the same job
        pg.locator("#tune_api_accordion .label-wrap").first.click()
        pg.locator("#tune_api_build").click()
        pg.wait_for_function("() => (document.querySelector('#tune_api_json textarea')?.value || '').includes('{')",
                             timeout=60_000)
        body = json.loads(pg.locator("#tune_api_json textarea").first.input_value())
        assert body["dataset"] == dataset and body["method"] == "lora" and body["steps"] == 30
        assert body["resolution"] == 64 and body["unet_lr"] == 5e-3 and body["sample_prompts"] == ["zkw, a photo"]
        curl = pg.locator("#tune_api_curl textarea").first.input_value()
        assert curl.startswith("curl -X POST ") and "/tune/v1/train" in curl
        pg.screenshot(path=str(output_dir / "tune-tab-1-validated.png"), full_page=True)


@pytest.fixture
def no_job_left(webui_js):
    """However the test ends, no training job keeps running into the session's next tests."""
    yield
    for j in webui_js.get("/tune/v1/jobs"):
        if j["state"] in ("queued", "running"):
            webui_js.post(f"/tune/v1/jobs/{j['id']}/interrupt")
    deadline = time.time() + 300
    while time.time() < deadline and any(j["state"] in ("queued", "running") for j in webui_js.get("/tune/v1/jobs")):
        time.sleep(1)


def test_train_watch_interrupt_resume_finish_and_use(webui_js, dataset, output_dir, no_job_left):
    webui = webui_js

    def shot(pg, name):
        pg.screenshot(path=str(output_dir / f"tune-tab-{name}.png"), full_page=True)

    with page(webui.url) as pg:
        open_tune_tab(pg)
        # a long run: progress moves, a sample and the plot appear
        fill_form(pg, dataset, "tune-ui-int", 1000, overwrite=True)
        pg.locator("#tune_start").click()
        assert "Started job" in wait_message(pg, "Started job")
        first = wait_step_above(pg, 0)
        wait_step_above(pg, first)
        wait_images(pg, "#tune_gallery img")
        wait_images(pg, "#tune_plot img")
        assert "training lora 'tune-ui-int'" in pg.locator("#tune_log").first.inner_text()
        job_id = job_state(pg)["job"]
        # one job at a time
        pg.locator("#tune_start").click()
        assert "still running" in wait_message(pg, "Cannot start")
        shot(pg, "2-running")

    with page(webui.url) as pg:  # a reload shows the running job
        open_tune_tab(pg)
        st = wait_state(pg, ["running"], timeout=120_000)
        assert st["job"] == job_id
        wait_step_above(pg, int(st["step"]))
        wait_images(pg, "#tune_gallery img")
        shot(pg, "3-reloaded-running")

        pg.locator("#tune_interrupt").click()
        st = wait_state(pg, ["interrupted"])
        stopped_at = int(st["step"])
        assert 0 < stopped_at < 1000
        pg.locator("#tune_resume").wait_for(state="visible", timeout=60_000)
        shot(pg, "4-interrupted")

        # the same output name again, without overwrite: refused, with the reason
        fill_form(pg, dataset, "tune-ui-int", 1000, overwrite=False)
        pg.locator("#tune_start").click()
        text = wait_message(pg, "Cannot start")
        assert "output_name" in text and "exists" in text, text

        # Resume continues from the saved state; the webui's own interrupt stops it too (its Interrupt button, shown
        # in txt2img only while a generation runs, and this API both call shared.state.interrupt())
        pg.locator("#tune_resume").click()
        assert "Resumed job" in wait_message(pg, "Resumed job")
        st = wait_state(pg, ["running"])
        wait_step_above(pg, stopped_at)
        pg.wait_for_function("() => (document.querySelector('#tune_log')?.innerText || '')"
                             ".includes('resumed at step')", timeout=LONG_MS)
        shot(pg, "5-resumed")
        # leaving the tab and coming back shows the job still moving
        step = int(job_state(pg)["step"])
        pg.locator("#tabs > .tab-nav button", has_text="txt2img").first.click()
        pg.locator("#txt2img_prompt textarea").first.wait_for(state="visible", timeout=60_000)
        pg.locator("#tabs > .tab-nav button", has_text="Tune").first.click()
        wait_step_above(pg, step)
        webui.post("/sdapi/v1/interrupt")
        st = wait_state(pg, ["interrupted"])
        assert int(st["step"]) > stopped_at

        # a run to the end
        fill_form(pg, dataset, "tune-ui", 30, overwrite=True)
        pg.locator("#tune_start").click()
        wait_message(pg, "Started job")
        st = wait_state(pg, ["done", "failed"])
        assert st["state"] == "done", pg.locator("#tune_progress").first.inner_text()
        wait_images(pg, "#tune_gallery img", n=3)  # samples at steps 10, 20, 30
        wait_images(pg, "#tune_plot img")
        progress = pg.locator("#tune_progress").first.inner_text()
        assert "step 30 / 30" in progress and "tune-ui.safetensors" in progress, progress
        shot(pg, "6-done")

        # Use it: the tag goes into the txt2img prompt, and txt2img generates with it
        pg.locator("#tune_use").click()
        pg.locator("#txt2img_prompt textarea").first.wait_for(state="visible", timeout=60_000)
        prompt = pg.locator("#txt2img_prompt textarea").first.input_value()
        assert "<tune:tune-ui:1>" in prompt and "zkw" in prompt, prompt
        for sel, value in (("#txt2img_width input[type=number]", 64), ("#txt2img_height input[type=number]", 64),
                           ("#txt2img_steps input[type=number]", 4)):
            el = pg.locator(sel).first
            el.fill(str(value))
            el.dispatch_event("blur")
        pg.locator("#txt2img_generate").click()
        wait_images(pg, "#txt2img_gallery img")
        pg.wait_for_function("() => (document.querySelector('#html_info_txt2img')?.innerText || '')"
                             ".includes('Tune hashes: \"tune-ui: ')", timeout=LONG_MS)
        shot(pg, "7-txt2img")
