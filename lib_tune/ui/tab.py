"""The top-level "Tune" tab."""
import gradio as gr

from ..webui import status as webui_status


def _status_markdown() -> str:
    s = webui_status.status()
    return (f"**sd-webui-tune {s['version']}** · base model: **{s['model'] or 'none loaded'}** "
            f"({s['architecture']})")


def build() -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row(elem_id="tune_status_row"):
            status = gr.Markdown(_status_markdown, elem_id="tune_status")
            refresh = gr.Button("Refresh", elem_id="tune_status_refresh", scale=0)
        refresh.click(fn=_status_markdown, inputs=[], outputs=[status])
    return blocks
