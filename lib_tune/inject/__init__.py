"""Runtime injection: name the loaded model's layers (targets), place adapter modules on them (mapping) and make
the touched layers compute with the adapters, merged into their weights and restored bit for bit (engine,
inplace)."""
from . import inplace
from .engine import ActiveEntry, Injector, Multiplier, OtherEngine, activate
from .mapping import ArchitectureMismatch, MappedAdapter, MappedEntry, map_adapter
from .targets import Targets, find_targets

__all__ = ["ActiveEntry", "ArchitectureMismatch", "Injector", "MappedAdapter", "MappedEntry", "Multiplier",
           "OtherEngine", "Targets", "activate", "find_targets", "inplace", "map_adapter"]
