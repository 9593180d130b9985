"""Textual-inversion embeddings: every file layout the webui loads (its textual_inversion.py), read safely.

Layouts: webui `.pt` dict (`string_to_param` {'*': [n, dim]}, `name`, `step`); kohya safetensors `emb_params`;
OneTrainer `emp_params` (its `emp_params_out` output vectors are not used by the webui either); SDXL `clip_l` [n, 768]
+ `clip_g` [n, 1280]; diffusers concept `.bin` {token: [dim] or [n, dim]}. The name is the file stem (bundled
embeddings: the token in the key). Vectors come back as float32 on the CPU, like the webui keeps them.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import torch

from .container import read_container
from .model import AdapterFormatError, Embedding

#: the widths of the named encoders in the released models; not enforced here (fine-tunes and test models differ):
#: the width is checked against the loaded model when the embedding is registered
WIDTHS = {"clip_l": 768, "clip_g": 1280, "clip_h": 1024}


def load_embedding(path: str) -> Embedding:
    """One embedding file -> Embedding, or AdapterFormatError naming the file and the problem."""
    name = os.path.splitext(os.path.basename(path))[0]
    data, _ = read_container(path)
    return embedding_from_dict(data, name, source=path)


def embedding_from_dict(data: Mapping[str, Any], name: str, source: str = "") -> Embedding:
    """An Embedding from the top-level dict of a file (or of a `bundle_emb.<name>.` group of an adapter)."""
    where = os.path.basename(source) or name
    check_name(name, where)
    step = data.get("step")
    step = int(step) if isinstance(step, int) and not isinstance(step, bool) else None
    if "string_to_param" in data:
        params = data["string_to_param"]
        tensors = {k: v for k, v in params.items()} if isinstance(params, Mapping) else {}
        if len(tensors) != 1:
            raise AdapterFormatError(f"{where}: string_to_param must hold exactly one tensor, has {len(tensors)}")
        vectors = {"emb": next(iter(tensors.values()))}
    elif "clip_l" in data or "clip_g" in data:
        if "clip_l" not in data or "clip_g" not in data:
            raise AdapterFormatError(f"{where}: an SDXL embedding needs both clip_l and clip_g")
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif "emb_params" in data or "emp_params" in data:
        vectors = {"emb": data["emb_params"] if "emb_params" in data else data["emp_params"]}
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(sorted(map(str, data))[:6])
            raise AdapterFormatError(f"{where}: not an embedding: expected one vector tensor, found "
                                     f"{len(tensors)} tensors (keys: {keys or 'none'})")
        vectors = {"emb": next(iter(tensors.values()))}
    return Embedding(name=name, vectors=_checked(vectors, where), step=step, source=source)


def check_name(name: str, where: str) -> None:
    """Embedding names become prompt words and file names: nothing empty, hidden-relative or path-like."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise AdapterFormatError(f"{where}: embedding name {name!r} is empty or looks like a path")


def _checked(vectors: Dict[str, Any], where: str) -> Dict[str, torch.Tensor]:
    out = {}
    for key, vec in vectors.items():
        if not isinstance(vec, torch.Tensor) or not vec.is_floating_point() or vec.layout != torch.strided:
            kind = f"a {type(vec).__name__}" if not isinstance(vec, torch.Tensor) else \
                f"a {str(vec.dtype).replace('torch.', '')} {'tensor' if vec.layout == torch.strided else vec.layout}"
            raise AdapterFormatError(f"{where}: {key} is {kind}, not a floating-point tensor of vectors")
        if vec.dim() == 1:
            vec = vec.unsqueeze(0)
        if vec.dim() != 2 or vec.shape[0] == 0 or vec.shape[1] == 0:
            raise AdapterFormatError(f"{where}: {key} must be [n_vectors, width], got {tuple(vec.shape)}")
        vec = vec.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(vec).all()):
            raise AdapterFormatError(f"{where}: {key} holds NaN or infinite values (a damaged file or a diverged "
                                     f"training run)")
        out[key] = vec
    if len({v.shape[0] for v in out.values()}) > 1:
        raise AdapterFormatError(f"{where}: the encoders disagree on the number of vectors")
    return out
