"""The common shape of every network type: one module's weights of one adapter file, and its weight delta.

The numerics follow the webui's built-in Lora (extensions-builtin/Lora/network.py), the reference our
images must match: delta = finalize(calc_updown(W)) where finalize applies the optional `bias` extra,
reshapes to W's shape, multiplies by `scale` (alpha/rank, or an explicit `scale` key), applies DoRA's
weight decomposition when `dora_scale` is present, and finally multiplies by the user's multiplier.
A new network type is one new file in this package holding one NetworkModule subclass registered with
@register.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type

import torch

Tensor = torch.Tensor

REGISTRY: List[Type["NetworkModule"]] = []


class UnsupportedModuleError(ValueError):
    """No network type accepts a module's keys, or its tensors have impossible shapes."""


def register(cls):
    """Class decorator: add a network type. Types are tried in registration order (see algos/__init__)."""
    REGISTRY.append(cls)
    return cls


class NetworkModule:
    """Weights of one adapter for one target module.

    weights: the tensors of this module with the module-name prefix removed, e.g. {"lora_up.weight": ...,
    "lora_down.weight": ..., "alpha": ...}. Subclasses check shapes in __init__ (raising
    UnsupportedModuleError) and read the tensors through self.w() when computing, so that cast_like_builtin
    and trainers that swap tensors in self.weights are seen.
    """

    kind: str = "?"
    #: the keys (after the module prefix) that this type consumes; with common_keys, the rest are unused
    param_keys: Tuple[str, ...] = ()
    common_keys = ("alpha", "scale", "dora_scale", "bias")
    #: keys the built-in casts to the webui's compute dtype when it loads a file (see cast_like_builtin)
    load_cast_keys: Tuple[str, ...] = ()

    def __init__(self, weights: Dict[str, Tensor]):
        self.weights = dict(weights)
        self.alpha = _scalar(weights.get("alpha"))
        self.scale = _scalar(weights.get("scale"))
        self.dora_scale = weights.get("dora_scale")
        self.bias = weights.get("bias")
        self.dim: Optional[int] = None  # rank, set by subclasses that have one

    # ---- to implement -------------------------------------------------------------------------
    @classmethod
    def accepts(cls, weights: Dict[str, Tensor]) -> bool:
        raise NotImplementedError

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Return (finalized delta for the weight, delta for the bias or None), multiplier NOT applied.
        dyn_dim (the prompt's `dyn=`) only means something to LoRA; the other types ignore it."""
        raise NotImplementedError

    def in_dim(self) -> Optional[int]:
        """The target's input width as far as the tensors tell (None where they don't): used to guess the
        model family from cross-attention k/v widths."""
        return None

    # ---- shared ---------------------------------------------------------------------------------
    def calc_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def finalize_updown(self, updown: Tensor, orig_weight: Tensor, output_shape, ex_bias: Optional[Tensor] = None):
        if self.bias is not None:
            updown = updown.reshape(self.bias.shape)
            updown = updown + self.bias.to(orig_weight.device, dtype=updown.dtype)
            updown = updown.reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)
        return updown, ex_bias

    def apply_weight_decompose(self, updown: Tensor, orig_weight: Tensor) -> Tensor:
        """DoRA. The axis follows dora_scale's shape: [1, in, ...] (kohya/webui legacy: norm per input channel)
        or [out, 1, ...] (LyCORIS >= 3.2 wd_on_output: norm per output channel)."""
        orig_weight = orig_weight.to(updown.dtype)
        dora_scale = self.dora_scale.to(device=orig_weight.device, dtype=updown.dtype)
        updown = updown.to(orig_weight.device)
        merged = updown + orig_weight
        nd = merged.dim() - 1
        if dora_scale.dim() > 1 and dora_scale.shape[0] == 1:  # [1, in, ...]: per input channel (webui 1.10)
            norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                    .reshape(merged.shape[1], *[1] * nd).transpose(0, 1))
        else:  # [out, 1, ...] or [out]: per output channel (LyCORIS wd_on_output)
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1, keepdim=True).reshape(merged.shape[0], *[1] * nd)
            dora_scale = dora_scale.reshape(merged.shape[0], *[1] * nd)
        return merged * (dora_scale / norm) - orig_weight

    def delta(self, orig_weight: Tensor, multiplier: float = 1.0,
              dyn_dim: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """The full change to (weight, bias) at this multiplier, computed in orig_weight's dtype promoted to at
        least the adapter's dtype, exactly as the built-in merges it."""
        up, ex_bias = self.calc_updown(orig_weight, dyn_dim=dyn_dim)
        up = up * multiplier
        if ex_bias is not None:
            ex_bias = ex_bias * multiplier
        return up, ex_bias

    def unused_keys(self) -> List[str]:
        used = set(self.param_keys) | set(self.common_keys)
        return [k for k in self.weights if k not in used]

    def cast_like_builtin(self, dtype: torch.dtype) -> None:
        """The built-in stores LoRA's up/down/mid in the webui's compute dtype (devices.dtype) when it loads a
        file and keeps every other type in the file's dtype; call this once with that dtype to get its numbers."""
        for key in self.load_cast_keys:
            t = self.weights.get(key)
            if t is not None:
                self.weights[key] = t.to(dtype)

    def w(self, key: str, device=None) -> Optional[Tensor]:
        """One of this module's tensors (None if absent), moved to `device` like the built-in does."""
        t = self.weights.get(key)
        if t is None or device is None:
            return t
        t = t.to(device)
        # torch has no float16 matmul on the CPU (2.1): compute such files in float32 there (the built-in fails)
        return t.float() if t.dtype == torch.float16 and t.device.type == "cpu" else t

    def parameters(self) -> List[Tensor]:
        return [t for t in self.weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _scalar(t) -> Optional[float]:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().item()) if t.numel() == 1 else None
    return float(t)
