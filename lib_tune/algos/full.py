"""Full (LyCORIS "full" / kohya "diff"): the delta itself is stored, `diff` [= W's shape], and `diff_b` for the
bias. No rank, so scale 1 unless an explicit `scale` key (webui network_full.py)."""
from __future__ import annotations

from typing import Optional

from .base import NetworkModule, Tensor, register


@register
class FullModule(NetworkModule):
    kind = "full"
    required_keys = ("diff",)
    param_keys = ("diff", "diff_b")

    def in_dim(self) -> Optional[int]:
        diff = self.w("diff")
        return diff.shape[1] if diff.dim() >= 2 else None

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        diff, diff_b = self.w("diff", orig_weight.device), self.w("diff_b", orig_weight.device)
        return self.finalize_updown(diff, orig_weight, diff.shape, diff_b)
