"""Textual-inversion files in every layout the webui loads, and the ways they can be broken."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lib_tune.formats import AdapterFormatError, load_embedding


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def write(tmp_path, name, data):
    p = tmp_path / name
    save_file(data, str(p)) if name.endswith(".safetensors") else torch.save(data, p)
    return str(p)


def test_webui_pt_dict(tmp_path):
    vec = rnd(2, 768)
    emb = load_embedding(write(tmp_path, "my-style.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": vec},
                                                         "name": "other", "step": 1500, "sd_checkpoint": "abc"}))
    assert emb.name == "my-style" and emb.step == 1500 and emb.n_vectors == 2
    assert torch.equal(emb.vectors["emb"], vec) and emb.vectors["emb"].dtype == torch.float32


@pytest.mark.parametrize("key", ["emb_params", "emp_params"])
def test_kohya_and_onetrainer_safetensors(tmp_path, key):
    vec = rnd(3, 1024).half()
    data = {key: vec}
    if key == "emp_params":
        data["emp_params_out"] = rnd(3, 1024, seed=1)
    emb = load_embedding(write(tmp_path, "tok.safetensors", data))
    assert list(emb.vectors) == ["emb"] and torch.equal(emb.vectors["emb"], vec.float())


def test_sdxl_pair(tmp_path):
    emb = load_embedding(write(tmp_path, "xl.safetensors", {"clip_l": rnd(4, 768), "clip_g": rnd(4, 1280)}))
    assert set(emb.vectors) == {"clip_l", "clip_g"} and emb.n_vectors == 4


def test_diffusers_concept_bin_single_vector(tmp_path):
    vec = rnd(768)
    emb = load_embedding(write(tmp_path, "learned_embeds.bin", {"<cat-toy>": vec}))
    assert emb.name == "learned_embeds" and emb.vectors["emb"].shape == (1, 768)


@pytest.mark.parametrize("data,match", [
    ({"clip_l": rnd(2, 768)}, "needs both"),
    ({"clip_l": rnd(2, 768), "clip_g": rnd(3, 1280)}, "disagree"),
    ({"emb_params": rnd(2, 3, 768)}, r"\[n_vectors, width\]"),
    ({"emb_params": torch.zeros(0, 768)}, r"\[n_vectors, width\]"),
    ({"emb_params": torch.ones(2, 768, dtype=torch.int32)}, "floating-point"),
    ({"a": rnd(2, 768), "b": rnd(2, 768)}, "found 2 tensors"),
])
def test_wrong_shapes_and_layouts(tmp_path, data, match):
    with pytest.raises(AdapterFormatError, match=match):
        load_embedding(write(tmp_path, "bad.safetensors", data))


def test_string_to_param_must_hold_one_tensor(tmp_path):
    with pytest.raises(AdapterFormatError, match="exactly one"):
        load_embedding(write(tmp_path, "two.pt", {"string_to_param": {"*": rnd(1, 768), "+": rnd(1, 768)}}))


def test_empty_truncated_and_malicious_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="empty.pt: the file is empty"):
        load_embedding(str(tmp_path / "empty.pt"))
    good = write(tmp_path, "cut.safetensors", {"emb_params": rnd(2, 768)})
    with open(good, "rb") as f:
        data = f.read()
    with open(good, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="cut.safetensors"):
        load_embedding(good)
    target = tmp_path / "ran.txt"

    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}, protocol=2))
    with pytest.raises(AdapterFormatError, match="evil.pt"):
        load_embedding(str(tmp_path / "evil.pt"))
    assert not target.exists()


def test_non_dict_pickle(tmp_path):
    with pytest.raises(AdapterFormatError, match="not a dict"):
        load_embedding(write(tmp_path, "list.pt", [rnd(1, 768)]))


@pytest.mark.parametrize("name", ["..", "a/b", "a\\b", "", " x"])
def test_path_like_names_are_refused(name):
    from lib_tune.formats.textual_inversion import embedding_from_dict
    with pytest.raises(AdapterFormatError, match="looks like a path"):
        embedding_from_dict({"emb_params": rnd(1, 768)}, name)


def test_widths_are_checked_against_the_model_not_here(tmp_path):
    """Fine-tuned and test models have other widths: the file loads, registration compares with the model."""
    emb = load_embedding(write(tmp_path, "tiny.safetensors", {"clip_l": rnd(2, 64), "clip_g": rnd(2, 256)}))
    assert emb.vectors["clip_l"].shape == (2, 64) and emb.vectors["clip_g"].shape == (2, 256)
