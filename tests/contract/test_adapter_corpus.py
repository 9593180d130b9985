"""The adapter corpus (tests/fixtures/adapters.py) against lib_tune on the real tiny ldm/sgm models: every file is
read with no unplaced keys as the type it was written as, maps 100% of its modules onto the model (packed
OpenCLIP attention complete), and every delta is finite, non-zero and 5-80% of its weight's norm at multiplier 1,
so the e2e fidelity test compares images that the adapters really change. Also: the metadata makes the webui's
version filter and lib_tune's guess agree, the files are deterministic, and TI files fit the model's widths."""
import pytest
import torch
from safetensors import safe_open

from lib_tune.formats import addnet_hash, legacy_hash, load_adapter, load_embedding
from lib_tune.inject import find_targets, map_adapter
from lib_tune.inject.mapping import weight_of
from tests.fixtures import adapters

FIXTURES = {"sd1": "tiny_ldm_sd1", "sd2v": "tiny_ldm_sd2v", "sdxl": "tiny_sgm_sdxl"}
TARGET_ARCH = {"sd1": "sd1", "sd2v": "sd2", "sdxl": "sdxl"}
REL_BOUNDS = (0.05, 0.8)
CASES = [pytest.param(arch, case, id=f"{arch}-{case}") for arch in adapters.ARCHS for case in adapters.case_names(arch)]


@pytest.fixture(autouse=True)
def _one_thread():
    with adapters.one_thread():
        yield


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory):
    """arch -> (model, targets, Corpus, layers), each written once per module on first use."""
    made = {}

    def get(arch):
        if arch not in made:
            model = request.getfixturevalue(FIXTURES[arch])
            made[arch] = (model, find_targets(model),
                          adapters.write_corpus(arch, model, tmp_path_factory.mktemp(f"corpus-{arch}")),
                          adapters.model_layers(arch, model))
        return made[arch]

    return get


@pytest.fixture(scope="module")
def mapped(corpus):
    """(arch, case) -> (AdapterFile, MappedAdapter), read and mapped once."""
    done = {}

    def get(arch, case):
        if (arch, case) not in done:
            _, targets, files, _ = corpus(arch)
            adapter = load_adapter(str(files[case]))
            done[arch, case] = adapter, map_adapter(adapter, targets)
        return done[arch, case]

    return get


def builtin_version(metadata):
    """extensions-builtin/Lora/network.py NetworkOnDisk.detect_version, with our arch names."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "sdxl"
    if str(metadata.get("ss_v2", "")) == "True":
        return "sd2"
    return "sd1" if metadata else None


def _file_modules(path):
    with safe_open(str(path), framework="pt") as f:
        return {k.split(".", 1)[0] for k in f.keys() if not k.startswith("bundle_emb.")}


@pytest.mark.parametrize("arch,case", CASES)
def test_file_loads_maps_completely_and_changes_every_layer(corpus, mapped, arch, case):
    model, _, files, layers = corpus(arch)
    spec = adapters.CASES_BY_NAME[case]
    written = [layer for layer in layers if spec.selects(layer) and spec.rename(layer.key)]
    adapter, result = mapped(arch, case)

    assert adapter.unplaced == [], adapter.notes[:5]
    assert len(adapter.modules) == len(_file_modules(files[case])) == len(written) > 0
    assert set(adapter.kinds) == {spec.kind}
    assert adapter.architecture == builtin_version(adapter.metadata) == TARGET_ARCH[arch]
    assert adapter.metadata["ss_output_name"] == files[case].stem

    assert result.n_mapped == len(adapter.modules), result.summary()
    assert not result.unmapped and not result.mismatched and not result.partial, result.summary()
    assert {e.is_te for e in result.entries} == {layer.te for layer in written}
    assert sum(e.part is not None for e in result.entries) == sum(layer.packed for layer in written)

    with torch.no_grad():
        for e in result.entries:
            weight = weight_of(e.module, e.part)
            up, ex_bias = e.net.delta(weight)
            assert torch.isfinite(up).all() and up.abs().max() > 0, e.key
            rel = float(up.norm() / weight.norm())
            assert REL_BOUNDS[0] < rel < REL_BOUNDS[1], f"{e.key}: ||dW|| / ||W|| = {rel:.3f}"
            if ex_bias is not None:
                assert torch.isfinite(ex_bias).all() and ex_bias.abs().max() > 0, e.key

    if case == "bundled_ti":
        token = files.tokens[case]
        assert set(adapter.embeddings) == {token}
        vectors = adapter.embeddings[token].vectors
        assert {k: v.shape[1] for k, v in vectors.items()} == _embedding_widths(model)


def _embedding_widths(model):
    """The model's token-embedding widths under the names lib_tune's reader gives the vectors: one encoder ->
    "emb", SDXL -> clip_l + clip_g."""
    def width(enc):
        emb = enc.transformer.text_model.embeddings if hasattr(enc, "transformer") else enc.model
        return emb.token_embedding.embedding_dim

    conditioner = getattr(model, "conditioner", None)
    if conditioner is None:
        return {"emb": width(model.cond_stage_model)}
    return {"clip_l": width(conditioner.embedders[0]), "clip_g": width(conditioner.embedders[1])}


@pytest.mark.parametrize("arch", ["sd2v", "sdxl"])
def test_openclip_attention_is_written_as_complete_sets(corpus, mapped, arch):
    """The built-in changes a packed MultiheadAttention only with all four parts (network_apply_weights)."""
    _, targets, _, _ = corpus(arch)
    n_layers = sum(1 for name in targets if name.endswith("_attn") and name.startswith(("model_", "1_model_")))
    for case in ("lora", "te_only", "dora", "loha", "lokr", "bundled_ti"):
        parts = {}
        for e in mapped(arch, case)[1].entries:
            if e.part is not None:
                parts.setdefault(e.layer, set()).add(e.part)
        assert len(parts) == n_layers == 10 and all(p == {"q", "k", "v", "out"} for p in parts.values()), case


def test_cases_per_arch():
    common = {"lora", "locon", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_w1ab", "dora", "ia3", "oft",
              "boft", "oft_diag", "oft_kohya", "full", "norm", "bundled_ti", "te_only", "unet_only"}
    assert set(adapters.case_names("sdxl")) == common
    assert set(adapters.case_names("sd1")) == set(adapters.case_names("sd2v")) == common | {"lora_diffusers_names"}


def test_diffusers_names_cover_every_block_kind(mapped):
    adapter, result = mapped("sd1", "lora_diffusers_names")
    keys = set(adapter.modules)
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_0_downsamplers_0_conv",
                "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_mid_block_resnets_1_time_emb_proj",
                "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2",
                "lora_unet_up_blocks_0_resnets_2_conv2", "lora_unet_conv_in", "lora_unet_conv_out",
                "lora_unet_time_embedding_linear_1"):
        assert key in keys
    assert not any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
                   for k in keys)
    layers = {e.layer for e in result.entries}
    assert {"diffusion_model_input_blocks_3_0_op", "diffusion_model_output_blocks_5_1_transformer_blocks_0_ff_net_2",
            "diffusion_model_middle_block_2_emb_layers_1", "diffusion_model_out_2"} <= layers


def test_same_seed_same_bytes_other_seed_other_tensors(corpus, tmp_path):
    model, _, files, _ = corpus("sd1")
    again = adapters.write_corpus("sd1", model, tmp_path / "again", cases=["loha_tucker", "oft"])
    other = adapters.write_corpus("sd1", model, tmp_path / "other", seed=1, cases=["loha_tucker"])
    for case in ("loha_tucker", "oft"):
        assert again[case].read_bytes() == files[case].read_bytes()
        md = load_adapter(str(files[case])).metadata
        assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == (addnet_hash(str(files[case])),
                                                                   legacy_hash(str(files[case])))
    assert addnet_hash(str(other["loha_tucker"])) != addnet_hash(str(files["loha_tucker"]))


def test_checkpoint_path_gives_the_same_corpus(corpus, tmp_path):
    model, _, files, _ = corpus("sd1")
    from_file = adapters.write_corpus("sd1", model.tiny_checkpoint_path, tmp_path, cases=["dora"])
    assert from_file["dora"].read_bytes() == files["dora"].read_bytes()


def test_wrong_arch_is_refused(corpus, tmp_path):
    model, _, _, _ = corpus("sd1")
    with pytest.raises(ValueError):
        adapters.write_corpus("sdxl", model, tmp_path)
    with pytest.raises(ValueError):
        adapters.write_corpus("sd2v", model, tmp_path)
    with pytest.raises(ValueError):
        adapters.write_corpus("sdxl", model, tmp_path, cases=["lora_diffusers_names"])


@pytest.mark.parametrize("arch", adapters.ARCHS)
def test_textual_inversion_file_fits_the_model(request, arch, tmp_path):
    model = request.getfixturevalue(FIXTURES[arch])
    path = adapters.write_ti(arch, tmp_path, "tinyti")
    emb = load_embedding(str(path))
    assert emb.name == "tinyti" and emb.n_vectors == adapters.TI_VECTORS
    assert {k: v.shape[1] for k, v in emb.vectors.items()} == _embedding_widths(model)
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in emb.vectors.values())
