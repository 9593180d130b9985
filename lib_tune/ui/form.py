"""The Tune tab's form as data: its fields, how their values become the JSON job that `POST /tune/v1/train`
takes, and what a task preset fills in. Pure (no gradio, no webui) so the mapping is unit-tested; tab.py only
lays the fields out.

Why the form sends every advanced field explicitly: the preset dropdown already wrote the preset's values into
those fields, and the user may have edited them since; what the user sees is what trains, and the "Copy as API
request" text is the complete job.

UI-only conventions (the config itself has no such values):
- method "dreambooth" is DreamBooth-LoRA: a LoRA with prior preservation (class images when a class folder is
  given, else the adapter-off prediction as the prior);
- 0 means "unset" for resolution (the model's own), conv_dim (no convolution layers) and min_snr_gamma (off).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, fields as dc_fields
from typing import Any, Dict, Optional, Sequence, Tuple

from ..train.config import MIXED_PRECISION, PRESET_VALUES, PRIORS, TASK_PRESETS, ConfigError, TrainConfig
from ..train.methods import METHODS, PRESETS as TARGET_PRESETS
from ..train.optim import OPTIMIZERS, SCHEDULERS

UI_METHODS = METHODS + ("dreambooth",)
#: fields where the UI's 0 stands for the config's null
ZERO_IS_NONE = ("resolution", "conv_dim", "min_snr_gamma")
#: keys the job JSON carries next to TrainConfig's fields (job_runner.start pops them)
JOB_EXTRAS = ("sample_prompts", "sample_steps", "overwrite", "resume")


@dataclass(frozen=True)
class Field:
    key: str
    kind: str  # text | lines | int | float | bool | choice | json
    label: str
    default: Any = None
    choices: Tuple[str, ...] = ()
    info: str = ""


_D = {f.name: f.default for f in dc_fields(TrainConfig)}


def _f(key, kind, label, default=None, choices=(), info=""):
    return Field(key, kind, label, _D.get(key) if default is None else default, tuple(choices), info)


FIELDS: Tuple[Field, ...] = (
    # dataset
    _f("dataset", "text", "Dataset folder (on the server)", "",
       info="images with optional same-named .txt captions; kohya's N_name subfolders give repeats"),
    _f("trigger", "text", "Trigger word", ""),
    _f("default_caption", "text", "Default caption", "", info="for images without a caption file"),
    _f("shuffle_caption", "bool", "Shuffle caption tags"),
    _f("keep_tokens", "int", "Keep first N tags in place"),
    _f("caption_dropout", "float", "Caption dropout rate"),
    _f("flip_aug", "bool", "Random horizontal flip"),
    _f("prior", "choice", "Prior preservation", choices=PRIORS),
    _f("class_dir", "text", "Class images folder", ""),
    _f("class_prompt", "text", "Class prompt", ""),
    _f("prior_loss_weight", "float", "Prior loss weight"),
    # task
    _f("method", "choice", "Method", "lora", UI_METHODS),
    _f("preset", "choice", "Preset", "character", TASK_PRESETS,
       info="character (person) / style / object / ti / pivotal: fills the advanced fields"),
    _f("steps", "int", "Steps", 1000),
    _f("output_name", "text", "Output name", ""),
    _f("overwrite", "bool", "Overwrite an existing file", False),
    # advanced
    _f("targets", "choice", "Layers", choices=TARGET_PRESETS),
    _f("network_dim", "int", "Rank (dim)"),
    _f("network_alpha", "float", "Alpha"),
    _f("conv_dim", "int", "Conv rank (0: none)", 0),
    _f("train_text_encoder", "bool", "Train the text encoder"),
    _f("stages", "json", "Stages (JSON)", "",
       info='a staged plan, empty: none. A JSON list, e.g. [{"targets": "mid_proj", "steps": 200, "network_dim": 8}, '
            '{"targets": "te_last2", "steps": 100, "te_lr": 5e-5}]; steps is then their sum'),
    _f("num_vectors", "int", "Embedding vectors"),
    _f("init_text", "text", "Embedding init text", ""),
    _f("unet_lr", "float", "UNet LR"),
    _f("te_lr", "float", "Text encoder LR"),
    _f("emb_lr", "float", "Embedding LR"),
    _f("optimizer", "choice", "Optimizer", choices=OPTIMIZERS),
    _f("lr_scheduler", "choice", "LR schedule", choices=SCHEDULERS),
    _f("warmup_ratio", "float", "Warmup (fraction of steps)"),
    _f("min_snr_gamma", "float", "Min-SNR gamma (0: off)"),
    _f("noise_offset", "float", "Noise offset"),
    _f("resolution", "int", "Resolution (0: the model's)", 0),
    _f("min_bucket", "int", "Min bucket size"),
    _f("max_bucket", "int", "Max bucket size"),
    _f("batch_size", "int", "Batch size"),
    _f("gradient_accumulation", "int", "Gradient accumulation"),
    _f("gradient_checkpointing", "bool", "Gradient checkpointing"),
    _f("mixed_precision", "choice", "Precision", choices=MIXED_PRECISION),
    _f("save_every", "int", "Save every N steps (0: at the end)"),
    _f("seed", "int", "Seed"),
    _f("on_bad_image", "choice", "Unusable images", choices=("skip", "fail"),
       info="skip: leave out, with a warning, images that cannot train; fail: refuse the dataset"),
    # validation (held-out images) and early stopping
    _f("validation_count", "int", "Held-out images (0: none)",
       info="scored for a validation loss, never trained on; overrides the fraction"),
    _f("validation_split", "float", "Held-out fraction (0..0.5)"),
    _f("validation_every", "int", "Validate every N steps (0: steps/10)"),
    _f("validation_timesteps", "int", "Validation timesteps per image"),
    _f("early_stopping_patience", "int", "Early-stopping patience (0: off)",
       info="validations without improvement before the run ends"),
    _f("early_stopping_min_delta", "float", "Min improvement"),
    _f("keep_best", "bool", "Keep the best file (<name>-best)"),
    # samples
    _f("sample_prompts", "lines", "Sample prompts (one per line)", ""),
    _f("sample_every", "int", "Sample every N steps (0: never)"),
    _f("sample_steps", "int", "Sampling steps", 20),
)
BY_KEY: Dict[str, Field] = {f.key: f for f in FIELDS}
KEYS: Tuple[str, ...] = tuple(f.key for f in FIELDS)
#: the fields a preset writes (everything PRESET_VALUES sets that the form shows, across all presets)
PRESET_KEYS: Tuple[str, ...] = tuple(k for k in KEYS if any(k in v for v in PRESET_VALUES.values()))


def initial_values() -> Dict[str, Any]:
    """The form on first load: field defaults with the default preset filled in."""
    values = {f.key: f.default for f in FIELDS}
    values.update(preset_values(values["preset"]))
    return values


def to_ui(key: str, value: Any) -> Any:
    if key in ZERO_IS_NONE and value is None:
        return 0
    return value


def preset_values(preset: str) -> Dict[str, Any]:
    """What choosing `preset` writes into the form: the preset's values, and the config's defaults for the
    fields it does not set (so switching from style back to character also clears style's noise offset)."""
    chosen = PRESET_VALUES.get(preset, {})
    return {k: to_ui(k, chosen[k] if k in chosen else _D[k]) for k in PRESET_KEYS}


def preset_for_method(method: str, current: str) -> str:
    """The preset that goes with a method: embeddings have their own; DreamBooth-LoRA starts from object's
    rates; other methods keep the user's choice unless it was an embedding preset."""
    if method in ("ti", "pivotal"):
        return method
    if method == "dreambooth":
        return "object"
    return current if current not in ("ti", "pivotal") else "character"


def prior_for_method(method: str, prior: str, class_dir: str) -> str:
    """DreamBooth needs a prior: class images when a folder is given, else the base model's prediction."""
    if method == "dreambooth" and prior == "none":
        return "class_images" if (class_dir or "").strip() else "base_prediction"
    return prior


def _number(f: Field, value: Any) -> Any:
    if value is None or value == "":
        return None
    if f.kind == "int":
        return int(round(float(value)))
    return float(value)


def _json_value(f: Field, value: Any) -> Any:
    """A JSON field's text as data (None when empty); ConfigError naming the field when it is not valid JSON or
    not a list (the only JSON field, stages, takes a list)."""
    if isinstance(value, list):
        return value
    text = str(value or "").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f.key, f"{f.label} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(data, list):
        raise ConfigError(f.key, f"{f.label} must be a JSON list of stages ([{{...}}, ...]), not "
                                 f"{type(data).__name__}")
    return data


def to_job(values: Dict[str, Any]) -> Dict[str, Any]:
    """The job JSON for the form's values (the body of POST /tune/v1/train). Values are converted to the
    config's types (gradio numbers arrive as floats); the config's own validation judges them afterwards. A JSON
    field that does not parse is a ConfigError naming it (the tab shows it like any config error)."""
    out: Dict[str, Any] = {}
    for f in FIELDS:
        if f.key not in values:
            continue
        v = values[f.key]
        if f.kind in ("int", "float"):
            v = _number(f, v)
            if f.key in ZERO_IS_NONE and not v:
                v = None
            elif v is None:
                continue
        elif f.kind == "bool":
            v = bool(v)
        elif f.kind == "lines":
            v = [line.strip() for line in str(v or "").splitlines() if line.strip()]
        elif f.kind == "json":
            v = _json_value(f, v)
            if v is None:
                continue
        elif isinstance(v, str) or v is None:
            v = (v or "").strip()
        out[f.key] = v
    if out.get("stages"):
        out.pop("steps", None)  # a staged plan's steps are its stages' sum (the config derives it)
    method = out.get("method")
    if method == "dreambooth":
        out["prior"] = prior_for_method(method, out.get("prior", "none"), out.get("class_dir", ""))
        out["method"] = "lora"
    if out.get("method") == "ti" and not out.get("output_name"):
        out["output_name"] = out.get("trigger", "")
    for key in ("class_dir", "class_prompt", "init_text", "default_caption"):
        if key in out and not out[key]:
            del out[key]
    if not out.get("sample_prompts"):
        out.pop("sample_prompts", None)
    if not out.get("overwrite"):
        out.pop("overwrite", None)
    return out


def dataset_check_body(job: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a job that the dataset check (POST /tune/v1/validate) takes (TrainConfig's fields only)."""
    return {k: v for k, v in job.items() if k not in JOB_EXTRAS}


def resume_body(config: Dict[str, Any]) -> Dict[str, Any]:
    """A finished job's stored config, to start again from its saved state."""
    body = {k: v for k, v in config.items() if k != "overwrite"}
    body["resume"] = True
    return body


def use_text(job: Optional[Dict[str, Any]]) -> str:
    """What "Use it" adds to the txt2img prompt: the trigger and the tag for a network, the trigger (the
    embedding's name) for textual inversion; '' when the job left no file."""
    if not job or not job.get("output_path"):
        return ""
    cfg = job.get("config") or {}
    name, trigger = cfg.get("output_name", ""), (cfg.get("trigger") or "").strip()
    if cfg.get("method") == "ti":
        return name
    tag = f"<tune:{name}:1>"
    return f"{trigger}, {tag}" if trigger else tag


def api_request(job: Dict[str, Any], base_url: str) -> Tuple[str, str]:
    """(pretty JSON, a curl line) that start the same job through the HTTP API."""
    pretty = json.dumps(job, indent=2)
    compact = json.dumps(job, separators=(",", ":"))
    curl = (f"curl -X POST {shlex.quote(base_url.rstrip('/') + '/tune/v1/train')} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(compact)}")
    return pretty, curl


def values_from(keys: Sequence[str], args: Sequence[Any]) -> Dict[str, Any]:
    """gradio passes inputs positionally: name them."""
    if len(keys) != len(args):
        raise ValueError(f"{len(args)} values for {len(keys)} fields")
    return dict(zip(keys, args))
