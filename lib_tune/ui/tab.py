"""The top-level "Tune" tab: a form that builds the same JSON job as `POST /tune/v1/train`, the dataset check,
start, live progress of the current job, and what to do with the result.

How live progress works in gradio 3.41: javascript/tune.js clicks the hidden `#tune_poll` button every 1.5 s
while this tab is visible and the shown job is queued or running (and once whenever the tab is opened). The
job lives server-side in job_runner.registry, so a reload or another browser sees the same run. The poll answers
only what changed since the browser's last poll (a gr.State holds what it was sent): the gallery and the plot
are re-sent only when there are new samples / steps, so they do not flicker.

Images go out as PIL images marked `already_saved_as` their file: the webui's gradio patch then serves that
file instead of writing a temporary copy every poll.
"""
from __future__ import annotations

import html
import os
import threading
from typing import Any, Dict, List, Optional

import gradio as gr

from ..train.config import ConfigError
from ..webui import status as webui_status
from . import form
from .plot import training_plot
from .progress import ACTIVE, events_html, message_html, progress_html, report_html

DATASET_KEYS = ("dataset", "trigger", "default_caption", "shuffle_caption", "keep_tokens", "caption_dropout",
                "flip_aug")
PRIOR_KEYS = ("prior", "class_dir", "class_prompt", "prior_loss_weight")
TASK_KEYS = ("method", "preset", "steps", "output_name", "overwrite")
NETWORK_KEYS = ("targets", "network_dim", "network_alpha", "conv_dim", "train_text_encoder")
EMBEDDING_KEYS = ("num_vectors", "init_text", "emb_lr")
RATE_KEYS = ("unet_lr", "te_lr", "optimizer", "lr_scheduler", "warmup_ratio", "min_snr_gamma", "noise_offset")
DATA_KEYS = ("resolution", "min_bucket", "max_bucket", "batch_size", "gradient_accumulation",
             "gradient_checkpointing", "mixed_precision", "save_every", "seed", "on_bad_image")
SAMPLE_KEYS = ("sample_prompts", "sample_every", "sample_steps")
VALIDATION_KEYS = ("validation_count", "validation_split", "validation_every", "validation_timesteps",
                   "early_stopping_patience", "early_stopping_min_delta", "keep_best")


def _status_markdown() -> str:
    s = webui_status.status()
    text = (f"**sd-webui-tune {s['version']}** · base model: **{s['model'] or 'none loaded'}** "
            f"({s['architecture']})")
    if s.get("adapters") is not None:
        text += f" · adapters: {s['adapters']}"
    skipped = s.get("skipped_files") or []
    if skipped:
        rows = "".join(f"<li><code>{html.escape(x['path'])}</code>: {html.escape(x['reason'])}</li>" for x in skipped)
        text += (f"\n\n<details id=\"tune_skipped_files\"><summary>{len(skipped)} file(s) in the Lora folder "
                 f"skipped (not adapters)</summary><ul>{rows}</ul></details>")
    return text


def _job_runner():
    from ..webui import job_runner
    return job_runner


def _component(f: form.Field, value: Any):
    eid = f"tune_{f.key}"
    if f.kind == "bool":
        return gr.Checkbox(label=f.label, value=bool(value), elem_id=eid)
    if f.kind == "choice":
        if f.key == "method":
            return gr.Radio(label=f.label, choices=list(f.choices), value=value, elem_id=eid)
        return gr.Dropdown(label=f.label, choices=list(f.choices), value=value, elem_id=eid, info=f.info or None)
    if f.kind == "int":
        return gr.Number(label=f.label, value=value, precision=0, elem_id=eid, info=f.info or None)
    if f.kind == "float":
        return gr.Number(label=f.label, value=value, elem_id=eid, info=f.info or None)
    if f.kind == "lines":
        return gr.Textbox(label=f.label, value=value, lines=3, elem_id=eid)
    if f.kind == "json":
        return gr.Textbox(label=f.label, value=value, lines=4, elem_id=eid, info=f.info or None,
                          placeholder='[{"targets": "mid_proj", "steps": 200}, '
                                      '{"targets": "cross_attn", "steps": 300}]')
    return gr.Textbox(label=f.label, value=value, lines=1, elem_id=eid, info=f.info or None)


def _base_url() -> str:
    from modules import shared
    opts = shared.cmd_opts
    host = getattr(opts, "server_name", None) or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    return f"http://{host}:{getattr(opts, 'port', None) or 7860}"


# ---- job read-outs -------------------------------------------------------------------------------------------
def _current_job() -> Optional[Dict[str, Any]]:
    """The job the tab shows: the running one, else the latest."""
    runner = _job_runner()
    job = runner.registry.running() or (runner.registry.list() or [None])[-1]
    return job.to_dict() if job is not None else None


def _saved_image(path: str):
    """A PIL image of a file on disk that the webui's gradio patch serves as that file (no temporary copy)."""
    from PIL import Image
    img = Image.open(path)
    img.already_saved_as = path
    return img


def _gallery(job: Dict[str, Any]) -> List:
    return [(_saved_image(s["path"]), f"step {s['step']}: {s['prompt']}") for s in job.get("samples") or []
            if os.path.isfile(s.get("path", ""))]


def _plot(job: Dict[str, Any]):
    path = os.path.join(_job_runner().data_dir(), "plots", f"{job['id']}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    first = 1 + max(0, (job.get("step") or 0) - len(job.get("losses") or []))
    img = training_plot(job.get("losses") or [], job.get("lrs") or [], first_step=first,
                        title=f"{job.get('output_name')}: training loss",
                        val_losses=job.get("val_losses") or [], best_step=job.get("best_step"))
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)  # another browser's poll may be serving this file right now: never a half-written one
    return _saved_image(path)


def _readout(job: Optional[Dict[str, Any]], seen: Optional[Dict[str, Any]]):
    """Outputs for the progress area; gallery and plot only when they changed since `seen`."""
    seen = seen if isinstance(seen, dict) else {}
    if job is None:
        return (progress_html(None), gr.update(), gr.update(), events_html(None), {}, gr.update(visible=False),
                gr.update(visible=False), gr.update(visible=False), "")
    same_job = seen.get("id") == job["id"]
    n_samples, n_losses = len(job.get("samples") or []), len(job.get("losses") or [])
    n_val = len(job.get("val_losses") or [])
    gallery = gr.update(value=_gallery(job)) if not same_job or seen.get("samples") != n_samples else gr.update()
    plot = gr.update(value=_plot(job)) if not same_job or seen.get("losses") != n_losses or \
        seen.get("val", 0) != n_val else gr.update()
    active = job["state"] in ACTIVE
    use = form.use_text(job)
    return (progress_html(job), gallery, plot, events_html(job), {"id": job["id"], "samples": n_samples,
                                                                 "losses": n_losses, "val": n_val},
            gr.update(visible=active), gr.update(visible=bool(use) and not active),
            gr.update(visible=not active and job["state"] in ("interrupted", "failed")), use)


# ---- actions -------------------------------------------------------------------------------------------------
def _config_error(prefix: str, e: ConfigError) -> str:
    return message_html(f"{prefix}: {e.field}: {e.message}", ok=False)


def build() -> gr.Blocks:
    values0 = form.initial_values()
    comps: Dict[str, Any] = {}

    def make(keys):
        for k in keys:
            comps[k] = _component(form.BY_KEY[k], values0[k])

    def section(title, keys, first):
        """A titled group: the first `first` fields one under the other, the rest side by side."""
        with gr.Group():
            gr.Markdown(f"### {title}")
            make(keys[:first])
            with gr.Row():
                make(keys[first:])

    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row(elem_id="tune_status_row"):
            status = gr.Markdown(_status_markdown, elem_id="tune_status")
            refresh = gr.Button("Refresh", elem_id="tune_status_refresh", scale=0)
        with gr.Row():
            with gr.Column(scale=3):
                section("Dataset", DATASET_KEYS, 3)
                section("Method", TASK_KEYS, 2)
                with gr.Accordion("Advanced", open=False, elem_id="tune_advanced"):
                    with gr.Row():
                        make(NETWORK_KEYS)
                    make(("stages",))
                    with gr.Row():
                        make(RATE_KEYS)
                    with gr.Row():
                        make(EMBEDDING_KEYS)
                    with gr.Row():
                        make(DATA_KEYS)
                    with gr.Row():
                        make(PRIOR_KEYS)
                    with gr.Row():
                        make(VALIDATION_KEYS)
                section("Samples", SAMPLE_KEYS, 1)
                with gr.Accordion("Copy as API request", open=False, elem_id="tune_api_accordion"):
                    api_build = gr.Button("Build from the form", elem_id="tune_api_build")
                    api_json = gr.Textbox(label="POST /tune/v1/train body", lines=12, elem_id="tune_api_json",
                                          show_copy_button=True, interactive=False)
                    api_curl = gr.Textbox(label="curl", lines=2, elem_id="tune_api_curl", show_copy_button=True,
                                          interactive=False)
            with gr.Column(scale=2):
                with gr.Row():
                    validate_btn = gr.Button("Validate", elem_id="tune_validate")
                    start_btn = gr.Button("Start training", variant="primary", elem_id="tune_start")
                message = gr.HTML(elem_id="tune_message")
                report = gr.HTML(elem_id="tune_report")
                progress = gr.HTML(progress_html(None), elem_id="tune_progress")
                with gr.Row():
                    interrupt_btn = gr.Button("Interrupt", elem_id="tune_interrupt", visible=False)
                    use_btn = gr.Button("Use it", variant="primary", elem_id="tune_use", visible=False)
                    resume_btn = gr.Button("Resume", elem_id="tune_resume", visible=False)
                gallery = gr.Gallery(label="Samples", elem_id="tune_gallery", columns=4, height=240,
                                     object_fit="contain")
                plot = gr.Image(label="Loss and learning rate", show_label=False, show_download_button=False,
                                type="pil", interactive=False, elem_id="tune_plot")
                log = gr.HTML(events_html(None), elem_id="tune_log")
        poll_btn = gr.Button(visible=False, elem_id="tune_poll")
        use_value = gr.Textbox(visible=False, elem_id="tune_use_value")
        seen = gr.State({})

        keys = list(comps)
        inputs = [comps[k] for k in keys]
        readout = [progress, gallery, plot, log, seen, interrupt_btn, use_btn, resume_btn, use_value]

        def job_from(args):
            return form.to_job(form.values_from(keys, args))

        def on_refresh():
            return _status_markdown()

        def on_preset(preset):
            vals = form.preset_values(preset)
            return [gr.update(value=vals[k]) for k in form.PRESET_KEYS]

        def on_method(method, preset, prior, class_dir):
            return (gr.update(value=form.preset_for_method(method, preset)),
                    gr.update(value=form.prior_for_method(method, prior, class_dir)))

        def on_api(*args):
            try:
                return form.api_request(job_from(args), _base_url())
            except ConfigError as e:  # a malformed JSON field (stages)
                return f"{e.field}: {e.message}", ""

        def on_validate(*args):
            try:
                job = job_from(args)
            except ConfigError as e:  # a malformed JSON field (stages)
                return (_config_error("Not valid", e), "", "", "")
            api = form.api_request(job, _base_url())
            try:
                rep = _job_runner().check_dataset(form.dataset_check_body(job))
            except ConfigError as e:
                return (_config_error("Not valid", e), "") + api
            ok = rep.get("ok")
            return (message_html("The dataset is ready." if ok else "The dataset has errors (see below).", ok=ok),
                    report_html(rep)) + api

        def start(body, seen_state, verb="start", done="Started"):
            try:
                _job_runner().start(body)
            except ConfigError as e:
                return (_config_error(f"Cannot {verb}", e),) + _readout(_current_job(), seen_state)
            job = _current_job()
            return (message_html(f"{done} job {job['id']}."),) + _readout(job, seen_state)

        def on_start(seen_state, *args):
            try:
                job = job_from(args)
            except ConfigError as e:  # a malformed JSON field (stages)
                return (_config_error("Cannot start", e),) + _readout(_current_job(), seen_state) + ("", "")
            return start(job, seen_state, "start") + form.api_request(job, _base_url())

        def on_resume(seen_state):
            job = _current_job()
            if job is None:
                return (message_html("No job to resume.", ok=False),) + _readout(None, seen_state)
            return start(form.resume_body(job["config"]), seen_state, "resume", "Resumed")

        def on_interrupt(seen_state):
            runner = _job_runner()
            running = runner.registry.running()
            if running is not None:
                runner.interrupt(running.id)
            return _readout(_current_job(), seen_state)

        def on_poll(seen_state):
            return _readout(_current_job(), seen_state)

        refresh.click(fn=on_refresh, inputs=[], outputs=[status])
        comps["preset"].change(fn=on_preset, inputs=[comps["preset"]], outputs=[comps[k] for k in form.PRESET_KEYS],
                               queue=False, show_progress="hidden")
        comps["method"].change(fn=on_method, inputs=[comps[k] for k in ("method", "preset", "prior", "class_dir")],
                               outputs=[comps["preset"], comps["prior"]], queue=False, show_progress="hidden")
        api_build.click(fn=on_api, inputs=inputs, outputs=[api_json, api_curl], queue=False)
        validate_btn.click(fn=on_validate, inputs=inputs, outputs=[message, report, api_json, api_curl])
        start_btn.click(fn=on_start, inputs=[seen] + inputs, outputs=[message] + readout + [api_json, api_curl])
        resume_btn.click(fn=on_resume, inputs=[seen], outputs=[message] + readout)
        interrupt_btn.click(fn=on_interrupt, inputs=[seen], outputs=readout, queue=False)
        poll_btn.click(fn=on_poll, inputs=[seen], outputs=readout, queue=False, show_progress="hidden")
        use_btn.click(fn=None, _js="tune_use_it", inputs=[use_value], outputs=[])
    return blocks
