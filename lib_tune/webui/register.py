"""Registers sd-webui-tune with the webui: settings, the Tune tab, the `tune` extra network and its page, API
routes, and the checkpoint guard.

The checkpoint guard: while a training job is queued or running, anything that would replace or unload the loaded
model (Settings / the checkpoint dropdown / POST /sdapi/v1/options with sd_model_checkpoint, a txt2img with
override_settings sd_model_checkpoint or a refiner, fp8 changes, Unload checkpoint) is refused: the webui's
sd_models.reload_model_weights / load_model / unload_model_weights are wrapped and raise CheckpointLocked with
"sd-webui-tune: training 'NAME' is running on CHECKPOINT; interrupt it before switching checkpoints". The webui's
Options.set then prints it, restores the old value and the dropdown snaps back (a popup in the UI too);
process_images fails with it (HTTP 500 naming it) and restores its overridden options. A call that would change
nothing (processing.py re-checks the model before each batch) passes. Calls from the training thread itself (its
sample previews, class images) never switch: they get the model they train on.

Kept cheap at import (the webui imports it at start-up): heavy parts are imported inside the callbacks.
"""
from modules import script_callbacks, shared

from . import networks, settings


def _on_ui_settings():
    for key, info in settings.options().items():
        shared.opts.add_option(key, info)


def _on_ui_tabs():
    from ..ui import tab
    return [(tab.build(), "Tune", "tune_tab")]


def _on_before_ui():
    from ..ui import extra_page
    extra_page.register()


def _on_app_started(_demo, app):
    from . import api
    api.add_routes(app)


class CheckpointLocked(RuntimeError):
    """A checkpoint switch refused because a training job runs on the loaded model."""


def _training_job():
    from . import job_runner
    return job_runner.registry.running()


def _refuse(action: str):
    """Raise CheckpointLocked when a job is queued/running (console line, popup in a gradio request, job log)."""
    job = _training_job()
    if job is None:
        return
    from modules import sd_models
    from ..train.job import model_title
    model = sd_models.model_data.sd_model  # not shared.sd_model: with no model it would load one
    info = getattr(model, "sd_checkpoint_info", None)
    title = model_title(model) or "the loaded checkpoint"
    name = job.config.get("output_name") or job.id
    message = f"sd-webui-tune: training '{name}' is running on {title}; interrupt it before {action}"
    print(message)
    job.log(f"refused {action}")
    if info is not None:  # the setting names the checkpoint still loaded, also where nothing restores it
        # (a txt2img with override_settings_restore_afterwards false)
        from modules import shared
        named = sd_models.get_closet_checkpoint_match(str(shared.opts.data.get("sd_model_checkpoint") or ""))
        if named is None or named.filename != info.filename:
            shared.opts.data["sd_model_checkpoint"] = info.title
    try:
        import gradio as gr
        gr.Warning(message)
    except Exception:  # outside a gradio request (API calls) there is no popup
        pass
    raise CheckpointLocked(message)


def _in_training_thread() -> bool:
    import threading
    from . import job_runner
    return job_runner._thread is not None and threading.current_thread() is job_runner._thread


def install_checkpoint_guard():
    """Wrap the webui's model (re)loading functions (idempotent: a UI reload re-runs setup())."""
    import functools
    from modules import devices, sd_models

    if getattr(sd_models.reload_model_weights, "_tune_guard", False):
        return
    reload_orig = sd_models.reload_model_weights
    load_orig = sd_models.load_model
    unload_orig = sd_models.unload_model_weights

    @functools.wraps(reload_orig)
    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        if _training_job() is not None:
            current = sd_models.model_data.sd_model
            if _in_training_thread():
                return current  # the trainer's own previews: always the model it trains
            target = info or sd_models.select_checkpoint()
            noop = (current is not None and not forced_reload and sd_model in (None, current)
                    and getattr(current, "sd_model_checkpoint", None) == target.filename
                    and sd_models.check_fp8(current) == devices.fp8)
            if not noop:
                _refuse("switching checkpoints")
        return reload_orig(sd_model=sd_model, info=info, forced_reload=forced_reload)

    @functools.wraps(load_orig)
    def load_model(*args, **kwargs):
        _refuse("switching checkpoints")
        return load_orig(*args, **kwargs)

    @functools.wraps(unload_orig)
    def unload_model_weights(*args, **kwargs):
        _refuse("unloading the checkpoint")
        return unload_orig(*args, **kwargs)

    for fn in (reload_model_weights, load_model, unload_model_weights):
        fn._tune_guard = True
    sd_models.reload_model_weights = reload_model_weights
    sd_models.load_model = load_model
    sd_models.unload_model_weights = unload_model_weights


def setup():
    networks.setup()
    install_checkpoint_guard()
    script_callbacks.on_ui_settings(_on_ui_settings, name="sd-webui-tune settings")
    script_callbacks.on_before_ui(_on_before_ui, name="sd-webui-tune extra networks page")
    script_callbacks.on_ui_tabs(_on_ui_tabs, name="sd-webui-tune tab")
    script_callbacks.on_app_started(_on_app_started, name="sd-webui-tune api")
