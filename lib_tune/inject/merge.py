"""The arithmetic of applying adapter deltas to one layer, with no state: merged weights (the built-in's order of
operations, so results are bit-identical to its merged model) and per-part deltas of packed attention.

A merged weight is a NEW tensor; the layer's own parameters are only read.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..algos.base import NetworkModule

Tensor = torch.Tensor
#: (adapter module, multiplier, dyn_dim)
Item = Tuple[NetworkModule, float, Optional[int]]
#: one adapter's parts on a MultiheadAttention: "q"/"k"/"v"/"out" -> Item
MhaItem = Dict[str, Item]
#: a MultiheadAttention's packed in_proj_weight holds q, k and v as thirds, in this order
QKV = ("q", "k", "v")


def qkv_parts(in_proj: Tensor) -> Dict[str, Tensor]:
    """The q/k/v rows of a packed in_proj weight (views)."""
    return dict(zip(QKV, in_proj.chunk(3, 0)))


def pack_qkv(parts: Dict[str, Tensor]) -> Tensor:
    """The inverse of qkv_parts: one packed tensor from q, k and v."""
    return torch.vstack([parts[p] for p in QKV])


def fit_to(updown: Tensor, weight: Tensor) -> Tensor:
    """Inpainting UNets have 9 input channels where adapters were trained on 4: zero-pad, as the built-in."""
    if weight.dim() == 4 and weight.shape[1] == 9 and updown.dim() == 4 and updown.shape[1] == 4:
        updown = F.pad(updown, (0, 0, 0, 0, 0, 5))
    return updown


def _base(module: torch.nn.Module, name: str) -> Optional[Tensor]:
    """The value to merge onto: the parameter, or the webui's fp16 copy when it stores the layer in fp8
    (`fp16_weight` / `fp16_bias`, modules/sd_models.py), as the built-in does."""
    full = getattr(module, "fp16_" + name, None)
    p = module._parameters.get(name)
    if full is not None and p is not None:
        return full.to(p.device)
    return p


def merge_plain(module: torch.nn.Module, items: Sequence[Item]) -> Dict[str, Tensor]:
    """New {"weight": W', "bias": B'} for a Linear / Conv2d / GroupNorm / LayerNorm, the deltas added one adapter
    after another on the running weight (W-dependent types such as DoRA, IA3, OFT see the previous adapters, as
    in the built-in's in-place merge): W' = (W.to(dW.dtype) + dW).to(W.dtype) per adapter."""
    weight = module._parameters["weight"]
    w = _base(module, "weight")
    b = _base(module, "bias")
    acc = w.dtype  # the dtype the built-in keeps between adapters (fp16 for an fp8 layer's fp16 copy)
    bias_changed = False
    for net, m, dyn in items:
        up, ex_bias = net.delta(w, m, dyn)
        up = fit_to(up, w)
        w = (w.to(dtype=up.dtype) + up).to(dtype=acc)
        if ex_bias is not None:
            ex_bias = ex_bias.to(w.device)
            b = ex_bias.to(acc) if b is None else (b + ex_bias).to(dtype=b.dtype)
            bias_changed = True
    out = {"weight": w.to(weight.dtype)}
    if bias_changed:
        bias = module._parameters.get("bias")
        out["bias"] = b.to(bias.dtype if bias is not None else weight.dtype)
    return out


def _add(t: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    """The value of the built-in's in-place `t += d` (computed in the promoted dtype, stored in t's)."""
    return (t + d).to(dtype)


def mha_parts_delta(mha: torch.nn.MultiheadAttention, parts: MhaItem, w_in: Tensor, w_out: Tensor) -> Dict[str, Tuple]:
    """One adapter's deltas at multiplier 1 per part: {"q"/"k"/"v": (dW,), "out": (dW, dB or None)}, computed
    on the given in_proj / out_proj weights; the engine scales them per sampling step."""
    chunks = qkv_parts(w_in)
    out = {}
    for p, (net, _, dyn) in parts.items():
        if p == "out":
            up, ex_bias = net.delta(w_out, 1.0, dyn)
            out[p] = (up, None if ex_bias is None else ex_bias.to(w_out.device))
        else:
            out[p] = (net.delta(chunks[p], 1.0, dyn)[0],)
    return out


def merge_mha(mha: torch.nn.MultiheadAttention, groups: Sequence[MhaItem]) -> Dict[Tuple[str, str], Tensor]:
    """New in_proj_weight / out_proj.weight / out_proj.bias for a packed MultiheadAttention: per adapter, the
    q/k/v deltas (computed on the matching third of the running in_proj_weight) stacked into one in_proj delta,
    a missing part contributing zeros; out goes to out_proj (built-in networks.py L486-513, which needs all four).
    Keys are (owner, name): ("", "in_proj_weight"), ("out_proj", "weight"), ("out_proj", "bias")."""
    w_in0, w_out0, b_out0 = mha.in_proj_weight, mha.out_proj.weight, mha.out_proj.bias
    w_in, w_out, b_out = w_in0, w_out0, b_out0
    out: Dict[Tuple[str, str], Tensor] = {}
    for parts in groups:
        if any(p in parts for p in QKV):
            chunks = qkv_parts(w_in)
            ups: Dict[str, Tensor] = {p: parts[p][0].delta(chunks[p], *parts[p][1:])[0] for p in QKV if p in parts}
            dtype = next(iter(ups.values())).dtype
            ups = {p: ups[p] if p in ups else torch.zeros(c.shape, dtype=dtype, device=c.device)
                   for p, c in chunks.items()}
            w_in = _add(w_in, pack_qkv(ups), w_in0.dtype)
            out[("", "in_proj_weight")] = w_in
        if "out" in parts:
            net, m, dyn = parts["out"]
            up, ex_bias = net.delta(w_out, m, dyn)
            w_out = _add(w_out, up, w_out0.dtype)
            out[("out_proj", "weight")] = w_out
            if ex_bias is not None:
                ex_bias = ex_bias.to(w_out.device)
                b_out = ex_bias.to(w_out0.dtype) if b_out is None else _add(b_out, ex_bias, b_out.dtype)
                out[("out_proj", "bias")] = b_out
    return out


def input_of(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["input"]
