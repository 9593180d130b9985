"""Prompt tags to active adapters: resolve names, load files (cached), map them onto the loaded model and hand
the engine what to apply. Pure torch; the webui glue (lib_tune/webui/networks.py) calls it from its extra
network, and the trainer's previews use the same path.

Nothing here raises for a bad request: every problem (unknown name, unreadable file, wrong architecture) becomes
a warning and that adapter is skipped, so a generation always goes on.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .formats.model import AdapterFile
from .inject.engine import ActiveEntry, Injector
from .inject.mapping import MappedAdapter, map_adapter
from .inject.targets import Targets, find_targets
from .library import AdapterEntry, Library
from .prompt.blocks import arch_warning, block_multiplier
from .prompt.tags import AdapterRequest


@dataclass
class Activated:
    """One adapter that is in effect, for infotext and diagnostics."""
    request: AdapterRequest
    entry: AdapterEntry
    mapped: MappedAdapter
    load_seconds: float = 0.0


@dataclass
class Activation:
    active: List[Activated] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    #: adapters that carried textual-inversion embeddings (name -> Embedding), for the caller to register
    embeddings: Dict[str, object] = field(default_factory=dict)


class Runtime:
    """One per process. `targets_of(sd_model)` is cached per model object; adapter files are cached by path,
    size and mtime (at most `cache_size` files); mapped adapters per (model, file)."""

    def __init__(self, library: Library, cache_size: int = 4,
                 loader: Optional[Callable[[str], AdapterFile]] = None):
        from .formats.read import load_adapter
        self.library = library
        self.cache_size = cache_size
        self.loader = loader or load_adapter
        self.injector = Injector()
        self._files: "OrderedDict[Tuple[str, int, float], AdapterFile]" = OrderedDict()
        self._mapped: Dict[Tuple[int, Tuple[str, int, float]], MappedAdapter] = {}
        self._targets: Optional[Tuple[int, Targets]] = None
        self._lock = threading.RLock()
        self.current: List[Activated] = []
        self.hires = False
        #: adapters under training, by output name: a tag naming one uses its current tensors (no file)
        self.live: Dict[str, AdapterFile] = {}

    # ---- caches ------------------------------------------------------------------------------------------------
    def targets_of(self, sd_model) -> Targets:
        if self._targets is None or self._targets[0] != id(sd_model):
            self._targets = (id(sd_model), find_targets(sd_model))
            self._mapped.clear()
            self.injector.clear()
            self.injector.drop_cache()
        return self._targets[1]

    def load(self, entry: AdapterEntry) -> AdapterFile:
        key = (entry.path, entry.size, entry.mtime)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        adapter = self.loader(entry.path)
        with self._lock:
            self._files[key] = adapter
            while len(self._files) > max(1, self.cache_size):
                old, _ = self._files.popitem(last=False)
                for mk in [k for k in self._mapped if k[1] == old]:
                    del self._mapped[mk]
        return adapter

    def mapped(self, sd_model, entry: AdapterEntry) -> MappedAdapter:
        targets = self.targets_of(sd_model)
        adapter = self.load(entry)
        key = (id(sd_model), (entry.path, entry.size, entry.mtime))
        with self._lock:
            m = self._mapped.get(key)
        if m is None:
            m = map_adapter(adapter, targets)
            with self._lock:
                self._mapped[key] = m
        return m

    # ---- activation ----------------------------------------------------------------------------------------------
    def activate(self, sd_model, requests: Sequence[AdapterRequest], hires: bool = False) -> Activation:
        """Make `requests` the active set on `sd_model` (an empty list clears it)."""
        out = Activation()
        entries: List[ActiveEntry] = []
        for req in requests:
            live = self.live.get(req.name)
            entry = self.library.find(req.name) if live is None else \
                AdapterEntry(name=req.name, path=live.path, _hash="training-now")
            if entry is None:
                self.library.refresh()
                entry = self.library.find(req.name)
            if entry is None:
                out.warnings.append(f"adapter '{req.name}' not found in the Lora folder")
                continue
            t0 = time.perf_counter()
            try:
                mapped = map_adapter(live, self.targets_of(sd_model)) if live is not None else \
                    self.mapped(sd_model, entry)
            except Exception as e:  # unreadable, corrupt, wrong architecture: skip it, say why
                out.warnings.append(f"adapter '{req.name}' skipped: {e}")
                continue
            if mapped.n_unmapped:
                out.warnings.append(f"adapter '{req.name}': {mapped.summary()}")
            if req.lbw is not None:
                w = arch_warning(req.lbw, mapped.architecture)
                if w:
                    out.warnings.append(f"adapter '{req.name}': {w}")
            entries.extend(self._entries(req, mapped, hires))
            out.active.append(Activated(req, entry, mapped, time.perf_counter() - t0))
            out.embeddings.update(mapped.adapter.embeddings)
        self.injector.apply(entries)
        self.current = out.active
        self.hires = hires
        return out

    def _entries(self, req: AdapterRequest, mapped: MappedAdapter, hires: bool) -> List[ActiveEntry]:
        arch = mapped.architecture

        def weight(which: int):
            if req.is_static or (hires and req.hr_te.is_constant and req.hr_unet.is_constant):
                return req.weights_at(0, 1, hires)[which]
            return lambda step, total: req.weights_at(step, total, hires)[which]

        te, unet = weight(0), weight(1)
        out = []
        for e in mapped.entries:
            block = block_multiplier(req.lbw, e.key, arch) if req.lbw is not None else 1.0
            # the text encoder runs once, before sampling: a schedule counts with its value at the first step
            m = te if e.is_te else unet
            if e.is_te and callable(m):
                m = m(0, 1)
            out.append(ActiveEntry(e, m, block, req.dyn))
        return out

    def set_step(self, step: int, total: int) -> None:
        self.injector.set_step(step, total)

    def deactivate(self) -> None:
        self.injector.clear()
        self.current = []
