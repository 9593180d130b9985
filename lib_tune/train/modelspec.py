"""SAI ModelSpec keys (`modelspec.*`) of a trained file, as kohya sd-scripts writes them (library/sai_model_spec.py;
no code is copied): the architecture with the adapter kind, the implementation, resolution, date, prediction
type and the optional fields a user may fill (author, description, trigger phrase, ...).

Why: kohya writes them beside its ss_* keys, and tools that follow the SAI model spec classify a file by them
(formats/arch.py reads `modelspec.architecture` too). The sshs_* hashes (kohya_metadata.py) cover the ss_* keys
only, so editing these keys later changes no hash.
"""
from __future__ import annotations

import datetime
import time
from typing import Dict, Mapping, Optional, Tuple

SAI_MODEL_SPEC_VERSION = "1.0.1"  # what kohya sd-scripts @48d368fa writes
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2_v": "stable-diffusion-v2-768-v",
        "sdxl": "stable-diffusion-xl-v1-base"}


def modelspec_metadata(base: str, title: str, *, v_parameterization: bool = False, adapter: str = "lora",
                       resolution: Optional[Tuple[int, int]] = None, timestamp: Optional[float] = None,
                       clip_skip: Optional[int] = None, timestep_range: Optional[Tuple[int, int]] = None,
                       implementation_version: Optional[str] = None,
                       optional: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """SAI ModelSpec keys as kohya writes them for a LoRA (adapter="lora") or an embedding
    (adapter="textual-inversion"). optional: extra spec fields without the prefix (author, description,
    license, tags, usage_hint, trigger_phrase, thumbnail, ...)."""
    if adapter not in ("lora", "textual-inversion"):
        raise ValueError(f"unknown adapter kind {adapter!r}")
    if base == "sd2":
        arch = ARCH["sd2_v"] if v_parameterization else ARCH["sd2"]
    elif base in ARCH:
        arch = ARCH[base]
    else:
        raise ValueError(f"unknown base model {base!r}")
    arch += "/" + adapter
    # kohya: SDXL LoRA and TI are "sgm"-style (Stability's repo); SD1/2 LoRA keys are diffusers-style names
    impl = IMPL_STABILITY_AI if (base == "sdxl" or adapter == "textual-inversion") else IMPL_DIFFUSERS
    if resolution is None:
        side = 1024 if base == "sdxl" else (768 if base == "sd2" and v_parameterization else 512)
        resolution = (side, side)
    ts = int(timestamp if timestamp is not None else time.time())
    if implementation_version is None:
        from .. import __version__
        implementation_version = f"sd-webui-tune/{__version__}"
    m = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(ts).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if timestep_range is not None:
        m["modelspec.timestep_range"] = f"{timestep_range[0]},{timestep_range[1]}"
    if clip_skip is not None:
        m["modelspec.encoder_layer"] = str(clip_skip)
    m["modelspec.implementation_version"] = implementation_version
    for k, v in (optional or {}).items():
        if v is not None:
            m[k if k.startswith("modelspec.") else "modelspec." + k] = str(v)
    return m
