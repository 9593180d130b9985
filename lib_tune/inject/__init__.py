"""Runtime injection: name the loaded model's layers (targets), place adapter modules on them (mapping) and make
the touched layers compute with the adapters without ever writing the model's weights (engine)."""
from .engine import ActiveEntry, Injector, Multiplier, activate
from .mapping import ArchitectureMismatch, MappedAdapter, MappedEntry, map_adapter
from .targets import Targets, find_targets

__all__ = ["ActiveEntry", "ArchitectureMismatch", "Injector", "MappedAdapter", "MappedEntry", "Multiplier",
           "Targets", "activate", "find_targets", "map_adapter"]
