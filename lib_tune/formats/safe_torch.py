"""Reading pickled tensor files (.pt/.ckpt/.bin) without running code from them.

torch.load(weights_only=True) (torch >= 1.13) unpickles only tensors, storages and plain containers/primitives and
refuses every other global, so a crafted pickle cannot import or call anything. Whatever it refuses, and any
other failure (empty, truncated, not a pickle), becomes an AdapterFormatError that names the file.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from .model import AdapterFormatError


def safe_load(path: str) -> Any:
    """The unpickled object of a torch file, on the CPU, or AdapterFormatError."""
    name = os.path.basename(path)
    try:
        if os.path.getsize(path) == 0:
            raise AdapterFormatError(f"{name}: the file is empty")
        with warnings.catch_warnings():  # torch 2.1's weights-only path warns about its own TypedStorage use
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return torch.load(path, map_location="cpu", weights_only=True)
    except AdapterFormatError:
        raise
    except OSError as e:
        raise AdapterFormatError(f"{name}: cannot read the file ({e.strerror or e})") from None
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, ... : all mean "not for us"
        raise AdapterFormatError(f"{name}: refused as a pickled tensor file, it is truncated, corrupt or holds "
                                 f"objects other than tensors ({_detail(e)})") from None


def _detail(e: Exception) -> str:
    """The useful part of torch's message (not its advice to retry with weights_only=False)."""
    text = str(e).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
