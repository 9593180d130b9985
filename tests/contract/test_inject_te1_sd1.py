"""An SD1 adapter whose text-encoder keys say `lora_te1_` (some trainers write that for SD1's one encoder) on the
real tiny ldm SD1 tree: read as SD1, mapped onto the same layers as the same file written with `lora_te_` (the
built-in's load_network looks `lora_te1_text_model` up as `transformer_text_model` when the model has no
`0_transformer_text_model`), while an SDXL file on SD1 is still refused with the reason."""
import pytest
from safetensors.torch import load_file, save_file

from lib_tune.formats import load_adapter
from lib_tune.inject import ArchitectureMismatch, find_targets, map_adapter
from tests.fixtures import adapters


@pytest.fixture(scope="module")
def sd1_files(tiny_ldm_sd1, tmp_path_factory):
    with adapters.one_thread():
        return adapters.write_corpus("sd1", tiny_ldm_sd1, tmp_path_factory.mktemp("te1"),
                                     cases=["lora", "lora_diffusers_names"])


@pytest.mark.parametrize("case", ["lora", "lora_diffusers_names"])
@pytest.mark.parametrize("keep_metadata", [False, True], ids=["no-metadata", "metadata"])
def test_sd1_file_with_te1_keys_maps_like_lora_te(tiny_ldm_sd1, sd1_files, tmp_path, case, keep_metadata):
    src = sd1_files[case]
    tensors = {k.replace("lora_te_", "lora_te1_", 1): v for k, v in load_file(str(src)).items()}
    assert sum(k.startswith("lora_te1_") for k in tensors) > 0
    te1 = tmp_path / "te1.safetensors"
    if keep_metadata:
        from safetensors import safe_open
        with safe_open(str(src), framework="pt") as f:
            md = f.metadata()
    else:
        md = None
    save_file(tensors, str(te1), metadata=md)

    targets = find_targets(tiny_ldm_sd1)
    original, renamed = load_adapter(str(src)), load_adapter(str(te1))
    assert renamed.architecture == "sd1"
    m_orig, m_te1 = map_adapter(original, targets), map_adapter(renamed, targets)
    assert not m_te1.unmapped and not m_te1.mismatched
    assert {e.key.replace("lora_te1_", "lora_te_", 1): e.layer for e in m_te1.entries} == \
        {e.key: e.layer for e in m_orig.entries}
    te_layers = [e.layer for e in m_te1.entries if e.key.startswith("lora_te1_")]
    assert te_layers and all(layer.startswith("transformer_text_model_") for layer in te_layers)
    assert all(e.is_te for e in m_te1.entries if e.key.startswith("lora_te1_"))


def test_sdxl_file_on_sd1_is_refused(tiny_ldm_sd1, tiny_sgm_sdxl, tmp_path):
    with adapters.one_thread():
        path = adapters.write_corpus("sdxl", tiny_sgm_sdxl, tmp_path, cases=["lora"])["lora"]
    tensors = load_file(str(path))
    stripped = tmp_path / "xl-no-metadata.safetensors"
    save_file(tensors, str(stripped))  # no metadata: the keys and shapes alone must say SDXL
    for p in (path, stripped):
        ad = load_adapter(str(p))
        assert ad.architecture == "sdxl", p
        with pytest.raises(ArchitectureMismatch, match="is for SDXL .* the loaded model is SD1"):
            map_adapter(ad, find_targets(tiny_ldm_sd1))
