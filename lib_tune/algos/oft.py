"""OFT family: the target's output channels are rotated blockwise, W' = R·W, and dW = rescale·W' - W.

- kohya OFT and LyCORIS Diag-OFT: `oft_blocks` [n_blocks, b, b]; Q = B - Bᵀ is skew-symmetric and
  R = (I + Q)(I - Q)^-1 (Cayley). `alpha` is a norm constraint, not a scale: when alpha·out_dim > 0, Q is shrunk
  to that Frobenius norm (clamp of the norm over all blocks). Per block the built-in computes W'[k] = R[k]ᵀ W[k]
  (einsum 'k n m, k n ... -> k m ...').
- old LyCORIS OFT: `oft_diag` holds R itself, no Cayley, no constraint.
- LyCORIS BOFT: `oft_blocks` [m, n_blocks, b, b]: m butterfly stages; stage i permutes the output channels
  ((c g k) -> (c k g), g = 2, k = 2^i·b/2), applies R[i] per block (R·W, not Rᵀ), and permutes back.
- optional `rescale` [out, 1, ...] multiplies W' row-wise.
The user's multiplier scales dW linearly (not the angle), and `scale`/`alpha` never scale dW: the webui's
network_oft.py, whose order of operations we follow.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .base import NetworkModule, Tensor, UnsupportedModuleError, register


def cayley(blocks: Tensor, constraint) -> Tensor:
    """R = (I + Q)(I - Q)^-1 with Q = B - Bᵀ, Q's norm clamped to `constraint` (a tensor) when it is non-zero."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device)
    q = blocks - blocks.transpose(-1, -2)
    if constraint is not None and bool(constraint != 0):
        norm = torch.norm(q.flatten())
        new_norm = torch.clamp(norm, max=constraint.to(blocks.device))
        q = q * ((new_norm + 1e-8) / (norm + 1e-8))
    minus = eye - q
    if minus.dtype != torch.float64:
        minus = minus.float()  # the built-in inverts in fp32 (no half-precision inverse); fp64 stays fp64
    return torch.matmul(eye + q, minus.inverse())


def _butterfly(weight: Tensor, r: Tensor) -> Tensor:
    m, _, b, _ = r.shape
    rest = weight.shape[1:]
    out = weight
    for i in range(m):
        k = 2 ** i * (b // 2)
        out = out.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, b, *rest)  # (c g k) -> (c k g) -> d b
        out = torch.einsum("b i j, b j ... -> b i ...", r[i], out)
        out = out.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(-1, *rest)  # (c k g) -> (c g k)
    return out


@register
class OftModule(NetworkModule):
    kind = "oft"
    param_keys = ("oft_blocks", "oft_diag", "rescale")

    @classmethod
    def accepts(cls, weights: Dict[str, Tensor]) -> bool:
        return "oft_blocks" in weights or "oft_diag" in weights

    def __init__(self, weights: Dict[str, Tensor]):
        super().__init__(weights)
        self.is_r = "oft_blocks" not in self.weights
        blocks = self.w("oft_diag" if self.is_r else "oft_blocks")
        self.is_boft = not self.is_r and blocks.dim() == 4
        if blocks.dim() != (4 if self.is_boft else 3) or blocks.shape[-1] != blocks.shape[-2]:
            raise UnsupportedModuleError(f"OFT blocks must be [n, b, b] or [m, n, b, b], got {tuple(blocks.shape)}")
        self.alpha_t = None if self.is_r else self.weights.get("alpha")  # the constraint, as the built-in keeps it
        self.scale = 1.0  # the built-in's OFT never scales dW by alpha or `scale`
        self.dim = blocks.shape[0] if not self.is_r else blocks.shape[1]

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        blocks = self.w("oft_diag" if self.is_r else "oft_blocks", orig_weight.device)
        out_dim = orig_weight.shape[0]
        if self.is_r:
            r = blocks
        else:
            constraint = None if self.alpha_t is None else self.alpha_t * out_dim
            r = cayley(blocks, constraint).to(orig_weight.device)
        if self.is_boft:
            merged = _butterfly(orig_weight.to(r.dtype), r)
        else:
            n_blocks, size = out_dim // r.shape[-1], r.shape[-1]
            w = orig_weight.to(r.dtype).reshape(n_blocks, size, *orig_weight.shape[1:])
            merged = torch.einsum("k n m, k n ... -> k m ...", r, w).reshape(out_dim, *orig_weight.shape[1:])
        rescale = self.w("rescale", orig_weight.device)
        if rescale is not None:
            merged = rescale.reshape(-1, *[1] * (orig_weight.dim() - 1)).to(merged) * merged
        updown = merged.to(orig_weight.device) - orig_weight.to(merged.dtype)
        return self.finalize_updown(updown, orig_weight, orig_weight.shape)
