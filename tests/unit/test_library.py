"""The adapter library: names with sub-folders, aliases from ss_output_name, hashes, architecture from metadata."""
import hashlib

import torch
from safetensors.torch import save_file

from lib_tune.library import Library, architecture_from_metadata, summary


def _write(path, metadata=None, value=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.full((2, 3), value)}, str(path), metadata=metadata or {})
    return path


def test_names_aliases_and_lookup(tmp_path):
    _write(tmp_path / "plain.safetensors")
    _write(tmp_path / "sub dir" / "my lora.safetensors", {"ss_output_name": "nice alias"})
    _write(tmp_path / "a" / "dup1.safetensors", {"ss_output_name": "shared"}, 2.0)
    _write(tmp_path / "b" / "dup2.safetensors", {"ss_output_name": "shared"}, 3.0)
    (tmp_path / "notes.txt").write_text("not an adapter")
    lib = Library([tmp_path])
    assert lib.refresh() == 4
    assert [e.name for e in lib.list()] == ["a/dup1", "b/dup2", "plain", "sub dir/my lora"]
    assert lib.find("sub dir/my lora").name == "sub dir/my lora"
    assert lib.find("my lora").name == "sub dir/my lora"  # unique stem
    assert lib.find("nice alias").name == "sub dir/my lora"
    assert lib.find("shared") is None  # an alias claimed twice resolves to nothing
    assert lib.find("missing") is None


def test_hash_is_the_webuis_addnet_hash(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"ss_output_name": "x"})
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + n:]).hexdigest()
    lib = Library([tmp_path])
    lib.refresh()
    e = lib.find("x")
    assert e.sha256() == expected and e.shorthash == expected[:12]
    assert lib.by_hash(expected[:12]) is e


def test_refresh_sees_new_and_changed_files(tmp_path):
    lib = Library([tmp_path])
    assert lib.refresh() == 0
    _write(tmp_path / "new.safetensors", {"ss_output_name": "first"})
    lib.refresh()
    assert lib.find("first") is not None
    import os
    import time
    _write(tmp_path / "new.safetensors", {"ss_output_name": "second"})
    st = os.stat(tmp_path / "new.safetensors")
    os.utime(tmp_path / "new.safetensors", (st.st_atime, st.st_mtime + 5))
    time.sleep(0.01)
    lib.refresh()
    assert lib.find("second") is not None and lib.find("first") is None


def test_corrupt_file_is_listed_without_metadata(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    lib = Library([tmp_path])
    lib.refresh()
    assert lib.find("broken").metadata == {}


def test_architecture_from_metadata_and_summary(tmp_path):
    assert architecture_from_metadata({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == "sdxl"
    assert architecture_from_metadata({"ss_base_model_version": "sd_v1"}) == "sd1"
    assert architecture_from_metadata({"ss_v2": "True"}) == "sd2"
    assert architecture_from_metadata({}) is None
    p = _write(tmp_path / "t.safetensors", {"ss_network_dim": "16",
                                            "ss_tag_frequency": '{"5_x": {"cat": 3, " dog": 5}}'})
    lib = Library([tmp_path])
    lib.refresh()
    s = summary(lib.find("t"))
    assert s["ss_network_dim"] == "16" and s["top_tags"] == ["dog", "cat"]
