"""HTML for the Tune tab's read-outs: a job's progress, its event log, the dataset check's report and
messages. Pure (no gradio, no webui) and escaped throughout: paths, captions and errors are user text.

The progress box carries `data-state` and `data-poll`: javascript/tune.js reads the state to decide whether to
keep polling, and the poll counter to know that the previous poll has answered.
"""
from __future__ import annotations

import html
import itertools
import math
from typing import Any, Dict, Optional

ACTIVE = ("queued", "running")
INFOS_PER_CODE = 3
_COLORS = {"queued": "#888", "running": "#2a7ae2", "done": "#2e9d4a", "failed": "#d33", "interrupted": "#d98b00"}
_polls = itertools.count(1)

# polls replace the read-outs every 1.5 s: gradio's "pending" dimming of outputs would make them flicker
_STYLE = """<style>
#tune_progress .pending,#tune_log .pending{opacity:1!important}
.tune-progress{padding:8px 0}
.tune-bar{height:14px;border-radius:7px;background:rgba(128,128,128,.25);overflow:hidden;margin:6px 0}
.tune-bar>div{height:100%;background:#2a7ae2;transition:width .4s}
.tune-state{display:inline-block;padding:1px 8px;border-radius:8px;color:#fff;font-weight:600}
.tune-table{border-collapse:collapse;margin:4px 0}
.tune-table td,.tune-table th{border:1px solid rgba(128,128,128,.35);padding:2px 8px;text-align:left}
.tune-msg-error{color:#d33!important;font-weight:600}
.tune-msg-ok{color:#2e9d4a!important;font-weight:600}
.tune-log{max-height:14em;overflow:auto;font-size:90%;margin:0;white-space:pre-wrap}
</style>"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_loss(loss: Optional[float]) -> str:
    if loss is None:
        return "–"
    return f"{loss:.4f}" if math.isfinite(loss) else str(loss)


def progress_html(job: Optional[Dict[str, Any]]) -> str:
    """A job's state, step/total bar, loss, ETA, error and output file; a placeholder without a job."""
    poll = next(_polls)
    if not job:
        return (f'{_STYLE}<div class="tune-progress" data-state="none" data-poll="{poll}">'
                f'No training job yet.</div>')
    state = job.get("state", "?")
    step, total = int(job.get("step") or 0), int(job.get("total") or 0)
    pct = 100.0 * step / total if total else 0.0
    parts = [f'<span class="tune-state" style="background:{_COLORS.get(state, "#888")}">{_e(state)}</span> '
             f'<b>{_e(job.get("output_name") or "")}</b> ({_e(job.get("method") or "")}) · job {_e(job.get("id"))}',
             f'<div class="tune-bar"><div style="width:{pct:.1f}%"></div></div>',
             f'<span class="tune-step">step {step} / {total}</span> · loss {_e(format_loss(job.get("loss")))}'
             f' · ETA {_e(format_eta(job.get("eta_seconds")))}']
    stage = job.get("stage")
    if stage:  # a staged plan: the stage running now and how far it is
        parts.append(f'<div class="tune-stage">stage {int(stage.get("index", 0)) + 1}/{int(stage.get("of") or 1)}: '
                     f'<b>{_e(stage.get("name") or "")}</b> · step {int(stage.get("step") or 0)} / '
                     f'{int(stage.get("steps") or 0)} of this stage</div>')
    if job.get("resumed_from"):
        parts.append(f'<div>resumed from step {int(job["resumed_from"])}</div>')
    if job.get("error"):
        parts.append(f'<div class="tune-msg-error">{_e(job["error"])}</div>')
    if job.get("output_path"):
        parts.append(f'<div>file: <code>{_e(job["output_path"])}</code></div>')
    return (f'{_STYLE}<div class="tune-progress" data-state="{_e(state)}" data-job="{_e(job.get("id"))}" '
            f'data-step="{step}" data-poll="{poll}">' + "".join(parts) + "</div>")


def events_html(job: Optional[Dict[str, Any]], last: int = 200) -> str:
    events = list((job or {}).get("events") or [])[-last:]
    return f'<pre class="tune-log" id="tune_log_pre">{_e(chr(10).join(events))}</pre>'


def message_html(text: str, ok: bool = True) -> str:
    if not text:
        return ""
    return f'<div class="tune-msg-{"ok" if ok else "error"}">{_e(text)}</div>'


def report_html(report: Dict[str, Any]) -> str:
    """The dataset check's report: verdict, counts, derived steps, the bucket histogram and every problem with its
    file."""
    ok = bool(report.get("ok"))
    problems = report.get("problems") or []
    n_err = sum(1 for p in problems if p.get("severity") == "error")
    n_warn = sum(1 for p in problems if p.get("severity") == "warning")
    out = [_STYLE, '<div class="tune-report">',
           f'<div class="tune-msg-{"ok" if ok else "error"}">{"OK" if ok else "NOT READY"}: '
           f'{n_err} error(s), {n_warn} warning(s)</div>',
           f'<div>images: {int(report.get("num_images") or 0)} '
           f'({int(report.get("num_images_with_repeats") or 0)} with repeats)'
           + (f', class images: {int(report["num_class_images"])}' if report.get("num_class_images") else "")
           + '</div>',
           f'<div>steps: {int(report.get("batches_per_epoch") or 0)} batches/epoch, '
           f'{int(report.get("steps_per_epoch") or 0)} steps/epoch, {int(report.get("epochs") or 0)} epoch(s), '
           f'<b>{int(report.get("total_steps") or 0)} steps</b> in total</div>']
    hist = report.get("bucket_histogram") or {}
    if hist:
        top = max(hist.values()) or 1
        rows = "".join(f'<tr><td>{_e(k)}</td><td>{int(v)}</td><td><div style="background:#2a7ae2;height:10px;'
                       f'width:{max(2, int(120 * v / top))}px"></div></td></tr>' for k, v in hist.items())
        out.append(f'<table class="tune-table tune-buckets"><tr><th>bucket</th><th>samples/epoch</th><th></th></tr>'
                   f'{rows}</table>')
    if problems:
        order = {"error": 0, "warning": 1, "info": 2}
        shown, rows, hidden = {}, [], {}
        for p in sorted(problems, key=lambda p: order.get(p.get("severity"), 3)):
            code = p.get("code", "")
            if p.get("severity") == "info":  # infos repeat per file (e.g. default caption used): a few per code
                shown[code] = shown.get(code, 0) + 1
                if shown[code] > INFOS_PER_CODE:
                    hidden[code] = hidden.get(code, 0) + 1
                    continue
            rows.append(f'<tr><td>{_e(p.get("severity", ""))}</td><td>{_e(code)}</td>'
                        f'<td>{_e(p.get("message", ""))}</td><td>{_e(p.get("path") or "")}</td></tr>')
        rows += [f'<tr><td>info</td><td>{_e(c)}</td><td>... and {n} more</td><td></td></tr>' for c, n in hidden.items()]
        rows = "".join(rows)
        out.append(f'<table class="tune-table tune-problems"><tr><th>severity</th><th>code</th><th>problem</th>'
                   f'<th>file</th></tr>{rows}</table>')
    out.append("</div>")
    return "".join(out)
