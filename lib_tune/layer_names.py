"""The one authority for layer names: kohya key ⇄ webui (ldm/sgm) layer ⇄ diffusers name ⇄ LBW block, for SD1, SD2
and SDXL. The runtime (inject), the trainer (train.methods) and the tag grammar (prompt.blocks) all ask here.

The names:
- webui layer: what the built-in Lora calls a module (extensions-builtin/Lora/networks.py
  assign_network_names_to_compvis_modules): the ldm/sgm module path with dots as underscores, `diffusion_model_...`
  for the UNet, `transformer_text_model_...` (SD1 CLIP), `model_transformer_resblocks_...` (SD2 OpenCLIP),
  `0_...` / `1_...` (SDXL's two text encoders).
- kohya key: an adapter module's name, `lora_unet_` + a diffusers path (SD1/SD2) or an ldm path (SDXL, and what the
  built-in also reads for SD1), `lora_te_` / `lora_te1_` / `lora_te2_` + a Hugging Face CLIP path.
- diffusers path: the diffusers UNet module path with underscores (`down_blocks_0_attentions_0_...`), which
  `ldm_path` turns into the ldm one (`input_blocks_1_1_...`) by the built-in's block arithmetic, and `diffusers_path`
  back.
- LBW block: `BASE` (text encoders), `IN00`-`IN11`, `M00`, `OUT00`-`OUT11` (sd-webui-lora-block-weight's ids: the
  ldm block index).

Pure string rules (no torch): prompt's grammar imports this without the engine.
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Tuple

UNET = "diffusion_model_"  # webui layer names of the UNet
KOHYA_UNET = "lora_unet_"
#: kohya text-encoder prefixes; `lora_te?_` is formats.keys.TE_PENDING (CLIP-L of a file not yet told SD1 or SDXL)
KOHYA_TE = re.compile(r"lora_te[0-9?]*_")
#: ldm input (and output) blocks per architecture: SD1/SD2 have four levels of three, SDXL three
IO_BLOCKS = {"sd1": 12, "sd2": 12, "sdxl": 9}

#: diffusers ResnetBlock2D child -> ldm ResBlock child
RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
          "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_RESNET_INV = {v: k for k, v in RESNET.items()}
#: Hugging Face CLIP child -> OpenCLIP resblock child (the built-in applies the first that matches)
_OPENCLIP = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn"))

#: the text-encoder layers kohya trains (CLIPAttention's q/k/v/out + CLIPMLP): group 2 is the layer index
HF_TE_LAYER = re.compile(r"^(0_)?transformer_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
OPENCLIP_TE_LAYER = re.compile(r"^(1_)?model_transformer_resblocks_(\d+)_(attn|mlp_c_fc|mlp_c_proj)$")


# ---- the UNet's block arithmetic ----------------------------------------------------------------------------------
def input_block(level: int, index: int) -> int:
    """ldm input block of diffusers down_blocks_{level}, its resnet/attention `index` (0, 1) or downsampler (2)."""
    return 1 + 3 * level + index


def output_block(level: int, index: int) -> int:
    """ldm output block of diffusers up_blocks_{level}, its resnet/attention `index` (0-2); the upsampler sits in 2."""
    return 3 * level + index


def _upsampler_slot(level: int) -> int:
    """The upsampler's place in its output block by the built-in's rule: after the attention, except on level 0 (SD1
    has no attention there; SDXL and two-level UNets do, so there the rule misses the layer)."""
    return 2 if level > 0 else 1


def _sub(group: str) -> int:
    return 1 if group == "attentions" else 0


def _suffix(group: str, s: str) -> str:
    return RESNET.get(s, s) if group == "resnets" else s


_TO_LDM = [(re.compile(p), f) for p, f in [
    (r"conv_in(.*)", lambda m: f"input_blocks_0_0{m[1]}"),
    (r"conv_out(.*)", lambda m: f"out_2{m[1]}"),
    (r"time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"input_blocks_{input_block(int(m[1]), int(m[3]))}_{_sub(m[2])}_{_suffix(m[2], m[4])}"),
    (r"mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"),
    (r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"output_blocks_{output_block(int(m[1]), int(m[3]))}_{_sub(m[2])}_{_suffix(m[2], m[4])}"),
    (r"down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{input_block(int(m[1]), 2)}_0_op"),
    (r"up_blocks_(\d+)_upsamplers_0_conv",
     lambda m: f"output_blocks_{output_block(int(m[1]), 2)}_{_upsampler_slot(int(m[1]))}_conv"),
]]
_FROM_LDM_SIMPLE = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
                    "time_embed_2": "time_embedding_linear_2"}
_LDM_IO = re.compile(r"(input|output)_blocks_(\d+)_(\d+)_(.+)$")
_LDM_MIDDLE = re.compile(r"middle_block_(\d+)_(.+)$")
_LDM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_|middle_block_")


def ldm_path(diffusers: str) -> Optional[str]:
    """The ldm UNet path of a diffusers one (underscores, no prefix) by the built-in's convert_diffusers_name_to_compvis
    (anchored at the start only, as its re.match: what follows a sampler's `conv` is dropped); None if no rule
    matches (an ldm path, or a layer the built-in has no rule for)."""
    for rx, fmt in _TO_LDM:
        m = rx.match(diffusers)
        if m:
            return fmt(m)
    return None


def diffusers_path(ldm: str) -> Optional[str]:
    """The diffusers UNet path of an ldm one (the inverse of ldm_path), None for layers without one (label_emb,
    out_0, a block index past the last)."""
    if ldm in _FROM_LDM_SIMPLE:
        return _FROM_LDM_SIMPLE[ldm]
    m = _LDM_IO.match(ldm)
    if m:
        n, j, rest = int(m[2]), int(m[3]), m[4]
        if m[1] == "input":
            if n == 0:
                return None
            level, index = divmod(n - 1, 3)
            if index == 2:
                return f"down_blocks_{level}_downsamplers_0_conv" if j == 0 and rest == "op" else None
            return _block_part("down_blocks", level, index, j, rest)
        level, index = divmod(n, 3)
        if rest == "conv" and j > 0:
            return f"up_blocks_{level}_upsamplers_0_conv"
        return _block_part("up_blocks", level, index, j, rest)
    m = _LDM_MIDDLE.match(ldm)
    if m:
        j, rest = int(m[1]), m[2]
        if j == 1:
            return f"mid_block_attentions_0_{rest}"
        return f"mid_block_resnets_{j // 2}_{_RESNET_INV.get(rest, rest)}"
    return None


def _block_part(group: str, level: int, index: int, j: int, rest: str) -> Optional[str]:
    if j == 0:
        return f"{group}_{level}_resnets_{index}_{_RESNET_INV.get(rest, rest)}"
    if j == 1:
        return f"{group}_{level}_attentions_{index}_{rest}"
    return None


# ---- kohya key -> webui layer --------------------------------------------------------------------------------------
_TE = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")
_TE2 = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _openclip(i: str, rest: str) -> str:
    """HF CLIP layer names -> OpenCLIP resblock names (only the first matching rename, as the built-in)."""
    for hf, oc in _OPENCLIP:
        if hf in rest:
            return f"model_transformer_resblocks_{i}_{rest.replace(hf, oc)}"
    return f"model_transformer_resblocks_{i}_{rest}"


def convert_key(key: str, is_sd2: bool) -> str:
    """The built-in's convert_diffusers_name_to_compvis: diffusers-style kohya names (SD1/SD2 UNet) and kohya TE
    names to webui layer names; any other key is returned unchanged."""
    if key.startswith(KOHYA_UNET):
        path = ldm_path(key[len(KOHYA_UNET):])
        if path is not None:
            return UNET + path
    m = _TE.match(key)
    if m:
        return _openclip(m[1], m[2]) if is_sd2 else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = _TE2.match(key)
    if m:
        return "1_" + _openclip(m[1], m[2])
    return key


def resolve(key: str, has: Callable[[str], bool], is_sd2: bool) -> Tuple[Optional[str], Optional[str]]:
    """Find the layer for adapter module `key` with the built-in's fallbacks, in its order (load_network).

    Returns (layer name, MultiheadAttention part) or (None, None). The part is "q"/"k"/"v" when the key named one
    projection of a packed attention (`..._attn_q_proj` -> layer `..._attn`), else None. (A packed attention's out
    projection is a layer of its own, `..._attn_out_proj`; inject.mapping.place makes it part "out".)
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


# ---- webui layer -> kohya key ---------------------------------------------------------------------------------------
_HF_LAYER = re.compile(r"(0_)?transformer_text_model_(.+)$")
_OPENCLIP_LAYER = re.compile(r"(1_)?model_transformer_resblocks_(\d+)_(.+)$")


def kohya_keys(layer: str, part: Optional[str], architecture: str) -> List[str]:
    """The kohya keys that name webui `layer` (and packed-attention `part`), the one kohya writes first: for an
    SD1/SD2 UNet layer its diffusers name, then its ldm name (which the built-in also reads); an SDXL UNet layer by
    its ldm name; text encoders by Hugging Face CLIP names (OpenCLIP's converted as kohya does). Which of them the
    built-in's rules lead back to the layer is resolve's to say (the diffusers name misses where the built-in's
    upsampler rule does); empty for layers no kohya key can name."""
    if layer.startswith(UNET):
        path = layer[len(UNET):]
        d = diffusers_path(path) if architecture in ("sd1", "sd2") else None
        return ([KOHYA_UNET + d] if d else []) + [KOHYA_UNET + path]
    m = _HF_LAYER.match(layer)
    if m and part is None:
        return [("lora_te1_" if m[1] else "lora_te_") + "text_model_" + m[2]]
    m = _OPENCLIP_LAYER.match(layer)
    if m:
        rest = m[3]
        if rest == "attn":
            if part is None:
                return []
            rest = f"attn_{part}_proj"
        elif part is not None:
            return []
        for hf, oc in _OPENCLIP:
            if rest.startswith(oc):
                rest = hf + rest[len(oc):]
                break
        return [f"{'lora_te2_' if m[1] else 'lora_te_'}text_model_encoder_layers_{m[2]}_{rest}"]
    return []


# ---- LBW blocks ----------------------------------------------------------------------------------------------------
def lbw_block(key: str, architecture: str) -> Optional[str]:
    """LBW block id ('BASE', 'IN04', 'M00', 'OUT05', ...) of a kohya key (diffusers or ldm UNet names), None for
    modules in no block (time embedding, conv_out, SDXL's label_emb) and for blocks past the architecture's last."""
    if KOHYA_TE.match(key):
        return "BASE"
    if not key.startswith(KOHYA_UNET):
        return None
    rest = key[len(KOHYA_UNET):]
    m = _LDM_BLOCK.match(ldm_path(rest) or rest)
    if m is None:
        return None
    if m[1] is None:
        return "M00"
    index = int(m[2])
    if index >= IO_BLOCKS[architecture]:
        return None
    return f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{index:02d}"


def layer_block(layer: str, architecture: str) -> Optional[str]:
    """The LBW block of a webui layer: its UNet block, BASE for every text-encoder layer."""
    if layer.startswith(UNET):
        return lbw_block(KOHYA_UNET + layer[len(UNET):], architecture)
    return "BASE"
