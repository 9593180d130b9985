"""The Tune tab's read-outs: the progress box tells the poller the state, shows step/total, loss, ETA and
errors; the dataset check's report shows verdict, derived steps, buckets and per-file problems; all user text is
escaped."""
import re

from lib_tune.ui import progress


def job(**over):
    d = dict(id="1-1", state="running", step=12, total=30, output_name="me", method="lora", loss=0.1234567,
             eta_seconds=75.4, error=None, output_path=None, resumed_from=None, events=["12:00:00 a", "12:00:01 b"])
    d.update(over)
    return d


def attr(html, name):
    return re.search(fr'data-{name}="([^"]*)"', html).group(1)


def test_running_job_shows_progress_and_state_for_the_poller():
    h = progress.progress_html(job())
    assert attr(h, "state") == "running" and attr(h, "step") == "12" and attr(h, "job") == "1-1"
    assert "step 12 / 30" in h and "loss 0.1235" in h and "ETA 1:15" in h and "width:40.0%" in h


def test_every_answer_has_a_new_poll_counter():
    a, b = progress.progress_html(job()), progress.progress_html(job())
    assert attr(a, "poll") != attr(b, "poll")
    assert attr(progress.progress_html(None), "state") == "none"


def test_finished_and_failed_jobs_show_file_error_and_resume_point():
    h = progress.progress_html(job(state="done", step=30, output_path="/l/me.safetensors", eta_seconds=None))
    assert attr(h, "state") == "done" and "/l/me.safetensors" in h and "ETA –" in h
    h = progress.progress_html(job(state="failed", error="dataset: <bad>", resumed_from=10))
    assert "dataset: &lt;bad&gt;" in h and "<bad>" not in h and "resumed from step 10" in h


def test_user_text_is_escaped():
    h = progress.progress_html(job(output_name='<img src=x onerror="alert(1)">'))
    assert "<img" not in h
    assert "<script" not in progress.events_html(job(events=["<script>x</script>"]))
    assert "&lt;b&gt;" in progress.message_html("<b>", ok=False)
    assert progress.message_html("") == ""


def test_format_eta_and_loss():
    assert progress.format_eta(None) == "–" and progress.format_eta(float("nan")) == "–"
    assert progress.format_eta(5) == "0:05" and progress.format_eta(3725) == "1:02:05"
    assert progress.format_loss(None) == "–" and progress.format_loss(float("nan")) == "nan"


def test_events_are_the_last_ones_in_order():
    h = progress.events_html(job(events=[f"e{i}" for i in range(300)]), last=5)
    assert h.index("e295") < h.index("e299") and "e294" not in h


def test_report_shows_verdict_steps_buckets_and_problems_per_file():
    rep = dict(ok=False, num_images=4, num_images_with_repeats=40, num_class_images=0, batches_per_epoch=40,
               steps_per_epoch=40, epochs=3, total_steps=120, bucket_histogram={"64x64": 36, "64x128": 4},
               problems=[dict(severity="warning", code="no_caption", message="no caption", path="/d/a.png"),
                         dict(severity="error", code="corrupt_image", message="cannot read <x>", path="/d/b.png")]
               + [dict(severity="info", code="default_caption", message="used", path=f"/d/{i}.png")
                  for i in range(5)])
    h = progress.report_html(rep)
    assert "NOT READY: 1 error(s), 1 warning(s)" in h and "<b>120 steps</b>" in h
    assert "64x64</td><td>36" in h and "64x128</td><td>4" in h
    assert h.index("corrupt_image") < h.index("no_caption")  # errors first
    assert "/d/b.png" in h and "cannot read &lt;x&gt;" in h
    assert h.count("<td>default_caption</td>") == progress.INFOS_PER_CODE + 1 and "and 2 more" in h
    ok = progress.report_html(dict(ok=True, problems=[], bucket_histogram={}))
    assert "OK: 0 error(s), 0 warning(s)" in ok and "tune-buckets" not in ok
