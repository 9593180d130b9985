"""Which model family an adapter was trained for: "sd1", "sd2", "sdxl" or None.

Evidence, strongest first: the input width of the UNet's cross-attention k/v (the text-embedding width: 768 SD1,
1024 SD2, 2048 SDXL); two text encoders (`lora_te1_`/`lora_te2_`); the metadata kohya and the SAI model spec write
(`ss_base_model_version`, `ss_v2`, `modelspec.architecture`); the width of a lone text encoder (768 CLIP-L,
1024 OpenCLIP-H); finally any kohya `ss_*` metadata without an SD2/SDXL mark means SD1 (the webui's rule).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from ..algos.base import NetworkModule

CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_WIDTH = {768: "sd1", 1024: "sd2"}


def from_metadata(metadata: Mapping[str, str]) -> Optional[str]:
    base = str(metadata.get("ss_base_model_version", "")).lower()
    if base.startswith("sdxl"):
        return "sdxl"
    if base.startswith("sd_v2") or str(metadata.get("ss_v2", "")) == "True":
        return "sd2"
    if base.startswith("sd_v1"):
        return "sd1"
    spec = str(metadata.get("modelspec.architecture", "")).lower()
    for prefix, arch in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if spec.startswith(prefix):
            return arch
    return None


def guess_architecture(modules: Dict[str, NetworkModule], metadata: Mapping[str, str]) -> Optional[str]:
    for name, module in modules.items():
        if name.startswith("lora_unet_") and name.endswith(("attn2_to_k", "attn2_to_v")):
            arch = CROSS_ATTN_WIDTH.get(module.in_dim())
            if arch:
                return arch
    if any(name.startswith(("lora_te1_", "lora_te2_")) for name in modules):
        return "sdxl"
    arch = from_metadata(metadata)
    if arch:
        return arch
    for name, module in modules.items():
        if name.startswith("lora_te_") and name.endswith(("q_proj", "k_proj", "v_proj", "mlp_fc1")):
            arch = TE_WIDTH.get(module.in_dim())
            if arch:
                return arch
    if any(k.startswith("ss_") for k in metadata):
        return "sd1"
    return None
