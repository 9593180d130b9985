"""Property tests of the safetensors readers: any damage to a valid file is a clean load or an AdapterFormatError.

Truncations at every length, byte flips (weighted towards the header), inserted and deleted bytes, rewritten
header lengths, and header JSON whose fields are replaced by arbitrary JSON values go through read_header and
read_safetensors. Whatever read_header accepts, the safetensors crate must accept too, with the same tensors and
metadata (read_header is what the Lora folder scan trusts). Seeded (derandomize) so CI sees the same examples.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lib_tune.formats import AdapterFormatError  # noqa: E402
from lib_tune.formats.container import read_header, read_safetensors  # noqa: E402
from tests.fixtures import hostile  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

import torch  # noqa: E402

TENSORS = {**hostile._lora_pair(hostile.PROJ_IN, 8, 8, seed=1),
           "x.f16": torch.arange(6, dtype=torch.float16).reshape(2, 3), "x.i8": torch.arange(5, dtype=torch.int8),
           "x.empty": torch.zeros(0, 4), "x.scalar": torch.tensor(3.0, dtype=torch.float64)}
HEADER, DATA = hostile.st_layout(TENSORS, {"ss_network_dim": "2", "note": "caf\u00e9 \U0001F600"})
VALID = hostile.st_encode(HEADER, DATA)
N = struct.unpack("<Q", VALID[:8])[0]
DIR = tempfile.mkdtemp(prefix="prop-safetensors-")
atexit.register(shutil.rmtree, DIR, True)


def _write(blob: bytes) -> str:
    path = os.path.join(DIR, "case.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    return path


def _check(blob: bytes) -> None:
    """Both readers answer with a load or AdapterFormatError; what read_header accepts safetensors accepts."""
    from safetensors import safe_open
    path = _write(blob)
    try:
        header = read_header(path)
    except AdapterFormatError as e:
        assert "case.safetensors" in str(e)
        header = None
    try:
        tensors, metadata = read_safetensors(path)
    except AdapterFormatError as e:
        assert "case.safetensors" in str(e)
        assert header is None or _torch_lacks_a_dtype(header), (str(e), header)
        return
    assert header is not None, "read_safetensors loaded a file read_header refused"
    with safe_open(path, framework="pt") as f:
        assert (f.metadata() or {}) == header.metadata == metadata
        assert set(f.keys()) == set(header.tensors) == set(tensors)
    for key, (dtype, shape, (begin, end)) in header.tensors.items():
        assert tuple(tensors[key].shape) == shape
        assert tensors[key].numel() * tensors[key].element_size() == end - begin


def _torch_lacks_a_dtype(header) -> bool:
    return any(d.startswith("F8") for d, _, _ in header.tensors.values()) and not hasattr(torch, "float8_e4m3fn")


def test_the_valid_file_is_valid():
    _check(VALID)
    h = read_header(_write(VALID))
    assert h.metadata["note"] == "caf\u00e9 \U0001F600" and h.tensors["x.empty"][1] == (0, 4)


@settings(max_examples=400, **SETTINGS)
@given(st.integers(min_value=0, max_value=len(VALID)))
def test_every_truncation(cut):
    _check(VALID[:cut])


@settings(max_examples=600, **SETTINGS)
@given(st.lists(st.tuples(st.one_of(st.integers(min_value=0, max_value=8 + N - 1),
                                    st.integers(min_value=0, max_value=len(VALID) - 1)),
                          st.integers(min_value=1, max_value=255)), min_size=1, max_size=6))
def test_byte_flips(flips):
    blob = bytearray(VALID)
    for at, mask in flips:
        blob[at] ^= mask
    _check(bytes(blob))


@settings(max_examples=400, **SETTINGS)
@given(st.integers(min_value=0, max_value=len(VALID)), st.binary(max_size=16), st.integers(min_value=0, max_value=16))
def test_inserted_and_deleted_bytes(at, inserted, deleted):
    _check(VALID[:at] + inserted + VALID[at + deleted:])


@settings(max_examples=300, **SETTINGS)
@given(st.one_of(st.integers(min_value=0, max_value=2 ** 64 - 1), st.integers(min_value=N - 16, max_value=N + 64)))
@example(2 ** 63)
@example(N + len(DATA))
def test_header_length_rewritten(length):
    _check(struct.pack("<Q", length) + VALID[8:])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F8_E4M3", "U16", "f32", "", [], {}, [0, 0],
                       [0, 2 ** 64], [2, 8], [8, 2], [-1, 1], 2 ** 64]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
KEYS = sorted(HEADER)
FIELDS = ["dtype", "shape", "data_offsets", "extra"]


@st.composite
def header_edits(draw):
    header = json.loads(json.dumps(HEADER))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(KEYS + ["new tensor", "__metadata__"]))
        if key == "__metadata__" or draw(st.integers(min_value=0, max_value=5)) == 0:
            header[key] = draw(JSON)
        elif isinstance(header.get(key), dict):
            field = draw(st.sampled_from(FIELDS))
            if draw(st.integers(min_value=0, max_value=6)) == 0:
                header[key].pop(field, None)
            else:
                header[key][field] = draw(JSON)
        else:
            header[key] = draw(JSON)
    return header


@settings(max_examples=600, **SETTINGS)
@given(header_edits(), st.sampled_from(["exact", "short", "long"]))
@example({**HEADER, "__metadata__": {"a": "\ud800"}}, "exact")  # a lone surrogate: safetensors refuses it
@example({**HEADER, "x.empty": {"dtype": "F32", "shape": [0, 2 ** 70], "data_offsets": [0, 0]}}, "exact")
@example({**HEADER, "x.i8": {**HEADER["x.i8"], "extra": float("nan")}}, "exact")
@example({**HEADER, "x.i8": {**HEADER["x.i8"], "extra": ["\udc00"]}}, "exact")
def test_header_fields_replaced_by_any_json(header, data):
    tail = {"exact": DATA, "short": DATA[:-3], "long": DATA + b"\0" * 5}[data]
    try:
        text = json.dumps(header, sort_keys=True).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return
    _check(hostile.st_encode(text, tail))
