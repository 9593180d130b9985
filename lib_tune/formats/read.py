"""load_adapter: any supported adapter file -> AdapterFile with canonical module names.

Steps: read the container (safetensors, or a pickle through the safe loader); place each key (keys.place_key);
collect `bundle_emb.*` embeddings; give PEFT modules without an `alpha` key the alpha that diffusers keeps in the
`lora_adapter_metadata` JSON (absent: alpha = rank, i.e. scale 1, diffusers' "folded" alpha); build one
NetworkModule per module; guess the architecture and with it settle CLIP-L names of dotted layouts (`lora_te_`
for SD1/SD2, `lora_te1_` for SDXL). Keys that fit nowhere are listed in `unplaced` (with a reason in `notes`);
a file where nothing fits is an AdapterFormatError that names it and some of its keys.
"""
from __future__ import annotations

import math
import os
from typing import Dict

import torch

from ..algos import build_module
from ..algos.base import UnsupportedModuleError
from .arch import guess_architecture
from .container import parse_json_metadata, read_container
from .keys import TE_PENDING, KeyPlace, place_key
from .model import AdapterFile, AdapterFormatError
from .textual_inversion import embedding_from_dict

PEFT_METADATA_KEY = "lora_adapter_metadata"


def load_adapter(path: str) -> AdapterFile:
    name = os.path.basename(path)
    data, metadata = read_container(path)
    out = AdapterFile(path=path, metadata=metadata)
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    sources: Dict[str, Dict[str, str]] = {}  # module -> param -> file key
    places: Dict[str, KeyPlace] = {}
    bundles: Dict[str, dict] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            _unplaced(out, str(key), "not a tensor")
            continue
        problem = _tensor_problem(value)
        if problem:
            _unplaced(out, key, problem)
            continue
        if value.is_floating_point() and not bool(torch.isfinite(_finite_view(value)).all()):
            raise AdapterFormatError(f"{name}: tensor {key} holds NaN or infinite values (a damaged file or a "
                                     f"diverged training run); it would turn every image black")
        if value.dtype in FLOAT8:
            value = value.float()  # torch has no float8 arithmetic; float32 holds every float8 value exactly
        if key.startswith("bundle_emb."):
            if not _add_bundle(bundles, key, value):
                _unplaced(out, key, "malformed bundled-embedding key")
            continue
        place = place_key(key)
        if place is None:
            _unplaced(out, key, "unknown key layout")
        elif place.param in SCALAR_PARAMS and value.numel() != 1:
            _unplaced(out, key, f"{place.param} must be one number, it has shape {tuple(value.shape)}")
        elif place.param not in SCALAR_PARAMS and not value.is_floating_point():
            _unplaced(out, key, f"weights must be floating-point, not {str(value.dtype).replace('torch.', '')}")
        elif place.param in groups.get(place.module, {}):
            _unplaced(out, key, f"duplicate of {sources[place.module][place.param]}")
        else:
            groups.setdefault(place.module, {})[place.param] = value
            sources.setdefault(place.module, {})[place.param] = key
            places.setdefault(place.module, place)

    peft = parse_json_metadata(metadata, PEFT_METADATA_KEY)
    for module, weights in groups.items():
        if places[module].layout == "peft" and "alpha" not in weights:
            _fill_peft_alpha(weights, places[module], peft)
        try:
            built = build_module(weights)
        except Exception as e:  # UnsupportedModuleError; anything else a network type trips over on odd shapes
            why = str(e) if isinstance(e, UnsupportedModuleError) else f"cannot be used ({type(e).__name__}: {e})"
            for key in sources[module].values():
                _unplaced(out, key, why)
            continue
        out.modules[module] = built
        for param in built.unused_keys():
            _unplaced(out, sources[module].get(param, param), f"not used by {built.kind}")

    for emb_name, emb_data in bundles.items():
        try:
            out.embeddings[emb_name] = embedding_from_dict(emb_data, emb_name, source=f"{path}/{emb_name}")
        except AdapterFormatError as e:
            raise AdapterFormatError(f"{name}: bundled embedding {e}") from None

    try:
        out.architecture = guess_architecture({_provisional(k): m for k, m in out.modules.items()}, metadata)
    except Exception:  # odd shapes that a network type accepted: no guess rather than no file
        out.architecture = None
    te_l = "lora_te1_" if out.architecture == "sdxl" else "lora_te_"
    out.modules = {(te_l + k[len(TE_PENDING):] if k.startswith(TE_PENDING) else k): m for k, m in out.modules.items()}

    if not out.modules and not out.embeddings:
        shown = ", ".join(out.unplaced[:5]) + (", ..." if len(out.unplaced) > 5 else "")
        reason = out.notes[0] if out.notes else "the file holds no tensors"
        raise AdapterFormatError(f"{name}: no adapter weights found ({reason}); keys: {shown or 'none'}")
    return out


#: parameters that are one number (alpha, an explicit scale, IA3's on_input flag): any real dtype
SCALAR_PARAMS = ("alpha", "scale", "on_input")
FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _tensor_problem(value: torch.Tensor) -> str:
    """Why a tensor cannot be a weight of any network type, or ""."""
    if value.layout != torch.strided:
        return f"not a dense tensor ({value.layout})"
    if value.is_complex() or value.is_quantized:
        return f"unusable dtype {str(value.dtype).replace('torch.', '')}"
    if value.numel() == 0:
        return f"empty tensor (shape {tuple(value.shape)})"
    return ""


def _finite_view(value: torch.Tensor) -> torch.Tensor:
    return value.float() if value.dtype in FLOAT8 else value


def _provisional(module: str) -> str:
    return "lora_te_" + module[len(TE_PENDING):] if module.startswith(TE_PENDING) else module


def _unplaced(out: AdapterFile, key: str, why: str) -> None:
    out.unplaced.append(key)
    out.notes.append(f"{key}: {why}")


def _add_bundle(bundles: Dict[str, dict], key: str, value: torch.Tensor) -> bool:
    """`bundle_emb.<name>.string_to_param.<k>` or `bundle_emb.<name>.<vector name>` (webui networks.py)."""
    parts = key[len("bundle_emb."):].split(".", 1)
    if len(parts) != 2 or not parts[1]:
        return False
    emb_name, vec_name = parts
    group = bundles.setdefault(emb_name, {})
    if vec_name.startswith("string_to_param."):
        params = group.setdefault("string_to_param", {})
        if not isinstance(params, dict):  # `bundle_emb.<name>.string_to_param` was a tensor itself
            return False
        params[vec_name.split(".", 1)[1]] = value
    elif vec_name == "string_to_param" and vec_name in group:
        return False
    else:
        group[vec_name] = value
    return True


def _fill_peft_alpha(weights: Dict[str, torch.Tensor], place: KeyPlace, peft) -> None:
    """diffusers keeps PEFT's LoraConfig as JSON: either flat ({"r", "lora_alpha", ...}) or per component
    ({"unet.r": .., "unet.lora_alpha": ..}); alpha_pattern/rank_pattern override per module path suffix."""
    if not isinstance(peft, dict):
        return
    prefix = place.component + "."
    if any(k.startswith(prefix) for k in peft):
        config = {k[len(prefix):]: v for k, v in peft.items() if k.startswith(prefix)}
    elif any("." in k for k in peft):
        return  # per-component config without this component
    else:
        config = peft
    alpha = _pattern(config.get("alpha_pattern"), place.path, config.get("lora_alpha"))
    down = weights.get("lora_down.weight")
    rank = down.shape[0] if down is not None and down.dim() >= 1 else None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not rank:
        return
    try:
        alpha = float(alpha)
    except OverflowError:  # a JSON integer beyond float range
        return
    if not math.isfinite(alpha):  # JSON NaN / Infinity
        return
    if config.get("use_rslora"):
        weights["scale"] = torch.tensor(float(alpha) / math.sqrt(rank))
    else:
        weights["alpha"] = torch.tensor(float(alpha))


def _pattern(patterns, path: str, default):
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if path == pattern or path.endswith("." + pattern):
                return value
    return default
