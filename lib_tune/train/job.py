"""A training job as the API and the Tune tab see it: its config, state, progress, losses, samples and result.

Pure (no webui): `JobRegistry` keeps jobs and serialises them; `validate_config` runs the dataset validator
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
from .validate import ValidationConfig, validate_dataset

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

    def log(self, message: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {message}")

    @property
    def eta_seconds(self) -> Optional[float]:
        if not self.started or self.step <= (self.resumed_from or 0) or self.state != "running":
            return None
        done = self.step - (self.resumed_from or 0)
        return (time.time() - self.started) / done * (self.total - self.step)

    def to_dict(self, full: bool = True) -> Dict[str, Any]:
        d = {"id": self.id, "state": self.state, "step": self.step, "total": self.total,
             "output_name": self.config.get("output_name"), "method": self.config.get("method"),
             "output_path": self.output_path, "error": self.error, "eta_seconds": self.eta_seconds,
             "loss": self.losses[-1] if self.losses else None, "created": self.created, "started": self.started,
             "finished": self.finished, "resumed_from": self.resumed_from}
        if full:
            d.update(config=self.config, losses=self.losses, lrs=self.lrs, samples=self.samples, saved=self.saved,
                     events=self.events)
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


def validate_config(cfg: TrainConfig, resolution: int) -> Dict[str, Any]:
    """The dataset validator's report for a config, as JSON (nothing is trained or encoded)."""
    ds_cfg = DatasetConfig(train_dir=cfg.dataset,
                           class_dir=cfg.class_dir if cfg.prior == "class_images" else None,
                           default_caption=cfg.default_caption, class_caption=cfg.class_prompt,
                           trigger_word=cfg.trigger)
    res = cfg.resolution or resolution
    buckets = BucketConfig(resolution=(res, res), min_size=cfg.min_bucket, max_size=cfg.max_bucket,
                           step=cfg.bucket_step, no_upscale=cfg.bucket_no_upscale, enabled=cfg.enable_bucket)
    report = validate_dataset(ValidationConfig(dataset=ds_cfg, buckets=buckets, batch_size=cfg.batch_size,
                                               max_train_steps=cfg.steps,
                                               gradient_accumulation_steps=cfg.gradient_accumulation))
    out = report.to_dict()
    out["bucket_histogram"] = {(f"{k[0]}x{k[1]}" if isinstance(k, tuple) else str(k)): v
                               for k, v in out["bucket_histogram"].items()}
    out["ok"] = report.ok
    out["text"] = report.to_text()
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


class _Callbacks:
    def __init__(self, job: Job, hooks: JobHooks):
        self.job, self.hooks = job, hooks

    def step_context(self):
        return self.hooks.step_context()

    def on_step(self, step, total, loss, lr):
        j = self.job
        j.step, j.total = step, total
        j.losses.append(float(loss))
        j.lrs.append(float(lr))
        self.hooks.on_step(j)

    def should_stop(self):
        return self.job.stop_requested or bool(self.hooks.should_stop())

    def on_sample(self, step):
        self.hooks.on_sample(self.job, step)

    def on_save(self, path):
        self.job.saved.append(path)
        self.job.log(f"saved {os.path.basename(path)}")


def run_job(job: Job, cfg: TrainConfig, make_trainer: Callable[[TrainConfig, Any], Any], hooks: JobHooks,
            resume_state: Optional[str] = None) -> Job:
    """Run one job to its end; never raises (a failure becomes state 'failed' with a readable message)."""
    job.state, job.started = "running", time.time()
    job.total = cfg.steps
    try:
        trainer = make_trainer(cfg, _Callbacks(job, hooks))
        if resume_state:
            job.resumed_from = trainer.resume(resume_state)
            job.step = job.resumed_from
            job.losses = list(trainer.losses)
            job.log(f"resumed at step {job.resumed_from}")
        hooks.on_start(job, trainer)
        job.log(f"training {cfg.method} '{cfg.output_name}' for {cfg.steps} steps")
        result = trainer.run()
        job.output_path = result.adapter_path
        job.state = "interrupted" if result.stopped else "done"
        job.log(f"{job.state} at step {result.steps_done}" + (f": {result.adapter_path}" if result.adapter_path else ""))
    except ConfigError as e:
        job.state, job.error = "failed", f"{e.field}: {e.message}"
        job.log(f"failed: {job.error}")
    except Exception as e:  # the model is restored by the trainer; report, never crash the webui
        job.state, job.error = "failed", f"{type(e).__name__}: {e}"
        job.log(f"failed: {job.error}")
        traceback.print_exc()
    finally:
        job.finished = time.time()
        hooks.on_end(job)
    return job
