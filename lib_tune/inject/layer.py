"""One touched layer: which active entries are merged once, which change per sampling step, and the cached
tensors that make the second call with the same set free.

Parameter slots are named relative to the layer, ("", "weight") or ("out_proj", "bias") for a
MultiheadAttention's out projection, so nothing cached holds a strong reference to a module (the cache is a
WeakKeyDictionary keyed by module: an unloaded model takes its cache with it).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..algos.base import NetworkModule
from .lowrank import LinearFactors
from .merge import QKV, fit_to, merge_mha, merge_plain, mha_parts_delta, pack_qkv, qkv_parts

Tensor = torch.Tensor
Slot = Tuple[str, str]  # (submodule path, parameter name) inside the layer


def _tensors(net: NetworkModule) -> List[Tensor]:
    return [t for t in net.weights.values() if isinstance(t, torch.Tensor)]


def _net_key(net: NetworkModule) -> tuple:
    """Identity and in-place version of every tensor of an adapter module: training steps and tensor swaps change it."""
    return (id(net),) + tuple((id(t), t._version) for t in _tensors(net))


def group_key(g) -> tuple:
    """What a scheduled group's cached dW depends on besides the base weights: its adapter modules (and parts)."""
    if isinstance(g, dict):
        return tuple(sorted((p, id(a.entry.net), a.dyn) for p, a in g.items()))
    return ((None, id(g.entry.net), g.dyn),)


def _fixed(a) -> float:
    return a.value()


def as_items(g, value: Callable = _fixed):
    """An ActiveEntry (plain layer) or {part: ActiveEntry} (MultiheadAttention) as merge items, with multipliers
    from `value(active_entry)` (this step's, see Injector.value)."""
    if isinstance(g, dict):
        return {p: (a.entry.net, value(a), a.dyn) for p, a in g.items()}
    return g.entry.net, value(g), g.dyn


def _group_mha(entries) -> List[dict]:
    """Parts of the same adapter (and same static/scheduled kind) form one group, in order of first appearance."""
    groups: Dict[tuple, dict] = {}
    for a in entries:
        groups.setdefault((id(a.entry.adapter), a.scheduled), {})[a.entry.part] = a
    return list(groups.values())


class Cached:
    """Tensors of one layer for one adapter set, valid while the base tensors are unchanged."""

    def __init__(self, set_key: tuple, keep: list, base: list):
        self.set_key = set_key
        self.keep = keep  # the adapter modules and tensors whose ids are in set_key (so ids are not reused)
        self.base = base  # [(weakref, _version, device, dtype) or None] per base tensor
        self.swaps: Dict[Slot, Tensor] = {}  # statically merged parameters
        self.sched: Dict[tuple, object] = {}  # group_key -> deltas at multiplier 1, in the layer's dtype
        self.factors: Optional[LinearFactors] = None  # per-step low-rank adapters of a Linear, as factors
        self.step_key: Optional[tuple] = None  # the per-step multipliers step_swaps was computed for
        self.step_swaps: Dict[Slot, Tensor] = {}


class Layer:
    """The plan for one touched layer, made once per Injector.apply().

    Inference: fixed multipliers are merged once (`static`); per-step ones (`sched`, `lowrank`) are added to the
    merged weight on each call from cached deltas or low-rank factors (a fused multiply-add / one skinny GEMM each,
    never calc_updown again). Training: adapters with a low-rank form (plain LoRA) run as up(down(x)) on the output
    (`bypass`), everything else is merged on every call, both with autograd.
    """

    def __init__(self, module: torch.nn.Module, layer: str, items: Sequence, train: bool):
        self.module = module
        self.layer = layer
        self.is_mha = isinstance(module, torch.nn.MultiheadAttention)
        self.static: list = []  # ActiveEntry (plain) or {part: ActiveEntry} (mha)
        self.sched: list = []  # per-step, through a cached dW
        self.lowrank: list = []  # per-step low-rank adapter on a Linear, through its factors
        self.bypass: list = []  # training: low-rank adapters as up(down(x)) on the output
        self.prev_forward = None
        self.wrapper = None
        self.live = True
        self.cached: Optional[Cached] = None
        if self.is_mha:
            self.static = _group_mha([a for a in items if train or not a.scheduled])
            self.sched = [] if train else _group_mha([a for a in items if a.scheduled])
        else:
            for a in items:
                low_rank = a.entry.net.can_bypass_on(module)
                if train and low_rank:
                    self.bypass.append(a)
                elif train or not a.scheduled:
                    self.static.append(a)
                elif low_rank and isinstance(module, torch.nn.Linear):
                    self.lowrank.append(a)
                else:
                    self.sched.append(a)
        key, keep = [], []
        for a in items:
            key.append((a.entry.part, None if a.scheduled else a.value(), a.dyn, a.scheduled) + _net_key(a.entry.net))
            keep.append(a.entry.net)
            keep.extend(_tensors(a.entry.net))
        self.set_key, self.keep = tuple(key), keep

    @property
    def per_step(self) -> bool:
        return bool(self.sched or self.lowrank)

    # ---- parameters -------------------------------------------------------------------------------------------
    def owner(self, sub: str) -> torch.nn.Module:
        return self.module.get_submodule(sub) if sub else self.module

    def _base_tensors(self) -> list:
        """(Checked on every call: kept to plain dict lookups.)"""
        m = self.module
        if self.is_mha:
            o = m.out_proj._parameters
            out = [m._parameters.get("in_proj_weight"), o.get("weight"), o.get("bias")]
        else:
            out = [m._parameters.get("weight"), m._parameters.get("bias")]
        full = m.__dict__.get("fp16_weight")  # the webui's full-precision copy of an fp8 layer
        if isinstance(full, torch.Tensor):
            out.append(full)
        return out

    def base_state(self) -> list:
        return [None if t is None else (weakref.ref(t), t._version, t.device, t.dtype) for t in self._base_tensors()]

    def same_base(self, saved: list) -> bool:
        now = self._base_tensors()
        if len(now) != len(saved):
            return False
        for s, t in zip(saved, now):
            if (s is None) != (t is None):
                return False
            if t is not None and (s[0]() is not t or s[1] != t._version or s[2] != t.device or s[3] != t.dtype):
                return False
        return True

    # ---- computing ----------------------------------------------------------------------------------------------
    def merge(self, groups: list) -> Dict[Slot, Tensor]:
        """New parameter values with `groups` (merge items) added, the built-in's way."""
        if not groups:
            return {}
        if self.is_mha:
            return merge_mha(self.module, groups)
        return {("", n): t for n, t in merge_plain(self.module, groups).items()}

    def build_cache(self) -> Cached:
        """Static merge; dW at multiplier 1 of per-step entries (on the statically merged weights); the
        factors of per-step low-rank adapters."""
        c = Cached(self.set_key, self.keep, self.base_state())
        c.swaps = self.merge([as_items(g) for g in self.static])

        def current(sub, name):
            return c.swaps.get((sub, name), self.owner(sub)._parameters.get(name))

        for g in self.sched:
            if self.is_mha:
                w_in = current("", "in_proj_weight")
                d = mha_parts_delta(self.module, {p: (a.entry.net, 1.0, a.dyn) for p, a in g.items()}, w_in,
                                    current("out_proj", "weight"))
                c.sched[group_key(g)] = {p: tuple(None if t is None else t.to(w_in.dtype) for t in v)
                                         for p, v in d.items()}
            else:
                w = current("", "weight")
                up, ex_bias = g.entry.net.delta(w, 1.0, g.dyn)
                c.sched[group_key(g)] = (fit_to(up, w).to(w.dtype),
                                         None if ex_bias is None else ex_bias.to(w.device, w.dtype))
        if self.lowrank:
            w = self.module.weight
            c.factors = LinearFactors(self.lowrank, w.device, w.dtype)
        return c

    def step_swaps(self, c: Cached, value: Callable) -> Dict[Slot, Tensor]:
        """The parameters for this call: the static merge plus this step's multiples of the per-step deltas.
        Reused while the multipliers stay the same (flat parts of a schedule cost what a static set costs)."""
        if self.is_mha:
            key = tuple(value(a) for g in self.sched for a in g.values())
        else:
            key = tuple(value(a) for a in self.lowrank) + tuple(value(a) for a in self.sched)
        if key != c.step_key:
            c.step_swaps = self._mha_step(c, iter(key)) if self.is_mha else self._plain_step(c, key)
            c.step_key = key
        return c.step_swaps

    def _plain_step(self, c: Cached, key: tuple) -> Dict[Slot, Tensor]:
        weight = self.module._parameters["weight"]
        w0 = w = c.swaps.get(("", "weight"), weight)
        b0 = b = c.swaps.get(("", "bias"), self.module._parameters.get("bias"))
        n = len(self.lowrank)
        if c.factors is not None:
            w = c.factors.added_to(w, key[:n])
        for a, m in zip(self.sched, key[n:]):
            if m != 0:
                d, d_bias = c.sched[group_key(a)]
                w = torch.add(w, d, alpha=m)
                if d_bias is not None:
                    b = d_bias * m if b is None else torch.add(b, d_bias, alpha=m)
        if w is w0 and b is b0:
            return c.swaps
        out = dict(c.swaps)
        out[("", "weight")] = w if w.dtype == weight.dtype else w.to(weight.dtype)
        if b is not None:
            out[("", "bias")] = b.to(weight.dtype if b0 is None else b0.dtype)
        return out

    def _mha_step(self, c: Cached, values) -> Dict[Slot, Tensor]:
        """A MultiheadAttention's per-step deltas, re-added for this step's multipliers (`values`, in the order of
        the groups and their parts)."""
        mha = self.module
        swaps = c.swaps
        w_in = swaps.get(("", "in_proj_weight"), mha.in_proj_weight)
        w_out = swaps.get(("out_proj", "weight"), mha.out_proj.weight)
        b_out = swaps.get(("out_proj", "bias"), mha.out_proj.bias)
        out = dict(swaps)
        for g in self.sched:
            d = c.sched[group_key(g)]
            m = {p: next(values) for p in g}
            if any(p in d for p in QKV):
                dq = {p: d[p][0] * m[p] if p in d else torch.zeros_like(ch) for p, ch in qkv_parts(w_in).items()}
                w_in = (w_in + pack_qkv(dq)).to(mha.in_proj_weight.dtype)
                out[("", "in_proj_weight")] = w_in
            if "out" in d:
                up, db = d["out"]
                w_out = (w_out + up * m["out"]).to(mha.out_proj.weight.dtype)
                out[("out_proj", "weight")] = w_out
                if db is not None:
                    b_out = ((db * m["out"]).to(w_out.dtype) if b_out is None
                             else (b_out + db * m["out"]).to(b_out.dtype))
                    out[("out_proj", "bias")] = b_out
        return out

    def bypass_terms(self, x: Tensor, value: Callable) -> Optional[Tensor]:
        """Training: sum of the bypassed adapters' output terms (up(down(x)) * m * scale for LoRA), with autograd
        (None if there are none)."""
        out = None
        for a in self.bypass:
            t = a.entry.net.bypass(x, self.module, value(a), a.dyn)
            out = t if out is None else out + t
        return out
