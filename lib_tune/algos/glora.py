"""GLoRA (LyCORIS): dW = W·A + B, both A and B low-rank. Two on-disk layouts exist and are told apart by shapes:

- old (LyCORIS 1.x; the one the webui's network_glora.py computes): a1 [r, in], a2 [in, r], b1 [r, in],
  b2 [out, r]; dW = b2 @ b1 + (W @ a2) @ a1. The built-in never sets a rank for GLoRA, so it ignores `alpha`
  (scale 1 unless an explicit `scale` key); we keep that, so old files give the webui's images.
- new (LyCORIS >= 2, modules/glora.py): a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in(, kh, kw)] (conv factors
  carry 1x1 dims; with `bm.weight` [r, r, kh, kw] B is Tucker); dW = (b1 @ b2 + (W @ a1) @ a2) * alpha / r.
  The built-in cannot multiply these shapes, so here we follow LyCORIS.
Square targets satisfy both shape rules; then the reading with the smaller rank wins (a rank equal to the width is
no adapter), ties going to the old layout like the built-in.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .base import NetworkModule, Tensor, UnsupportedModuleError, register

KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def _ranks(a1, a2, b1, b2):
    old = a1.shape[0] if a1.shape[0] == a2.shape[1] == b1.shape[0] == b2.shape[1] else None
    new = a1.shape[1] if a1.shape[1] == a2.shape[0] == b1.shape[1] == b2.shape[0] else None
    return old, new


@register
class GloraModule(NetworkModule):
    kind = "glora"
    required_keys = KEYS
    param_keys = KEYS + ("bm.weight",)

    def __init__(self, weights: Dict[str, Tensor]):
        super().__init__(weights)
        a1, a2, b1, b2 = (self.w(k) for k in KEYS)
        if min(t.dim() for t in (a1, a2, b1, b2)) < 2:
            raise UnsupportedModuleError("GLoRA factors must be at least 2-D")
        old, new = _ranks(a1, a2, b1, b2)
        if old is None and new is None:
            raise UnsupportedModuleError(f"GLoRA shapes fit neither layout: a1 {tuple(a1.shape)}, a2 "
                                         f"{tuple(a2.shape)}, b1 {tuple(b1.shape)}, b2 {tuple(b2.shape)}")
        self.new_layout = new is not None and (old is None or new < old or self.w("bm.weight") is not None)
        if self.new_layout:
            self.dim = new
        elif a1.dim() != 2:
            raise UnsupportedModuleError("old-layout GLoRA only targets Linear layers")

    def in_dim(self) -> Optional[int]:
        return self.w("a2.weight").shape[1] if self.new_layout else self.w("a1.weight").shape[1]

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        a1, a2, b1, b2 = (self.w(k, orig_weight.device) for k in KEYS)
        if not self.new_layout:
            updown = (b2 @ b1) + ((orig_weight.to(dtype=a1.dtype) @ a2) @ a1)
            return self.finalize_updown(updown, orig_weight, [a1.shape[0], b1.shape[1]])
        flat = [t.reshape(t.shape[0], -1) for t in (a1, a2, b1, b2)]
        bm = self.w("bm.weight", orig_weight.device)
        if bm is not None:
            wb = torch.einsum("m n ..., i m, n j -> i j ...", bm, flat[2], flat[3])
        else:
            wb = (flat[2] @ flat[3]).reshape(orig_weight.shape)
        w = orig_weight.to(dtype=a1.dtype)
        if w.dim() > 2:
            wa = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", w, flat[0]), flat[1])
        else:
            wa = (w @ flat[0]) @ flat[1]
        return self.finalize_updown(wb + wa, orig_weight, orig_weight.shape)
