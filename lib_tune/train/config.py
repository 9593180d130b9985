"""The training job: one flat dataclass, the same JSON the HTTP API (`POST /tune/v1/train`) takes.

Only `dataset`, `method`, `steps`, `output_name` and `trigger` are required; everything else comes from a task
preset (`preset`, defaulting from the method) and then from the field defaults. `validate()` raises ConfigError
naming the first bad field (config_checks.py), which the API turns into a 422 with that field.

Preset values are the community's starting points for SD1.5 at 512, from: HOLO (hollowstrawberry/kohya-colab,
popular LoRA notebooks), CIV (Civitai's on-site trainer defaults), KSS (bmaltais/kohya_ss presets; EDG its "sd15
EDG LoRA" preset), SDS (kohya sd-scripts' docs), DIF (diffusers' examples), DBX (the webui's Dreambooth
extension), OneTrainer and LyCORIS:
- character / object: LoRA dim 16 / alpha 8 (alpha = dim/2: HOLO, CIV), attention + MLP layers (LyCORIS
  attn-mlp, OneTrainer); character unet 5e-4 / te 1e-4 (HOLO SD1.5, CIV anime), object unet 1e-4 / te 5e-5
  (DIF DreamBooth-LoRA, DBX, KSS EDG); text encoder trained;
- style: dim 32 / alpha 16 (CIV), unet 5e-4, text encoder not trained (HOLO: "0 for styles"), noise offset 0.05,
  flips on;
- ti: 4 vectors (SDS docs), lr 5e-3 (webui Train tab);
- pivotal: the character LoRA plus new token vectors at 5e-4 (DIF's TI rate; vectors learn next to the LoRA);
- all: AdamW (torch; 8-bit/Prodigy optional), cosine schedule with 10% warmup, min-SNR gamma 5 (HOLO, CIV, KSS
  presets; not for ti, like the webui), batch 1, gradient clipping at 1.0 (kohya's default).
Never kohya's raw LR default (2e-6, meant for full fine-tuning).

Held-out validation is off unless validation_count or validation_split holds images out (see the fields' comments and
validation.py); validation_every and early_stopping_patience without a held-out set are errors, not no-ops.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

from .config_checks import (ConfigError, check_bool, check_choice, check_file_name, check_float, check_int,
                            check_path, check_str, show)
from .methods import CONV_METHODS, EMBEDDING_METHODS, METHODS, PRESETS
from .optim import OPTIMIZERS, SCHEDULERS

TASK_PRESETS = ("character", "style", "object", "ti", "pivotal")
PRIORS = ("none", "class_images", "base_prediction")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
REQUIRED = ("dataset", "method", "steps", "output_name", "trigger")
#: fields that may change between a run and its resume (they do not change what is computed)
RESUMABLE_CHANGES = ("output_dir", "state_dir", "save_every", "keep_last", "save_dtype", "save_state",
                     "sample_every", "save_on_stop", "latent_cache_dir", "cache_text_outputs", "keep_best")

_COMMON = dict(optimizer="adamw", lr_scheduler="cosine", warmup_ratio=0.1, min_snr_gamma=5.0, batch_size=1,
               max_grad_norm=1.0)
PRESET_VALUES: Dict[str, Dict[str, Any]] = {
    "character": dict(_COMMON, targets="attn_mlp", network_dim=16, network_alpha=8.0, unet_lr=5e-4, te_lr=1e-4,
                      train_text_encoder=True, keep_tokens=1),
    "object": dict(_COMMON, targets="attn_mlp", network_dim=16, network_alpha=8.0, unet_lr=1e-4, te_lr=5e-5,
                   train_text_encoder=True, keep_tokens=1),
    "style": dict(_COMMON, targets="attn_mlp", network_dim=32, network_alpha=16.0, unet_lr=5e-4, te_lr=0.0,
                  train_text_encoder=False, noise_offset=0.05, flip_aug=True),
    "ti": dict(_COMMON, num_vectors=4, emb_lr=5e-3, min_snr_gamma=None, train_text_encoder=False),
    "pivotal": dict(_COMMON, targets="attn_mlp", network_dim=16, network_alpha=8.0, unet_lr=5e-4, te_lr=0.0,
                    train_text_encoder=False, num_vectors=2, emb_lr=5e-4, keep_tokens=1),
}
_DEFAULT_PRESET = {"ti": "ti", "pivotal": "pivotal"}
#: folders: absolute or relative paths, never with NUL bytes or '..' components
PATH_FIELDS = ("dataset", "output_dir", "state_dir", "class_dir", "latent_cache_dir")
#: free text (prompts, captions, the trigger word): anything but NUL bytes
TEXT_FIELDS = ("trigger", "class_prompt", "default_caption", "init_text")
#: deepest nesting of a field's JSON value (stages: list > stage > targets list)
MAX_DEPTH = 8


@dataclass
class TrainConfig:
    # ---- required ----
    dataset: str = ""
    method: str = ""
    steps: int = 0
    output_name: str = ""
    trigger: str = ""
    # ---- task ----
    preset: Optional[str] = None
    output_dir: Optional[str] = None
    #: resume-state folder; default <output_dir>/<output_name>-state
    state_dir: Optional[str] = None
    class_dir: Optional[str] = None
    class_prompt: str = ""
    #: caption of training images without a caption file (the instance prompt)
    default_caption: str = ""
    prior: str = "none"
    prior_loss_weight: float = 1.0
    #: class images for prior "class_images": when > 0 (with a class_prompt), the webui generates the missing
    #: ones before training with its own sampler (lib_tune/train/class_images.py), into class_dir or, without
    #: one, a cache folder under its data dir
    num_class_images: int = 0
    # ---- network ----
    targets: str = "attn_mlp"
    network_dim: int = 16
    network_alpha: float = 8.0
    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    lokr_factor: int = -1
    train_text_encoder: bool = False
    #: a staged plan (lib_tune/train/stages.py): [{"targets", "steps", optional network_dim, network_alpha,
    #: unet_lr, te_lr, name}, ...]; `steps` is then the stages' sum (from_dict derives it when omitted)
    stages: Optional[List[dict]] = None
    # ---- embeddings (ti, pivotal) ----
    num_vectors: int = 1
    init_text: str = ""
    # ---- optimisation ----
    unet_lr: float = 1e-4
    te_lr: float = 5e-5
    emb_lr: float = 5e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    #: overrides warmup_ratio when set
    warmup_steps: Optional[int] = None
    lr_cycles: int = 1
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    seed: int = 0
    # ---- loss ----
    min_snr_gamma: Optional[float] = 5.0
    noise_offset: float = 0.0
    # ---- data ----
    #: square base resolution; None: the model's (512 SD1, 768 SD2-v, 1024 SDXL)
    resolution: Optional[int] = None
    enable_bucket: bool = True
    min_bucket: int = 256
    max_bucket: int = 1024
    bucket_step: int = 64
    bucket_no_upscale: bool = False
    #: an image that cannot train (unreadable, truncated, too small for any bucket): "skip" leaves it out with a
    #: warning in the report, the job's events and ss_tune_skipped_images; "fail" refuses to start
    on_bad_image: str = "skip"
    flip_aug: bool = False
    random_crop: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    latent_cache_dir: Optional[str] = None
    #: keep text-encoder outputs across steps when nothing on the text side trains and captions are not augmented
    #: (bit-identical results; lib_tune/train/text_cache.py)
    cache_text_outputs: bool = True
    # ---- saving / previews ----
    save_every: int = 0
    keep_last: int = 3
    save_dtype: str = "fp16"
    save_state: bool = True
    save_on_stop: bool = True
    sample_every: int = 0
    # ---- validation / early stopping ----
    #: fraction of the training images (distinct images, not repeats) held out for validation, 0..0.5; never
    #: class images; picked deterministically from the seed and the image paths
    validation_split: float = 0.0
    #: a number of images held out instead (overrides validation_split when > 0); one must stay for training
    validation_count: int = 0
    #: score the held-out set every N steps and at the end; 0 with a held-out set: max(1, steps // 10)
    validation_every: int = 0
    #: fixed timesteps per held-out image, evenly spread over the noise schedule (fixed noise too)
    validation_timesteps: int = 4
    #: evaluations without an improvement of more than early_stopping_min_delta before the run ends; 0: never
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    #: write <output_name>-best.safetensors whenever the validation loss improves
    keep_best: bool = True

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        """A validated config from JSON-like data: preset values fill the fields the data does not set."""
        if not isinstance(data, dict):
            raise ConfigError("body", "the job must be a JSON object")
        names = {f.name: f for f in fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(key if isinstance(key, str) else show(key), "unknown field")
            if _depth(data[key]) > MAX_DEPTH:
                raise ConfigError(key, f"is nested more than {MAX_DEPTH} levels deep")
        if data.get("stages") and isinstance(data["stages"], list) and data.get("steps") in (None, 0):
            from .stages import check_stages, total_steps
            check_stages(data["stages"], data.get("method"))
            data = dict(data, steps=total_steps(data["stages"]))
        for key in REQUIRED:
            if data.get(key) in (None, "", 0):
                raise ConfigError(key, "is required")
        method = data.get("method")
        if method == "dreambooth":
            # DreamBooth-style LoRA: a LoRA with prior preservation, from class images when a folder is given,
            # else from the base model's own prediction (adapter off) as the prior target
            data = dict(data, method="lora")
            gen = bool(data.get("class_prompt")) and bool(data.get("num_class_images"))
            data.setdefault("prior", "class_images" if data.get("class_dir") or gen else "base_prediction")
            data.setdefault("preset", "object")
            method = "lora"
        check_choice("method", method, METHODS + ("dreambooth",))
        preset = data.get("preset") or _DEFAULT_PRESET.get(method, "character")
        check_choice("preset", preset, TASK_PRESETS)
        values: Dict[str, Any] = dict(PRESET_VALUES[preset])
        values["preset"] = preset
        for key, value in data.items():
            values[key] = _coerce(names[key], key, value)
        cfg = cls(**{k: v for k, v in values.items() if k in names})
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- derived -------------------------------------------------------------------------------------------------
    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return int(round(self.warmup_ratio * self.steps))

    @property
    def has_validation(self) -> bool:
        """Whether a held-out set is requested."""
        return bool(self.validation_count) or bool(self.validation_split)

    @property
    def validation_interval(self) -> int:
        """Steps between two validation scores: 0 without a held-out set; validation_every, else a tenth of
        the steps."""
        if not self.has_validation:
            return 0
        return int(self.validation_every) or max(1, int(self.steps) // 10)

    def _validate_validation(self) -> None:
        check_float("validation_split", self.validation_split, 0.0, 0.5)
        check_int("validation_count", self.validation_count, 0, 100_000)
        check_int("validation_every", self.validation_every, 0, 10_000_000)
        check_int("validation_timesteps", self.validation_timesteps, 1, 1000)
        check_int("early_stopping_patience", self.early_stopping_patience, 0, 100_000)
        check_float("early_stopping_min_delta", self.early_stopping_min_delta, 0.0, 1e6)
        check_bool("keep_best", self.keep_best)
        if not self.has_validation:
            for name in ("validation_every", "early_stopping_patience"):
                if getattr(self, name):
                    raise ConfigError(name, "needs a held-out set: set validation_count or validation_split")

    @property
    def trains_network(self) -> bool:
        return self.method != "ti"

    @property
    def trains_embedding(self) -> bool:
        return self.method in EMBEDDING_METHODS

    def validate(self) -> None:
        check_str("dataset", self.dataset, required=True)
        check_choice("method", self.method, METHODS)
        check_int("steps", self.steps, 1, 10_000_000)
        check_str("output_name", self.output_name, required=True)
        check_file_name("output_name", self.output_name)
        check_str("trigger", self.trigger, required=True)
        for name in TEXT_FIELDS:
            check_str(name, getattr(self, name))
            if "\0" in getattr(self, name):
                raise ConfigError(name, "must not contain NUL bytes")
        for name in PATH_FIELDS:
            if getattr(self, name) is not None:
                check_path(name, getattr(self, name))
        if self.trains_embedding and not re.fullmatch(r"[^\s.,/\\()\[\]<>:]+", self.trigger):
            raise ConfigError("trigger", "an embedding's trigger must be one word without spaces, dots, commas, "
                                         "slashes, brackets or colons")
        if self.method == "ti" and self.output_name != self.trigger:
            raise ConfigError("output_name", "for textual inversion the file name is the prompt word: it must "
                                             "equal the trigger")
        if self.preset is not None:
            check_choice("preset", self.preset, TASK_PRESETS)
        check_choice("prior", self.prior, PRIORS)
        check_int("num_class_images", self.num_class_images, 0, 100_000)
        if self.num_class_images and not (isinstance(self.class_prompt, str) and self.class_prompt.strip()):
            raise ConfigError("class_prompt", "is required to generate class images (num_class_images > 0)")
        if self.num_class_images and self.prior != "class_images":
            raise ConfigError("num_class_images", "class images are generated for prior 'class_images' (or "
                                                  "method dreambooth) only")
        if self.prior == "class_images" and not self.class_dir and not self.num_class_images:
            raise ConfigError("class_dir", "prior 'class_images' needs a class images folder, or a class_prompt "
                                           "and num_class_images to generate them")
        if self.prior == "base_prediction" and not self.trains_network:
            raise ConfigError("prior", "the base-prediction prior needs a network (it compares with the adapter "
                                       "switched off)")
        check_float("prior_loss_weight", self.prior_loss_weight, 0.0, 100.0)
        check_choice("targets", self.targets, PRESETS)
        if self.stages is not None:
            from .stages import check_stages, total_steps
            check_stages(self.stages, self.method)
            for i, st in enumerate(self.stages):
                if "\0" in (st.get("name") or ""):
                    raise ConfigError(f"stages[{i}].name", "must not contain NUL bytes")
            if self.steps != total_steps(self.stages):
                raise ConfigError("steps", f"must equal the sum of the stages' steps ({total_steps(self.stages)}) "
                                           f"or be left out, not {self.steps}")
        check_int("network_dim", self.network_dim, 1, 1024)
        check_float("network_alpha", self.network_alpha, 0.0, 1e6, open_low=True)
        if self.conv_dim is not None:
            check_int("conv_dim", self.conv_dim, 1, 1024)
            if self.method not in CONV_METHODS:
                raise ConfigError("conv_dim", f"method {self.method} does not train convolutions; use locon, "
                                              f"loha, lokr or dora")
        if self.conv_alpha is not None:
            check_float("conv_alpha", self.conv_alpha, 0.0, 1e6, open_low=True)
        check_int("lokr_factor", self.lokr_factor, -1, 1 << 20)
        if self.lokr_factor == 0:
            raise ConfigError("lokr_factor", "must be -1 (balanced) or a positive factor")
        check_bool("train_text_encoder", self.train_text_encoder)
        if self.train_text_encoder and self.method == "ti":
            raise ConfigError("train_text_encoder", "textual inversion trains vectors, not the text encoder")
        check_int("num_vectors", self.num_vectors, 1, 75)
        check_str("init_text", self.init_text)
        for name in ("unet_lr", "te_lr", "emb_lr"):
            check_float(name, getattr(self, name), 0.0, 10.0)
        if self.trains_network and not self.unet_lr and not (self.train_text_encoder and self.te_lr):
            raise ConfigError("unet_lr", "nothing would train: unet_lr is 0 and the text encoder is not trained")
        if self.train_text_encoder and not self.te_lr:
            raise ConfigError("te_lr", "must be > 0 when the text encoder is trained")
        if self.trains_embedding and not self.emb_lr:
            raise ConfigError("emb_lr", "must be > 0 for textual inversion / pivotal tuning")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float("weight_decay", self.weight_decay, 0.0, 10.0)
        check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, 0, self.steps)
        check_int("lr_cycles", self.lr_cycles, 1, 1000)
        check_int("batch_size", self.batch_size, 1, 4096)
        check_int("gradient_accumulation", self.gradient_accumulation, 1, 4096)
        check_float("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_int("seed", self.seed, 0, 2 ** 63 - 1)
        if self.min_snr_gamma is not None:
            check_float("min_snr_gamma", self.min_snr_gamma, 0.0, 1000.0, open_low=True)
        check_float("noise_offset", self.noise_offset, 0.0, 1.0)
        if self.resolution is not None:
            check_int("resolution", self.resolution, 64, 4096)
            if self.resolution % 8:
                raise ConfigError("resolution", "must be a multiple of 8")
        for name in ("enable_bucket", "bucket_no_upscale", "flip_aug", "random_crop", "shuffle_caption",
                     "save_state", "save_on_stop", "cache_text_outputs"):
            check_bool(name, getattr(self, name))
        check_int("bucket_step", self.bucket_step, 8, 512)
        if self.bucket_step % 8:
            raise ConfigError("bucket_step", "must be a multiple of 8")
        check_int("min_bucket", self.min_bucket, 64, 8192)
        check_int("max_bucket", self.max_bucket, self.min_bucket, 8192)
        check_int("keep_tokens", self.keep_tokens, 0, 75)
        check_float("caption_dropout", self.caption_dropout, 0.0, 1.0)
        check_float("tag_dropout", self.tag_dropout, 0.0, 1.0)
        check_int("save_every", self.save_every, 0, 10_000_000)
        check_int("keep_last", self.keep_last, 1, 10_000)
        check_choice("save_dtype", self.save_dtype, SAVE_DTYPES)
        check_int("sample_every", self.sample_every, 0, 10_000_000)
        check_choice("on_bad_image", self.on_bad_image, ("skip", "fail"))
        self._validate_validation()


# ---- reading JSON ---------------------------------------------------------------------------------------------
def _coerce(f: dataclasses.Field, key: str, value: Any) -> Any:
    """JSON numbers for float fields may arrive as ints; everything else must already have its type."""
    if value is None:
        return "" if key in TEXT_FIELDS else None  # a form's empty text box may arrive as null
    if f.type in ("float", "Optional[float]") and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(key, f"must be a number of sensible size, not {show(value)}") from None
    return value


def _depth(value) -> int:
    """How deeply lists/dicts nest in a JSON value (iterative: no recursion on hostile input)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            break
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend((x, d + 1) for x in v)
    return deepest
