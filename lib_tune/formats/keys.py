"""File key -> (canonical module name, parameter name), for every key layout we read.

Canonical module names are kohya's (see AdapterFile): `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` + the
target path with dots as underscores. kohya and LyCORIS keys are split at the first dot like the webui does;
dotted layouts (diffusers, PEFT, ComfyUI) are split by recognising the parameter suffix instead, since their module
paths contain dots. A CLIP-L text encoder key of a dotted layout is `lora_te_` for SD1 but `lora_te1_` for SDXL,
which only the whole file tells: such keys get the TE_PENDING prefix and read.py resolves it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

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

#: parameter spellings of dotted layouts, longest first -> our parameter names
DOTTED_PARAMS = (
    ("lora_linear_layer.down.weight", "lora_down.weight"), ("lora_linear_layer.up.weight", "lora_up.weight"),
    ("lora.down.weight", "lora_down.weight"), ("lora.up.weight", "lora_up.weight"),
    ("lora_down.weight", "lora_down.weight"), ("lora_up.weight", "lora_up.weight"),
    ("lora_mid.weight", "lora_mid.weight"),
    ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight"),
    ("lora_magnitude_vector.weight", "dora_scale"), ("lora_magnitude_vector", "dora_scale"),
    ("a1.weight", "a1.weight"), ("a2.weight", "a2.weight"), ("b1.weight", "b1.weight"),
    ("b2.weight", "b2.weight"), ("bm.weight", "bm.weight"),
)

#: one-word parameters (LyCORIS types and common extras), valid at the end of a dotted key
SINGLE_PARAMS = frozenset((
    "alpha", "scale", "dora_scale", "bias", "on_input", "weight", "diff", "diff_b", "w_norm", "b_norm",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_blocks", "oft_diag", "rescale",
))

_PEFT_NAMED = re.compile(r"^(.+)\.lora_([AB])\.[A-Za-z0-9_]+\.weight$")  # lora_A.<adapter name>.weight
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
        return f"{m.group(1)}.{target}", f"lora_{m.group(3)}.weight", "attn-proc"
    for suffix, param in DOTTED_PARAMS:
        if rest.endswith("." + suffix):
            layout = "peft" if suffix.startswith(("lora_A", "lora_B", "lora_magnitude")) else "dotted"
            return rest[: -len(suffix) - 1], param, layout
    m = _PEFT_NAMED.match(rest)
    if m:
        return m.group(1), "lora_down.weight" if m.group(2) == "A" else "lora_up.weight", "peft"
    path, _, last = rest.rpartition(".")
    if last in SINGLE_PARAMS:
        return path, last, "dotted"
    return None
