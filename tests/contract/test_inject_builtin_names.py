"""Our layer names and key conversion against the webui's own code: the two pure functions of the built-in Lora
(networks.py convert_diffusers_name_to_compvis and assign_network_names_to_compvis_modules) are read from a webui
v1.10.1 source (SD_WEBUI_PATH, the test host's webui, or the shared source tarball) and run on the tiny models.
Skipped when no webui source is around."""
import ast
import os
import re
import tarfile
import types
from pathlib import Path

import pytest
import torch

from lib_tune.inject import find_targets
from lib_tune.layer_names import convert_key

REPO = Path(__file__).resolve().parents[2]
NETWORKS = "extensions-builtin/Lora/networks.py"
WANTED = {"re_digits", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis",
          "assign_network_names_to_compvis_modules"}


def _networks_source():
    roots = [os.environ.get("SD_WEBUI_PATH"), str(Path.home() / ".cache/sd-webui-tune/webui-host/webui")]
    for root in filter(None, roots):
        p = Path(root) / NETWORKS
        if p.is_file():
            return p.read_text()
    for shared in (os.environ.get("TUNE_SHARED"), REPO.parent / "shared", "/work/shared"):
        tb = Path(shared or "/nonexistent") / "webui-src/webui.tar.gz"
        if tb.is_file():
            with tarfile.open(tb) as tar:
                for name in ("./" + NETWORKS, NETWORKS):
                    try:
                        return tar.extractfile(name).read().decode()
                    except KeyError:
                        continue
    return None


@pytest.fixture(scope="module")
def builtin():
    """The built-in's functions, with `shared` replaced by a namespace whose sd_model the test sets."""
    src = _networks_source()
    if src is None:
        pytest.skip("no webui v1.10.1 source (set SD_WEBUI_PATH or provide ../shared/webui-src/webui.tar.gz)")
    tree = ast.parse(src)
    keep = []
    for node in tree.body:
        names = {node.name} if isinstance(node, ast.FunctionDef) else \
            {t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}
        if names & WANTED:
            keep.append(node)
    assert len(keep) == len(WANTED), "the webui source changed shape"
    shared = types.SimpleNamespace(sd_model=None)
    ns = {"re": re, "shared": shared}
    exec(compile(ast.Module(body=keep, type_ignores=[]), NETWORKS, "exec"), ns)
    return types.SimpleNamespace(shared=shared, **{k: ns[k] for k in WANTED})


class Hijacked(torch.nn.Module):
    """The webui wraps each text encoder it hijacks (sd_hijack.py); the built-in names only wrapped embedders."""

    def __init__(self, inner):
        super().__init__()
        self.wrapped = inner


def _builtin_names(builtin, model):
    """Run the built-in's naming on the model (as hijacked), then undo what it writes onto the modules."""
    embedders = getattr(getattr(model, "conditioner", None), "embedders", None)
    saved = list(embedders) if embedders is not None else None
    try:
        if embedders is not None:
            for i in range(2):  # the two CLIP text encoders; the size/crop embedders are not wrapped
                embedders[i] = Hijacked(embedders[i])
        model.is_sdxl = embedders is not None
        builtin.shared.sd_model = model
        builtin.assign_network_names_to_compvis_modules(model)
        mapping = dict(model.network_layer_mapping)
    finally:
        for m in model.modules():
            m.__dict__.pop("network_layer_name", None)
        for attr in ("network_layer_mapping", "is_sdxl"):
            model.__dict__.pop(attr, None)
        if saved is not None:
            for i, e in enumerate(saved):
                embedders[i] = e
    return mapping


@pytest.mark.parametrize("fixture", ["tiny_ldm_sd1", "tiny_ldm_sd2v", "tiny_sgm_sdxl"])
def test_every_builtin_layer_name_is_a_target(builtin, fixture, request):
    model = request.getfixturevalue(fixture)
    ours = find_targets(model)
    theirs = _builtin_names(builtin, model)
    theirs.pop("", None)  # the root module (the built-in lets the UNet's root overwrite the TE's); never a layer
    assert set(theirs) == set(ours)
    assert all(theirs[k] is ours[k] for k in theirs)
    assert ours.architecture == {"tiny_ldm_sd1": "sd1", "tiny_ldm_sd2v": "sd2", "tiny_sgm_sdxl": "sdxl"}[fixture]
    assert ours.architecture != "sd2" or "model_transformer_resblocks" in theirs


KEYS = [
    "lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0",
    "lora_unet_down_blocks_3_resnets_1_conv2", "lora_unet_down_blocks_0_resnets_0_conv_shortcut",
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj", "lora_unet_down_blocks_1_downsamplers_0_conv",
    "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_mid_block_resnets_1_norm2",
    "lora_unet_up_blocks_0_resnets_2_norm1", "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
    "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_up_blocks_2_upsamplers_0_conv",
    "lora_te_text_model_encoder_layers_11_mlp_fc1", "lora_te_text_model_encoder_layers_3_mlp_fc2",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_7_layer_norm1",
    "lora_te2_text_model_encoder_layers_31_mlp_fc1", "lora_te2_text_model_encoder_layers_2_mlp_fc2",
    "lora_te2_text_model_encoder_layers_5_self_attn_out_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "oft_unet_output_blocks_3_1_proj_out",
    "lycoris_down_blocks_1_attentions_0_proj_in", "lora_unet_conv_in_extra", "",
]


@pytest.mark.parametrize("is_sd2", [False, True])
def test_key_conversion_equals_builtin(builtin, is_sd2):
    for key in KEYS:
        assert convert_key(key, is_sd2) == builtin.convert_diffusers_name_to_compvis(key, is_sd2), key
