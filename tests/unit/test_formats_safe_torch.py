"""Pickled files are read without executing anything in them."""
import pickle

import pytest
import torch

from lib_tune.formats.model import AdapterFormatError
from lib_tune.formats.safe_torch import safe_load


class WritesAFile:
    """Unpickling this calls open(target, "w"), which creates the file: the proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_plain_tensor_dict_loads(tmp_path):
    p = tmp_path / "ok.pt"
    torch.save({"a": torch.ones(2), "step": 3, "name": "x"}, p)
    obj = safe_load(str(p))
    assert torch.equal(obj["a"], torch.ones(2)) and obj["step"] == 3


@pytest.mark.parametrize("container", ["raw-pickle", "torch-zip"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, container):
    target = tmp_path / "pwned.txt"
    p = tmp_path / "evil.pt"
    payload = {"lora_unet_x.lora_up.weight": torch.ones(1), "boom": WritesAFile(str(target))}
    if container == "raw-pickle":
        p.write_bytes(pickle.dumps(WritesAFile(str(target)), protocol=2))  # reaches the GLOBAL
    else:
        torch.save(payload, p)
    assert not target.exists()
    with pytest.raises(AdapterFormatError, match="evil.pt"):
        safe_load(str(p))
    assert not target.exists()


def test_objects_other_than_tensors_are_refused(tmp_path):
    p = tmp_path / "module.pt"
    torch.save({"layer": torch.nn.Linear(2, 2)}, p)
    with pytest.raises(AdapterFormatError, match="module.pt"):
        safe_load(str(p))


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", None])
def test_empty_garbage_and_truncated_files(tmp_path, content):
    p = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"a": torch.ones(100)}, p)
        content = p.read_bytes()[:200]
    p.write_bytes(content)
    with pytest.raises(AdapterFormatError, match="bad.ckpt"):
        safe_load(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFormatError, match="nope.pt"):
        safe_load(str(tmp_path / "nope.pt"))
