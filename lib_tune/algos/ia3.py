"""(IA)^3: a learned per-channel gain. dW = W * w, with w scaling output rows, or input columns when `on_input`.

The webui's network_ia3.py multiplies a Linear weight by w[:, None] (rows) or w (columns); that is what we do for
2-D targets. For conv targets the built-in's broadcast lands on the kernel axes and fails, so there w is laid
along axis 0 or 1 explicitly (LyCORIS's meaning). Scale is 1 unless an explicit `scale` key says otherwise.
"""
from __future__ import annotations

from typing import Dict, Optional

from .base import NetworkModule, Tensor, UnsupportedModuleError, register


@register
class Ia3Module(NetworkModule):
    kind = "ia3"
    required_keys = ("weight", "on_input")
    param_keys = ("weight", "on_input")

    def __init__(self, weights: Dict[str, Tensor]):
        super().__init__(weights)
        on_input = self.w("on_input")
        if on_input.numel() != 1:
            raise UnsupportedModuleError(f"IA3 on_input must be a scalar, got shape {tuple(on_input.shape)}")
        self.on_input = bool(on_input.item())
        w = self.w("weight")
        if w.dim() == 0 or w.numel() != max(w.shape):  # [n], or LyCORIS's [n, 1] / [1, n]
            raise UnsupportedModuleError(f"IA3 weight must be a vector, got shape {tuple(w.shape)}")

    def in_dim(self) -> Optional[int]:
        return self.w("weight").numel() if self.on_input else None

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        w = self.w("weight", orig_weight.device)
        output_shape = [w.numel(), orig_weight.shape[1]]
        if self.on_input:
            output_shape.reverse()
            if orig_weight.dim() > 2:
                w = w.reshape(1, -1, *[1] * (orig_weight.dim() - 2))
            else:
                w = w.reshape(-1)
        else:
            w = w.reshape(-1, *[1] * (orig_weight.dim() - 1))
        return self.finalize_updown(orig_weight * w, orig_weight, output_shape)
