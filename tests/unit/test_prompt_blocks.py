"""Block weights (lib_tune.prompt.blocks): LBW tables and presets, key -> block mapping, multipliers."""
import re

import pytest

from lib_tune.prompt import BlockWeights, PRESETS, TagError, arch_warning, block_multiplier, block_of, \
    parse_block_weights, parse_preset_text
from lib_tune.prompt.blocks import BLOCKID12, BLOCKID17, BLOCKID20, BLOCKID26

ATTN = "transformer_blocks_0_attn1_to_q"

SD1_DIFFUSERS = [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "BASE"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", "BASE"),
    ("lora_unet_conv_in", "IN00"),
    (f"lora_unet_down_blocks_0_attentions_0_{ATTN}", "IN01"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "IN01"),
    (f"lora_unet_down_blocks_0_attentions_1_{ATTN}", "IN02"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "IN03"),
    (f"lora_unet_down_blocks_1_attentions_0_{ATTN}", "IN04"),
    ("lora_unet_down_blocks_1_attentions_0_proj_in", "IN04"),
    ("lora_unet_down_blocks_1_resnets_1_time_emb_proj", "IN05"),
    ("lora_unet_down_blocks_1_downsamplers_0_conv", "IN06"),
    (f"lora_unet_down_blocks_2_attentions_0_{ATTN}", "IN07"),
    (f"lora_unet_down_blocks_2_attentions_1_{ATTN}", "IN08"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "IN09"),
    ("lora_unet_down_blocks_3_resnets_0_conv1", "IN10"),
    ("lora_unet_down_blocks_3_resnets_1_conv2", "IN11"),
    (f"lora_unet_mid_block_attentions_0_{ATTN}", "M00"),
    ("lora_unet_mid_block_resnets_1_conv1", "M00"),
    ("lora_unet_up_blocks_0_resnets_0_conv1", "OUT00"),
    ("lora_unet_up_blocks_0_resnets_2_conv_shortcut", "OUT02"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "OUT02"),
    (f"lora_unet_up_blocks_1_attentions_0_{ATTN}", "OUT03"),
    (f"lora_unet_up_blocks_1_attentions_2_{ATTN}", "OUT05"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "OUT05"),
    (f"lora_unet_up_blocks_2_attentions_1_{ATTN}", "OUT07"),
    (f"lora_unet_up_blocks_3_attentions_0_{ATTN}", "OUT09"),
    (f"lora_unet_up_blocks_3_attentions_2_{ATTN}", "OUT11"),
    ("lora_unet_time_embedding_linear_1", None),
    ("lora_unet_conv_out", None),
    ("lora_unet_conv_norm_out", None),
    ("something_else", None),
]

SD1_LDM = [
    ("lora_unet_input_blocks_0_0", "IN00"),
    (f"lora_unet_input_blocks_1_1_{ATTN}", "IN01"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "IN01"),
    (f"lora_unet_input_blocks_2_1_{ATTN}", "IN02"),
    ("lora_unet_input_blocks_3_0_op", "IN03"),
    (f"lora_unet_input_blocks_4_1_{ATTN}", "IN04"),
    (f"lora_unet_input_blocks_8_1_{ATTN}", "IN08"),
    ("lora_unet_input_blocks_10_0_emb_layers_1", "IN10"),  # not IN01: '1_' is no prefix of '10_'
    ("lora_unet_input_blocks_11_0_out_layers_3", "IN11"),
    (f"lora_unet_middle_block_1_{ATTN}", "M00"),
    ("lora_unet_middle_block_2_in_layers_2", "M00"),
    ("lora_unet_output_blocks_0_0_in_layers_2", "OUT00"),
    ("lora_unet_output_blocks_2_1_conv", "OUT02"),
    (f"lora_unet_output_blocks_3_1_{ATTN}", "OUT03"),
    (f"lora_unet_output_blocks_11_1_{ATTN}", "OUT11"),
    ("lora_unet_time_embed_0", None),
    ("lora_unet_out_2", None),
    ("lora_unet_input_blocks_12_0_op", None),  # past SD1's last block
]

SDXL_LDM = [
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "BASE"),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc1", "BASE"),
    ("lora_te?_text_model_encoder_layers_0_mlp_fc1", "BASE"),  # formats.keys.TE_PENDING
    ("lora_unet_input_blocks_0_0", "IN00"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "IN01"),
    ("lora_unet_input_blocks_3_0_op", "IN03"),
    (f"lora_unet_input_blocks_4_1_{ATTN}", "IN04"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "IN04"),
    (f"lora_unet_input_blocks_5_1_{ATTN}", "IN05"),
    ("lora_unet_input_blocks_6_0_op", "IN06"),
    (f"lora_unet_input_blocks_7_1_{ATTN}", "IN07"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2", "IN08"),
    (f"lora_unet_middle_block_1_{ATTN}", "M00"),
    (f"lora_unet_output_blocks_0_1_{ATTN}", "OUT00"),
    (f"lora_unet_output_blocks_2_1_{ATTN}", "OUT02"),
    ("lora_unet_output_blocks_2_2_conv", "OUT02"),
    (f"lora_unet_output_blocks_5_1_{ATTN}", "OUT05"),
    ("lora_unet_output_blocks_8_0_skip_connection", "OUT08"),
    ("lora_unet_input_blocks_9_0_op", None),  # SDXL has IN00..IN08
    ("lora_unet_output_blocks_9_1_proj_in", None),
    ("lora_unet_label_emb_0_0", None),
    ("lora_unet_time_embed_2", None),
]

SDXL_DIFFUSERS = [
    (f"lora_unet_down_blocks_1_attentions_0_{ATTN}", "IN04"),
    (f"lora_unet_down_blocks_2_attentions_1_{ATTN}", "IN08"),
    ("lora_unet_down_blocks_1_downsamplers_0_conv", "IN06"),
    (f"lora_unet_mid_block_attentions_0_{ATTN}", "M00"),
    (f"lora_unet_up_blocks_0_attentions_0_{ATTN}", "OUT00"),
    (f"lora_unet_up_blocks_1_attentions_2_{ATTN}", "OUT05"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "OUT05"),
    ("lora_unet_up_blocks_2_resnets_2_conv1", "OUT08"),
    ("lora_unet_up_blocks_3_resnets_0_conv1", None),  # SDXL has three up blocks
]


@pytest.mark.parametrize("arch,key,block",
                         [("sd1", k, b) for k, b in SD1_DIFFUSERS + SD1_LDM]
                         + [("sd2", k, b) for k, b in SD1_DIFFUSERS + SD1_LDM]
                         + [("sdxl", k, b) for k, b in SDXL_LDM + SDXL_DIFFUSERS])
def test_block_of(arch, key, block):
    assert block_of(key, arch) == block


# The webui's own diffusers -> ldm conversion (extensions-builtin/Lora/networks.py
# convert_diffusers_name_to_compvis, v1.10.1, UNet branches), copied as an independent oracle: a diffusers key
# and its converted ldm key must fall into the same block.
def webui_convert(key):
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"lora_unet_input_blocks_0_0{m[0]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"lora_unet_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{m[3]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"lora_unet_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{m[2]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"lora_unet_output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{m[3]}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"lora_unet_input_blocks_{3 + int(m[0]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"lora_unet_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
    ]
    for pattern, build in rules:
        m = re.match(pattern, key)
        if m:
            return build(m.groups())
    return None


@pytest.mark.parametrize("arch,key", [("sd1", k) for k, _ in SD1_DIFFUSERS if webui_convert(k)]
                         + [("sdxl", k) for k, _ in SDXL_DIFFUSERS if webui_convert(k)])
def test_diffusers_and_ldm_names_agree_with_the_webui_conversion(arch, key):
    ldm = webui_convert(key)
    assert ldm.startswith("lora_unet_") and ldm != key
    assert block_of(key, arch) == block_of(ldm, arch)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        block_of("lora_unet_input_blocks_1_1_x", "flux")


def test_lbw_tables():
    """Lengths and order as in LBW lora_block_weight.py L53-59."""
    assert (len(BLOCKID12), len(BLOCKID17), len(BLOCKID20), len(BLOCKID26)) == (12, 17, 20, 26)
    assert BLOCKID17[:8] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00")
    assert BLOCKID12 == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04",
                         "OUT05")
    for table in (BLOCKID12, BLOCKID17, BLOCKID20):
        assert all(b in BLOCKID26 for b in table)
        assert sorted(table, key=BLOCKID26.index) == list(table)


def test_presets():
    assert all(len(v) == 17 for v in PRESETS.values())
    assert PRESETS["IND"] == (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert PRESETS["OUTALL"] == (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    assert PRESETS["ALL0.5"] == (0.5,) * 17
    assert PRESETS["IN02"] == tuple(1.0 if i == 2 else 0.0 for i in range(17))
    assert PRESETS["NMID"] == tuple(0.0 if i == 7 else 1.0 for i in range(17))
    for name in ("NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"):
        assert parse_block_weights(name).to_text() == name


def test_multiplier_sd1_17_values():
    bw = BlockWeights(tuple(float(i + 1) for i in range(17)))
    for i, block in enumerate(BLOCKID17):
        if block == "BASE":
            key = "lora_te_text_model_encoder_layers_3_mlp_fc1"
        elif block == "M00":
            key = "lora_unet_middle_block_1_proj_in"
        else:
            key = f"lora_unet_{'input' if block.startswith('IN') else 'output'}_blocks_{int(block[-2:])}_1_proj_in"
        assert block_multiplier(bw, key, "sd1") == i + 1, block
    # blocks the 17-value layout leaves out get 0, as in LBW's to26; modules in no block keep 1
    assert block_multiplier(bw, "lora_unet_down_blocks_0_downsamplers_0_conv", "sd1") == 0.0  # IN03
    assert block_multiplier(bw, "lora_unet_up_blocks_0_resnets_1_conv1", "sd1") == 0.0  # OUT01
    assert block_multiplier(bw, "lora_unet_time_embedding_linear_1", "sd1") == 1.0
    assert block_multiplier(list(bw.values), f"lora_unet_up_blocks_3_attentions_2_{ATTN}", "sd1") == 17.0


def test_multiplier_sdxl_12_and_26_values():
    bw = parse_block_weights(",".join(str(i + 1) for i in range(12)))
    assert block_multiplier(bw, "lora_te2_text_model_encoder_layers_0_mlp_fc1", "sdxl") == 1.0  # BASE
    assert block_multiplier(bw, f"lora_unet_input_blocks_4_1_{ATTN}", "sdxl") == 2.0
    assert block_multiplier(bw, f"lora_unet_input_blocks_8_1_{ATTN}", "sdxl") == 5.0
    assert block_multiplier(bw, f"lora_unet_middle_block_1_{ATTN}", "sdxl") == 6.0
    assert block_multiplier(bw, f"lora_unet_output_blocks_0_1_{ATTN}", "sdxl") == 7.0
    assert block_multiplier(bw, f"lora_unet_output_blocks_5_1_{ATTN}", "sdxl") == 12.0
    assert block_multiplier(bw, "lora_unet_output_blocks_6_0_in_layers_2", "sdxl") == 0.0
    full = BlockWeights(tuple(float(i) for i in range(26)))
    assert full.multiplier("lora_unet_input_blocks_11_0_op", "sd1") == 12.0
    assert full.multiplier("lora_unet_output_blocks_11_0_op", "sd1") == 25.0


def test_block_weights_validation_and_text():
    with pytest.raises(ValueError):
        BlockWeights((1.0,) * 5)
    bw = parse_block_weights("1 0.5\t0.25," + ",".join(["0"] * 9))
    assert len(bw.values) == 12 and bw.to_text() == "1,0.5,0.25," + ",".join(["0"] * 9)
    assert parse_block_weights(bw.to_text()) == bw
    with pytest.raises(TagError, match="lbw is empty"):
        parse_block_weights("  ")


def test_arch_warning():
    assert "OUT00" in arch_warning(parse_block_weights("ALL"), "sdxl")
    assert "IN09" not in arch_warning(parse_block_weights("ALL"), "sdxl")  # SDXL has no IN09
    assert arch_warning(parse_block_weights(",".join(["1"] * 12)), "sdxl") is None
    assert arch_warning(parse_block_weights(",".join(["1"] * 26)), "sdxl") is None
    assert arch_warning(parse_block_weights("INS"), "sd1") is None
    warning = arch_warning(parse_block_weights(",".join(["1"] * 12)), "sd1")
    assert "17 or 26" in warning and "IN01" in warning


def test_parse_preset_text_lbw_file_format():
    text = "\n".join([
        "MINE:1,1,1,1,1,1,1,1,1,1,1,1",
        "# NOTE:0,0,0,0,0,0,0,0,0,0,0,0",
        "SHORT:1,2,3",
        "BAD:1,1,1,1,1,1,1,1,1,1,1,x",
        "no colon here",
        " SPACED :" + ",".join(["0.5"] * 17),
    ])
    presets = parse_preset_text(text)
    assert presets == {"MINE": (1.0,) * 12, "SPACED": (0.5,) * 17}
    assert parse_block_weights("spaced", presets).preset == "SPACED"
