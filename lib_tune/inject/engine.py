"""The injection engine: active adapters change what touched layers compute, never the model's own weights.

How (why each choice):
- Only layers an active adapter touches get a wrapper, as an instance attribute `module.forward` (removed by
  clear()); every other layer runs exactly as before, with no overhead.
- The wrapper calls the layer's class forward at call time (`type(module).forward`, or a forward some other code
  set on the instance before us), so the webui's own class-level patches keep running, whatever CrossAttention
  variant is selected (they all call the to_q/to_k/to_v Linear layers).
- Static multipliers (the usual case): the merged weight W' = W + sum m_i dW_i is computed once, in the built-in's
  order of operations and dtypes (bit-identical to its merged model), cached in the layer's dtype on its device, and
  swapped into `module._parameters` only for the duration of the call (try/finally). The cache is keyed by the
  adapters' tensors, the multipliers and the base tensors' identity/_version/device/dtype, so a second generation
  with the same set computes nothing and a multiplier change recomputes only the layers it affects.
- Multipliers that change per sampling step (callables (step, total) -> float): no re-merge per step. Each call
  runs with W' + sum m_i(step) dW_i, from dW cached at multiplier 1, or for LoRA on a Linear from its factors
  (one fused GEMM, see lowrank.py for why this beats adding up(down(x)) to the output).
- Training (apply(..., train=True)): nothing cached, every delta is rebuilt with autograd each forward (LoRA as
  up(down(x)) on the output), on detached base parameters, so gradients reach the adapters and never the model.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from .layer import Cached, Layer, as_items
from .mapping import MappedAdapter, MappedEntry
from .merge import input_of

#: a fixed multiplier, or one per sampling step: f(step, total_steps) -> multiplier
Multiplier = Union[float, Callable[[int, int], float]]


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


class Injector:
    """Applies a list of ActiveEntries to the model their MappedEntries point into. One Injector per model.

    apply(entries) installs the wrappers (replacing any previous set), clear() removes them; set_step(step,
    total) tells per-step multipliers where sampling is. `computed` counts layer merges (diagnostics, tests).
    """

    def __init__(self):
        self.layers: Dict[torch.nn.Module, Layer] = {}
        self.train = False
        self.step, self.total = 0, 1
        self.computed = 0
        self._values: Dict[int, float] = {}
        self._cache: "weakref.WeakKeyDictionary[torch.nn.Module, Cached]" = weakref.WeakKeyDictionary()
        #: called with a wrapped layer before each of its calls, on its real parameters: lets another engine that
        #: merges into the weights (the webui's built-in Lora) bring the layer up to date first, so it never
        #: acts on our swapped-in tensors
        self.before_call: Optional[Callable[[torch.nn.Module], None]] = None

    # ---- public ------------------------------------------------------------------------------------------------
    def apply(self, entries: Sequence[ActiveEntry], train: bool = False) -> None:
        """Make `entries` the active set. Entries are applied in list order (the order of the built-in's list of
        loaded networks). Fixed multipliers of 0 are skipped (no wrapper when nothing is left on a layer).
        train=True: no cache, autograd through the adapters (see the module docstring)."""
        self.clear()
        self.train = train
        self._values = {}
        by_module: Dict[torch.nn.Module, List[ActiveEntry]] = {}
        for a in entries:
            if not train and not a.scheduled and a.value() == 0:
                continue
            by_module.setdefault(a.entry.module, []).append(a)
        for module in list(self._cache.keys()):
            if module not in by_module:
                del self._cache[module]
        for module, items in by_module.items():
            layer = Layer(module, items[0].entry.layer, items, train)
            self._install(layer)
            self.layers[module] = layer

    def clear(self) -> None:
        """Remove every wrapper. Merged tensors stay cached for the next apply() of the same set (apply() drops
        the cache of layers the new set does not touch; drop_cache() drops all)."""
        for module, layer in self.layers.items():
            layer.live = False  # if another wrapper sits on top of ours, ours becomes a pass-through
            if module.__dict__.get("forward") is layer.wrapper:
                if layer.prev_forward is None:
                    del module.forward
                else:
                    module.forward = layer.prev_forward
        self.layers = {}

    def drop_cache(self) -> None:
        self._cache = weakref.WeakKeyDictionary()

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = step, max(int(total), 1)
        self._values = {}

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

    @property
    def touched(self) -> List[str]:
        return [layer.layer for layer in self.layers.values()]

    # ---- per call ---------------------------------------------------------------------------------------------
    def _install(self, layer: Layer) -> None:
        module = layer.module
        layer.prev_forward = module.__dict__.get("forward")

        def forward(*args, **kwargs):
            return self._forward(layer, args, kwargs)

        layer.wrapper = forward
        module.forward = forward

    @staticmethod
    def _inner(layer: Layer, args, kwargs):
        if layer.prev_forward is not None:
            return layer.prev_forward(*args, **kwargs)
        return type(layer.module).forward(layer.module, *args, **kwargs)

    def _forward(self, layer: Layer, args, kwargs):
        if not layer.live:
            return self._inner(layer, args, kwargs)
        if self.before_call is not None:
            self.before_call(layer.module)
        saved = []
        try:
            if self.train:
                # detached base parameters (all of the layer's, MHA's in_proj_bias too): gradients reach the
                # adapters only
                for owner in layer.module.modules():
                    for name, t in list(owner._parameters.items()):
                        if t is not None:
                            _swap(saved, owner, name, t.detach())
                swaps = layer.merge([as_items(g, self.value) for g in layer.static])
            else:
                cached = self._cached(layer)
                swaps = cached.swaps
                if layer.per_step:
                    if torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                        # plain tensors without autograd history, reusable in and outside inference_mode
                        with torch.inference_mode(False), torch.no_grad():
                            swaps = layer.step_swaps(cached, self.value)
                    else:  # (the usual sampling context: skip the contexts' cost on this per-call path)
                        swaps = layer.step_swaps(cached, self.value)
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

    def _cached(self, layer: Layer) -> Cached:
        c = layer.cached  # checked against this set already; the base tensors are checked on every call
        if c is None:
            c = self._cache.get(layer.module)
            if c is not None and c.set_key != layer.set_key:
                c = None
        if c is not None and layer.same_base(c.base):
            layer.cached = c
            return c
        # normal tensors even inside inference_mode, so a later autograd-enabled call can use them
        with torch.inference_mode(False), torch.no_grad():
            c = layer.build_cache()
        self.computed += 1
        self._cache[layer.module] = layer.cached = c
        return c


def _swap(saved: list, owner: torch.nn.Module, name: str, t) -> None:
    saved.append((owner, name, owner._parameters[name]))
    owner._parameters[name] = t
