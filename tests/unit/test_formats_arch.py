"""formats.arch: the one place that tells an architecture from metadata (from_metadata, for the cards) and from
metadata with the tensors (explain_architecture, for the loader)."""
import pytest
import torch

from lib_tune.algos import build_module
from lib_tune.formats.arch import ARCH_NAMES, explain_architecture, from_metadata


@pytest.mark.parametrize("metadata,arch", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
    ({"ss_v2": "True"}, "sd2"),
    ({"ss_base_model_version": "sd_v1"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
    # kohya's own key first when the two disagree
    ({"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sd1"),
    ({"ss_v2": "False"}, "sd1"),  # kohya metadata without an SD2/SDXL mark: SD1, the webui's rule
    ({"ss_network_dim": "4"}, "sd1"),
    ({"ss_v2": "False", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"format": "pt"}, None),
    ({}, None),
])
def test_from_metadata(metadata, arch):
    assert from_metadata(metadata) == arch


def _lora(out, inn):
    return build_module({"lora_up.weight": torch.zeros(out, 2), "lora_down.weight": torch.zeros(2, inn)})


def test_unet_structure_is_read_from_diffusers_and_ldm_names_alike():
    for key in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_input_blocks_1_1_proj_in",
                "lora_unet_up_blocks_3_resnets_0_conv1", "lora_unet_output_blocks_10_0_skip_connection"):
        arch, why = explain_architecture({key: _lora(4, 4), "lora_te1_text_model_encoder_layers_0_mlp_fc1":
                                          _lora(4, 4)}, {})
        assert arch == "sd1" and key in why
    arch, why = explain_architecture({"lora_unet_up_blocks_0_attentions_0_transformer_blocks_3_attn1_to_q":
                                      _lora(4, 4)}, {})
    assert arch == "sdxl" and "SDXL UNet structure" in why


def test_arch_names():
    assert ARCH_NAMES == {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
