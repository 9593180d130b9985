"""save_adapter (atomic safetensors) and the addnet / legacy hashes, checked against independent computations."""
import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from lib_tune.formats import addnet_hash, legacy_hash, load_adapter, save_adapter


def test_round_trip_with_metadata_and_no_temp_files(tmp_path):
    path = tmp_path / "out.safetensors"
    t = {"lora_unet_a.lora_up.weight": torch.randn(4, 2), "lora_unet_a.lora_down.weight": torch.randn(2, 4)}
    save_adapter(str(path), t, {"ss_network_dim": "2"})
    af = load_adapter(str(path))
    assert af.metadata == {"ss_network_dim": "2"} and list(af.modules) == ["lora_unet_a"]
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_shared_and_non_contiguous_tensors_are_written(tmp_path):
    base = torch.randn(4, 4)
    save_adapter(str(tmp_path / "s.safetensors"), {"a": base, "b": base, "c": base.t()})
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("b"), base) and torch.equal(f.get_tensor("c"), base.t())


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "keep.safetensors"
    save_adapter(str(path), {"a": torch.ones(2)})
    before = path.read_bytes()

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(str(path), {"a": torch.zeros(2)})
    monkeypatch.undo()
    with pytest.raises(TypeError):
        save_adapter(str(path), {"a": torch.ones(2)}, {"n": 3})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["keep.safetensors"]


def test_addnet_hash_covers_only_the_data_after_the_header(tmp_path):
    path = tmp_path / "h.safetensors"
    save_adapter(str(path), {"a": torch.arange(10.0)}, {"note": "one"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8:8 + n])["__metadata__"] == {"note": "one"}
    assert addnet_hash(str(path)) == hashlib.sha256(raw[8 + n:]).hexdigest()
    first = addnet_hash(str(path))
    save_adapter(str(path), {"a": torch.arange(10.0)}, {"note": "a much longer note than before"})
    assert addnet_hash(str(path)) == first


def test_legacy_hash_reads_64k_at_one_mebibyte(tmp_path):
    path = tmp_path / "big.safetensors"
    save_adapter(str(path), {"a": torch.arange(400_000, dtype=torch.float32)})
    raw = path.read_bytes()
    assert legacy_hash(str(path)) == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
