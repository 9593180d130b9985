"""The container layer shared by adapter and embedding readers: bytes on disk -> ({key: tensor}, metadata)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch

from .model import AdapterFormatError
from .safe_torch import safe_load

SAFETENSORS = (".safetensors",)
PICKLES = (".pt", ".ckpt", ".bin", ".pth")


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors (CPU) and the string metadata of a .safetensors file, or AdapterFormatError."""
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise AdapterFormatError(f"{name}: the file is empty")
        if size < 8:
            raise AdapterFormatError(f"{name}: truncated, shorter than a safetensors header")
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except AdapterFormatError:
        raise
    except OSError as e:
        raise AdapterFormatError(f"{name}: cannot read the file ({e.strerror or e})") from None
    except Exception as e:  # SafetensorError and friends: bad header, truncated data, bad dtype
        raise AdapterFormatError(f"{name}: not a valid safetensors file ({str(e).strip()[:300] or type(e).__name__})"
                                 ) from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_pickle_dict(path: str) -> Dict[str, Any]:
    """The top-level dict of a pickled torch file (unwrapping a `state_dict` entry), via the safe loader."""
    obj = safe_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{os.path.basename(path)}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def read_container(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(top-level dict, metadata) for any supported extension; values of pickles may be non-tensors."""
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS:
        return read_safetensors(path)
    if ext in PICKLES:
        return read_pickle_dict(path), {}
    raise AdapterFormatError(f"{os.path.basename(path)}: unsupported file type {ext or '(none)'!r}; expected "
                             f"{', '.join(SAFETENSORS + PICKLES)}")


def parse_json_metadata(metadata: Dict[str, str], key: str) -> Any:
    """A JSON-valued metadata entry, or None if absent or not JSON."""
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
