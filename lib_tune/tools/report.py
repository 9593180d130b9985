"""The quality report of a tool run: Frobenius retention per module and overall.

Per module: retention = ||kept||_F / ||delta||_F (sqrt of the retained share of the squared singular values, as
kohya's resize_lora.py `fro_retained`). Overall: the same over the whole adapter (sqrt(sum kept^2 / sum total^2),
each module weighted by its energy), and `mean`: the plain mean of the per-module values (kohya's "Average Frobenius
norm retention").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class ModuleReport:
    name: str
    old_rank: Optional[int]  # None for types without a rank (full) or a sum over inputs (merge: the stacked rank)
    new_rank: int
    retention: float
    method: str  # "qr-core" (exact, from factors), "randomized" (materialised delta), "exact" (dense), "kept"
    kept_sq: float = 0.0
    total_sq: float = 0.0


@dataclass
class Report:
    tool: str
    modules: List[ModuleReport] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    params: Dict[str, object] = field(default_factory=dict)

    def add(self, m: ModuleReport) -> None:
        self.modules.append(m)

    @property
    def overall(self) -> float:
        kept = sum(m.kept_sq for m in self.modules)
        total = sum(m.total_sq for m in self.modules)
        return 1.0 if total <= 0 else min(1.0, math.sqrt(kept / total))

    @property
    def mean(self) -> float:
        vals = [m.retention for m in self.modules if not math.isnan(m.retention)]
        return sum(vals) / len(vals) if vals else 1.0

    @property
    def ranks(self) -> List[int]:
        return [m.new_rank for m in self.modules]

    def to_dict(self) -> dict:
        return {"tool": self.tool, "params": self.params, "overall_retention": round(self.overall, 6),
                "mean_retention": round(self.mean, 6), "notes": self.notes,
                "modules": {m.name: {"old_rank": m.old_rank, "new_rank": m.new_rank,
                                     "retention": round(m.retention, 6), "method": m.method}
                            for m in self.modules}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)

    def table(self, limit: Optional[int] = None) -> str:
        """A text table; with limit, the `limit` modules of lowest retention (and a line saying so)."""
        rows = sorted(self.modules, key=lambda m: m.name)
        shown = rows
        head = []
        if limit is not None and len(rows) > limit:
            shown = sorted(rows, key=lambda m: m.retention)[:limit]
            head = [f"(the {limit} of {len(rows)} modules with the lowest retention; --table all shows every one)"]
        width = max([len(m.name) for m in shown] + [6])
        lines = head + [f"{'module':<{width}}  {'rank':>11}  {'retention':>9}  method",
                        "-" * (width + 36)]
        for m in shown:
            old = "-" if m.old_rank is None else str(m.old_rank)
            lines.append(f"{m.name:<{width}}  {old:>5}->{m.new_rank:<5}  {m.retention:>9.4%}  {m.method}")
        lines.append("-" * (width + 36))
        lines.append(f"{len(rows)} modules; overall Frobenius retention {self.overall:.4%}, mean {self.mean:.4%}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def module_report(name: str, old_rank, new_rank: int, kept_sq: float, total_sq: float, method: str) -> ModuleReport:
    ret = 1.0 if total_sq <= 0 else min(1.0, math.sqrt(max(kept_sq, 0.0) / total_sq))
    return ModuleReport(name, old_rank, new_rank, ret, method, kept_sq, total_sq)
