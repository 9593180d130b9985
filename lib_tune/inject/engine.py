"""The injection engine: active adapters change what the touched layers compute, and the model's own weights come
back bit for bit when they are no longer wanted.

How (why each choice):
- Only layers an active adapter touches get a wrapper, as an instance attribute `module.forward` (removed by
  clear()); every other layer runs exactly as before, with no overhead.
- The wrapper calls the layer's class forward at call time (`type(module).forward`, or a forward some other code
  set on the instance before us), so the webui's own class-level patches keep running, whatever CrossAttention
  variant is selected (they all call the to_q/to_k/to_v Linear layers).
- Inference merges in place, lazily, like the built-in Lora: at a layer's first call with a new set, its parameters
  get W' = W + sum m_i dW_i written into `param.data` (the built-in's order of operations and dtypes: bit-identical
  to its merged model), after a backup of W in CPU memory (inplace.py). The merge stays while the set stays, across
  calls and generations (a second generation with the same set computes nothing); a set change re-merges only the
  layers whose own entries changed; clear(), a set that no longer touches a layer, park()ed wrappers called outside
  a generation, and any apply(..., train=True) restore the backup exactly. Nothing but the adapters' tensors and
  transient per-layer temporaries is held on the model's device: no second copy of a layer (the opt-in
  `backup_device="layer"` keeps the backup there instead, for faster set changes).
- Module moves (the webui's --medvram/--lowvram pre-hooks, `module.to(device)`) keep the Parameter objects, so the
  merged weights travel with their block and nothing is recomputed; `keep_on_device=False` (set by the runtime under
  those flags) also keeps no per-step factors on a device between calls.
- Another engine that merges into the same weights (the webui's built-in Lora, `other`): before it would change a
  layer, our delta is taken out (restored from our backup), it updates the real weights, and ours is merged on top
  again with a fresh backup; so our delta never reaches its backup and its restore never drops or doubles ours.
- Multipliers that change per sampling step (callables (step, total) -> float): plain LoRA on a Linear/Conv2d from
  its factors, folded into the weight in place or bypassed per call, whichever costs less (layer.py); other types
  re-merge their layer exactly when their multiplier changes. No full-size delta per adapter is kept.
- Training (apply(..., train=True)): no merge in place anywhere (every other injector is cleared first); every
  delta is rebuilt with autograd each forward (LoRA as up(down(x)) on the output), on detached base parameters
  swapped in for the call only, so gradients reach the adapters and never the model.
- One injector at a time has adapters in a model: apply() of one clears every other (the runtime's and a trainer's
  alternate under the webui's queue lock).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from . import inplace
from .layer import Layer, as_items
from .mapping import MappedAdapter, MappedEntry
from .merge import input_of

#: a fixed multiplier, or one per sampling step: f(step, total_steps) -> multiplier
Multiplier = Union[float, Callable[[int, int], float]]

#: injectors that have wrappers installed or merges in a model
_LIVE: "weakref.WeakSet[Injector]" = weakref.WeakSet()


@dataclass(eq=False)
class ActiveEntry:
    """One mapped adapter module, switched on: its multiplier (te or unet, chosen by the caller), a block
    multiplier (block weights) and DyLoRA's rank cut (`dyn=`)."""
    entry: MappedEntry
    multiplier: Multiplier = 1.0
    block: float = 1.0
    dyn: Optional[int] = None

    @property
    def scheduled(self) -> bool:
        return callable(self.multiplier)

    def value(self, step: int = 0, total: int = 1) -> float:
        m = self.multiplier(step, total) if callable(self.multiplier) else self.multiplier
        return m * self.block


def activate(mapped: MappedAdapter, te: Multiplier = 1.0, unet: Multiplier = 1.0,
             block: Optional[Callable[[str], float]] = None, dyn: Optional[int] = None) -> List[ActiveEntry]:
    """ActiveEntries for every mapped module of one adapter: text-encoder layers take `te`, UNet layers `unet`;
    `block(layer name)` gives a per-layer factor (block weights)."""
    return [ActiveEntry(e, te if e.is_te else unet, 1.0 if block is None else block(e.layer), dyn)
            for e in mapped.entries]


class OtherEngine:
    """Another engine that merges its own adapters into the same weights, lazily per layer (the webui's built-in
    Lora; see lib_tune/webui/networks.py). The injector asks `stale(module)` before each call of a layer it wraps;
    when True, it takes its own delta out, calls `sync(module)` (the other engine brings the real weights up to
    date: restore and/or merge, backup taken on clean weights) and merges its own on top again."""

    def stale(self, module: torch.nn.Module) -> bool:
        raise NotImplementedError

    def sync(self, module: torch.nn.Module) -> None:
        raise NotImplementedError


class Injector:
    """Applies a list of ActiveEntries to the model their MappedEntries point into. One Injector per model.

    apply(entries) makes them the active set (merges follow lazily, per layer, at its next call); clear() removes
    the wrappers and restores every weight; park() leaves the merges in place for the next apply() of the same set
    but makes any call outside it see the model's own weights; set_step(step, total) tells per-step multipliers
    where sampling is. `computed` counts layer merges of a set, `step_merges` exact re-merges for a per-step
    multiplier of a type without factors (diagnostics, tests).
    """

    def __init__(self):
        self.layers: Dict[torch.nn.Module, Layer] = {}
        self.train = False
        self.parked = False
        self.step, self.total = 0, 1
        self.computed = 0
        self.step_merges = 0
        self._values: Dict[int, float] = {}
        self._runs: Dict[int, int] = {}
        #: another engine merging into the same weights (the built-in Lora), see OtherEngine
        self.other: Optional[OtherEngine] = None
        #: where backups live: "cpu" (default) or "layer" (the layer's own device: faster set changes, costs VRAM)
        self.backup_device: str = "cpu"
        #: keep per-step LoRA factors on the layer's device between calls (False under --medvram/--lowvram)
        self.keep_on_device = True

    # ---- public ------------------------------------------------------------------------------------------------
    def apply(self, entries: Sequence[ActiveEntry], train: bool = False) -> None:
        """Make `entries` the active set. Entries are applied in list order (the order of the built-in's list of
        loaded networks). Fixed multipliers of 0 are skipped (no wrapper when nothing is left on a layer).
        Layers no longer touched are restored now; the others merge at their next call.
        train=True: nothing merged in place anywhere, autograd through the adapters (see the module docstring)."""
        for other in list(_LIVE):
            if other is not self:
                other.clear()
        self._uninstall()
        self.train = train
        self.parked = False
        self._values, self._runs = {}, {}
        by_module: Dict[torch.nn.Module, List[ActiveEntry]] = {}
        for a in entries:
            if not train and not a.scheduled and a.value() == 0:
                continue
            by_module.setdefault(a.entry.module, []).append(a)
        inplace.restore_all(keep_owner=self)  # merges whose injector is gone
        for module, st in inplace.owned_by(self):
            if train or module not in by_module:
                inplace.restore(module, st)
        for module, items in by_module.items():
            layer = Layer(module, items[0].entry.layer, items, train)
            self._install(layer)
            self.layers[module] = layer
        if self.layers:
            _LIVE.add(self)

    def clear(self) -> None:
        """Remove every wrapper and restore every weight this injector merged. Backups stay for the next apply()
        (drop_cache() drops them)."""
        self._uninstall()
        for module, st in inplace.owned_by(self):
            inplace.restore(module, st)
        self.parked = False
        _LIVE.discard(self)

    def park(self) -> None:
        """The end of a generation: merges stay in place (the next apply() of the same set computes nothing), but a
        call outside a generation (class images, another tool running the model) restores its layer first."""
        self.parked = True

    def drop_cache(self) -> None:
        """Forget the backups of layers that hold no merge of ours (frees their memory)."""
        for module, st in inplace.owned_by(self):
            if st.key is None and not st.folded:
                inplace.forget(module)
        for layer in self.layers.values():
            layer.factors = None

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = step, max(int(total), 1)
        self._values, self._runs = {}, {}

    def value(self, a: ActiveEntry) -> float:
        """`a`'s multiplier at the current step; each schedule callable runs once per step, however many layers
        share it."""
        f = a.multiplier
        if not callable(f):
            return f * a.block
        v = self._values.get(id(f))  # (cleared on set_step/apply; the entries keep f alive meanwhile)
        if v is None:
            v = self._values[id(f)] = f(self.step, self.total)
        return v * a.block

    def run_length(self, a: ActiveEntry) -> int:
        """How many steps from this one keep `a`'s multiplier (a flat part of a schedule, or the rest of a
        `start=`/`stop=` window): folding it into the weight pays over all of them. (Each schedule callable is asked
        once per step for the steps ahead, however many layers share it.)"""
        f = a.multiplier
        if not callable(f):
            return max(self.total - self.step, 1)
        r = self._runs.get(id(f))
        if r is None:
            now, r = f(self.step, self.total), 1
            while self.step + r < self.total and f(self.step + r, self.total) == now:
                r += 1
            self._runs[id(f)] = r
        return r

    @property
    def touched(self) -> List[str]:
        return [layer.layer for layer in self.layers.values()]

    def held_tensors(self) -> List[torch.Tensor]:
        """Every tensor this injector keeps between calls (backups, per-step factors), for byte counts per
        device. The adapters' own tensors are the caller's and not included."""
        out = [t for _, st in inplace.owned_by(self) for t in st.backup.values() if t is not None]
        for layer in self.layers.values():
            if layer.factors is not None:
                out.extend(layer.factors.tensors())
        return out

    # ---- wrappers ---------------------------------------------------------------------------------------------
    def _install(self, layer: Layer) -> None:
        module = layer.module
        layer.prev_forward = module.__dict__.get("forward")

        def forward(*args, **kwargs):
            return self._forward(layer, args, kwargs)

        layer.wrapper = forward
        module.forward = forward

    def _uninstall(self) -> None:
        for module, layer in self.layers.items():
            layer.live = False  # if another wrapper sits on top of ours, ours becomes a pass-through
            if module.__dict__.get("forward") is layer.wrapper:
                if layer.prev_forward is None:
                    del module.forward
                else:
                    module.forward = layer.prev_forward
        self.layers = {}

    @staticmethod
    def _inner(layer: Layer, args, kwargs):
        if layer.prev_forward is not None:
            return layer.prev_forward(*args, **kwargs)
        return type(layer.module).forward(layer.module, *args, **kwargs)

    # ---- per call ---------------------------------------------------------------------------------------------
    def _forward(self, layer: Layer, args, kwargs):
        if not layer.live:
            return self._inner(layer, args, kwargs)
        if self.train:
            return self._train_forward(layer, args, kwargs)
        module = layer.module
        if self.parked:  # outside a generation: the model's own weights
            st = inplace.STATES.get(module)
            if st is not None and st.owner() is self:
                inplace.restore(module, st)
            return self._inner(layer, args, kwargs)
        other = self.other
        if other is not None and other.stale(module):
            st = inplace.STATES.get(module)
            if st is not None:
                inplace.restore(module, st)
            other.sync(module)
        st = self._ensure(layer)
        pending = None
        if layer.lowrank:
            pending = self._per_step_lowrank(layer, st, input_of(args, kwargs))
        y = self._inner(layer, args, kwargs)
        if pending is not None:
            y = layer.add_bypass(y, pending)
        return y

    def _wanted(self, layer: Layer):
        if not layer.sched:
            return layer.set_key
        if layer.is_mha:
            return layer.set_key, tuple(self.value(a) for g in layer.sched for a in g.values())
        return layer.set_key, tuple(self.value(a) for a in layer.sched)

    def _ensure(self, layer: Layer) -> inplace.State:
        """The layer's parameters hold this set's merge (with the current step's multipliers for `sched`)."""
        module = layer.module
        want = self._wanted(layer)
        st = layer.state  # (anyone else's write or merge on this layer since ours shows in intact())
        if st is not None and (st.key is want or st.key == want) and st.owner() is self and inplace.intact(module, st):
            st.key = want  # (identity: the next call's check is one `is`)
            return st
        st = layer.state = inplace.STATES.get(module)  # (a new plan for this layer: its state from the table)
        if st is not None and st.key == want and st.owner() is self and inplace.intact(module, st):
            st.key = want
            return st
        old = None if st is None else st.key
        with torch.inference_mode(False), torch.no_grad():
            if st is not None and not inplace.intact(module, st):
                inplace.forget(module)  # somebody else wrote the weights: they are the base now
                st = None
            if st is None:
                st = layer.state = inplace.take_backup(module, self, self.backup_device)
            else:
                st.owner = weakref.ref(self)
                if st.key is not None or st.folded:
                    inplace.put_back(module, st)
            try:
                layer.merge_into(self.value)
            except BaseException:
                inplace.put_back(module, st)  # never leave a half-merged layer behind
                raise
            st.key, st.folded = want, tuple(0.0 for _ in layer.lowrank)
            inplace.mark(module, st)
        if layer.sched and isinstance(old, tuple) and len(old) == 2 and old[0] == layer.set_key:
            self.step_merges += 1  # the same set, another step's multiplier
        else:
            self.computed += 1
        return st

    def _per_step_lowrank(self, layer: Layer, st: inplace.State, x: torch.Tensor):
        """This step's plain-LoRA multipliers: folded into the weight (in place) when that costs less than a bypass
        on this call (returns None), else the difference to what is folded, as a pending bypass term
        (Layer.bypass_delta / add_bypass)."""
        ms = tuple(self.value(a) for a in layer.lowrank)
        if ms == st.folded:
            return None
        weight = layer.module._parameters["weight"]
        f = layer.factors_on(weight, self.keep_on_device)
        deltas = [m - d for m, d in zip(ms, st.folded)]
        calls = min(self.run_length(a) for a in layer.lowrank)
        if layer.fold_pays(weight, x, calls) and weight.is_contiguous():
            with torch.inference_mode(False), torch.no_grad():
                layer.fold(f, deltas)
                st.folded = ms
                inplace.mark(layer.module, st)
            return None
        return layer.bypass_delta(f, x, deltas)

    def _train_forward(self, layer: Layer, args, kwargs):
        module = layer.module
        other = self.other
        if other is not None and other.stale(module):
            other.sync(module)
        saved = []
        try:
            # detached base parameters (all of the layer's, MHA's in_proj_bias too): gradients reach the adapters only
            for owner in module.modules():
                for name, t in list(owner._parameters.items()):
                    if t is not None:
                        _swap(saved, owner, name, t.detach())
            swaps = layer.merge([as_items(g, self.value) for g in layer.static])
            for (sub, name), t in swaps.items():
                _swap(saved, layer.owner(sub), name, t)
            y = self._inner(layer, args, kwargs)
        finally:
            for owner, name, t in reversed(saved):
                owner._parameters[name] = t
        if layer.bypass:
            extra = layer.bypass_terms(input_of(args, kwargs), self.value)
            if extra is not None:
                y = y + extra.to(y.dtype)
        return y


def _swap(saved: list, owner: torch.nn.Module, name: str, t) -> None:
    saved.append((owner, name, owner._parameters[name]))
    owner._parameters[name] = t
