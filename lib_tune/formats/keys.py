"""File key -> (canonical module name, parameter name), for every key layout we read.

Canonical module names are kohya's (see AdapterFile): `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` + the
target path with dots as underscores. kohya and LyCORIS keys are split at the first dot like the webui does;
dotted layouts (diffusers, PEFT, ComfyUI) are split by recognising the parameter suffix instead, since their module
paths contain dots. A CLIP-L text encoder key of a dotted layout is `lora_te_` for SD1 but `lora_te1_` for SDXL,
which only the whole file tells: such keys get the TE_PENDING prefix and read.py resolves it.

Parameter names are the network types' own (lib_tune.algos: param_keys, aliases, common_keys); this module adds only
the spellings of dotted file layouts (diffusers' attention processors and lora_linear_layer, PEFT's DoRA magnitude).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

from ..algos import param_names
from ..algos.lora import DOWN, PEFT_NAMES, UP

TE_PENDING = "lora_te?_"

#: underscore layouts: file prefix -> canonical prefix
UNDERSCORE_PREFIXES = (
    ("lora_unet_", "lora_unet_"), ("lora_te_", "lora_te_"), ("lora_te1_", "lora_te1_"),
    ("lora_te2_", "lora_te2_"), ("oft_unet_", "lora_unet_"), ("lycoris_", "lora_unet_"),
)

#: dotted layouts: file prefix -> (component as PEFT metadata names it, canonical prefix, is a text encoder)
DOTTED_PREFIXES = (
    ("text_encoders.clip_l.transformer.", "text_encoder", TE_PENDING, True),
    ("text_encoders.clip_g.transformer.", "text_encoder_2", "lora_te2_", True),
    ("text_encoders.clip_h.transformer.", "text_encoder", "lora_te_", True),
    ("text_encoder_2.", "text_encoder_2", "lora_te2_", True),
    ("text_encoder.", "text_encoder", TE_PENDING, True),
    ("unet.", "unet", "lora_unet_", False),
    ("model.diffusion_model.", "unet", "lora_unet_", False),
    ("diffusion_model.", "unet", "lora_unet_", False),
    ("down_blocks.", "unet", "lora_unet_", False),  # oldest diffusers attn-proc files: no component prefix
    ("mid_block.", "unet", "lora_unet_", False),
    ("up_blocks.", "unet", "lora_unet_", False),
)

#: parameter spellings of dotted layouts that no network type reads as such, longest first -> our parameter names
DOTTED_SPELLINGS = (
    ("lora_linear_layer.down.weight", DOWN), ("lora_linear_layer.up.weight", UP),
    ("lora.down.weight", DOWN), ("lora.up.weight", UP),
    ("lora_magnitude_vector.weight", "dora_scale"), ("lora_magnitude_vector", "dora_scale"),
)
_PEFT_PREFIXES = tuple(k.split(".")[0] for k in PEFT_NAMES) + ("lora_magnitude",)


def _dotted_params() -> Tuple[Tuple[str, str], ...]:
    """(suffix, our name) for every dotted parameter: the layouts' spellings, then the registered types' names."""
    names = tuple((k, PEFT_NAMES.get(k, k)) for k in param_names() if "." in k)
    return DOTTED_SPELLINGS + names


_PEFT_NAMED = re.compile(r"^(.+)\.(lora_[AB])\.[A-Za-z0-9_]+\.weight$")  # lora_A.<adapter name>.weight
_ATTN_PROC = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")
_UNET_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class KeyPlace:
    module: str  # canonical module name (may start with TE_PENDING)
    param: str  # parameter name as the network types expect it
    layout: str  # "kohya" | "lycoris" | "dotted" | "peft" | "attn-proc"
    component: str = ""  # dotted layouts: "unet" | "text_encoder" | "text_encoder_2" (for PEFT metadata)
    path: str = ""  # dotted layouts: the module path inside the component, with dots


def place_key(key: str) -> Optional[KeyPlace]:
    """Where one file key goes, or None if it is in no layout we know."""
    head = key.split(".", 1)[0]
    for file_prefix, canon in UNDERSCORE_PREFIXES:
        if head.startswith(file_prefix) and "." in key and len(head) > len(file_prefix):
            module, param = key.split(".", 1)
            layout = "lycoris" if file_prefix == "lycoris_" else "kohya"
            return KeyPlace(canon + module[len(file_prefix):], param, layout)
    for file_prefix, component, canon, is_te in DOTTED_PREFIXES:
        if key.startswith(file_prefix):
            rest = key[len(file_prefix):]
            if file_prefix in ("down_blocks.", "mid_block.", "up_blocks."):
                rest = key
            split = _split_dotted(rest, is_te)
            if split is None:
                return None
            path, param, layout = split
            if not path:
                return None
            return KeyPlace(canon + path.replace(".", "_"), param, layout, component, path)
    return None


def _split_dotted(rest: str, is_te: bool):
    m = _ATTN_PROC.match(rest)
    if m:
        target = (_TE_PROC if is_te else _UNET_PROC)[m.group(2)]
        return f"{m.group(1)}.{target}", UP if m.group(3) == "up" else DOWN, "attn-proc"
    for suffix, param in _dotted_params():
        if rest.endswith("." + suffix):
            layout = "peft" if suffix.startswith(_PEFT_PREFIXES) else "dotted"
            return rest[: -len(suffix) - 1], param, layout
    m = _PEFT_NAMED.match(rest)
    if m:
        return m.group(1), PEFT_NAMES[m.group(2) + ".weight"], "peft"
    path, _, last = rest.rpartition(".")
    if "." not in last and last in param_names():
        return path, last, "dotted"
    return None
