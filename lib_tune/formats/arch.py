"""Which model family an adapter was trained for: "sd1", "sd2", "sdxl" or None.

Evidence, strongest first: the input width of the UNet's cross-attention k/v (the text-embedding width: 768 SD1,
1024 SD2, 2048 SDXL); a second text encoder (`lora_te2_`); the UNet's block structure (SDXL has no attention on
its first level and deeper transformer stacks, SD1/SD2 have attention from the first level on); the metadata
kohya and the SAI model spec write (`ss_base_model_version`, `ss_v2`, `modelspec.architecture`); the width of a
lone text encoder (768 CLIP-L, 1024 OpenCLIP-H); finally any kohya `ss_*` metadata without an SD2/SDXL mark means
SD1 (the webui's rule).

A `lora_te1_` prefix alone is no evidence: some SD1 trainers write it, and the built-in Lora maps it on SD1 (to
the CLIP text encoder) as on SDXL (to its CLIP-L); only a `lora_te2_` module says SDXL. A file with `lora_te1_`
and an SD1/SD2-shaped UNet is SD1 (CLIP-L is SD1's encoder; SD2's OpenCLIP is written `lora_te_`).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

from ..algos.base import NetworkModule
from ..layer_names import KOHYA_UNET, ldm_path

#: how the UI writes each architecture
ARCH_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_WIDTH = {768: "sd1", 1024: "sd2"}

#: UNet modules (ldm paths, diffusers keys are converted first) only SDXL has: more than one transformer block per
#: attention (depth 2 and 10), the class/size embedding (label_emb). (Attention on the deepest up level is
#: SDXL-only in full-size models, but a two-level SD1 UNet, as the tests' tiny ones, has it too.)
_SDXL_UNET = re.compile(r"(.*_transformer_blocks_[1-9]\d*_|label_emb_)")
#: UNet modules SDXL has not: attention on the first level (input_blocks_1/2_1), a fourth level (blocks 9-11)
_SD_UNET = re.compile(r"(input_blocks_[12]_1_|(input|output)_blocks_(9|1[01])_)")
#: the metadata keys that declare an architecture, strongest first
_MARKS = ("ss_base_model_version", "ss_v2", "modelspec.architecture")


def _declared(metadata: Mapping[str, str]) -> Optional[str]:
    """The architecture kohya's or the SAI model spec's keys declare (kohya's first), else None."""
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


def _kohya(metadata: Mapping[str, str]) -> bool:
    """Any kohya ss_* key: without an SD2/SDXL mark that means SD1 (the webui's rule)."""
    return any(k.startswith("ss_") for k in metadata)


def from_metadata(metadata: Mapping[str, str]) -> Optional[str]:
    """The architecture from a file's metadata alone (no tensors: the cards page): the declared one, else SD1 for
    kohya metadata, else None. explain_architecture weighs the same evidence with the tensors'."""
    return _declared(metadata) or ("sd1" if _kohya(metadata) else None)


def _unet_path(name: str) -> Optional[str]:
    if not name.startswith(KOHYA_UNET):
        return None
    rest = name[len(KOHYA_UNET):]
    return ldm_path(rest) or rest


def guess_architecture(modules: Dict[str, NetworkModule], metadata: Mapping[str, str]) -> Optional[str]:
    return explain_architecture(modules, metadata)[0]


def explain_architecture(modules: Dict[str, NetworkModule],
                         metadata: Mapping[str, str]) -> Tuple[Optional[str], str]:
    """(architecture or None, the evidence that decided it, in words for messages)."""
    for name, module in modules.items():
        if name.startswith("lora_unet_") and name.endswith(("attn2_to_k", "attn2_to_v")):
            arch = CROSS_ATTN_WIDTH.get(module.in_dim())
            if arch:
                return arch, f"cross-attention context width {module.in_dim()} ({name})"
    te2 = [n for n in modules if n.startswith("lora_te2_")]
    if te2:
        return "sdxl", f"{len(te2)} modules of a second text encoder (lora_te2_)"
    paths = {n: _unet_path(n) for n in modules}
    xl = next((n for n, p in paths.items() if p is not None and _SDXL_UNET.match(p)), None)
    sd = next((n for n, p in paths.items() if p is not None and _SD_UNET.match(p)), None)
    if xl and not sd:
        return "sdxl", f"SDXL UNet structure ({xl})"
    arch = _declared(metadata)
    if arch:
        key = next(k for k in _MARKS if k in metadata and _declared({k: metadata[k]}) == arch)
        return arch, f"{key}={metadata[key]}"
    for name, module in modules.items():
        if name.startswith("lora_te_") and name.endswith(("q_proj", "k_proj", "v_proj", "mlp_fc1")):
            arch = TE_WIDTH.get(module.in_dim())
            if arch:
                return arch, f"text encoder width {module.in_dim()} ({name})"
    if sd and not xl and any(n.startswith("lora_te1_") for n in modules):
        # CLIP-L named lora_te1_ over an SD-shaped UNet: an SD1 file from a trainer that numbers its one encoder
        return "sd1", f"SD1 UNet structure ({sd}) with one CLIP text encoder (lora_te1_, no lora_te2_)"
    if _kohya(metadata):
        return "sd1", "kohya ss_* metadata without an SD2/SDXL mark"
    return None, "no evidence"
