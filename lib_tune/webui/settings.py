"""The "Tune" section of the webui's Settings."""
from modules import shared

SECTION = ("tune", "Tune")


def options():
    import gradio as gr
    items = {
        "tune_default_weight": shared.OptionInfo(
            1.0, "Default weight of <tune:name> without a number", gr.Slider,
            {"minimum": 0.0, "maximum": 2.0, "step": 0.05}),
        "tune_handle_lora_tags": shared.OptionInfo(
            False, "Also handle <lora:...> and <lyco:...> tags (instead of the built-in Lora)").needs_reload_ui(),
        "tune_cache_adapters": shared.OptionInfo(
            4, "Adapter files kept in memory between generations", gr.Number, {"precision": 0}),
        "tune_warn_in_ui": shared.OptionInfo(True, "Show adapter warnings (unknown name, bad tag) as a popup"),
        "tune_hashes_to_infotext": shared.OptionInfo(True, "Add adapter hashes to infotext"),
    }
    for info in items.values():
        info.section = SECTION
    return items
