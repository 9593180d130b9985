"""Writing adapters (safetensors, atomically) and the two file hashes the kohya/webui world shows.

save_adapter writes to a temporary file in the target folder and renames it over the target (os.replace), so a
reader never sees half a file and a crash leaves the old file intact. addnet_hash is the "sshs_model_hash" of
kohya and the webui's LoRA hash: sha256 of the bytes after the 8-byte header length and the JSON header, so it
does not change when only metadata changes. legacy_hash is kohya's older 8-hex hash of 64 KiB at offset 1 MiB.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from typing import Dict, Mapping, Optional

import torch

BLOCK = 1024 * 1024


def save_adapter(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    from safetensors.torch import save_file

    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad[:5]}")
    # a fresh name beside the target (same file system, so the rename is atomic); created by safetensors with
    # the usual umask permissions, unlike mkstemp's 0600
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(_plain(tensors), tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plain(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def addnet_hash(path: str) -> str:
    """sha256 hex of a safetensors file's tensor data (webui modules/hashes.py addnet_hash_safetensors)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n + 8 > os.fstat(f.fileno()).st_size:  # a damaged header: past the end there is nothing to hash (the
            return h.hexdigest()                  # webui's seek lands there too; a seek beyond 2**63 would raise)
        f.seek(n + 8)
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_hash(path: str) -> str:
    """First 8 hex of sha256 of the 64 KiB at offset 1 MiB (kohya train_util.model_hash, webui's old model hash)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
