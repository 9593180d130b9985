"""lib_tune.layer_names on the real layer lists: the tiny SD1 / SD2-v / SDXL models of the contract layer, and SD1.5's
and SDXL's full-size UNets and text encoders built from the real ldm / sgm / transformers / open_clip classes on the
meta device (their real shapes and names, no memory, no weights).

Every rule is checked both ways on every layer an adapter can change: layer -> kohya key -> the same layer (and
packed-attention part), ldm path -> diffusers path -> the same ldm path (the built-in's upsampler rule excepted,
and only where it does miss), and the LBW block of a layer equals the block of each of its keys."""
import json
import re
from unittest import mock

import pytest
import torch
from torch import nn

from lib_tune.inject import find_targets
from lib_tune.inject.mapping import place, weight_of
from lib_tune.layer_names import (KOHYA_UNET, UNET, convert_key, diffusers_path, kohya_keys, layer_block, lbw_block,
                                  ldm_path)
from lib_tune.tiny.tokenizer import write_clip_text_folder
from tests.contract.conftest import _require_libraries
from tests.contract.test_inject_builtin_names import builtin  # noqa: F401  (fixture: the webui's own functions)
from tests.fixtures import adapters, tiny_models

KINDS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
#: layers no kohya key reaches through the built-in's rules: a lone CLIP's / OpenCLIP's layers outside its encoder
#: layers (the built-in converts only `lora_te_text_model_encoder_layers_*`; SDXL's CLIP-L is reached by its
#: `lora_te1_text_model` fallback, so its final_layer_norm has a name)
UNNAMED = re.compile(r"^(transformer_text_model_final_layer_norm|(1_)?model_ln_final)$")
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}


# ---- full-size models on the meta device -------------------------------------------------------------------------
def _clip_l_folder(tmp_path_factory):
    folder = write_clip_text_folder(tmp_path_factory.mktemp("clip-l") / "clip")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(CLIP_L)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def _on_meta(instantiate, unet: dict, **encoders):
    """An object with the attributes find_targets reads (model.diffusion_model, cond_stage_model / conditioner),
    built on the meta device."""
    import open_clip
    from omegaconf import OmegaConf

    create = open_clip.create_model_and_transforms

    def create_on_meta(arch, *args, **kwargs):  # sgm's OpenCLIP embedder moves the model to the CPU
        return create(arch, *args, **{**kwargs, "device": torch.device("meta")})

    with torch.device("meta"), tiny_models.offline_text_encoders(), tiny_models.no_default_init(), \
            mock.patch.object(open_clip, "create_model_and_transforms", create_on_meta):
        model = nn.Module()
        model.model = nn.Module()
        model.model.diffusion_model = instantiate(OmegaConf.create(unet))
        for name, config in encoders.items():
            setattr(model, name, instantiate(OmegaConf.create(config)))
    return model


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """SD1.5 as configs/v1-inference.yaml: ldm UNet (320 channels, four levels) and CLIP ViT-L/14's text model."""
    _require_libraries()
    pytest.importorskip("ldm", reason="contract layer: Stability's ldm (stable-diffusion-sdkit) is not installed")
    from ldm.util import instantiate_from_config

    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
        context_dim=768, use_checkpoint=False, legacy=False)}
    clip = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": _clip_l_folder(tmp_path_factory)}}
    return _on_meta(instantiate_from_config, unet, cond_stage_model=clip)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """SDXL base as generative-models' sd_xl_base.yaml: sgm UNet (transformer depths 1/2/10), CLIP ViT-L/14 and
    OpenCLIP ViT-bigG/14 text encoders, three size/crop embedders."""
    _require_libraries()
    tiny_models.sgm_path()
    tiny_models.import_sgm()
    from sgm.util import instantiate_from_config

    emb = "sgm.modules.encoders.modules."
    unet = {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(
        adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4,
        model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
        num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
        transformer_depth=[1, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax", legacy=False)}
    embedders = [
        {"is_trainable": False, "input_key": "txt", "target": emb + "FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": 11, "version": _clip_l_folder(tmp_path_factory)}},
        {"is_trainable": False, "input_key": "txt", "target": emb + "FrozenOpenCLIPEmbedder2",
         "params": {"arch": "ViT-bigG-14", "version": None, "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
    ] + [{"is_trainable": False, "input_key": key, "target": emb + "ConcatTimestepEmbedderND",
          "params": {"outdim": 256}} for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    conditioner = {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}}
    return _on_meta(instantiate_from_config, unet, conditioner=conditioner)


MODELS = {"tiny_ldm_sd1": "sd1", "tiny_ldm_sd2v": "sd2", "tiny_sgm_sdxl": "sdxl", "sd15": "sd1", "sdxl": "sdxl"}


@pytest.fixture(params=list(MODELS))
def named(request):
    """(targets, architecture) of one model."""
    targets = find_targets(request.getfixturevalue(request.param))
    assert targets.architecture == MODELS[request.param]
    return targets, MODELS[request.param], request.param


def adaptable(targets):
    """Every (layer, part) an adapter can change: weighted Linear/Conv2d/GroupNorm/LayerNorm layers, and the four
    parts of a packed attention (its out_proj is part "out", not a layer of its own)."""
    out_projs = {id(m.out_proj) for m in targets.values() if isinstance(m, nn.MultiheadAttention)}
    for name, m in targets.items():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            yield from ((name, p) for p in ("q", "k", "v", "out"))
        elif isinstance(m, KINDS) and id(m) not in out_projs and weight_of(m, None) is not None:
            yield name, None


# ---- the tests -------------------------------------------------------------------------------------------------
def test_every_layer_has_a_kohya_key_that_leads_back(named):
    targets, arch, _ = named
    unnamed, n = [], 0
    for layer, part in adaptable(targets):
        n += 1
        keys = kohya_keys(layer, part, arch)
        back = [k for k in keys if place(k, targets)[:2] == (layer, part)]
        if not back:
            unnamed.append(layer)
            continue
        assert layer.startswith(UNET) or keys[0].startswith("lora_te"), (layer, keys)
    assert n > 100 and all(UNNAMED.match(layer) for layer in unnamed), unnamed


def test_every_key_converts_as_the_builtin_converts_it(named, builtin):  # noqa: F811
    targets, arch, _ = named
    keys = [k for layer, part in adaptable(targets) for k in kohya_keys(layer, part, arch)]
    for key in keys:
        assert convert_key(key, arch == "sd2") == builtin.convert_diffusers_name_to_compvis(key, arch == "sd2"), key
    assert len(keys) > 100


def test_diffusers_and_ldm_paths_are_inverse(named):
    targets, arch, _ = named
    seen = 0
    for layer, _ in adaptable(targets):
        if not layer.startswith(UNET):
            continue
        path = layer[len(UNET):]
        d = diffusers_path(path)
        oracle = adapters.diffusers_key(KOHYA_UNET + path)  # the fixtures' own inverse of the built-in's rules
        if d is None:
            assert oracle is None and re.match(r"(label_emb|out_0)", path), path
            continue
        seen += 1
        if ldm_path(d) == path:
            assert oracle == KOHYA_UNET + d, path
            if arch != "sdxl":  # kohya's SD1/SD2 name is the diffusers one wherever it leads back
                assert kohya_keys(layer, None, arch)[0] == KOHYA_UNET + d
        else:  # the built-in's rule puts level 0's upsampler after a resnet: not so when that level has attention
            assert (path, d) == ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv") and oracle is None
            assert place(KOHYA_UNET + d, targets)[0] != layer
    assert seen > 50


def test_lbw_block_of_a_layer_equals_the_block_of_its_keys(named):
    targets, arch, name = named
    blocks = set()
    for layer, part in adaptable(targets):
        block = layer_block(layer, arch)
        blocks.add(block)
        for key in kohya_keys(layer, part, arch):
            if place(key, targets)[:2] == (layer, part):
                assert lbw_block(key, arch) == block, (key, layer)
    levels = {"sd15": 4, "sdxl": 3}.get(name, 3 if arch == "sdxl" else 2)
    n = 3 * levels  # input and output blocks
    want = {"BASE", "M00", None} | {f"IN{i:02d}" for i in range(n)} | {f"OUT{i:02d}" for i in range(n)}
    assert blocks == want
