"""The metadata of a file the trainer saves, from the run: kohya's ss_* keys (what the run was) and sshs_* hashes
(kohya_metadata.py, which says why each key matters to the webui and other tools) and the SAI ModelSpec keys
(modelspec.py), filled from the job config, the model and the data. Textual-inversion files get the ModelSpec
keys only (kohya's TI script writes no ss_* keys either).

A staged plan (stages.py) adds `ss_tune_stages` (the plan as JSON: name, targets, steps, start, rank, alpha,
LRs of each stage); ss_network_dim/alpha are then the largest stage rank and its alpha (kohya has no per-module
rank key; each module's rank is its tensors' shape, which every reader uses).

Extra RunInfo fields the trainer cannot know (the SD checkpoint's name and hashes, clip skip, VAE) come from the
webui glue through Trainer(run_info=...).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from .kohya_metadata import RunInfo, build_ss_metadata, dataset_fields, metadata_for_save, network_args_for
from .modelspec import modelspec_metadata
from .stages import build_plan, plan_metadata

OPTIMIZER_NAMES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                   "prodigy": "prodigyopt.Prodigy"}
PRECISION_NAMES = {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}


def file_metadata(cfg, model, data, tensors: Mapping[str, torch.Tensor], *, step: int, total: int, session_id: int,
                  started_at: float, precision: Optional[torch.dtype],
                  extra: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """All header metadata of one saved file at `step` (cfg: TrainConfig, model: DiffusionModel, data:
    TrainingData; tensors: exactly what is saved, for the hashes)."""
    v = model.prediction_type == "v"
    res = cfg.resolution or model.native_resolution
    spec_args = dict(v_parameterization=v, resolution=(res, res), timestamp=started_at,
                     optional={"trigger_phrase": cfg.trigger})
    if cfg.method == "ti":
        return modelspec_metadata(model.architecture, cfg.output_name, adapter="textual-inversion", **spec_args)
    info = run_info_fields(cfg, model, data, total=total, session_id=session_id, started_at=started_at,
                           precision=precision)
    info.update({k: val for k, val in (extra or {}).items() if k in RunInfo.__dataclass_fields__})
    ss = build_ss_metadata(RunInfo(**info))
    if getattr(cfg, "stages", None):
        ss["ss_tune_stages"] = plan_metadata(cfg)
    epoch = data.epoch_of(max(0, step * cfg.gradient_accumulation - 1)) + 1
    spec = modelspec_metadata(model.architecture, cfg.output_name, **spec_args)
    return metadata_for_save(tensors, ss, steps=step, epoch=epoch, modelspec=spec)


def run_info_fields(cfg, model, data, *, total: int, session_id: int, started_at: float,
                    precision: Optional[torch.dtype]) -> Dict[str, Any]:
    """RunInfo fields of a network run. DoRA is LyCORIS algo=lora with dora_wd, pivotal a kohya LoRA (its
    embedding is named in network_args); conv_dim is reported where convolutions train."""
    extra: Dict[str, Any] = {"preset": "stages" if getattr(cfg, "stages", None) else cfg.targets}
    dim, alpha = cfg.network_dim, cfg.network_alpha
    if getattr(cfg, "stages", None):  # mixed ranks (each module's is its tensors' shape): the largest stage's
        plan = build_plan(cfg)
        top = max(plan, key=lambda s: s.network_dim)
        dim, alpha = top.network_dim, top.network_alpha
    if cfg.method == "lokr":
        extra["factor"] = cfg.lokr_factor
    if cfg.method == "pivotal":
        extra["embeddings"] = cfg.trigger
    trains_conv = cfg.method in ("locon", "loha", "lokr", "dora") and cfg.targets == "full"
    conv_dim = cfg.conv_dim or (cfg.network_dim if trains_conv else None)
    conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else (cfg.network_alpha if conv_dim else None)
    method = "lora" if cfg.method == "pivotal" else cfg.method
    batches = data.batches_per_epoch
    return dict(
        output_name=cfg.output_name, base=model.architecture, v_parameterization=model.prediction_type == "v",
        session_id=session_id, training_started_at=started_at, algo=method,
        network_dim=dim, network_alpha=alpha,
        network_args=network_args_for(method, conv_dim, conv_alpha, extra),
        learning_rate=cfg.unet_lr, unet_lr=cfg.unet_lr, text_encoder_lr=cfg.te_lr if cfg.train_text_encoder else None,
        optimizer=OPTIMIZER_NAMES[cfg.optimizer], optimizer_args={"weight_decay": cfg.weight_decay},
        lr_scheduler=cfg.lr_scheduler, lr_warmup_steps=0 if cfg.lr_scheduler == "constant" else cfg.warmup,
        max_grad_norm=cfg.max_grad_norm, max_train_steps=total,
        num_epochs=-(-total * cfg.gradient_accumulation // batches), num_batches_per_epoch=batches,
        gradient_accumulation_steps=cfg.gradient_accumulation, batch_size=cfg.batch_size,
        gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=PRECISION_NAMES[precision],
        seed=cfg.seed, cache_latents=True, min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset or None,
        prior_loss_weight=cfg.prior_loss_weight, caption_dropout_rate=cfg.caption_dropout,
        caption_tag_dropout_rate=cfg.tag_dropout, keep_tokens=cfg.keep_tokens, shuffle_caption=cfg.shuffle_caption,
        flip_aug=cfg.flip_aug, random_crop=cfg.random_crop,
        **_dataset_fields(cfg, data))


def _dataset_fields(cfg, data) -> Dict[str, Any]:
    """kohya's dataset fields, with held-out validation images counted as kohya counts them: out of
    ss_num_train_images, in ss_num_validation_images (and the validation settings in its ss_validation_* keys)."""
    out = dataset_fields(data.dataset, data.plan, data.buckets)
    skipped = set(getattr(data, "excluded", ()) or ())
    if skipped:  # images that could not train are not training images (they are counted on their own)
        out["num_train_images"] -= sum(it.repeats for it in data.dataset.train_items if it.path in skipped)
        out["num_reg_images"] -= sum(it.repeats for it in data.dataset.reg_items if it.path in skipped)
        out["num_skipped_images"] = len(skipped)
    held = list(getattr(data, "val_items", None) or [])
    if held:
        out["num_train_images"] -= sum(it.repeats for it in held)
        out.update(num_validation_images=len(held), validation_seed=cfg.seed,
                   validation_split=float(getattr(cfg, "validation_split", 0.0) or 0.0),
                   validate_every_n_steps=getattr(cfg, "validation_interval", None))
    return out

