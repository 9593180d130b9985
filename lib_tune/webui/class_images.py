"""DreamBooth class images rendered by the webui's own sampler before training (planning and caching:
lib_tune/train/class_images.py).

Runs in the training job's thread before the trainer is built: the loaded model with no adapter (extra networks
disabled, no scripts), one image per seed (base seed + index) at the training resolution, the webui's queue lock
taken per image (a txt2img sent meanwhile runs between two images), progress on shared.state, Interrupt (the
webui's or the job's) stops after the current image, keeping the images already written for the next run.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from modules import shared

from ..train.class_images import ClassImagePlan, plan_class_images, write_class_image
from ..train.config import TrainConfig
from ..train.job import Stopped


def cache_root(data_dir: str) -> str:
    return os.path.join(data_dir, "class-images")


def model_identity():
    """(model hash, VAE name) of the loaded model: what the cache key needs besides the generation settings."""
    from modules import sd_models, sd_vae
    model = sd_models.model_data.sd_model
    info = getattr(model, "sd_checkpoint_info", None)
    h = getattr(info, "sha256", None) or getattr(info, "hash", None) or getattr(info, "filename", "") or ""
    vae = getattr(sd_vae, "loaded_vae_file", None) or ""
    return str(h), os.path.basename(str(vae)) if vae else ""


def plan(cfg: TrainConfig, data_dir: str, resolution: int) -> Optional[ClassImagePlan]:
    model_hash, vae = model_identity()
    return plan_class_images(cfg, model_hash, cache_root(data_dir), resolution, vae=vae)


def generate(p: ClassImagePlan, should_stop: Callable[[], bool], log: Callable[[str], None]) -> int:
    """Render the plan's missing images; returns how many were written. Raises job.Stopped when stopped."""
    from modules import sd_models
    from modules.call_queue import queue_lock

    from .render import render

    total = len(p.missing)
    done = 0

    def stopped():
        return Stopped(f"stopped while generating class images ({done} of {total} written to {p.folder}; the next "
                       f"run generates the rest)")
    if total:
        shared.state.begin(job="Tune: class images")  # (also clears a stale Interrupt)
    for n, index in enumerate(p.missing):
        if should_stop() or shared.state.interrupted:
            raise stopped()
        with queue_lock:
            shared.state.job = "Tune: class images"
            shared.state.job_count = total
            shared.state.job_no = n
            shared.state.textinfo = f"Tune: class image {n + 1}/{total}"
            # the base model alone: render() leaves the prompt's <lora:>/<tune:> tags inactive
            image = render(sd_models.model_data.sd_model, p.prompt, negative_prompt=p.negative_prompt,
                           seed=p.seed_of(index), width=p.width, height=p.height, steps=p.steps,
                           cfg_scale=p.cfg_scale, sampler=p.sampler, scheduler=p.scheduler)
            if shared.state.interrupted or should_stop():  # a partial image is not a class image
                raise stopped()
            if image is None:
                raise RuntimeError(f"the webui returned no image for class image {index}")
            write_class_image(p, index, image)
            shared.state.assign_current_image(image)
            done += 1
    log(f"class images: generated {done}, found {p.existing} in {p.folder}")
    return done
