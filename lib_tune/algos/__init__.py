"""Network types (one file each) and the choice of type for one module's weights.

Types are tried in the webui built-in's order (lora, hada, ia3, lokr, full, norm, glora, oft), the first that
accepts the keys wins, so a file with odd extra keys resolves the way the webui resolves it.
"""
from __future__ import annotations

from typing import Dict, Tuple

from . import lora, loha, ia3, lokr, full, norm, glora, oft  # noqa: F401  (registration order matters)
from .base import REGISTRY, NetworkModule, Tensor, UnsupportedModuleError

KINDS: Tuple[str, ...] = tuple(cls.kind for cls in REGISTRY)


def build_module(weights: Dict[str, Tensor]) -> NetworkModule:
    """The NetworkModule for one module's weights (keys without the module prefix). Raises
    UnsupportedModuleError when no type accepts the keys or the accepting type finds the shapes impossible."""
    for cls in REGISTRY:
        if cls.accepts(weights):
            return cls(weights)
    raise UnsupportedModuleError(f"no network type ({', '.join(KINDS)}) accepts the keys: {', '.join(sorted(weights))}")


__all__ = ["KINDS", "NetworkModule", "UnsupportedModuleError", "build_module"]
