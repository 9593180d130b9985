"""The adapter library: the files in the Lora folder(s), their names, aliases and cheap facts.

A name is the file's path relative to its root folder without the extension, with '/' separators
(`sub/dir/name`), like the webui's. The alias is `ss_output_name` from the file's metadata; an alias claimed by
two files is ambiguous and resolves to nothing (the name still works). Only safetensors headers are read while
scanning (no tensors); hashes are computed on demand and cached by (path, size, mtime).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
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


PARTIAL_DOWNLOAD_EXTS = (".part", ".crdownload", ".download", ".partial", ".aria2", ".tmp")


@dataclass
class SkippedFile:
    """A file or folder under a Lora folder that is not offered as an adapter, and why (in words)."""
    path: str
    reason: str


def probe_file(path: str, size: int) -> Dict[str, str]:
    """The metadata of an adapter file after a cheap check of its container (header only, no tensors), or
    AdapterFormatError with the reason in words."""
    from .formats.container import read_header
    from .formats.model import AdapterFormatError

    if size == 0:
        raise AdapterFormatError("the file is empty (0 bytes): an interrupted download or copy")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise AdapterFormatError(f"cannot read the file ({e.strerror or e})") from None
    if head.lstrip()[:1] == b"<" or head.lower().lstrip().startswith((b"<!doctype", b"<html")):
        raise AdapterFormatError("an HTML or XML page saved under an adapter's name (a failed download: download "
                                 "it again)")
    if path.lower().endswith(".safetensors"):
        return dict(read_header(path).metadata)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise AdapterFormatError("not a torch file (neither a zip archive nor a pickle)")
    from .formats.safe_torch import prescan
    prescan(path, size)  # what the pickle claims against the bytes behind it; nothing from the file runs
    return {}


def read_metadata(path: str) -> Dict[str, str]:
    """The string metadata of a safetensors file (header only); {} for other containers or unreadable files."""
    try:
        return probe_file(path, os.path.getsize(path)) if path.lower().endswith(".safetensors") else {}
    except Exception:  # a corrupt file is reported by the scan and when it is used
        return {}


def architecture_from_metadata(md: Dict[str, str]) -> Optional[str]:
    """The architecture a file's metadata names (formats.arch.from_metadata: the one rule for the loader too)."""
    from .formats.arch import from_metadata
    return from_metadata(md)


def _why_stat_failed(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a symlink loop"
    if e.errno == errno.ENOENT:
        return "a broken symlink (its target does not exist)"
    return f"cannot read it ({e.strerror or e})"


def walk_files(root: str, skipped: List[SkippedFile]):
    """(folder, sorted directory entries that are not folders) for `root` and every folder under it, following
    symlinks to folders once each: a loop or a second link to a folder already scanned is reported in `skipped`
    and not entered again; an unreadable folder is reported and skipped, never fatal."""
    seen = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                skipped.append(SkippedFile(folder, "a folder already scanned (a symlink loop or a second link to it)"))
                continue
            seen.add(key)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append(SkippedFile(folder, f"folder not scanned: {_why_stat_failed(e)}"))
            continue
        files, subfolders = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            (subfolders if is_dir else files).append(entry)
            if is_dir and entry.name.lower().endswith(ADAPTER_EXTS):
                skipped.append(SkippedFile(entry.path, "a folder named like an adapter file (its contents are "
                                                       "scanned)"))
        yield folder, files
        stack.extend(e.path for e in reversed(subfolders))


class Library:
    """Thread-safe index of the adapter files under some root folders."""

    def __init__(self, roots: Iterable[str]):
        self.roots = [str(r) for r in roots]
        self._lock = threading.Lock()
        self.entries: Dict[str, AdapterEntry] = {}
        self.aliases: Dict[str, AdapterEntry] = {}
        #: files under the roots that are not offered as adapters, with the reason (from the last refresh)
        self.skipped: List[SkippedFile] = []

    def refresh(self) -> int:
        """Scan the roots again; the number of adapters found. Files that cannot be adapters are listed in
        `skipped` with the reason (and printed once to the console); one bad file never hides the others."""
        entries: Dict[str, AdapterEntry] = {}
        skipped: List[SkippedFile] = []
        for root in self.roots:
            if not os.path.isdir(root):
                continue
            for folder, files in walk_files(root, skipped):
                for f in files:
                    self._scan_file(root, f.path, f.name, entries, skipped)
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
            before = {(x.path, x.reason) for x in self.skipped}
            self.entries, self.aliases, self.skipped = entries, aliases, skipped
        new = [x for x in skipped if (x.path, x.reason) not in before]
        if new:
            print(f"[Tune] {len(new)} file(s) in the Lora folder(s) skipped:")
            for x in new:
                print(f"[Tune]   {x.path!r}: {x.reason}")
        return len(entries)

    def _scan_file(self, root: str, path: str, fname: str, entries: Dict[str, AdapterEntry],
                   skipped: List[SkippedFile]) -> None:
        from .formats.model import AdapterFormatError

        lower = fname.lower()
        if lower.endswith(PARTIAL_DOWNLOAD_EXTS) and os.path.splitext(lower)[0].endswith(ADAPTER_EXTS):
            skipped.append(SkippedFile(path, "an incomplete download (finish or delete it)"))
            return
        if not lower.endswith(ADAPTER_EXTS):
            return
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            skipped.append(SkippedFile(path.encode("utf-8", "replace").decode("utf-8"),
                                       "the file name is not valid UTF-8 (rename it)"))
            return
        name = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")
        if name in entries:
            return
        try:
            st = os.stat(path)
        except OSError as e:
            skipped.append(SkippedFile(path, _why_stat_failed(e)))
            return
        if not stat.S_ISREG(st.st_mode):
            skipped.append(SkippedFile(path, "not a regular file"))
            return
        old = self.entries.get(name)
        if old and old.path == path and old.size == st.st_size and old.mtime == st.st_mtime:
            entries[name] = old
            return
        try:
            md = probe_file(path, st.st_size)
        except AdapterFormatError as e:
            skipped.append(SkippedFile(path, str(e)))
            return
        except Exception as e:  # whatever else a hostile file does, it is this file's problem only
            skipped.append(SkippedFile(path, f"cannot read it ({type(e).__name__}: {e})"))
            return
        alias = md.get("ss_output_name")
        entries[name] = AdapterEntry(name=name, path=path, metadata=md, alias=alias if alias else None,
                                     size=st.st_size, mtime=st.st_mtime)

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
            try:
                if e.shorthash == shorthash:
                    return e
            except OSError:  # removed or unreadable since the scan
                continue
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
