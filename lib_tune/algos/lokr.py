"""LoKr (LyCORIS): dW = kron(w1, w2) reshaped to the target, each factor full or low-rank.

w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2, lokr_w2_a @ lokr_w2_b, or the Tucker form with lokr_t2.
For conv targets w1 gets two singleton dims so kron spreads the kernel of w2. Rank (for alpha/rank) comes from
w1_b / w2_b; with both factors full there is no rank and the scale is 1 (the webui's network_lokr.py rule).

One deliberate difference from the built-in: a non-Tucker conv w2 stored as w2_a [b, r] @ w2_b [r, d, kh, kw]
(LyCORIS's own layout) is multiplied on the flattened w2_b, as LyCORIS does; the built-in's plain `w2a @ w2b`
raises (or mixes axes) there, so that layer never worked in the webui.

Training (LyCORIS's init): out and in are split by `factorization` (LyCORIS's rule, `factor` -1 for the most
balanced), w1 kaiming-uniform, w2 zeros, or w2_a kaiming / w2_b zeros when the rank is below half of w2's larger side
(then alpha/rank scales it; with a full w2 the scale is 1), so the initial delta is 0.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .base import NetworkModule, Tensor, TrainMethod, UnsupportedModuleError, kaiming_uniform, register
from .loha import rebuild_tucker


def _factor(w: Optional[Tensor], wa: Optional[Tensor], wb: Optional[Tensor], t: Optional[Tensor] = None) -> Tensor:
    if w is not None:
        return w
    if t is not None:
        return rebuild_tucker(t, wa, wb)
    if wb.dim() > 2:
        return (wa @ wb.reshape(wb.shape[0], -1)).reshape(wa.shape[0], *wb.shape[1:])
    return wa @ wb


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """LyCORIS's split of a dimension into (m, n), m <= n, m closest to `factor` (-1: most balanced)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def make_kron(output_shape, w1: Tensor, w2: Tensor) -> Tensor:
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2.contiguous()).reshape(output_shape)


@register
class LokrModule(NetworkModule):
    kind = "lokr"
    param_keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    train_methods = (TrainMethod("lokr", conv=True, network_args={"algo": "lokr"}),)

    @classmethod
    def accepts(cls, weights: Dict[str, Tensor]) -> bool:
        has1 = "lokr_w1" in weights or ("lokr_w1_a" in weights and "lokr_w1_b" in weights)
        has2 = "lokr_w2" in weights or ("lokr_w2_a" in weights and "lokr_w2_b" in weights)
        return has1 and has2

    def __init__(self, weights: Dict[str, Tensor]):
        super().__init__(weights)
        try:
            w1, w2 = self._factors(None)
        except RuntimeError as e:
            raise UnsupportedModuleError(f"LoKr factors do not chain: {e}") from None
        if w1.dim() != 2 or w2.dim() not in (2, 4):
            raise UnsupportedModuleError(f"LoKr factors must be 2-D (w2 may be 4-D), got {tuple(w1.shape)}, "
                                         f"{tuple(w2.shape)}")
        self._in = w1.shape[1] * w2.shape[1]
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if self.w(key) is not None:
                self.dim = self.w(key).shape[0]

    def _factors(self, dev):
        w1 = _factor(self.w("lokr_w1", dev), self.w("lokr_w1_a", dev), self.w("lokr_w1_b", dev))
        w2 = _factor(self.w("lokr_w2", dev), self.w("lokr_w2_a", dev), self.w("lokr_w2_b", dev), self.w("lokr_t2", dev))
        return w1, w2

    def in_dim(self) -> Optional[int]:
        return self._in

    @classmethod
    def init_weights(cls, shape, dim: int, g: torch.Generator, factor: int = -1) -> Dict[str, Tensor]:
        kernel = tuple(shape[2:])
        out_l, out_k = factorization(shape[0], factor)
        in_m, in_n = factorization(shape[1], factor)
        w = {"lokr_w1": kaiming_uniform((out_l, in_m), g)}
        if dim < max(out_k, in_n) / 2:
            w["lokr_w2_a"] = kaiming_uniform((out_k, dim), g)
            w["lokr_w2_b"] = torch.zeros((dim, in_n * int(math.prod(kernel))))
        else:  # full w2 (LyCORIS: the rank would not be smaller); scale is 1 then
            w["lokr_w2"] = torch.zeros((out_k, in_n) + kernel)
        return w

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        w1, w2 = self._factors(orig_weight.device)
        output_shape = [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        if orig_weight.dim() == 4:
            output_shape = orig_weight.shape
        return self.finalize_updown(make_kron(output_shape, w1, w2), orig_weight, output_shape)
