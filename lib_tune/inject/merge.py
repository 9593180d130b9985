"""The arithmetic of applying adapter deltas to one layer, with no state: merged weights (the built-in's order of
operations, so results are bit-identical to its merged model), per-part deltas of packed attention, and which
LoRAs can be kept in low-rank form.

A merged weight is a NEW tensor; the layer's own parameters are only read.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..algos.base import NetworkModule

Tensor = torch.Tensor
#: (adapter module, multiplier, dyn_dim)
Item = Tuple[NetworkModule, float, Optional[int]]
#: one adapter's parts on a MultiheadAttention: "q"/"k"/"v"/"out" -> Item
MhaItem = Dict[str, Item]


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
    chunks = dict(zip("qkv", w_in.chunk(3, 0)))
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
        qkv = [parts.get(p) for p in "qkv"]
        if any(it is not None for it in qkv):
            chunks = w_in.chunk(3, 0)
            ups: List[Optional[Tensor]] = [None if it is None else it[0].delta(c, it[1], it[2])[0]
                                           for it, c in zip(qkv, chunks)]
            dtype = next(u.dtype for u in ups if u is not None)
            ups = [u if u is not None else torch.zeros(c.shape, dtype=dtype, device=c.device)
                   for u, c in zip(ups, chunks)]
            w_in = _add(w_in, torch.vstack(ups), w_in0.dtype)
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


# ---- low-rank form -------------------------------------------------------------------------------------------------
def can_bypass(net: NetworkModule, module: torch.nn.Module) -> bool:
    """Plain LoRA (no DoRA, no full-rank `bias` extra) on a Linear, or on an ungrouped Conv2d whose kernel its
    spatial factor has, can run as up(down(x)) on the output and be kept as factors."""
    if not getattr(net, "can_bypass", False) or not hasattr(net, "bypass"):
        return False
    width = getattr(module, "in_features", None) or getattr(module, "in_channels", None)
    if net.in_dim() != width:  # e.g. an inpainting UNet's 9-channel conv_in: merged (zero-padded) instead
        return False
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return False
        if net.w("lora_mid.weight") is None:
            down = net.w("lora_down.weight")
            spatial = tuple(down.shape[2:]) if down.dim() == 4 else (1, 1)
            return spatial == tuple(module.weight.shape[2:])
        return True
    return isinstance(module, torch.nn.Linear)


def input_of(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["input"]
