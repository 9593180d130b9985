"""map_adapter: kohya key conversion (the built-in's rules), packed attention parts, and refusals."""
import pytest
import torch
from torch import nn

from lib_tune.algos.lora import LoraModule
from lib_tune.formats.model import AdapterFile
from lib_tune.inject import ArchitectureMismatch, find_targets, map_adapter
from lib_tune.inject.mapping import weight_of
from tests.unit.test_inject_targets import sd1_model, sd2_model, sdxl_model


def lora(shape, rank=2, alpha=1.0, seed=0):
    """A LoRA whose delta has `shape` ([out, in] or [out, in, kh, kw])."""
    g = torch.Generator().manual_seed(seed)
    out, inn, k = shape[0], shape[1], tuple(shape[2:])
    down = torch.randn((rank, inn) + k, generator=g)
    up = torch.randn((out, rank) + ((1, 1) if k else ()), generator=g)
    return LoraModule({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)})


def adapter_for(targets, key_to_layer, arch=None, path="test.safetensors"):
    """An AdapterFile with one LoRA per key, shaped for the layer (and q/k/v/out part) it should land on."""
    mods = {}
    for i, (key, (layer, part)) in enumerate(key_to_layer.items()):
        mods[key] = lora(weight_of(targets[layer], part).shape, seed=i)
    return AdapterFile(path=path, modules=mods, architecture=arch)


SD1_DIFFUSERS = {
    "lora_unet_conv_in": "diffusion_model_input_blocks_0_0",
    "lora_unet_conv_out": "diffusion_model_out_2",
    "lora_unet_time_embedding_linear_1": "diffusion_model_time_embed_0",
    "lora_unet_time_embedding_linear_2": "diffusion_model_time_embed_2",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k":
        "diffusion_model_input_blocks_2_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0":
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj":
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "diffusion_model_input_blocks_1_1_proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv1": "diffusion_model_input_blocks_1_0_in_layers_2",
    "lora_unet_down_blocks_0_resnets_1_conv2": "diffusion_model_input_blocks_2_0_out_layers_3",
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "diffusion_model_input_blocks_1_0_emb_layers_1",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "diffusion_model_input_blocks_3_0_op",
    "lora_unet_mid_block_attentions_0_proj_out": "diffusion_model_middle_block_1_proj_out",
    "lora_unet_mid_block_resnets_0_conv1": "diffusion_model_middle_block_0_in_layers_2",
    "lora_unet_mid_block_resnets_1_conv2": "diffusion_model_middle_block_2_out_layers_3",
    "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v":
        "diffusion_model_output_blocks_0_1_transformer_blocks_0_attn2_to_v",
    "lora_unet_up_blocks_0_resnets_0_conv_shortcut": "diffusion_model_output_blocks_0_0_skip_connection",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "transformer_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc2": "transformer_text_model_encoder_layers_1_mlp_fc2",
    "lora_te1_text_model_encoder_layers_1_self_attn_out_proj":
        "transformer_text_model_encoder_layers_1_self_attn_out_proj",
}


def test_sd1_diffusers_style_names_map_by_block_arithmetic():
    t = find_targets(sd1_model())
    mapped = map_adapter(adapter_for(t, {k: (v, None) for k, v in SD1_DIFFUSERS.items()}, arch="sd1"), t)
    assert not mapped.unmapped and not mapped.mismatched and not mapped.partial
    got = {e.key: e.layer for e in mapped.entries}
    assert got == SD1_DIFFUSERS
    assert {e.key for e in mapped.entries if e.is_te} == {k for k in SD1_DIFFUSERS if k.startswith("lora_te")}
    assert all(e.module is t[e.layer] and e.part is None for e in mapped.entries)


def _weighted(t, prefix_filter=lambda n: True):
    return {n: m for n, m in t.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and prefix_filter(n)}


def test_ldm_named_unet_keys_map_completely():
    t = find_targets(sd1_model())
    layers = _weighted(t, lambda n: n.startswith("diffusion_model_"))
    keys = {"lora_unet_" + n[len("diffusion_model_"):]: (n, None) for n in layers}
    mapped = map_adapter(adapter_for(t, keys), t)
    assert mapped.n_mapped == len(keys) > 40 and not mapped.unmapped
    assert {e.layer for e in mapped.entries} == set(layers)


def test_sd2_te_keys_go_to_packed_attention_parts():
    t = find_targets(sd2_model())
    mha = "model_transformer_resblocks_0_attn"
    keys = {f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj": (mha, p) for p in ("q", "k", "v", "out")}
    keys["lora_te_text_model_encoder_layers_0_mlp_fc1"] = ("model_transformer_resblocks_0_mlp_c_fc", None)
    keys["lora_te_text_model_encoder_layers_1_mlp_fc2"] = ("model_transformer_resblocks_1_mlp_c_proj", None)
    mapped = map_adapter(adapter_for(t, keys, arch="sd2"), t)
    got = {e.key: (e.layer, e.part) for e in mapped.entries}
    assert got == keys
    assert not mapped.partial and all(e.is_te for e in mapped.entries)
    assert isinstance(mapped.entries[0].module, nn.MultiheadAttention)


def test_partial_attention_sets_are_accepted_and_reported():
    t = find_targets(sd2_model())
    mha = "model_transformer_resblocks_1_attn"
    keys = {f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj": (mha, p) for p in ("q", "v")}
    mapped = map_adapter(adapter_for(t, keys), t)
    assert mapped.n_mapped == 2
    assert mapped.partial == {mha: ["k", "out"]}
    assert "missing q/k/v/out" in mapped.summary()


def test_sdxl_te1_te2_and_ldm_unet_keys():
    t = find_targets(sdxl_model())
    keys = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            ("0_transformer_text_model_encoder_layers_0_self_attn_q_proj", None),
        "lora_te1_text_model_encoder_layers_1_mlp_fc1": ("0_transformer_text_model_encoder_layers_1_mlp_fc1", None),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": ("1_model_transformer_resblocks_0_attn", "k"),
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": ("1_model_transformer_resblocks_0_attn", "out"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("1_model_transformer_resblocks_1_mlp_c_proj", None),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k":
            ("diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k", None),
        "lora_unet_middle_block_1_proj_in": ("diffusion_model_middle_block_1_proj_in", None),
        "oft_unet_output_blocks_0_1_proj_out": ("diffusion_model_output_blocks_0_1_proj_out", None),
    }
    mapped = map_adapter(adapter_for(t, keys, arch="sdxl"), t)
    assert {e.key: (e.layer, e.part) for e in mapped.entries} == keys
    assert mapped.partial == {"1_model_transformer_resblocks_0_attn": ["q", "v"]}
    te = {e.key for e in mapped.entries if e.is_te}
    assert te == {k for k in keys if k.startswith("lora_te")}


def test_unmapped_keys_are_listed_with_a_reason():
    t = find_targets(sd1_model())
    keys = {k: (v, None) for k, v in list(SD1_DIFFUSERS.items())[:6]}
    ad = adapter_for(t, keys)
    ad.modules["lora_unet_nowhere_to_q"] = lora((4, 4))
    ad.modules["lora_te_text_model_embeddings_token_embedding"] = lora((4, 4))  # an Embedding: not a target type
    mapped = map_adapter(ad, t)
    assert mapped.n_mapped == 6
    assert set(mapped.unmapped) == {"lora_unet_nowhere_to_q", "lora_te_text_model_embeddings_token_embedding"}
    assert "no layer" in mapped.unmapped["lora_unet_nowhere_to_q"]


def test_architecture_mismatch_names_both_sides():
    t = find_targets(sd1_model())
    ad = adapter_for(t, {k: (v, None) for k, v in SD1_DIFFUSERS.items()}, arch="sdxl", path="/x/style.safetensors")
    ad.metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    with pytest.raises(ArchitectureMismatch) as e:
        map_adapter(ad, t)
    msg = str(e.value)
    assert "/x/style.safetensors is for SDXL" in msg and "the loaded model is SD1" in msg and "sdxl_base_v1-0" in msg


def test_wrong_shapes_are_refused_or_dropped_when_not_strict():
    t = find_targets(sd1_model())
    keys = {k: (v, None) for k, v in SD1_DIFFUSERS.items()}
    ad = adapter_for(t, keys)
    bad = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"
    w = t[SD1_DIFFUSERS[bad]].weight
    ad.modules[bad] = lora((w.shape[0], w.shape[1] + 4))  # a wider context, as an SD2 adapter on SD1
    with pytest.raises(ArchitectureMismatch, match="1 of .* wrong shape"):
        map_adapter(ad, t)
    mapped = map_adapter(ad, t, strict=False)
    assert list(mapped.mismatched) == [bad]
    assert bad not in {e.key for e in mapped.entries}
    assert mapped.n_mapped == len(keys) - 1


def test_fewer_than_half_mapped_is_refused():
    t = find_targets(sd1_model())
    keys = {k: (v, None) for k, v in list(SD1_DIFFUSERS.items())[:3]}
    ad = adapter_for(t, keys)
    for i in range(3):  # 3 of 6 map: accepted
        ad.modules[f"lora_unet_elsewhere_{i}"] = lora((4, 4))
    assert map_adapter(ad, t).n_mapped == 3
    ad.modules["lora_unet_elsewhere_3"] = lora((4, 4))  # 3 of 7: refused
    with pytest.raises(ArchitectureMismatch, match="only 3 of 7 modules"):
        map_adapter(ad, t)


def test_sd2_te_keys_on_sd1_model_take_the_sd1_branch():
    """is_sd2 comes from the model, as in the built-in: on SD1 the same key names the HF CLIP layer."""
    t = find_targets(sd1_model())
    mapped = map_adapter(adapter_for(t, {"lora_te_text_model_encoder_layers_0_mlp_fc1":
                                         ("transformer_text_model_encoder_layers_0_mlp_fc1", None)}), t)
    assert mapped.entries[0].layer == "transformer_text_model_encoder_layers_0_mlp_fc1"


def _guessed(t, keys, path):
    from lib_tune.formats.arch import guess_architecture
    ad = adapter_for(t, keys, path=path)
    ad.architecture = guess_architecture(ad.modules, ad.metadata)
    return ad


def test_sd1_file_with_te1_prefix_maps_on_sd1_like_the_builtin():
    """kohya-style SD1 file whose text-encoder keys say lora_te1_: the built-in (networks.py load_network) looks
    them up as transformer_text_model_... on SD1; so do we, and the guess does not call it SDXL."""
    t = find_targets(sd1_model())
    keys = {k: (v, None) for k, v in SD1_DIFFUSERS.items() if not k.startswith("lora_te_")}
    keys.update({k.replace("lora_te_", "lora_te1_"): (v, None) for k, v in SD1_DIFFUSERS.items()
                 if k.startswith("lora_te_")})
    ad = _guessed(t, keys, "/x/sd1-te1.safetensors")
    assert ad.architecture == "sd1"
    mapped = map_adapter(ad, t)
    assert not mapped.unmapped and not mapped.mismatched
    got = {e.key: e.layer for e in mapped.entries}
    assert got == {k: v for k, (v, _) in keys.items()}
    te1 = {k for k in keys if k.startswith("lora_te1_")}
    assert len(te1) == 3 and {e.key for e in mapped.entries if e.is_te} == te1
    assert all(got[k].startswith("transformer_text_model_") for k in te1)


def test_sdxl_file_on_sd1_is_still_refused_with_the_reason():
    sdxl_t = find_targets(sdxl_model())
    keys = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            ("0_transformer_text_model_encoder_layers_0_self_attn_q_proj", None),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("1_model_transformer_resblocks_1_mlp_c_proj", None),
        "lora_unet_middle_block_1_proj_in": ("diffusion_model_middle_block_1_proj_in", None),
    }
    ad = _guessed(sdxl_t, keys, "/x/xl.safetensors")
    assert ad.architecture == "sdxl"
    assert map_adapter(ad, sdxl_t).n_mapped == 3
    with pytest.raises(ArchitectureMismatch) as e:
        map_adapter(ad, find_targets(sd1_model()))
    msg = str(e.value)
    assert "/x/xl.safetensors is for SDXL" in msg and "lora_te2_" in msg and "the loaded model is SD1" in msg
