"""The container layer shared by adapter and embedding readers: bytes on disk -> ({key: tensor}, metadata)."""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from .model import AdapterFormatError
from .safe_torch import safe_load

SAFETENSORS = (".safetensors",)
PICKLES = (".pt", ".ckpt", ".bin", ".pth")


#: safetensors' dtype names -> bytes per element (the Rust crate's Dtype; U16/U32/U64 left out: torch 2.1 has no
#: such tensors, so no adapter can hold them)
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
#: the safetensors crate's own limit on the JSON header
MAX_HEADER = 100 * 1000 * 1000
METADATA_KEY = "__metadata__"


@dataclass
class SafetensorsHeader:
    """What the header of a .safetensors file says, checked against the file (see read_header).

    tensors: key -> (dtype name, shape, (begin, end) byte offsets into the data section); size: the file's size;
    data_start: where the data section begins (8 + the header's length)."""
    metadata: Dict[str, str]
    tensors: Dict[str, Tuple[str, Tuple[int, ...], Tuple[int, int]]]
    size: int
    data_start: int = 0


def read_header(path: str) -> SafetensorsHeader:
    """The header of a .safetensors file, validated without reading any tensor data; AdapterFormatError otherwise.

    Checks what the safetensors crate checks before it maps the data, so that a file passing here is one it
    accepts, and a lying header is refused before anything is allocated for it: the file is a regular file of at
    least 8 bytes; the header's length (little-endian u64) fits in the file and in 100 MB; the header is UTF-8
    JSON holding an object without duplicate keys; `__metadata__` maps strings to strings; every other entry has
    a known `dtype`, a `shape` of non-negative ints and `data_offsets` [begin, end] whose span is
    prod(shape) * itemsize bytes; the spans tile the data section exactly (in some order: no gap, no overlap,
    nothing after the last one)."""
    name = os.path.basename(path)

    def bad(reason: str) -> AdapterFormatError:
        return AdapterFormatError(f"{name}: not a valid safetensors file: {reason}")

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterFormatError(f"{name}: {_not_a_file(st.st_mode)}")
        size = st.st_size
        if size == 0:
            raise AdapterFormatError(f"{name}: the file is empty (0 bytes)")
        if size < 8:
            raise bad(f"truncated: {size} bytes, shorter than the 8-byte header length")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("truncated: shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n == 0:
                raise bad("the header length is 0")
            if n > MAX_HEADER:
                raise bad(f"the header length {n} is over the 100 MB limit "
                          f"({'larger than the file, ' if n > size - 8 else ''}a damaged or foreign file)")
            if n > size - 8:
                raise bad(f"the header length {n} runs past the end of the file ({size} bytes): truncated or "
                          f"not a safetensors file")
            raw = f.read(n)
        if len(raw) != n:
            raise bad("the file changed while it was read")
    except AdapterFormatError:
        raise
    except OSError as e:
        raise AdapterFormatError(f"{name}: cannot read the file ({e.strerror or e})") from None
    tensors, metadata = _parse_header(raw, bad)
    data_size = size - 8 - n
    _check_spans(tensors, data_size, bad)
    return SafetensorsHeader(metadata=metadata, tensors=tensors, size=size, data_start=8 + n)


def _not_a_file(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file"


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN/Infinity, the safetensors crate does not


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def _unicode(obj) -> bool:
    """False when a string anywhere in the parsed header has a lone surrogate (a JSON escape such as \\ud800):
    Python reads those, the safetensors crate (and any UTF-8 reader) refuses them."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except (UnicodeEncodeError, RecursionError):
        return False


def _parse_header(raw: bytes, bad):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the header is not UTF-8 text (byte {e.start})") from None
    if not text.lstrip().startswith("{"):
        raise bad(f"the header is not a JSON object (starts with {text[:20]!r})")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite)
    except _Duplicate as e:
        raise bad(f"the header names {str(e.args[0])[:200]!r} twice") from None
    except RecursionError:
        raise bad("the header's JSON is nested too deeply") from None
    except (ValueError, MemoryError) as e:  # JSONDecodeError; an integer of more than 4300 digits
        raise bad(f"the header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise bad(f"the header is a JSON {type(obj).__name__}, not an object")
    if not _unicode(obj):
        raise bad("the header holds a string that is not valid Unicode (a lone surrogate escape such as \\ud800)")
    md = obj.pop(METADATA_KEY, None)
    if md is None:
        metadata: Dict[str, str] = {}
    elif isinstance(md, dict):
        wrong = [k for k, v in md.items() if not isinstance(v, str)]
        if wrong:
            raise bad(f"__metadata__ must map strings to strings; {wrong[0][:100]!r} is a "
                      f"{type(md[wrong[0]]).__name__}")
        metadata = md
    else:
        raise bad(f"__metadata__ is a {type(md).__name__}, not an object of strings")
    tensors = {}
    for key, info in obj.items():
        where = f"tensor {key[:200]!r}"
        if not isinstance(info, dict):
            raise bad(f"{where}: its entry is a {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"{where}: unknown dtype {_short(dtype)} (known: {', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2 ** 64 for d in shape):
            raise bad(f"{where}: shape {_short(shape)} is not a list of non-negative 64-bit integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise bad(f"{where}: data_offsets {_short(offsets)} is not a pair of integers [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"{where}: data_offsets [{begin}, {end}] are negative or reversed")
        n = 0 if 0 in shape else DTYPE_SIZES[dtype]
        for d in shape if n else ():
            n *= d
            if n > end - begin:  # every factor is >= 1 here: stop multiplying absurd shapes early
                break
        if n != end - begin:
            raise bad(f"{where}: shape {shape} of {dtype} needs {_nbytes(shape, dtype)} bytes but its data_offsets "
                      f"span {end - begin}")
        tensors[key] = (dtype, tuple(shape), (begin, end))
    return tensors, metadata


def _check_spans(tensors, data_size: int, bad) -> None:
    """The safetensors crate's rule: sorted by offsets, the spans follow each other from 0 to the end of the file."""
    at, last = 0, None
    for key, (_, _, (begin, end)) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        if begin > data_size or end > data_size:
            raise bad(f"tensor {key[:200]!r}: data_offsets [{begin}, {end}] run past the end of the data "
                      f"({data_size} bytes): the file is truncated")
        if begin < at:
            raise bad(f"tensor {key[:200]!r}: data_offsets [{begin}, {end}] overlap tensor {last[:200]!r}")
        if begin > at:
            raise bad(f"tensor {key[:200]!r}: a gap of {begin - at} bytes before its data")
        at, last = end, key
    if at != data_size:
        raise bad(f"{data_size - at} bytes after the last tensor's data (the header does not describe them)")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _nbytes(shape, dtype: str) -> str:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return str(n) if n < 10 ** 30 else "more than 1e30"


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors (CPU) and the string metadata of a .safetensors file, or AdapterFormatError.

    The header is checked first (read_header), so a lying header never reaches safetensors' allocator."""
    from safetensors import safe_open

    name = os.path.basename(path)
    header = read_header(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise AdapterFormatError(f"{name}: cannot read the file ({e.strerror or e})") from None
    except Exception as e:  # SafetensorError and friends: the file changed since read_header, a dtype torch lacks
        raise AdapterFormatError(f"{name}: not a valid safetensors file ({str(e).strip()[:300] or type(e).__name__})"
                                 ) from None
    return tensors, dict(header.metadata)


def read_pickle_dict(path: str) -> Dict[str, Any]:
    """The top-level dict of a pickled torch file (unwrapping a `state_dict` entry), via the safe loader."""
    obj = safe_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{os.path.basename(path)}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def read_container(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(top-level dict, metadata) for any supported extension; values of pickles may be non-tensors."""
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS:
        return read_safetensors(path)
    if ext in PICKLES:
        return read_pickle_dict(path), {}
    raise AdapterFormatError(f"{os.path.basename(path)}: unsupported file type {ext or '(none)'!r}; expected "
                             f"{', '.join(SAFETENSORS + PICKLES)}")


def parse_json_metadata(metadata: Dict[str, str], key: str) -> Any:
    """A JSON-valued metadata entry, or None if absent or not JSON."""
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError, MemoryError):  # not JSON, nested too deeply, an absurd integer
        return None
