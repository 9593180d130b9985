"""lib_tune.layer_names, rule by rule in both directions on hand-picked names (the contract layer runs every rule over
the real layer lists of the tiny models and of SD1.5's and SDXL's full-size ones)."""
import pytest

from lib_tune.layer_names import (convert_key, diffusers_path, kohya_keys, layer_block, lbw_block, ldm_path,
                                  resolve)

ATTN = "transformer_blocks_0_attn1_to_q"

# (ldm path, diffusers path): one of each rule, SD1's block layout
PAIRS = [
    ("input_blocks_0_0", "conv_in"),
    ("out_2", "conv_out"),
    ("time_embed_0", "time_embedding_linear_1"),
    ("time_embed_2", "time_embedding_linear_2"),
    (f"input_blocks_1_1_{ATTN}", f"down_blocks_0_attentions_0_{ATTN}"),
    ("input_blocks_2_0_in_layers_2", "down_blocks_0_resnets_1_conv1"),
    ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
    ("input_blocks_4_0_skip_connection", "down_blocks_1_resnets_0_conv_shortcut"),
    ("input_blocks_6_0_op", "down_blocks_1_downsamplers_0_conv"),
    ("input_blocks_11_0_emb_layers_1", "down_blocks_3_resnets_1_time_emb_proj"),
    ("middle_block_0_in_layers_0", "mid_block_resnets_0_norm1"),
    ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
    ("middle_block_2_out_layers_3", "mid_block_resnets_1_conv2"),
    ("output_blocks_0_0_out_layers_0", "up_blocks_0_resnets_0_norm2"),
    ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),
    ("output_blocks_4_1_proj_in", "up_blocks_1_attentions_1_proj_in"),
    ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
    ("output_blocks_11_1_transformer_blocks_0_ff_net_2", "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"),
]


@pytest.mark.parametrize("ldm,diffusers", PAIRS)
def test_diffusers_and_ldm_paths_both_ways(ldm, diffusers):
    assert ldm_path(diffusers) == ldm
    assert diffusers_path(ldm) == diffusers
    assert convert_key("lora_unet_" + diffusers, False) == "diffusion_model_" + ldm


def test_paths_without_a_counterpart():
    assert diffusers_path("label_emb_0_0") is None and diffusers_path("out_0") is None
    assert ldm_path(f"input_blocks_1_1_{ATTN}") is None  # already ldm
    # the built-in's rule puts level 0's upsampler after a resnet (SD1); with attention there (SDXL, two-level
    # UNets) the upsampler is the third module, which its diffusers name does not lead back to
    assert diffusers_path("output_blocks_2_2_conv") == "up_blocks_0_upsamplers_0_conv"
    assert ldm_path("up_blocks_0_upsamplers_0_conv") == "output_blocks_2_1_conv"
    assert ldm_path("down_blocks_1_downsamplers_0_conv_x") == "input_blocks_6_0_op"  # re.match, as the built-in


@pytest.mark.parametrize("layer,part,arch,keys", [
    (f"diffusion_model_input_blocks_1_1_{ATTN}", None, "sd1",
     [f"lora_unet_down_blocks_0_attentions_0_{ATTN}", f"lora_unet_input_blocks_1_1_{ATTN}"]),
    (f"diffusion_model_input_blocks_4_1_{ATTN}", None, "sdxl", [f"lora_unet_input_blocks_4_1_{ATTN}"]),
    ("diffusion_model_label_emb_0_0", None, "sdxl", ["lora_unet_label_emb_0_0"]),
    ("transformer_text_model_encoder_layers_3_mlp_fc1", None, "sd1", ["lora_te_text_model_encoder_layers_3_mlp_fc1"]),
    ("0_transformer_text_model_final_layer_norm", None, "sdxl", ["lora_te1_text_model_final_layer_norm"]),
    ("model_transformer_resblocks_2_attn", "k", "sd2", ["lora_te_text_model_encoder_layers_2_self_attn_k_proj"]),
    ("1_model_transformer_resblocks_5_attn", "out", "sdxl",
     ["lora_te2_text_model_encoder_layers_5_self_attn_out_proj"]),
    ("1_model_transformer_resblocks_5_attn_out_proj", None, "sdxl",
     ["lora_te2_text_model_encoder_layers_5_self_attn_out_proj"]),
    ("1_model_transformer_resblocks_0_mlp_c_fc", None, "sdxl", ["lora_te2_text_model_encoder_layers_0_mlp_fc1"]),
    ("model_transformer_resblocks_9_mlp_c_proj", None, "sd2", ["lora_te_text_model_encoder_layers_9_mlp_fc2"]),
    ("model_transformer_resblocks_9_ln_1", None, "sd2", ["lora_te_text_model_encoder_layers_9_ln_1"]),
    ("model_transformer_resblocks_9_attn", None, "sd2", []),  # the packed attention itself: only its parts
    ("model_ln_final", None, "sd2", []),
])
def test_kohya_keys_and_back(layer, part, arch, keys):
    assert kohya_keys(layer, part, arch) == keys
    names = {layer, layer + "_out_proj"}  # a packed attention's out part is its out_proj layer (see inject.mapping)
    want = (layer + "_out_proj", None) if part == "out" else (layer, part)
    for key in keys:
        assert resolve(key, names.__contains__, arch == "sd2") == want, key


def test_resolve_fallbacks_in_the_builtins_order():
    sd1 = {"transformer_text_model_encoder_layers_0_mlp_fc1", f"diffusion_model_input_blocks_1_1_{ATTN}"}
    assert resolve("lora_te1_text_model_encoder_layers_0_mlp_fc1", sd1.__contains__, False) == \
        ("transformer_text_model_encoder_layers_0_mlp_fc1", None)
    assert resolve(f"lora_unet_input_blocks_1_1_{ATTN}", sd1.__contains__, False) == \
        (f"diffusion_model_input_blocks_1_1_{ATTN}", None)
    assert resolve(f"oft_unet_input_blocks_1_1_{ATTN}", sd1.__contains__, False) == \
        (f"diffusion_model_input_blocks_1_1_{ATTN}", None)
    sd2 = {"model_transformer_resblocks_0_attn"}
    assert resolve("lora_te_text_model_encoder_layers_0_self_attn_v_proj", sd2.__contains__, True) == \
        ("model_transformer_resblocks_0_attn", "v")
    assert resolve("lora_te_text_model_encoder_layers_0_self_attn_v_proj", sd2.__contains__, False) == (None, None)


@pytest.mark.parametrize("ldm,diffusers", PAIRS)
def test_lbw_block_is_the_same_for_both_names(ldm, diffusers):
    block = lbw_block("lora_unet_" + ldm, "sd1")
    assert lbw_block("lora_unet_" + diffusers, "sd1") == block
    assert layer_block("diffusion_model_" + ldm, "sd1") == block


def test_lbw_blocks():
    assert lbw_block("lora_unet_conv_in", "sd1") == "IN00"
    assert lbw_block("lora_unet_down_blocks_1_downsamplers_0_conv", "sd1") == "IN06"
    assert lbw_block("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1") == "OUT02"
    assert lbw_block("lora_unet_mid_block_resnets_1_conv2", "sdxl") == "M00"
    assert lbw_block("lora_unet_output_blocks_9_0_skip_connection", "sdxl") is None  # SDXL has OUT00-OUT08
    assert lbw_block("lora_unet_time_embedding_linear_1", "sd1") is None
    assert lbw_block("lora_te?_text_model_encoder_layers_0_mlp_fc1", "sd1") == "BASE"
    assert layer_block("1_model_transformer_resblocks_0_ln_1", "sdxl") == "BASE"
