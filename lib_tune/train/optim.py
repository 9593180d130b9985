"""Optimizers and learning-rate schedules.

Optimizers: AdamW (torch, always there), AdamW8bit (bitsandbytes) and Prodigy (prodigyopt) when importable;
neither is ever required: asking for a missing one is an OptimizerUnavailable naming the package.

Schedules are the diffusers formulas kohya uses (diffusers.optimization), so a run here and a kohya run with the
same settings see the same learning rate at every step: the factor applied to each group's base LR at optimizer
step s (0-based) of T, with W warmup steps:
- constant: 1 (no warmup, like diffusers' "constant");
- constant_with_warmup: s / W during warmup, then 1;
- linear: warmup, then (T - s) / (T - W) down to 0;
- cosine: warmup, then 0.5 * (1 + cos(pi * p)), p = (s - W) / (T - W);
- cosine_with_restarts: warmup, then `cycles` cosine decays: 0.5 * (1 + cos(pi * ((cycles * p) % 1))), 0 at p >= 1.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")


class OptimizerUnavailable(RuntimeError):
    """The requested optimizer's package is not installed."""


def lr_factor(name: str, step: int, total: int, warmup: int = 0, cycles: int = 1) -> float:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((max(1, int(cycles)) * progress) % 1.0))))


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total: int, warmup: int = 0,
                    cycles: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(name, 0, total, warmup, cycles)  # validates the name
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(name, s, total, warmup, cycles))


def build_optimizer(name: str, groups: Dict[str, List[torch.nn.Parameter]], lrs: Dict[str, float],
                    weight_decay: float = 0.01, betas: Sequence[float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """One param group per part ("unet", "te", "emb") with its own LR; empty parts and parts with LR 0 are left
    out (their tensors do not train). Each group keeps its part's name under "name" (for logging/resume)."""
    param_groups = [{"params": ps, "lr": float(lrs[part]), "name": part}
                    for part, ps in groups.items() if ps and lrs.get(part)]
    if not param_groups:
        raise ValueError("nothing to train: every part has no tensors or a learning rate of 0")
    kw = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, **kw)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:  # ImportError, or a broken CUDA setup raising at import
            raise OptimizerUnavailable(f"AdamW8bit needs the bitsandbytes package ({e})") from None
        return bnb.optim.AdamW8bit(param_groups, **kw)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise OptimizerUnavailable(f"Prodigy needs the prodigyopt package ({e})") from None
        return Prodigy(param_groups, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def available_optimizers() -> List[str]:
    """The optimizers that can be built here (for the UI's dropdown)."""
    out = ["adamw"]
    for name, module in (("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")):
        try:
            __import__(module)
            out.append(name)
        except Exception:  # noqa: BLE001 - missing or broken: not offered
            pass
    return out
