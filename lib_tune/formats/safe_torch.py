"""Reading pickled tensor files (.pt/.ckpt/.bin) without running code from them.

torch.load(weights_only=True) (torch >= 1.13) unpickles only tensors, storages and plain containers/primitives and
refuses every other global, so a crafted pickle cannot import or call anything. Whatever it refuses, and any
other failure (empty, truncated, not a pickle), becomes an AdapterFormatError that names the file.

Before torch sees a file, `prescan` checks what torch 2.1 trusts blindly: the size each storage claims in the
pickle. torch 2.1 builds a storage of the claimed size over a zip record of any size (a 16-byte record can back a
"4 TB" tensor whose reads run off the end of the buffer; torch >= 2.4 checks this), and the legacy (non-zip)
format allocates the claimed size before it compares it with the data. The prescan unpickles with stand-ins
for every global (nothing real is ever imported or called), collects the storage claims and compares them with
the zip records (zip format) or with the file's size (legacy format); it also refuses zip entries that would
expand beyond the archive's own size (torch writes uncompressed records) and records whose CRC does not match
(torch 2.1 reads damaged bytes as weights).
"""
from __future__ import annotations

import io
import os
import pickle
import stat
import warnings
import zipfile
from typing import Any, Dict

import torch

from .model import AdapterFormatError

#: torch.serialization.MAGIC_NUMBER: the first pickle of a legacy (non-zip) torch file
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
#: bytes per element of the storage classes a torch pickle names (unknown ones count as the widest)
STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "QInt8Storage": 1, "QUInt8Storage": 1,
    "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1,
}
_WIDEST = 16


def safe_load(path: str) -> Any:
    """The unpickled object of a torch file, on the CPU, or AdapterFormatError."""
    name = os.path.basename(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, device or socket)"
            raise AdapterFormatError(f"{name}: is {kind}, not a torch file")
        if st.st_size == 0:
            raise AdapterFormatError(f"{name}: the file is empty")
        prescan(path, st.st_size)
        with warnings.catch_warnings():  # torch 2.1's weights-only path warns about its own TypedStorage use
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return _torch_load()(path, map_location="cpu", weights_only=True)
    except AdapterFormatError:
        raise
    except OSError as e:
        raise AdapterFormatError(f"{name}: cannot read the file ({e.strerror or e})") from None
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, ... : all mean "not for us"
        raise AdapterFormatError(f"{name}: refused as a pickled tensor file, it is truncated, corrupt or holds "
                                 f"objects other than tensors ({_detail(e)})") from None


def _torch_load():
    """torch's own loader. The webui replaces torch.load with its pickle checker (modules/safe.py), which prints a
    traceback for every refused file before refusing it; weights_only=True already refuses every global, so the
    original is used (found through sys.modules: nothing here imports the webui)."""
    import sys
    safe = sys.modules.get("modules.safe")
    if safe is not None and torch.load is getattr(safe, "load", None):
        return getattr(safe, "unsafe_torch_load", torch.load)
    return torch.load


def _detail(e: BaseException) -> str:
    """The useful part of torch's message (not its advice to retry with weights_only=False)."""
    text = str(e).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


# ---- the prescan -------------------------------------------------------------------------------------------------
def prescan(path: str, size: int) -> None:
    """AdapterFormatError when the storages a torch file's pickle claims are larger than the data behind them."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if head == b"PK\x03\x04":
            _prescan_zip(path, size)
        else:
            _prescan_legacy(path, size)
    except AdapterFormatError:
        raise
    except OSError as e:
        raise AdapterFormatError(f"{name}: cannot read the file ({e.strerror or e})") from None
    except Exception as e:  # a pickle or zip that does not even parse (also RecursionError, MemoryError)
        raise AdapterFormatError(f"{name}: refused as a pickled tensor file, it is truncated, corrupt or not a "
                                 f"torch file ({_detail(e)})") from None


def _prescan_zip(path: str, size: int) -> None:
    name = os.path.basename(path)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise AdapterFormatError(f"{name}: the zip archive names an entry twice")
        for info in infos:
            if info.file_size > size:
                raise AdapterFormatError(f"{name}: zip entry {info.filename[:100]!r} claims {info.file_size} bytes, "
                                         f"more than the whole file ({size}): damaged, or a zip bomb")
        damaged = z.testzip()  # reads every record once: torch 2.1 never checks the CRCs
        if damaged is not None:
            raise AdapterFormatError(f"{name}: zip entry {damaged[:100]!r} is damaged (its checksum does not match)")
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise AdapterFormatError(f"{name}: not a torch zip file ({len(pkls)} data.pkl records, expected 1)")
        prefix = pkls[0][:-len("data.pkl")]
        claims = _claims(io.BytesIO(z.read(pkls[0])))
        records = {i.filename: i.file_size for i in infos}
    for key, nbytes in claims.items():
        record = records.get(f"{prefix}data/{key}")
        if record is None:
            raise AdapterFormatError(f"{name}: storage {key[:50]!r} has no data record in the archive")
        if nbytes > record:
            raise AdapterFormatError(f"{name}: storage {key[:50]!r} claims {nbytes} bytes but its record holds "
                                     f"{record}: a damaged or crafted file")


def _prescan_legacy(path: str, size: int) -> None:
    name = os.path.basename(path)
    with open(path, "rb") as f:
        u = _StubUnpickler(f)
        magic = u.load()
        if type(magic) is not int or magic != LEGACY_MAGIC:
            raise AdapterFormatError(f"{name}: not a torch file (neither a zip archive nor torch's legacy format)")
        u.load()  # protocol version
        u.load()  # system info
        u.claims = {}
        u.load()  # the object
        claims = u.claims
    total = sum(claims.values())
    if total > size:
        raise AdapterFormatError(f"{name}: its storages claim {total} bytes, more than the whole file ({size}): a "
                                 f"damaged or crafted file")


def _claims(stream) -> Dict[str, int]:
    u = _StubUnpickler(stream)
    u.claims = {}
    u.load()
    return u.claims


class _Stub:
    """Stands in for every global a pickle names: accepts any construction, state and items, does nothing."""
    _itemsize = _WIDEST

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StubUnpickler(pickle.Unpickler):
    claims: Dict[str, int]

    def find_class(self, module: str, name: str):
        itemsize = STORAGE_ITEMSIZE.get(name, _WIDEST) if str(name).endswith("Storage") else _WIDEST
        return type("Stub", (_Stub,), {"_itemsize": itemsize})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            storage_type, key, numel = pid[1], str(pid[2]), pid[4]
            itemsize = storage_type._itemsize if isinstance(storage_type, type) and issubclass(storage_type, _Stub) \
                else _WIDEST
            if type(numel) is not int or numel < 0:
                raise pickle.UnpicklingError(f"storage {key[:50]!r} has a size of {numel!r}")
            self.claims[key] = max(self.claims.get(key, 0), numel * itemsize)
        return _Stub()
