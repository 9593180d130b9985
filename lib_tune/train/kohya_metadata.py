"""kohya's key set for a trained adapter: the `ss_*` training keys and the `sshs_*` precomputed hashes, all strings,
and the order in which one saved file's header is put together (`metadata_for_save`). The SAI ModelSpec
`modelspec.*` keys are modelspec.py's; run_metadata.py fills all of them from a run.

Why kohya's layout: the webui's built-in Lora reads `ss_output_name` (alias), `ss_base_model_version`/`ss_v2`
(which model the card is shown for), `sshs_model_hash` (file hash without re-hashing), and its metadata
editor reads `ss_training_started_at`, `ss_bucket_info`, `ss_dataset_dirs` and `ss_tag_frequency` (activation
text suggestions). Other tools (additional-networks, Civitai's kohya-based trainer, model managers) expect the
same keys. The key set, the value formatting (Python `str()` of each value, so `None` -> "None",
True -> "True", tuples -> "(512, 512)"; nested values as JSON) and the hash rules reproduce kohya sd-scripts
(train_network.py metadata block and save_model, library/train_util.py precalculate_safetensors_hashes /
addnet_hash_safetensors / addnet_hash_legacy / model_hash); no code is copied.

Hashes (`add_hashes`): computed like kohya over the tensors to be saved plus ONLY the `ss_*` keys, so that
later user edits of other keys (ssmd_*, modelspec.*) do not change them:
- sshs_model_hash: sha256 of the serialized safetensors bytes after the 8-byte header length and the header.
  The tensor payload does not depend on the metadata, so this equals the webui's addnet hash of the saved file
  (modules/hashes.py addnet_hash_safetensors) as long as the same tensors are saved;
- sshs_legacy_hash: first 8 hex of sha256 of the 64 KiB at offset 1 MiB of those serialized bytes (of the
  ss_-only serialization, not of the final file; files under 1 MiB all give sha256(b"")[:8] = "e3b0c442").
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import save as st_save

SS_MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                   "ss_network_args")
#: algorithms written by kohya's own networks.lora module (LoCon is networks.lora with conv_dim)
KOHYA_LORA_ALGOS = ("lora", "locon", "c3lier", "lierla")


def base_model_version(base: str, v_parameterization: bool = False) -> str:
    """kohya's ss_base_model_version: sd_v1, sd_v2, sd_v1_v, sd_v2_v or sdxl_base_v1-0."""
    if base == "sdxl":
        return "sdxl_base_v1-0"
    if base not in ("sd1", "sd2"):
        raise ValueError(f"unknown base model {base!r}")
    return ("sd_v2" if base == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")


def network_module_for(algo: str) -> str:
    """networks.lora for kohya's LoRA/LoCon, lycoris.kohya for LyCORIS types (loha, lokr, dora, ia3, ...)."""
    return "networks.lora" if algo.lower() in KOHYA_LORA_ALGOS else "lycoris.kohya"


def network_args_for(algo: str, conv_dim: Optional[int] = None, conv_alpha: Optional[float] = None,
                     extra: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """The network_args kohya users would have passed (string values, as kohya parses `key=value`), e.g.
    {"algo": "loha", "conv_dim": "8", "conv_alpha": "4"}. DoRA is LyCORIS `algo=lora` with `dora_wd=True`."""
    a = algo.lower()
    args: Dict[str, str] = {}
    if a == "dora":
        args.update({"algo": "lora", "dora_wd": "True"})
    elif a not in KOHYA_LORA_ALGOS:
        args["algo"] = a
    if conv_dim:
        args["conv_dim"] = str(conv_dim)
        args["conv_alpha"] = str(conv_alpha if conv_alpha is not None else 1)
    for k, v in (extra or {}).items():
        args[k] = str(v)
    return args


@dataclass
class RunInfo:
    """Everything the ss_* keys describe. Unknown values stay None (written "None", like kohya)."""
    output_name: str
    base: str = "sd1"  # "sd1" | "sd2" | "sdxl"
    v_parameterization: bool = False
    session_id: int = field(default_factory=lambda: random.randint(0, 2 ** 32))
    training_started_at: float = field(default_factory=time.time)
    training_comment: Optional[str] = None
    # base model (names/hashes as the webui's CheckpointInfo has them: hash = old 8-hex, sha256 = full)
    sd_model_name: Optional[str] = None
    sd_model_hash: Optional[str] = None
    new_sd_model_hash: Optional[str] = None
    vae_name: Optional[str] = None
    vae_hash: Optional[str] = None
    new_vae_hash: Optional[str] = None
    clip_skip: Optional[int] = None
    max_token_length: Optional[int] = None
    # network
    algo: str = "lora"
    network_module: Optional[str] = None  # derived from algo when None
    network_dim: Optional[int] = None
    network_alpha: Optional[float] = None
    network_dropout: Optional[float] = None
    network_args: Optional[Dict[str, Any]] = None
    scale_weight_norms: Optional[float] = None
    # optimisation
    learning_rate: Optional[float] = None
    unet_lr: Optional[float] = None
    text_encoder_lr: Optional[Union[float, Sequence[float]]] = None
    optimizer: str = "torch.optim.adamw.AdamW"
    optimizer_args: Optional[Dict[str, Any]] = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    max_train_steps: Optional[int] = None
    num_epochs: Optional[int] = None
    num_batches_per_epoch: Optional[int] = None
    gradient_accumulation_steps: int = 1
    batch_size: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    full_fp16: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    seed: Optional[int] = None
    cache_latents: bool = False
    lowram: bool = False
    # loss / noise
    min_snr_gamma: Optional[float] = None
    debiased_estimation: bool = False
    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: Optional[float] = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    huber_c: float = 0.1
    prior_loss_weight: float = 1.0
    # data
    resolution: Tuple[int, int] = (512, 512)
    num_train_images: int = 0
    num_reg_images: int = 0
    num_validation_images: int = 0
    #: images left out because they cannot train (the dataset check, on_bad_image="skip"); ss_tune_skipped_images
    num_skipped_images: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    keep_tokens: int = 0
    shuffle_caption: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: Optional[str] = None
    resize_interpolation: Optional[str] = None
    enable_bucket: bool = True
    bucket_no_upscale: bool = False
    min_bucket_reso: Optional[int] = 256
    max_bucket_reso: Optional[int] = 1024
    tag_frequency: Dict[str, Dict[str, int]] = field(default_factory=dict)
    dataset_dirs: Dict[str, Dict[str, int]] = field(default_factory=dict)
    reg_dataset_dirs: Dict[str, Dict[str, int]] = field(default_factory=dict)
    bucket_info: Optional[dict] = None
    # validation (kohya writes these even when unused)
    validation_seed: Optional[int] = None
    validation_split: float = 0.0
    max_validation_steps: Optional[int] = None
    validate_every_n_epochs: Optional[int] = None
    validate_every_n_steps: Optional[int] = None


def dataset_fields(dataset, plan=None, buckets=None) -> Dict[str, Any]:
    """RunInfo fields that come from a discovered Dataset (and its BucketPlan / BucketConfig):
    `RunInfo(output_name=..., **dataset_fields(ds, plan, cfg), ...)`."""
    out: Dict[str, Any] = {
        "num_train_images": dataset.num_train_images,
        "num_reg_images": dataset.num_reg_images,
        "tag_frequency": dataset.tag_frequency(),
        "dataset_dirs": dataset.dataset_dirs(reg=False),
        "reg_dataset_dirs": dataset.dataset_dirs(reg=True),
    }
    if plan is not None:
        out["bucket_info"] = plan.bucket_info()
    if buckets is not None:
        out.update(resolution=tuple(buckets.resolution), enable_bucket=buckets.enabled,
                   bucket_no_upscale=buckets.no_upscale and buckets.enabled,
                   min_bucket_reso=buckets.min_size if buckets.enabled else None,
                   max_bucket_reso=buckets.max_size if buckets.enabled else None)
        if not buckets.enabled:
            out["bucket_info"] = None
    return out


def build_ss_metadata(run: RunInfo) -> Dict[str, str]:
    """The ss_* keys kohya's train_network.py writes in folder (non-dataset-config) mode, as strings.
    ss_steps / ss_epoch / ss_training_finished_at are added per save by `metadata_for_save`."""
    r = run
    module = r.network_module or network_module_for(r.algo)
    opt_args = ",".join(f"{k}={v}" for k, v in (r.optimizer_args or {}).items())
    te_lr = [_f(x) for x in r.text_encoder_lr] if isinstance(r.text_encoder_lr, (list, tuple)) \
        else _f(r.text_encoder_lr)
    m: Dict[str, Any] = {
        "ss_session_id": r.session_id,
        "ss_training_started_at": r.training_started_at,
        "ss_output_name": r.output_name,
        "ss_learning_rate": _f(r.learning_rate),
        "ss_text_encoder_lr": te_lr,
        "ss_unet_lr": _f(r.unet_lr),
        "ss_num_train_images": r.num_train_images,
        "ss_num_validation_images": r.num_validation_images,
        "ss_num_reg_images": r.num_reg_images,
        "ss_num_batches_per_epoch": r.num_batches_per_epoch,
        "ss_num_epochs": r.num_epochs,
        "ss_gradient_checkpointing": bool(r.gradient_checkpointing),
        "ss_gradient_accumulation_steps": r.gradient_accumulation_steps,
        "ss_max_train_steps": r.max_train_steps,
        "ss_lr_warmup_steps": r.lr_warmup_steps,
        "ss_lr_scheduler": r.lr_scheduler,
        "ss_network_module": module,
        "ss_network_dim": r.network_dim,
        "ss_network_alpha": _f(r.network_alpha),
        "ss_network_dropout": r.network_dropout,
        "ss_mixed_precision": r.mixed_precision,
        "ss_full_fp16": bool(r.full_fp16),
        "ss_v2": r.base == "sd2",
        "ss_base_model_version": base_model_version(r.base, r.v_parameterization),
        "ss_clip_skip": r.clip_skip,
        "ss_max_token_length": r.max_token_length,
        "ss_cache_latents": bool(r.cache_latents),
        "ss_seed": r.seed,
        "ss_lowram": r.lowram,
        "ss_noise_offset": r.noise_offset,
        "ss_multires_noise_iterations": r.multires_noise_iterations,
        "ss_multires_noise_discount": r.multires_noise_discount,
        "ss_adaptive_noise_scale": r.adaptive_noise_scale,
        "ss_zero_terminal_snr": r.zero_terminal_snr,
        "ss_training_comment": r.training_comment,
        "ss_optimizer": r.optimizer + (f"({opt_args})" if opt_args else ""),
        "ss_max_grad_norm": r.max_grad_norm,
        "ss_caption_dropout_rate": r.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": r.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": r.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": r.face_crop_aug_range,
        "ss_prior_loss_weight": r.prior_loss_weight,
        "ss_min_snr_gamma": r.min_snr_gamma,
        "ss_scale_weight_norms": r.scale_weight_norms,
        "ss_ip_noise_gamma": r.ip_noise_gamma,
        "ss_debiased_estimation": bool(r.debiased_estimation),
        "ss_noise_offset_random_strength": r.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": r.ip_noise_gamma_random_strength,
        "ss_loss_type": r.loss_type,
        "ss_huber_schedule": r.huber_schedule,
        "ss_huber_scale": r.huber_scale,
        "ss_huber_c": r.huber_c,
        "ss_fp8_base": bool(r.fp8_base),
        "ss_fp8_base_unet": bool(r.fp8_base_unet),
        "ss_validation_seed": r.validation_seed,
        "ss_validation_split": r.validation_split,
        "ss_max_validation_steps": r.max_validation_steps,
        "ss_validate_every_n_epochs": r.validate_every_n_epochs,
        "ss_validate_every_n_steps": r.validate_every_n_steps,
        "ss_resize_interpolation": r.resize_interpolation,
        # folder-mode dataset keys
        "ss_batch_size_per_device": r.batch_size,
        "ss_total_batch_size": r.batch_size * r.gradient_accumulation_steps,
        "ss_resolution": tuple(r.resolution),
        "ss_color_aug": bool(r.color_aug),
        "ss_flip_aug": bool(r.flip_aug),
        "ss_random_crop": bool(r.random_crop),
        "ss_shuffle_caption": bool(r.shuffle_caption),
        "ss_enable_bucket": bool(r.enable_bucket),
        "ss_bucket_no_upscale": bool(r.bucket_no_upscale),
        "ss_min_bucket_reso": r.min_bucket_reso,
        "ss_max_bucket_reso": r.max_bucket_reso,
        "ss_keep_tokens": r.keep_tokens,
        "ss_dataset_dirs": json.dumps(r.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(r.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(r.tag_frequency),
        "ss_bucket_info": json.dumps(r.bucket_info),
    }
    if r.network_args:
        m["ss_network_args"] = json.dumps(r.network_args)
    if r.num_skipped_images:  # ours: images of the dataset left out because they could not train
        m["ss_tune_skipped_images"] = r.num_skipped_images
    _add_named(m, "sd_model", r.sd_model_name, r.sd_model_hash, r.new_sd_model_hash)
    _add_named(m, "vae", r.vae_name, r.vae_hash, r.new_vae_hash)
    return {k: str(v) for k, v in m.items()}


def _add_named(m: Dict[str, Any], what: str, name: Optional[str], old_hash: Optional[str],
               new_hash: Optional[str]) -> None:
    """ss_<what>_hash, ss_new_<what>_hash and ss_<what>_name, as kohya writes them: only for a named base model
    or VAE, each hash only when known."""
    if name is None:
        return
    if old_hash is not None:
        m[f"ss_{what}_hash"] = old_hash
    if new_hash is not None:
        m[f"ss_new_{what}_hash"] = new_hash
    m[f"ss_{what}_name"] = name


def _f(x):
    """kohya's argparse makes these floats, so 8 is written "8.0"; keep None as None."""
    return None if x is None else float(x)


def minimum_metadata(ss: Mapping[str, str]) -> Dict[str, str]:
    """What kohya keeps with --no_metadata (the keys tools need to classify the file)."""
    return {k: ss[k] for k in SS_MINIMUM_KEYS if k in ss}


# ---- hashes --------------------------------------------------------------------------------------------

def addnet_hash_safetensors(f: BinaryIO) -> str:
    """sha256 of everything after the 8-byte header length and the header (webui/kohya "addnet" hash), of an
    open stream (the in-memory serialization here; lib_tune.formats.write.addnet_hash does it for a path)."""
    h = hashlib.sha256()
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    f.seek(n + 8)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def addnet_hash_legacy(f: BinaryIO) -> str:
    """First 8 hex of sha256 of the 64 KiB at offset 1 MiB (old additional-networks / webui hash) of a stream
    (lib_tune.formats.write.legacy_hash does it for a path: kohya's ss_sd_model_hash of a checkpoint)."""
    f.seek(0x100000)
    return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def precalculate_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) for `tensors` as they will be saved: same keys, dtypes and values
    (cast to the save dtype first). Tensors sharing storage must be de-shared first, as for saving."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    b = io.BytesIO(st_save(plain, ss_only or None))
    return addnet_hash_safetensors(b), addnet_hash_legacy(b)


def add_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Dict[str, str]:
    """metadata plus sshs_model_hash / sshs_legacy_hash."""
    model_hash, legacy = precalculate_hashes(tensors, metadata)
    out = dict(metadata)
    out["sshs_model_hash"] = model_hash
    out["sshs_legacy_hash"] = legacy
    return out


def metadata_for_save(tensors: Mapping[str, torch.Tensor], ss: Mapping[str, str], *, steps: int, epoch: int,
                      modelspec: Optional[Mapping[str, str]] = None, finished_at: Optional[float] = None,
                      minimal: bool = False) -> Dict[str, str]:
    """The complete header metadata of one saved file, in kohya's order of operations: per-save ss keys
    (ss_training_finished_at, ss_steps, ss_epoch), then (minimal: only the classification keys), then
    modelspec, then the sshs hashes over tensors + ss_* keys."""
    m = dict(ss)
    m["ss_training_finished_at"] = str(finished_at if finished_at is not None else time.time())
    m["ss_steps"] = str(steps)
    m["ss_epoch"] = str(epoch)
    if minimal:
        m = minimum_metadata(m)
    if modelspec:
        m.update(modelspec)
    return add_hashes(tensors, m)
