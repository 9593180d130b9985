"""Norm (LyCORIS): trained GroupNorm/LayerNorm affine parameters stored as deltas, `w_norm` added to the weight
and `b_norm` to the bias (webui network_norm.py). The built-in requires both keys; we also take `w_norm` alone."""
from __future__ import annotations

from typing import Optional

from .base import NetworkModule, Tensor, register


@register
class NormModule(NetworkModule):
    kind = "norm"
    required_keys = ("w_norm",)
    param_keys = ("w_norm", "b_norm")

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        w_norm, b_norm = self.w("w_norm", orig_weight.device), self.w("b_norm", orig_weight.device)
        return self.finalize_updown(w_norm, orig_weight, w_norm.shape, b_norm)
