"""The adapter library: the files in the Lora folder(s), their names, aliases and cheap facts.

A name is the file's path relative to its root folder without the extension, with '/' separators
(`sub/dir/name`), like the webui's. The alias is `ss_output_name` from the file's metadata; an alias claimed by
two files is ambiguous and resolves to nothing (the name still works). Only safetensors headers are read while
scanning (no tensors); hashes are computed on demand and cached by (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

ADAPTER_EXTS = (".safetensors", ".pt", ".ckpt", ".bin")
PREVIEW_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif")


@dataclass
class AdapterEntry:
    name: str
    path: str
    metadata: Dict[str, str] = field(default_factory=dict)
    alias: Optional[str] = None
    size: int = 0
    mtime: float = 0.0
    _hash: Optional[str] = None

    @property
    def architecture(self) -> Optional[str]:
        return architecture_from_metadata(self.metadata)

    def preview(self) -> Optional[str]:
        base = os.path.splitext(self.path)[0]
        for stem in (base, base + ".preview"):
            for ext in PREVIEW_EXTS:
                if os.path.exists(stem + ext):
                    return stem + ext
        return None

    def sha256(self) -> str:
        """The addnet-style hash the webui shows for Lora files (sha256 of the tensor payload of a safetensors
        file, of the whole file otherwise); its first 12 hex digits are the short hash in infotext."""
        if self._hash is None:
            self._hash = addnet_hash(self.path)
        return self._hash

    @property
    def shorthash(self) -> str:
        return self.sha256()[:12]


def addnet_hash(path: str) -> str:
    """The webui's hash for Lora files: addnet-style for safetensors (formats.write.addnet_hash), plain sha256 of
    the file otherwise."""
    if path.endswith(".safetensors"):
        from .formats.write import addnet_hash as tensors_hash
        return tensors_hash(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str) -> Dict[str, str]:
    """The string metadata of a safetensors file (header only); {} for other containers or unreadable files."""
    if not path.endswith(".safetensors"):
        return {}
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception:  # a corrupt file is reported when it is used, not while listing
        return {}


def architecture_from_metadata(md: Dict[str, str]) -> Optional[str]:
    arch = (md.get("modelspec.architecture") or "").lower()
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1"):
        return "sd1"
    base = (md.get("ss_base_model_version") or "").lower()
    if base.startswith("sdxl"):
        return "sdxl"
    if base.startswith("sd_v2") or md.get("ss_v2") == "True":
        return "sd2"
    if base.startswith("sd_v1") or md.get("ss_v2") == "False":
        return "sd1"
    return None


class Library:
    """Thread-safe index of the adapter files under some root folders."""

    def __init__(self, roots: Iterable[str]):
        self.roots = [str(r) for r in roots]
        self._lock = threading.Lock()
        self.entries: Dict[str, AdapterEntry] = {}
        self.aliases: Dict[str, AdapterEntry] = {}

    def refresh(self) -> int:
        entries: Dict[str, AdapterEntry] = {}
        for root in self.roots:
            if not os.path.isdir(root):
                continue
            for dirpath, _dirs, files in os.walk(root, followlinks=True):
                for fn in sorted(files):
                    if not fn.lower().endswith(ADAPTER_EXTS):
                        continue
                    path = os.path.join(dirpath, fn)
                    name = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")
                    if name in entries:
                        continue
                    old = self.entries.get(name)
                    st = os.stat(path)
                    if old and old.path == path and old.size == st.st_size and old.mtime == st.st_mtime:
                        entries[name] = old
                        continue
                    md = read_metadata(path)
                    entries[name] = AdapterEntry(name=name, path=path, metadata=md, alias=md.get("ss_output_name"),
                                                 size=st.st_size, mtime=st.st_mtime)
        aliases: Dict[str, AdapterEntry] = {}
        claimed: Dict[str, int] = {}
        for e in entries.values():
            if e.alias and e.alias != e.name:
                claimed[e.alias] = claimed.get(e.alias, 0) + 1
                aliases[e.alias] = e
        for alias, n in claimed.items():
            if n > 1 or alias in entries:
                aliases.pop(alias, None)
        with self._lock:
            self.entries, self.aliases = entries, aliases
        return len(entries)

    def find(self, name: str) -> Optional[AdapterEntry]:
        """By name (with or without sub-folders), then by the bare file stem when unique, then by alias."""
        with self._lock:
            e = self.entries.get(name) or self.aliases.get(name)
            if e is None:
                stems = [x for x in self.entries.values() if x.name.rsplit("/", 1)[-1] == name]
                e = stems[0] if len(stems) == 1 else None
            return e

    def by_hash(self, shorthash: str) -> Optional[AdapterEntry]:
        with self._lock:
            items = list(self.entries.values())
        for e in items:
            if e.shorthash == shorthash:
                return e
        return None

    def list(self) -> List[AdapterEntry]:
        with self._lock:
            return sorted(self.entries.values(), key=lambda e: e.name.lower())


def summary(entry: AdapterEntry) -> dict:
    """What the API and the cards show of an entry's metadata."""
    md = entry.metadata
    keep = ("ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
            "ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_steps", "ss_training_comment",
            "modelspec.architecture", "modelspec.title", "modelspec.trigger_phrase")
    out = {k: md[k] for k in keep if k in md}
    if "ss_tag_frequency" in md:
        try:
            freq: Dict[str, int] = {}
            for tags in json.loads(md["ss_tag_frequency"]).values():
                for t, n in tags.items():
                    freq[t.strip()] = freq.get(t.strip(), 0) + int(n)
            out["top_tags"] = [t for t, _ in sorted(freq.items(), key=lambda x: -x[1])[:10]]
        except (ValueError, AttributeError, TypeError):
            pass
    return out
