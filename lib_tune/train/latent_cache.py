"""Cache of VAE latents so an image is encoded once per (content, VAE, bucket, crop, flip), across runs.

The key is what determines the latent: the image bytes (content hash, so renaming or moving a file keeps its
cache entry and editing it invalidates it), the VAE (an identity string from the caller, e.g. the VAE file's
sha256 plus its dtype), and the exact pixels cut from the image (resized size, bucket, crop offset, flip).
Caption or repeat changes therefore never invalidate latents.

Storage: an in-memory dict, optionally backed by a folder of safetensors files `<folder>/<d[:2]>/<d>.safetensors`
(d = key digest) holding one tensor `latent` and the key fields as metadata. Files are written to a temporary
name in the same folder, fsynced and renamed, so a crash never leaves a half-written entry under the real name;
an unreadable file or one whose metadata does not match its key counts as a miss and is rewritten.

Random crops give a new key per crop, so with caching on the trainer should use center crops (kohya disables
random crop with cached latents for the same reason).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

FORMAT = "sd-webui-tune-latent/1"


@dataclass(frozen=True)
class LatentKey:
    content_hash: str
    vae_id: str
    bucket: Tuple[int, int]
    resized: Tuple[int, int]
    crop_left_top: Tuple[int, int]
    flipped: bool

    @classmethod
    def for_transform(cls, content_hash: str, vae_id: str, transform) -> "LatentKey":
        """Key for a buckets.Transform."""
        return cls(content_hash=content_hash, vae_id=vae_id, bucket=tuple(transform.bucket),
                   resized=tuple(transform.resized), crop_left_top=tuple(transform.crop_left_top),
                   flipped=bool(transform.flipped))

    def as_metadata(self) -> Dict[str, str]:
        return {
            "format": FORMAT,
            "content_hash": self.content_hash,
            "vae_id": self.vae_id,
            "bucket": "%dx%d" % tuple(self.bucket),
            "resized": "%dx%d" % tuple(self.resized),
            "crop_left_top": "%d,%d" % tuple(self.crop_left_top),
            "flipped": str(bool(self.flipped)),
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_metadata(), sort_keys=True).encode("utf-8")).hexdigest()


class LatentCache:
    """get / put / get_or_encode; counts hits, misses and encoded latents in `stats`."""

    def __init__(self, folder: Optional[str] = None, keep_in_memory: bool = True):
        if folder is None and not keep_in_memory:
            raise ValueError("a cache needs a folder or memory")
        self.folder = folder
        self.keep_in_memory = keep_in_memory
        self._memory: Dict[str, torch.Tensor] = {}
        self.stats = {"hits": 0, "misses": 0, "encoded": 0, "bad_files": 0}

    def path_for(self, key: LatentKey) -> Optional[str]:
        if self.folder is None:
            return None
        d = key.digest
        return os.path.join(self.folder, d[:2], d + ".safetensors")

    def get(self, key: LatentKey) -> Optional[torch.Tensor]:
        d = key.digest
        t = self._memory.get(d)
        if t is None:
            t = self._read(key)
            if t is not None and self.keep_in_memory:
                self._memory[d] = t
        self.stats["hits" if t is not None else "misses"] += 1
        return t

    def put(self, key: LatentKey, latent: torch.Tensor) -> None:
        latent = latent.detach().to("cpu").contiguous()
        if self.keep_in_memory:
            self._memory[key.digest] = latent
        if self.folder is not None:
            self._write(key, latent)

    def get_or_encode(self, keys: Sequence[LatentKey],
                      encode: Callable[[List[int]], torch.Tensor]) -> List[torch.Tensor]:
        """Latents for keys, in order. `encode(missing)` gets the indices (into keys) not cached and returns
        their latents stacked as [len(missing), C, h, w] in that order; they are stored before returning.
        Keys that repeat within one call are encoded once."""
        out: List[Optional[torch.Tensor]] = [self.get(k) for k in keys]
        first_of: Dict[str, int] = {}
        missing = []
        for i, (k, t) in enumerate(zip(keys, out)):
            if t is None and k.digest not in first_of:
                first_of[k.digest] = i
                missing.append(i)
        if missing:
            latents = encode(missing)
            if latents.shape[0] != len(missing):
                raise ValueError(f"encode returned {latents.shape[0]} latents for {len(missing)} images")
            self.stats["encoded"] += len(missing)
            for i, lat in zip(missing, latents):
                self.put(keys[i], lat)
                out[i] = self._memory.get(keys[i].digest, lat.detach().to("cpu").contiguous())
        for i, k in enumerate(keys):
            if out[i] is None:
                out[i] = out[first_of[k.digest]]
        return out  # type: ignore[return-value]

    def clear_memory(self) -> None:
        self._memory.clear()

    def _read(self, key: LatentKey) -> Optional[torch.Tensor]:
        path = self.path_for(key)
        if path is None or not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta != key.as_metadata():
                    raise ValueError("metadata does not match the key")
                return f.get_tensor("latent")
        except Exception:
            self.stats["bad_files"] += 1
            return None

    def _write(self, key: LatentKey, latent: torch.Tensor) -> None:
        path = self.path_for(key)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        data = st_save({"latent": latent}, metadata=key.as_metadata())
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
