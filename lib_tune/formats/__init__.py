"""File formats: adapter and embedding readers, the adapter writer, and the in-memory model they share."""
from .model import AdapterFile, AdapterFormatError, Embedding
from .read import load_adapter
from .textual_inversion import load_embedding
from .write import addnet_hash, legacy_hash, save_adapter

__all__ = ["AdapterFile", "AdapterFormatError", "Embedding", "load_adapter", "load_embedding", "save_adapter",
           "addnet_hash", "legacy_hash"]
