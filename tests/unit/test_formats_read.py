"""load_adapter round trips: each key layout written with tiny tensors, read back to canonical kohya names."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lib_tune.formats import AdapterFormatError, load_adapter

ATTN2_K = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TE_Q = "text_model_encoder_layers_0_self_attn_q_proj"


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def lora(prefix, out_dim, in_dim, rank=2, alpha=None, a_b=False):
    up, down = ("lora_B.weight", "lora_A.weight") if a_b else ("lora_up.weight", "lora_down.weight")
    t = {f"{prefix}.{up}": rnd(out_dim, rank), f"{prefix}.{down}": rnd(rank, in_dim, seed=1)}
    if alpha is not None:
        t[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return t


def write(tmp_path, tensors, metadata=None, name="net.safetensors"):
    p = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(tensors, str(p), metadata=metadata)
    else:
        torch.save(tensors, p)
    return str(p)


def test_kohya_sd1_keeps_names_metadata_and_guesses_sd1(tmp_path):
    t = {**lora("lora_unet_" + ATTN2_K, 8, 768, alpha=1), **lora("lora_te_" + TE_Q, 768, 768, alpha=2)}
    af = load_adapter(write(tmp_path, t, {"ss_output_name": "cat", "ss_network_dim": "2"}))
    assert set(af.modules) == {"lora_unet_" + ATTN2_K, "lora_te_" + TE_Q}
    assert af.metadata["ss_output_name"] == "cat"
    assert af.architecture == "sd1" and af.unplaced == [] and af.kinds == {"lora": 2}
    assert af.modules["lora_unet_" + ATTN2_K].calc_scale() == 0.5


@pytest.mark.parametrize("width,arch", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_architecture_from_cross_attention_width(tmp_path, width, arch):
    af = load_adapter(write(tmp_path, lora("lora_unet_" + ATTN2_K, 4, width)))
    assert af.architecture == arch


@pytest.mark.parametrize("metadata,arch", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"), ({"ss_v2": "True"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"), ({"ss_network_dim": "4"}, "sd1"),
    ({}, None),
])
def test_architecture_from_metadata(tmp_path, metadata, arch):
    af = load_adapter(write(tmp_path, lora("lora_unet_mid_block_resnets_0_conv1", 4, 4), metadata))
    assert af.architecture == arch


def test_kohya_sdxl_two_text_encoders(tmp_path):
    t = {**lora("lora_te1_" + TE_Q, 768, 768), **lora("lora_te2_" + TE_Q, 1280, 1280),
         **lora("lora_unet_input_blocks_4_1_proj_in", 4, 4)}
    af = load_adapter(write(tmp_path, t))
    assert af.architecture == "sdxl"
    assert {"lora_te1_" + TE_Q, "lora_te2_" + TE_Q, "lora_unet_input_blocks_4_1_proj_in"} == set(af.modules)


def test_oft_unet_and_lycoris_prefixes_become_lora_unet(tmp_path):
    t = {"oft_unet_input_blocks_4_1_proj_in.oft_blocks": rnd(2, 2, 2), "oft_unet_input_blocks_4_1_proj_in.alpha":
         torch.tensor(0.0), "lycoris_mid_block_attentions_0_proj_in.hada_w1_a": rnd(4, 2)}
    t.update({f"lycoris_mid_block_attentions_0_proj_in.{k}": rnd(*s, seed=i) for i, (k, s) in enumerate(
        [("hada_w1_b", (2, 4)), ("hada_w2_a", (4, 2)), ("hada_w2_b", (2, 4))])})
    af = load_adapter(write(tmp_path, t))
    assert af.modules["lora_unet_input_blocks_4_1_proj_in"].kind == "oft"
    assert af.modules["lora_unet_mid_block_attentions_0_proj_in"].kind == "loha"


def test_diffusers_attention_processor_layout(tmp_path):
    base = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    t = {f"unet.{base}.to_q_lora.down.weight": rnd(2, 4), f"unet.{base}.to_q_lora.up.weight": rnd(4, 2),
         f"{base}.to_out_lora.down.weight": rnd(2, 4), f"{base}.to_out_lora.up.weight": rnd(4, 2),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": rnd(2, 768),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": rnd(768, 2),
         "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.down.weight": rnd(2, 768),
         "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight": rnd(768, 2)}
    af = load_adapter(write(tmp_path, t, name="old.bin"))
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    assert set(af.modules) == {unet + "to_q", unet + "to_out_0", "lora_te_" + TE_Q,
                               "lora_te_text_model_encoder_layers_1_self_attn_k_proj"}
    dw, _ = af.modules[unet + "to_q"].delta(torch.zeros(4, 4))
    torch.testing.assert_close(dw, t[f"unet.{base}.to_q_lora.up.weight"] @ t[f"unet.{base}.to_q_lora.down.weight"])


def test_diffusers_lora_compatible_layer_layout(tmp_path):
    t = {"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.down.weight": rnd(2, 4),
         "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight": rnd(4, 2)}
    af = load_adapter(write(tmp_path, t))
    assert list(af.modules) == ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"]


def test_peft_layout_folded_alpha_is_scale_one(tmp_path):
    t = {**lora("unet.mid_block.attentions.0.proj_out", 4, 4, a_b=True),
         **lora("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768, a_b=True),
         **lora("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280, 1280, a_b=True)}
    af = load_adapter(write(tmp_path, t))
    assert set(af.modules) == {"lora_unet_mid_block_attentions_0_proj_out", "lora_te1_" + TE_Q, "lora_te2_" + TE_Q}
    assert af.architecture == "sdxl"
    m = af.modules["lora_unet_mid_block_attentions_0_proj_out"]
    assert m.calc_scale() == 1.0
    torch.testing.assert_close(m.delta(torch.zeros(4, 4))[0],
                               t["unet.mid_block.attentions.0.proj_out.lora_B.weight"]
                               @ t["unet.mid_block.attentions.0.proj_out.lora_A.weight"])


@pytest.mark.parametrize("meta,scales", [
    ({"r": 2, "lora_alpha": 8}, (4.0, 4.0)),
    ({"unet.r": 2, "unet.lora_alpha": 1, "text_encoder.r": 2, "text_encoder.lora_alpha": 6}, (0.5, 3.0)),
    ({"r": 2, "lora_alpha": 2, "alpha_pattern": {"mid_block.attentions.0.proj_out": 4}}, (2.0, 1.0)),
    ({"r": 2, "lora_alpha": 4, "use_rslora": True}, (4 / 2 ** 0.5, 4 / 2 ** 0.5)),
])
def test_peft_alpha_from_lora_adapter_metadata(tmp_path, meta, scales):
    t = {**lora("unet.mid_block.attentions.0.proj_out", 4, 4, a_b=True),
         **lora("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768, a_b=True)}
    af = load_adapter(write(tmp_path, t, {"lora_adapter_metadata": json.dumps(meta)}))
    assert af.modules["lora_unet_mid_block_attentions_0_proj_out"].calc_scale() == pytest.approx(scales[0])
    assert af.modules["lora_te_" + TE_Q].calc_scale() == pytest.approx(scales[1])


def test_peft_dora_magnitude_becomes_dora_scale(tmp_path):
    t = {**lora("unet.mid_block.attentions.0.proj_out", 4, 3, a_b=True),
         "unet.mid_block.attentions.0.proj_out.lora_magnitude_vector": rnd(4).abs()}
    m = load_adapter(write(tmp_path, t)).modules["lora_unet_mid_block_attentions_0_proj_out"]
    assert torch.equal(m.dora_scale, t["unet.mid_block.attentions.0.proj_out.lora_magnitude_vector"])


def test_comfyui_layout_sd1_and_sdxl(tmp_path):
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    t = {**lora("diffusion_model.input_blocks.4.1.proj_in", 4, 4), **lora(te, 768, 768)}
    af = load_adapter(write(tmp_path, t, name="sd1.safetensors"))
    assert set(af.modules) == {"lora_unet_input_blocks_4_1_proj_in", "lora_te_" + TE_Q} and af.architecture == "sd1"
    t.update(lora("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj", 1280, 1280))
    af = load_adapter(write(tmp_path, t, name="xl.safetensors"))
    assert set(af.modules) == {"lora_unet_input_blocks_4_1_proj_in", "lora_te1_" + TE_Q, "lora_te2_" + TE_Q}


def test_comfyui_lycoris_params(tmp_path):
    t = {"diffusion_model.middle_block.1.proj_in.lokr_w1": rnd(2, 2),
         "diffusion_model.middle_block.1.proj_in.lokr_w2": rnd(2, 2, seed=1)}
    af = load_adapter(write(tmp_path, t))
    assert af.modules["lora_unet_middle_block_1_proj_in"].kind == "lokr"


@pytest.mark.parametrize("wrap", [False, True])
def test_pickled_adapter_via_the_safe_loader(tmp_path, wrap):
    t = lora("lora_unet_" + ATTN2_K, 4, 768, alpha=1)
    af = load_adapter(write(tmp_path, {"state_dict": t} if wrap else t, name="old.pt"))
    assert list(af.modules) == ["lora_unet_" + ATTN2_K] and af.metadata == {}


def test_bundled_embeddings_both_layouts(tmp_path):
    t = {**lora("lora_unet_" + ATTN2_K, 4, 768), "bundle_emb.star.string_to_param.*": rnd(2, 768),
         "bundle_emb.xlword.clip_l": rnd(3, 768), "bundle_emb.xlword.clip_g": rnd(3, 1280)}
    af = load_adapter(write(tmp_path, t))
    assert set(af.embeddings) == {"star", "xlword"}
    assert torch.equal(af.embeddings["star"].vectors["emb"], t["bundle_emb.star.string_to_param.*"])
    assert af.embeddings["xlword"].n_vectors == 3 and set(af.embeddings["xlword"].vectors) == {"clip_l", "clip_g"}


def test_bundled_embedding_with_a_path_like_name_is_refused(tmp_path):
    t = {**lora("lora_unet_" + ATTN2_K, 4, 768), "bundle_emb.a/b.clip_l": rnd(1, 768), "bundle_emb.a/b.clip_g":
         rnd(1, 1280)}
    with pytest.raises(AdapterFormatError, match="looks like a path"):
        load_adapter(write(tmp_path, t))


def test_unknown_and_broken_keys_are_unplaced_with_reasons(tmp_path):
    t = {**lora("lora_unet_" + ATTN2_K, 4, 768), "something.else": rnd(2),
         "lora_unet_bad.lora_up.weight": rnd(4, 3), "lora_unet_bad.lora_down.weight": rnd(2, 4),
         "lora_unet_x.hada_w1_a": rnd(2, 2)}
    af = load_adapter(write(tmp_path, t))
    assert list(af.modules) == ["lora_unet_" + ATTN2_K]
    assert sorted(af.unplaced) == sorted(["something.else", "lora_unet_bad.lora_up.weight",
                                          "lora_unet_bad.lora_down.weight", "lora_unet_x.hada_w1_a"])
    assert any("do not chain" in n for n in af.notes) and any("no network type" in n for n in af.notes)


def test_nothing_placed_names_the_file_and_keys(tmp_path):
    path = write(tmp_path, {"model.weight": rnd(2, 2), "other": rnd(2)}, name="checkpoint.safetensors")
    with pytest.raises(AdapterFormatError, match=r"checkpoint\.safetensors.*(model\.weight|other)"):
        load_adapter(path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "extension", "missing"])
def test_broken_files_raise_format_errors(tmp_path, kind):
    path = tmp_path / ("x.txt" if kind == "extension" else "x.safetensors")
    if kind == "truncated":
        save_file(lora("lora_unet_" + ATTN2_K, 4, 768), str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind != "missing":
        path.write_bytes({"empty": b"", "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx",
                          "extension": b"hello"}[kind])
    with pytest.raises(AdapterFormatError, match="x\\."):
        load_adapter(str(path))


# ---- lora_te1_ on SD1: some trainers number SD1's one text encoder; the built-in maps it to SD1's CLIP ------------
SD1_UNET_NO_WIDTH = ("input_blocks_1_1_transformer_blocks_0_attn1_to_q", "input_blocks_2_1_proj_in",
                     "output_blocks_9_1_transformer_blocks_0_ff_net_2")
SD1_DIFFUSERS_NO_WIDTH = ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                          "up_blocks_3_attentions_2_proj_out")


def _te1(n=2, width=768):
    t = {}
    for i in range(n):
        t.update(lora(f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj", width, width))
    return t


@pytest.mark.parametrize("unet", [SD1_UNET_NO_WIDTH, SD1_DIFFUSERS_NO_WIDTH], ids=["ldm", "diffusers"])
def test_te1_with_sd1_unet_structure_is_sd1(tmp_path, unet):
    t = _te1()
    for k in unet:
        t.update(lora("lora_unet_" + k, 8, 8))
    af = load_adapter(write(tmp_path, t))
    assert af.architecture == "sd1"
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in af.modules


def test_te1_with_sd1_cross_attention_width_and_metadata_is_sd1(tmp_path):
    t = {**_te1(), **lora("lora_unet_" + ATTN2_K, 8, 768)}
    assert load_adapter(write(tmp_path, t, name="w.safetensors")).architecture == "sd1"
    t = {**_te1(), **lora("lora_unet_input_blocks_4_1_proj_in", 8, 8)}
    af = load_adapter(write(tmp_path, t, {"ss_base_model_version": "sd_v1"}, name="md.safetensors"))
    assert af.architecture == "sd1"


@pytest.mark.parametrize("extra,why", [
    ({**lora("lora_te2_" + TE_Q, 1280, 1280)}, "second text encoder"),
    ({**lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048)}, "context width 2048"),
    ({**lora("lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q", 8, 8)}, "SDXL UNet structure"),
    ({**lora("lora_unet_label_emb_0_0", 8, 8)}, "SDXL UNet structure"),
], ids=["te2", "width", "depth", "label_emb"])
def test_te1_with_sdxl_evidence_is_still_sdxl(tmp_path, extra, why):
    from lib_tune.formats.arch import explain_architecture
    af = load_adapter(write(tmp_path, {**_te1(), **extra}))
    assert af.architecture == "sdxl"
    assert why in explain_architecture(af.modules, af.metadata)[1]


def test_te1_alone_is_no_evidence(tmp_path):
    """CLIP-L is the same encoder in SD1 and SDXL: without metadata a lora_te1_-only file fits both."""
    assert load_adapter(write(tmp_path, _te1())).architecture is None
    af = load_adapter(write(tmp_path, _te1(), {"ss_base_model_version": "sdxl_base_v1-0"}, name="xl.safetensors"))
    assert af.architecture == "sdxl"
