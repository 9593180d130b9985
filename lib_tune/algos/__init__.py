"""Network types (one file each, see base.py for their common verbs) and the choice of type for one module's weights.

Types are tried in the webui built-in's order (lora, hada, ia3, lokr, full, norm, glora, oft), the first that
accepts the keys wins, so a file with odd extra keys resolves the way the webui resolves it. The import line below
is the registry: a new type is its file plus its name there.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple, Type

from . import lora, loha, ia3, lokr, full, norm, glora, oft  # noqa: F401  (registration order matters)
from .base import REGISTRY, NetworkModule, Tensor, TrainMethod, UnsupportedModuleError

#: the types this package registers (REGISTRY also holds any registered later)
KINDS: Tuple[str, ...] = tuple(cls.kind for cls in REGISTRY)


def build_module(weights: Dict[str, Tensor]) -> NetworkModule:
    """The NetworkModule for one module's weights (keys without the module prefix). Raises
    UnsupportedModuleError when no type accepts the keys or the accepting type finds the shapes impossible."""
    for cls in REGISTRY:
        if cls.accepts(weights):
            return cls(weights)
    kinds = ", ".join(cls.kind for cls in REGISTRY)
    raise UnsupportedModuleError(f"no network type ({kinds}) accepts the keys: {', '.join(sorted(weights))}")


def train_methods() -> Iterator[Tuple[Type[NetworkModule], TrainMethod]]:
    """Every (type, method) the registered types can train, in registry order."""
    for cls in REGISTRY:
        for method in cls.train_methods:
            yield cls, method


def train_method(name: str) -> Tuple[Type[NetworkModule], TrainMethod]:
    """The type that trains method `name` and the method; KeyError when no registered type offers it."""
    for cls, method in train_methods():
        if method.name == name:
            return cls, method
    raise KeyError(name)


def param_names() -> Tuple[str, ...]:
    """Every parameter name a registered type reads (its param_keys, aliases and the common extras)."""
    names: Dict[str, None] = {}
    for cls in REGISTRY:
        names.update(dict.fromkeys(cls.param_keys + cls.common_keys + tuple(cls.aliases)))
    return tuple(names)


__all__ = ["KINDS", "NetworkModule", "TrainMethod", "UnsupportedModuleError", "build_module", "param_names",
           "train_method", "train_methods"]
