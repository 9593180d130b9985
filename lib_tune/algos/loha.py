"""LoHa (LyCORIS): dW = (w1a @ w1b) * (w2a @ w2b), Hadamard product of two low-rank products.

With `hada_t1`/`hada_t2` [r, r, kh, kw] (Tucker conv), each factor is rebuilt as
einsum(einsum(t, wb), wa) with wa [r, out] and wb [r, in]. Rank = hada_w1_b.shape[0]. Same math and order as the
webui's network_hada.py + lyco_helpers.make_weight_cp.

Training (LyCORIS's init): w1_b ~ N(0, 1), w1_a ~ N(0, 0.1^2), w2_b ~ N(0, 1), w2_a = 0, so the initial delta is 0;
conv factors are flat ([r, in·kh·kw]).
"""
from __future__ import annotations

from typing import Dict, Optional

import math

import torch

from .base import NetworkModule, Tensor, TrainMethod, UnsupportedModuleError, normal, register

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def rebuild_tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """[r, r, kh, kw] core with wa [r, out], wb [r, in] -> [out, in, kh, kw] (lyco_helpers.make_weight_cp)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def rebuild_flat(up: Tensor, down: Tensor, shape) -> Tensor:
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


@register
class LohaModule(NetworkModule):
    kind = "loha"
    required_keys = KEYS
    param_keys = KEYS + ("hada_t1", "hada_t2")
    train_methods = (TrainMethod("loha", conv=True, network_args={"algo": "loha"}),)

    def __init__(self, weights: Dict[str, Tensor]):
        super().__init__(weights)
        for n in ("1", "2"):
            wa, wb, t = self.w(f"hada_w{n}_a"), self.w(f"hada_w{n}_b"), self.w(f"hada_t{n}")
            ok = wa.dim() == 2 and wb.dim() >= 2
            if t is None:
                ok = ok and wa.shape[1] == wb.shape[0]
            else:
                ok = ok and t.dim() == 4 and wb.dim() == 2 and t.shape[0] == wa.shape[0] and t.shape[1] == wb.shape[0]
            if not ok:
                raise UnsupportedModuleError(
                    f"LoHa factor {n} shapes do not chain: a {tuple(wa.shape)}, b {tuple(wb.shape)}"
                    + (f", t {tuple(t.shape)}" if t is not None else ""))
        self.dim = self.w("hada_w1_b").shape[0]

    def in_dim(self) -> Optional[int]:
        return self.w("hada_w1_b").shape[1]

    @classmethod
    def init_weights(cls, shape, dim: int, g: torch.Generator, factor: int = -1) -> Dict[str, Tensor]:
        out_dim, flat_in = shape[0], shape[1] * int(math.prod(shape[2:]))
        return {"hada_w1_a": normal((out_dim, dim), 0.1, g), "hada_w1_b": normal((dim, flat_in), 1.0, g),
                "hada_w2_a": torch.zeros((out_dim, dim)), "hada_w2_b": normal((dim, flat_in), 1.0, g)}

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        dev = orig_weight.device
        w1a, w1b, w2a, w2b = (self.w(k, dev) for k in KEYS)
        t1, t2 = self.w("hada_t1", dev), self.w("hada_t2", dev)
        if t1 is not None:
            output_shape = [w1a.shape[1], w1b.shape[1]] + list(t1.shape[2:])
            updown1 = rebuild_tucker(t1, w1a, w1b)
        else:
            output_shape = [w1a.shape[0], w1b.shape[1]] + list(w1b.shape[2:] if w1b.dim() == 4 else [])
            updown1 = rebuild_flat(w1a, w1b, output_shape)
        updown2 = rebuild_tucker(t2, w2a, w2b) if t2 is not None else rebuild_flat(w2a, w2b, output_shape)
        return self.finalize_updown(updown1 * updown2, orig_weight, output_shape)
