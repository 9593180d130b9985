"""The webui's job runner: it starts training jobs (train/job.py: a job's state and pure logic) inside the webui,
one at a time, on the loaded model, as a webui job, and keeps them in its registry.

- The webui's queue lock is taken for each training step (not for the whole run): a txt2img sent during training
  waits at most one step and runs between two steps, on the model without the training adapter (the trainer
  applies its adapter only inside the step). `<tune:output_name>` in that txt2img uses the adapter's current
  weights (Runtime.live).
- Progress goes to shared.state (job, step of total, text info with the loss); the webui's Interrupt (or
  POST /tune/v1/jobs/{id}/interrupt) stops within one step and saves.
- Samples every N steps are rendered by the webui's own sampler with the current adapter.
- Switching the checkpoint while a job runs is refused (register.install_checkpoint_guard wraps the webui's
  model loading); should the model object change anyway, the job fails at its next step with a message saying so
  (job.check_model) rather than train an object the webui no longer uses.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Dict, Optional, Tuple

from modules import shared

from ..train.config import ConfigError, TrainConfig
from ..train.job import Job, JobHooks, JobRegistry, output_file, run_job, dataset_report
from . import networks

registry = JobRegistry()
_thread: Optional[threading.Thread] = None
_RESERVED = ("overwrite", "resume")


def data_dir() -> str:
    base = getattr(shared.cmd_opts, "data_dir", None) or shared.data_path
    d = os.path.join(base, "tune")
    os.makedirs(d, exist_ok=True)
    return d


def embeddings_dir() -> str:
    return getattr(shared.cmd_opts, "embeddings_dir", None) or os.path.join(shared.data_path, "embeddings")


def build_config(data: Dict[str, Any]) -> Tuple[TrainConfig, Dict[str, Any]]:
    """A validated TrainConfig from API/UI JSON, with the webui's folders filled in; raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError("body", "the job must be a JSON object")
    extra = {k: data[k] for k in _RESERVED if k in data}
    body = {k: v for k, v in data.items() if k not in _RESERVED}
    cfg = TrainConfig.from_dict(body)
    if not os.path.isdir(cfg.dataset):
        raise ConfigError("dataset", f"folder {cfg.dataset!r} does not exist on the server")
    if cfg.output_dir is None:
        cfg.output_dir = embeddings_dir() if cfg.method == "ti" else networks.lora_dirs()[0]
    if cfg.state_dir is None:
        cfg.state_dir = os.path.join(data_dir(), "states", cfg.output_name)
    cfg.validate()
    if os.path.exists(output_file(cfg)) and not extra.get("overwrite") and not extra.get("resume"):
        raise ConfigError("output_name", f"{output_file(cfg)} exists (set overwrite to replace it, or resume)")
    return cfg, extra


def _model_resolution() -> int:
    m = shared.sd_model
    return 1024 if getattr(m, "is_sdxl", False) else 768 if getattr(m, "parameterization", "eps") == "v" else 512


def check_dataset(data: Dict[str, Any]) -> Dict[str, Any]:
    """The dataset check's report for the same body POST /tune/v1/train takes (nothing starts; the route is
    POST /tune/v1/validate)."""
    body = {k: v for k, v in data.items() if k not in ("sample_prompts", "sample_steps")}
    cfg, _ = build_config(dict(body, overwrite=True))
    return dataset_report(cfg, _model_resolution())


def _run_info() -> Dict[str, Any]:
    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    out: Dict[str, Any] = {}
    if info is not None:
        out["sd_model_name"] = getattr(info, "name_for_extra", None) or getattr(info, "model_name", None)
        out["sd_model_hash"] = getattr(info, "hash", None)
        out["new_sd_model_hash"] = getattr(info, "sha256", None)
    out["clip_skip"] = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
    return out


class _WebuiHooks:
    """shared.state progress, the queue lock per step, samples through the webui's sampler."""

    def __init__(self, job: Job, cfg: TrainConfig, sample_prompts, sample_dir: str):
        self.job, self.cfg = job, cfg
        self.sample_prompts = sample_prompts
        self.sample_dir = sample_dir
        self.trainer = None

    @contextlib.contextmanager
    def step_context(self):
        from modules.call_queue import queue_lock
        with queue_lock:
            shared.state.job = "Tune training"
            yield

    def on_start(self, job, trainer):
        self.trainer = trainer
        shared.state.begin(job="Tune training")
        shared.state.job_count = 1
        shared.state.sampling_steps = job.total
        shared.state.sampling_step = job.step
        rt = networks.runtime()
        from ..formats.model import AdapterFile
        if trainer.adapter.has_network:
            rt.live[self.cfg.output_name] = AdapterFile(path=f"<training {self.cfg.output_name}>",
                                                         modules=dict(trainer.adapter.modules),
                                                         architecture=trainer.adapter.architecture)

    def on_step(self, job):
        st = shared.state
        st.sampling_steps = job.total
        st.sampling_step = job.step
        loss = job.losses[-1] if job.losses else float("nan")
        st.textinfo = f"Tune: step {job.step}/{job.total}, loss {loss:.4f}"
        if job.stage:  # a staged plan: which stage runs
            st.textinfo += f", stage {job.stage['index'] + 1}/{job.stage['of']}: {job.stage['name']}"

    def should_stop(self):
        return bool(shared.state.interrupted)

    def on_sample(self, job, step):
        from .render import render
        os.makedirs(self.sample_dir, exist_ok=True)
        m = shared.sd_model
        size = self.cfg.resolution or _model_resolution()
        for i, prompt in enumerate(self.sample_prompts):
            img = render(m, prompt, seed=int(self.cfg.seed) + i, width=size, height=size,
                         steps=int(self.cfg_value("sample_steps", 20)), cfg_scale=7.0, sampler="Euler")
            if img is None:
                continue
            path = os.path.join(self.sample_dir, f"step{step:06d}-{i}.png")
            img.save(path)
            job.samples.append({"step": step, "prompt": prompt, "path": path})
            shared.state.assign_current_image(img)

    def cfg_value(self, name, default):
        return self.job.config.get(name, default)

    def on_end(self, job):
        networks.runtime().live.pop(self.cfg.output_name, None)
        shared.state.end()
        lib = networks.runtime().library
        lib.refresh()
        import sys
        builtin = sys.modules.get("networks")  # the built-in Lora lists the new file without a restart
        if builtin is not None and hasattr(builtin, "list_available_networks"):
            try:
                builtin.list_available_networks()
            except Exception:
                pass
        if self.cfg.method == "ti":
            try:
                from modules import sd_hijack
                sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
            except Exception:
                pass


def _class_images(job: Job, cfg: TrainConfig) -> None:
    """DreamBooth class images: render the missing ones (cached by model, prompt, resolution, seed, sampler)
    and point cfg.class_dir at their folder; nothing to do without num_class_images."""
    from . import class_images
    plan = class_images.plan(cfg, data_dir(), cfg.resolution or _model_resolution())
    if plan is None:
        return
    cfg.class_dir = plan.folder
    job.log(f"class images: {plan.existing} of {plan.count} in {plan.folder}, generating {len(plan.missing)}")
    class_images.generate(plan, should_stop=lambda: job.stop_requested, log=job.log)


def _loaded_model():
    """The model the webui has loaded now (not shared.sd_model: with none loaded, that would load one)."""
    from modules import sd_models
    return sd_models.model_data.sd_model


def start(data: Dict[str, Any]) -> Job:
    """Validate and start a job in the background; ConfigError for a bad config or when one is running."""
    global _thread
    if registry.running() is not None:
        raise ConfigError("job", f"job {registry.running().id} is still running")
    if shared.sd_model is None:
        raise ConfigError("model", "no checkpoint is loaded")
    data = dict(data)
    sample_prompts = data.pop("sample_prompts", None) or []
    if isinstance(sample_prompts, str):
        sample_prompts = [s for s in sample_prompts.splitlines() if s.strip()]
    sample_steps = data.pop("sample_steps", 20)
    cfg, extra = build_config(data)
    if cfg.sample_every and not sample_prompts:
        sample_prompts = [f"{cfg.trigger}"]
    job = registry.new(dict(data, sample_prompts=sample_prompts, sample_steps=sample_steps))
    job.total = cfg.steps
    resume_state = None
    if extra.get("resume"):
        from ..train.state import RunFiles
        resume_state = RunFiles(cfg.output_dir, cfg.output_name, cfg.state_dir, cfg.keep_last).latest_state()
        if resume_state is None:
            registry.jobs.pop(job.id, None)
            raise ConfigError("resume", f"no saved state for '{cfg.output_name}' in {cfg.state_dir}")
    hooks_obj = _WebuiHooks(job, cfg, sample_prompts, os.path.join(data_dir(), "samples", job.id))
    hooks = JobHooks(step_context=hooks_obj.step_context, on_step=hooks_obj.on_step,
                     on_sample=hooks_obj.on_sample, should_stop=hooks_obj.should_stop,
                     on_start=hooks_obj.on_start, on_end=hooks_obj.on_end, current_model=_loaded_model)

    def make_trainer(cfg, callbacks):
        from ..train.data import prepare_data
        from ..train.loop import Trainer
        from ..train.model import DiffusionModel
        _class_images(job, cfg)  # before anything wraps the model: the webui renders them on the bare model
        model = DiffusionModel(shared.sd_model)
        report = dataset_report(cfg, _model_resolution())
        if not report["ok"]:
            raise ConfigError("dataset", "the dataset has errors:\n" + report["text"])
        _log_skipped(job, report)
        data = prepare_data(cfg, model, exclude=report.get("excluded", ()),
                            vae_id=str(getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "sha256", "")))
        return Trainer(cfg, model, data, callbacks, run_info=_run_info())

    _thread = threading.Thread(target=run_job, args=(job, cfg, make_trainer, hooks, resume_state),
                               name=f"tune-train-{job.id}", daemon=True)
    _thread.start()
    return job


def _log_skipped(job: Job, report: Dict[str, Any]) -> None:
    """Each image left out of training, with its reason, in the job's events and the console."""
    skipped = set(report.get("skipped_images") or ())
    if not skipped:
        return
    lines = [f"{len(skipped)} image(s) cannot train and are left out (on_bad_image=\"fail\" stops instead):"]
    lines += [f"  skipped {p['path']}: {p['message']}" for p in report.get("problems", ())
              if p.get("path") in skipped and p.get("severity") == "warning"]
    for line in lines:
        job.log(line)
        print(f"[Tune] job {job.id}: {line}")


def interrupt(job_id: str) -> Optional[Job]:
    job = registry.get(job_id)
    if job is not None and job.state in ("queued", "running"):
        job.stop_requested = True
        job.log("interrupt requested")
    return job
