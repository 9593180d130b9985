"""A training job as the API and the Tune tab see it: its config, state, progress, losses, samples and result.

Pure (no webui): `JobRegistry` keeps jobs and serialises them; `dataset_report` runs the dataset check
for a config without starting anything; `run_job` runs one job's Trainer with the driver's hooks (the webui glue
adds its queue lock, progress bar and sample rendering through `JobHooks`).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .buckets import BucketConfig
from .config import ConfigError, TrainConfig
from .dataset import DatasetConfig
from .dataset_check import DatasetCheckConfig, check_dataset

STATES = ("queued", "running", "done", "failed", "interrupted")
_ids = itertools.count(1)


@dataclass
class Job:
    id: str
    config: Dict[str, Any]
    state: str = "queued"
    step: int = 0
    total: int = 0
    losses: List[float] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    samples: List[Dict[str, Any]] = field(default_factory=list)
    saved: List[str] = field(default_factory=list)
    output_path: Optional[str] = None
    error: Optional[str] = None
    events: List[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    resumed_from: Optional[int] = None
    stop_requested: bool = False
    #: the current stage of a staged plan: {"index", "name", "of", "start", "steps"} (None without a plan)
    stage: Optional[Dict[str, Any]] = None
    #: [step, loss] of each held-out validation score; the best one and its file; whether patience ended the run
    val_losses: List[List[float]] = field(default_factory=list)
    best_step: Optional[int] = None
    best_val_loss: Optional[float] = None
    best_path: Optional[str] = None
    early_stopped: bool = False

    def log(self, message: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {message}")

    @property
    def eta_seconds(self) -> Optional[float]:
        if not self.started or self.step <= (self.resumed_from or 0) or self.state != "running":
            return None
        done = self.step - (self.resumed_from or 0)
        return (time.time() - self.started) / done * (self.total - self.step)

    @property
    def stage_info(self) -> Optional[Dict[str, Any]]:
        """The current stage with `step`, the steps done in it (None without a plan)."""
        if not self.stage:
            return None
        return dict(self.stage, step=min(self.stage["steps"], max(0, self.step - self.stage["start"])))

    def to_dict(self, full: bool = True) -> Dict[str, Any]:
        d = {"id": self.id, "state": self.state, "step": self.step, "total": self.total,
             "output_name": self.config.get("output_name"), "method": self.config.get("method"),
             "output_path": self.output_path, "error": self.error, "eta_seconds": self.eta_seconds,
             "loss": self.losses[-1] if self.losses else None, "created": self.created, "started": self.started,
             "finished": self.finished, "resumed_from": self.resumed_from,
             "stage": self.stage_info,
             "val_loss": self.val_losses[-1][1] if self.val_losses else None, "best_step": self.best_step,
             "best_val_loss": self.best_val_loss, "best_path": self.best_path, "early_stopped": self.early_stopped}
        if full:
            d.update(config=self.config, losses=self.losses, lrs=self.lrs, samples=self.samples, saved=self.saved,
                     events=self.events, val_losses=[list(v) for v in self.val_losses])
        return d


class JobRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self.jobs: Dict[str, Job] = {}

    def new(self, config: Dict[str, Any]) -> Job:
        with self._lock:
            job = Job(id=f"{int(time.time())}-{next(_ids)}", config=dict(config))
            self.jobs[job.id] = job
            return job

    def get(self, job_id: str) -> Optional[Job]:
        return self.jobs.get(job_id)

    def running(self) -> Optional[Job]:
        return next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)

    def list(self) -> List[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created)


def dataset_report(cfg: TrainConfig, resolution: int) -> Dict[str, Any]:
    """The dataset check's report for a config, as JSON (nothing is trained or encoded)."""
    ds_cfg = DatasetConfig(train_dir=cfg.dataset,
                           class_dir=cfg.class_dir if cfg.prior == "class_images" else None,
                           default_caption=cfg.default_caption, class_caption=cfg.class_prompt,
                           trigger_word=cfg.trigger)
    res = cfg.resolution or resolution
    buckets = BucketConfig(resolution=(res, res), min_size=cfg.min_bucket, max_size=cfg.max_bucket,
                           step=cfg.bucket_step, no_upscale=cfg.bucket_no_upscale, enabled=cfg.enable_bucket)
    report = check_dataset(DatasetCheckConfig(dataset=ds_cfg, buckets=buckets, batch_size=cfg.batch_size,
                                              max_train_steps=cfg.steps,
                                              gradient_accumulation_steps=cfg.gradient_accumulation,
                                              on_bad_image=getattr(cfg, "on_bad_image", "skip")))
    out = report.to_dict()
    out["bucket_histogram"] = {(f"{k[0]}x{k[1]}" if isinstance(k, tuple) else str(k)): v
                               for k, v in out["bucket_histogram"].items()}
    out["ok"] = report.ok
    out["text"] = report.to_text()
    if cfg.has_validation:  # the held-out images (ConfigError naming the field when none would stay to train)
        from .data import held_out_split
        out["held_out"] = held_out_split(report.dataset, cfg.seed, cfg.validation_count, cfg.validation_split,
                                         out.get("excluded") or ())
    return out


def output_file(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir or ".", cfg.output_name + ".safetensors")


@dataclass
class JobHooks:
    """What the driver adds around a run: a context per step (lock), progress, samples, the end."""
    step_context: Callable[[], Any] = contextlib.nullcontext
    on_step: Callable[[Job], None] = lambda job: None
    on_sample: Callable[[Job, int], None] = lambda job, step: None
    should_stop: Callable[[], bool] = lambda: False
    on_start: Callable[[Job, Any], None] = lambda job, trainer: None
    on_end: Callable[[Job], None] = lambda job: None
    #: the model object the host has loaded now (the webui: shared.sd_model); checked at each step, inside
    #: step_context, against the model the trainer was built on. None: no check.
    current_model: Optional[Callable[[], Any]] = None


class Stopped(Exception):
    """Raised by the driver's preparation (e.g. class image generation) when the job is stopped before training:
    the job ends 'interrupted'."""


class ModelChanged(RuntimeError):
    """The host's loaded model is no longer the object the job trains (the checkpoint was switched anyway)."""


def model_title(model) -> Optional[str]:
    """The webui's title of a loaded model's checkpoint ("name.safetensors [hash]"), else its file, else None."""
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "title", None) or getattr(model, "sd_model_checkpoint", None)


def _model_name(model) -> str:
    return str(model_title(model) or ("no model" if model is None else type(model).__name__))


def check_model(expected, current_model: Optional[Callable[[], Any]]) -> None:
    """Raise ModelChanged when `current_model()` is not `expected` (no check without either)."""
    if expected is None or current_model is None:
        return
    now = current_model()
    if now is not expected:
        raise ModelChanged(f"the loaded checkpoint changed during training (from {_model_name(expected)} to "
                           f"{_model_name(now)}); the job stopped rather than train a model that is no longer "
                           f"loaded: load {_model_name(expected)} again and resume")


class _Callbacks:
    def __init__(self, job: Job, hooks: JobHooks):
        self.job, self.hooks = job, hooks
        self.model = None  # the model object the trainer trains (set by run_job)

    @contextlib.contextmanager
    def step_context(self):
        with self.hooks.step_context():
            check_model(self.model, self.hooks.current_model)
            yield

    def on_step(self, step, total, loss, lr):
        j = self.job
        j.step, j.total = step, total
        j.losses.append(float(loss))
        j.lrs.append(float(lr))
        self.hooks.on_step(j)

    def on_stage(self, index, stage):
        j = self.job
        n = len(j.config.get("stages") or ()) or index + 1
        j.stage = {"index": index, "name": stage.name, "of": n, "start": stage.start, "steps": stage.steps}
        if j.step <= stage.start:
            j.log(f"stage {index + 1}/{n} '{stage.name}' started at step {stage.start}")
        else:
            j.log(f"stage {index + 1}/{n} '{stage.name}' (from step {stage.start}) continues at step {j.step}")

    def should_stop(self):
        return self.job.stop_requested or bool(self.hooks.should_stop())

    def on_sample(self, step):
        self.hooks.on_sample(self.job, step)

    def on_save(self, path):
        if path not in self.job.saved:  # the -best file is rewritten at each new best
            self.job.saved.append(path)
        self.job.log(f"saved {os.path.basename(path)}")

    def on_validation(self, step, loss, is_best):
        j = self.job
        j.val_losses.append([int(step), float(loss)])
        if is_best:
            j.best_step, j.best_val_loss = int(step), float(loss)
        j.log(f"validation loss {float(loss):.4g} at step {step}" + (" (best)" if is_best else ""))


def _validation_from(job: Job, trainer) -> None:
    """A resumed job's validation history and best, from the trainer's restored state."""
    v = getattr(trainer, "validation", None)
    if v is None:
        return
    job.val_losses = [[int(s), float(x)] for s, x in v.losses]
    job.best_step, job.best_val_loss = v.best_step, v.best_loss
    job.best_path = getattr(trainer, "best_path", None)


def run_job(job: Job, cfg: TrainConfig, make_trainer: Callable[[TrainConfig, Any], Any], hooks: JobHooks,
            resume_state: Optional[str] = None) -> Job:
    """Run one job to its end; never raises (a failure becomes state 'failed' with a readable message)."""
    job.state, job.started = "running", time.time()
    job.total = cfg.steps
    try:
        callbacks = _Callbacks(job, hooks)
        trainer = make_trainer(cfg, callbacks)
        callbacks.model = getattr(getattr(trainer, "model", None), "sd_model", None)
        check_model(callbacks.model, hooks.current_model)
        if resume_state:
            job.resumed_from = trainer.resume(resume_state)
            job.step = job.resumed_from
            job.losses = list(trainer.losses)
            _validation_from(job, trainer)
            job.log(f"resumed at step {job.resumed_from}")
        hooks.on_start(job, trainer)
        job.log(f"training {cfg.method} '{cfg.output_name}' for {cfg.steps} steps")
        result = trainer.run()
        job.output_path = result.adapter_path
        job.best_path = getattr(result, "best_path", None)
        job.early_stopped = bool(getattr(result, "early_stopped", False))
        if job.early_stopped:
            job.log(f"early stopping at step {result.steps_done}: no improvement for "
                    f"{cfg.early_stopping_patience} evaluations; best step {result.best_step}")
        job.state = "interrupted" if result.stopped else "done"
        job.log(f"{job.state} at step {result.steps_done}" + (f": {result.adapter_path}" if result.adapter_path else ""))
    except ConfigError as e:
        job.state, job.error = "failed", f"{e.field}: {e.message}"
        job.log(f"failed: {job.error}")
    except Stopped as e:  # stopped before training began (e.g. while generating class images)
        job.state = "interrupted"
        job.log(f"interrupted: {e}")
    except ModelChanged as e:
        job.state, job.error = "failed", str(e)
        job.log(f"failed: {job.error}")
        print(f"[sd-webui-tune] job {job.id} failed: {e}")
    except Exception as e:  # the model is restored by the trainer; report, never crash the webui
        job.state, job.error = "failed", f"{type(e).__name__}: {e}"
        job.log(f"failed: {job.error}")
        traceback.print_exc()
    finally:
        job.finished = time.time()
        hooks.on_end(job)
    return job
