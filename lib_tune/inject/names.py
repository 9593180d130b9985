"""Adapter module key -> webui layer name: the built-in Lora's rules (networks.py
convert_diffusers_name_to_compvis and the lookup fallbacks in load_network), kept as one pure function so that
the engine, the tools and the UI agree on what a key means.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Tuple

_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}

_RULES = [(re.compile(p), f) for p, f in [
    (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{_kind(m[2])}_{_suffix(m[2], m[4])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{_kind(m[2])}_{_suffix(m[2], m[4])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
     lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
]]
_TE = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")
_TE2 = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _kind(group: str) -> int:
    return 1 if group == "attentions" else 0


def _suffix(group: str, s: str) -> str:
    return _RESNET.get(s, s) if group == "resnets" else s


def _openclip(i: str, rest: str) -> str:
    """HF CLIP layer names -> OpenCLIP resblock names (only the first matching rename, as the built-in)."""
    if "mlp_fc1" in rest:
        rest = rest.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in rest:
        rest = rest.replace("mlp_fc2", "mlp_c_proj")
    else:
        rest = rest.replace("self_attn", "attn")
    return f"model_transformer_resblocks_{i}_{rest}"


def convert_key(key: str, is_sd2: bool) -> str:
    """The built-in's convert_diffusers_name_to_compvis: diffusers-style kohya names (SD1/SD2 UNet) and kohya TE
    names to ldm/OpenCLIP layer names; any other key is returned unchanged."""
    # the built-in matches with re.match (anchored at the start only), so a suffix after the pattern is kept
    for rx, fmt in _RULES:
        m = rx.match(key)
        if m:
            return fmt(m)
    m = _TE.match(key)
    if m:
        return _openclip(m[1], m[2]) if is_sd2 else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = _TE2.match(key)
    if m:
        return "1_" + _openclip(m[1], m[2])
    return key


def resolve(key: str, has: Callable[[str], bool], is_sd2: bool) -> Tuple[Optional[str], Optional[str]]:
    """Find the layer for adapter module `key` with the built-in's fallbacks, in its order.

    Returns (layer name, MultiheadAttention part) or (None, None). The part is "q"/"k"/"v" when the key named one
    projection of a packed attention (`..._attn_q_proj` -> layer `..._attn`), else None.
    """
    name = convert_key(key, is_sd2)
    if has(name):
        return name, None
    m = _X_PROJ.match(name)
    if m and has(m[1]):
        return m[1], m[2][0]
    if "lora_unet" in key:  # SDXL and ldm-named SD1 files already use ldm paths
        name = key.replace("lora_unet", "diffusion_model")
        return (name, None) if has(name) else (None, None)
    if "lora_te1_text_model" in key:
        for repl in ("0_transformer_text_model", "transformer_text_model"):  # SDXL CLIP-L, then SD1
            name = key.replace("lora_te1_text_model", repl)
            if has(name):
                return name, None
        return None, None
    if "oft_unet" in key:  # kohya OFT
        name = key.replace("oft_unet", "diffusion_model")
        return (name, None) if has(name) else (None, None)
    return None, None
