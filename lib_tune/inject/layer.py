"""One touched layer: which active entries are merged into its weights, which change per sampling step (and how),
and the arithmetic of each.

Inference (see engine.py for when each runs):
- `static` entries and the per-step entries that have no low-rank form (`sched`: LoHa, LoKr, full, DoRA, IA3,
  OFT, norm, any part of a MultiheadAttention) are merged into the layer's own parameters, the built-in's way
  (`merge_into`); a per-step multiplier change of a `sched` entry re-merges the layer exactly (from the backup),
  so no full-size delta per adapter is ever kept;
- per-step plain LoRA on a Linear or Conv2d (`lowrank`) is applied from its factors: either added into the
  weight in place (`fold`: W += (m - m_folded) * scale * up @ down, one skinny GEMM) or, where that costs more than
  the call itself, as a bypass on the output (`bypass_delta`: (m - m_folded) * scale * up(down(x))). Which one is
  decided per call from the call's rows (see `fold_pays`). Why not always bypass: on a GPU a weight update beats
two extra skinny GEMMs per call where calls are big (measured on an H200, 200 fp16 Linear(1280) layers, rank 32:
7.8 ms a pass without LoRA, 9.6 ms with one LoRA as a weight update vs 14.5 ms as bypass at 8192 tokens); why not
always fold: on the few-token layers (deep UNet levels, cross-attention's 77-token context) one fold costs more
than the whole call.

Training: adapters with a low-rank form (plain LoRA) run as up(down(x)) on the output (`bypass`), everything else
is merged on every call into new tensors, both with autograd (`merge`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..algos.base import NetworkModule
from .inplace import Slot
from .merge import merge_mha, merge_plain, merge_plain_into

Tensor = torch.Tensor


def _tensors(net: NetworkModule) -> List[Tensor]:
    return [t for t in net.weights.values() if isinstance(t, torch.Tensor)]


def _net_key(net: NetworkModule) -> tuple:
    """Identity and in-place version of every tensor of an adapter module: training steps and tensor swaps change it."""
    return (id(net),) + tuple((id(t), t._version) for t in _tensors(net))


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


def _foldable(net: NetworkModule, module: torch.nn.Module, dyn: Optional[int]) -> bool:
    """Plain LoRA whose dW is scale * up @ down on the layer's weight viewed as [out, -1] (a Linear, or a Conv2d
    whose factors span its whole kernel; a CP/Tucker middle factor does not)."""
    if not net.can_bypass_on(module) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    factors = net.linear_factors(dyn)
    if factors is None:
        return False
    up, down = factors
    return up.dim() == down.dim() == 2 and up.shape[0] * down.shape[1] == module.weight.numel()


class Factors:
    """The per-step LoRAs of one layer as factors on one device and dtype, concatenated: `up_cat` [out, R],
    `down_cat` [R, in'] (in' = in * kh * kw for a conv), entry i owning ranks `bounds[i]`, with `scales[i]`. One copy
    of the adapters' own tensors, no more."""

    def __init__(self, entries: Sequence, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        ups, downs, self.scales, self.bounds = [], [], [], []
        r = 0
        for a in entries:
            up, down = a.entry.net.linear_factors(a.dyn)
            ups.append(up.detach())
            downs.append(down.detach())
            self.scales.append(a.entry.net.calc_scale())
            self.bounds.append((r, r + down.shape[0]))
            r += down.shape[0]
        self.up_cat = (torch.cat(ups, 1) if len(ups) > 1 else ups[0]).to(device, dtype)
        self.down_cat = (torch.cat(downs, 0) if len(downs) > 1 else downs[0]).to(device, dtype)

    def tensors(self) -> List[Tensor]:
        return [self.up_cat, self.down_cat]


class Layer:
    """The plan for one touched layer, made once per Injector.apply()."""

    def __init__(self, module: torch.nn.Module, layer: str, items: Sequence, train: bool):
        self.module = module
        self.layer = layer
        self.is_mha = isinstance(module, torch.nn.MultiheadAttention)
        self.static: list = []  # ActiveEntry (plain) or {part: ActiveEntry} (mha), merged once
        self.sched: list = []  # per-step, without a low-rank form: exact re-merge when a multiplier changes
        self.lowrank: list = []  # per-step plain LoRA: folded into the weight or bypassed, from factors
        self.bypass: list = []  # training: low-rank adapters as up(down(x)) on the output
        self.merge_order: list = []  # inference: static and sched entries (mha: groups) in the order they merge
        self.prev_forward = None
        self.wrapper = None
        self.live = True
        self.state = None  # inplace.State, cached here (the engine checks it is still the table's)
        self.factors: Optional[Factors] = None
        self.fp8 = isinstance(module.__dict__.get("fp16_weight"), torch.Tensor)
        if self.is_mha:
            self.static = _group_mha([a for a in items if train or not a.scheduled])
            self.sched = [] if train else _group_mha([a for a in items if a.scheduled])
            self.merge_order = self.static + self.sched
        else:
            for a in items:
                low_rank = a.entry.net.can_bypass_on(module)
                if train and low_rank:
                    self.bypass.append(a)
                elif train or not a.scheduled:
                    self.static.append(a)
                    self.merge_order.append(a)
                elif not self.fp8 and _foldable(a.entry.net, module, a.dyn):
                    self.lowrank.append(a)
                else:
                    self.sched.append(a)
                    self.merge_order.append(a)
        key, keep = [], []
        for a in items:
            key.append((a.entry.part, None if a.scheduled else a.value(), a.dyn, a.scheduled) + _net_key(a.entry.net))
            keep.append(a.entry.net)
            keep.extend(_tensors(a.entry.net))
        self.set_key, self.keep = tuple(key), keep  # keep: the ids in set_key stay unique while the key lives

    @property
    def per_step(self) -> bool:
        return bool(self.sched or self.lowrank)

    def owner(self, sub: str) -> torch.nn.Module:
        return self.module.get_submodule(sub) if sub else self.module

    # ---- inference: merged into the parameters --------------------------------------------------------------
    def merge_into(self, value: Callable) -> None:
        """Merge the static and `sched` entries (at `value(entry)`) into the layer's parameters, which hold the
        backup's values when this is called, in entry order on the running weight. Caller: no_grad, outside
        inference mode.

        Plain LoRA on a Linear/Conv2d goes in as one fused multiply-add, W += m * scale * up @ down (`addmm_`: no
        delta-sized temporary, one pass over the weight; about a third of the built-in's time for a set change on
        SD1.5's layers), rounded once where the built-in rounds the delta, its scaled copies and the sum apart: the
        same weights up to the last bit or so (factors in the weight's dtype, as load_like_builtin holds them in the
        webui). Every other type (and fp8 layers, packed attention, norms, factors of another dtype) is merged with
        the built-in's own arithmetic, bit for bit."""
        if self.is_mha or self.fp8 or not isinstance(self.module, (torch.nn.Linear, torch.nn.Conv2d)):
            for (sub, name), t in self.merge([as_items(g, value) for g in self.merge_order]).items():
                owner = self.owner(sub)
                p = owner._parameters.get(name)
                if p is None:  # a bias the layer lacks (the built-in creates one too)
                    owner._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
                else:
                    p.copy_(t)
            return
        w = self.module._parameters["weight"]
        for a in self.merge_order:
            net = a.entry.net
            m = value(a)
            if m == 0:
                continue
            factors = net.linear_factors(a.dyn) if w.is_contiguous() and _foldable(net, self.module, a.dyn) else None
            if factors is not None and factors[0].dtype == w.dtype:  # (a wider delta: the built-in's casts below)
                up, down = factors
                w.view(w.shape[0], -1).addmm_(up.detach().to(w.device), down.detach().to(w.device),
                                              alpha=m * net.calc_scale())
            else:
                merge_plain_into(self.module, [as_items(a, value)])

    def factors_on(self, weight: Tensor, keep: bool) -> Factors:
        """The per-step LoRA factors on the weight's device and in its dtype; kept for the next call only when
        `keep` (they are the adapters' own tensors; under --medvram/--lowvram they are not kept, so nothing of ours
        stays on a device the layer has left)."""
        f = self.factors
        if f is not None and f.device == weight.device and f.dtype == weight.dtype:
            return f
        f = Factors(self.lowrank, weight.device, weight.dtype)
        self.factors = f if keep else None
        return f

    @staticmethod
    def fold_pays(weight: Tensor, x: Tensor, calls: int = 1) -> bool:
        """Adding r-rank factors into a [out, in'] weight costs ~ r * out * in' multiply-adds, once; a bypass costs
        ~ r * rows * (out + in') per call, for each of the `calls` the multipliers stay the same. Fold when those are
        at least as big (the many-token layers, flat parts of a schedule); bypass on the few-token ones (deep UNet
        levels, cross-attention's context) while the multipliers move."""
        out = weight.shape[0]
        inn = weight.numel() // out
        rows = x.numel() // (x.shape[-1] if weight.dim() == 2 else x.shape[1] if x.dim() > 1 else 1)
        return calls * rows * (out + inn) >= out * inn

    def fold(self, f: Factors, deltas: Sequence[float]) -> None:
        """W += sum_i d_i * scale_i * up_i @ down_i, in place, as one GEMM over all ranks (caller: no_grad, outside
        inference mode)."""
        w = self.module._parameters["weight"]
        w2 = w.view(w.shape[0], -1)
        if len(deltas) == 1:
            w2.addmm_(f.up_cat, f.down_cat, alpha=deltas[0] * f.scales[0])
            return
        up = f.up_cat.clone()
        for (lo, hi), scale, d in zip(f.bounds, f.scales, deltas):
            up[:, lo:hi].mul_(d * scale)
        w2.addmm_(up, f.down_cat)

    def bypass_delta(self, f: Factors, x: Tensor, deltas: Sequence[float]):
        """sum_i d_i * scale_i * up_i(down_i(x)), the per-step part not folded into the weight. On a Linear:
        (h, up_cat) with h = down(x) scaled per entry, for the caller to add h @ up_cat.T onto the output in place;
        on a conv: the term itself, (t, None)."""
        module = self.module
        if isinstance(module, torch.nn.Linear):
            xin = x if x.dtype == f.dtype else x.to(f.dtype)
            h = F.linear(xin, f.down_cat)
            for (lo, hi), scale, d in zip(f.bounds, f.scales, deltas):
                h[..., lo:hi].mul_(d * scale)
            return h, f.up_cat
        out = None
        for a, d in zip(self.lowrank, deltas):
            if d != 0:
                t = a.entry.net.bypass(x, module, d, a.dyn)
                out = t if out is None else out + t
        return (out, None) if out is not None else None

    @staticmethod
    def add_bypass(y: Tensor, pending) -> Tensor:
        """y + the bypass term from bypass_delta: added in place onto y's rows when nothing records autograd."""
        h, up = pending
        if up is None:
            return y + h.to(y.dtype)
        if not torch.is_grad_enabled() and y.dtype == h.dtype and y.is_contiguous() and y.shape[:-1] == h.shape[:-1]:
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
            return y
        return y + F.linear(h, up).to(y.dtype)

    # ---- training (and fp8 / small layers at inference) -------------------------------------------------------
    def merge(self, groups: list) -> Dict[Slot, Tensor]:
        """New parameter values with `groups` (merge items) added, the built-in's way."""
        if not groups:
            return {}
        if self.is_mha:
            return merge_mha(self.module, groups)
        return {("", n): t for n, t in merge_plain(self.module, groups).items()}

    def bypass_terms(self, x: Tensor, value: Callable) -> Optional[Tensor]:
        """Training: sum of the bypassed adapters' output terms (up(down(x)) * m * scale for LoRA), with autograd
        (None if there are none)."""
        out = None
        for a in self.bypass:
            t = a.entry.net.bypass(x, self.module, value(a), a.dyn)
            out = t if out is None else out + t
        return out
