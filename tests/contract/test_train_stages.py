"""Staged plans on the real ldm / sgm classes (tiny): the named selectors pick exactly the intended kohya module
names on SD1 and SDXL, and a three-stage SDXL run writes one file with the union of the stages' modules at mixed
ranks that our reader loads and maps onto the model without loss."""
import json
import re

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_tune.formats import load_adapter
from lib_tune.inject import map_adapter
from lib_tune.train.config import TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.loop import Trainer
from lib_tune.train.model import DiffusionModel
from lib_tune.train.stages import candidates, select, unused_last_layers
from tests.unit.train_fakes import model_fingerprint

ARCHS = ("tiny_ldm_sd1", "tiny_ldm_sd2v", "tiny_sgm_sdxl")
_MID_SD = {"lora_unet_mid_block_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out"}
MID = {"tiny_ldm_sd1": _MID_SD, "tiny_ldm_sd2v": _MID_SD,
       "tiny_sgm_sdxl": {"lora_unet_middle_block_1_proj_in", "lora_unet_middle_block_1_proj_out"}}
#: trailing text-encoder layers whose output never reaches the conditioning, per the models' yaml: SD1 CLIP "last";
#: SD2 OpenCLIP "penultimate" (the last resblock is not run); SDXL CLIP-L hidden_states[-2] (layer_idx 1 of 2
#: layers in the tiny model), SDXL OpenCLIP penultimate for crossattn but the last layer for the pooled vector
UNUSED = {"tiny_ldm_sd1": {"lora_te_": 0}, "tiny_ldm_sd2v": {"lora_te_": 1},
          "tiny_sgm_sdxl": {"lora_te1_": 1, "lora_te2_": 0}}


def _encoders(sd_model):
    """(kohya prefix, number of transformer layers) of each text encoder, read from the module tree."""
    if hasattr(sd_model, "conditioner"):
        e = sd_model.conditioner.embedders
        return [("lora_te1_", len(e[0].transformer.text_model.encoder.layers)),
                ("lora_te2_", len(e[1].model.transformer.resblocks))]
    enc = sd_model.cond_stage_model
    if hasattr(enc, "transformer"):
        return [("lora_te_", len(enc.transformer.text_model.encoder.layers))]
    return [("lora_te_", len(enc.model.transformer.resblocks))]


@pytest.mark.parametrize("arch", ARCHS)
def test_selectors_pick_the_intended_modules(arch, request):
    sd_model = request.getfixturevalue(arch)
    dm = DiffusionModel(sd_model)
    universe = candidates(dm.targets, conv=False)
    keys = [t.key for t in universe]
    assert len(keys) == len(set(keys))

    assert unused_last_layers(dm) == UNUSED[arch]

    def pick(selector):
        return {t.key for t in select(dm.targets, universe, selector, False, UNUSED[arch])}

    n_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in sd_model.model.diffusion_model.modules())
    assert n_blocks > 2
    assert pick("mid_proj") == MID[arch]
    cross = pick("cross_attn")
    assert len(cross) == 4 * n_blocks
    assert cross == {k for k in keys if re.fullmatch(r"lora_unet_.+_attn2_(to_q|to_k|to_v|to_out_0)", k)}
    attn = pick("unet_attn")
    assert attn == cross | {k.replace("_attn2_", "_attn1_") for k in cross}
    assert attn == pick("attn")  # the targets preset of the same name
    te = pick("te")
    assert te == {k for k in keys if k.startswith("lora_te")}
    last2 = set()
    for prefix, n in _encoders(sd_model):
        own = {k for k in te if k.startswith(prefix)}
        assert own, prefix
        layer = {k: int(re.search(r"_layers_(\d+)_", k)[1]) for k in own}
        assert max(layer.values()) == n - 1
        used = n - UNUSED[arch][prefix]  # layers 0 .. used-1 reach the conditioning
        mine = {k for k in own if used - 2 <= layer[k] <= used - 1}
        # attention q/k/v/out and mlp fc1/fc2 of each of the last two used layers (one if only one is used)
        assert len(mine) == 6 * min(2, used), prefix
        last2 |= mine
    assert pick("te_last2") == last2
    if arch != "tiny_ldm_sd1":
        assert last2 != te  # more layers than the selector takes (or an unused last one)
    # glob patterns over kohya names; a packed OpenCLIP attention part brings its three siblings
    got = pick(["lora_unet_*attn2_to_k", "lora_te*_layers_0_mlp_fc1"])
    assert got == {k for k in cross if k.endswith("_to_k")} | {k for k in te if k.endswith("_layers_0_mlp_fc1")}
    if arch == "tiny_sgm_sdxl":
        got = pick(["lora_te2_text_model_encoder_layers_3_self_attn_q_proj"])
        assert got == {f"lora_te2_text_model_encoder_layers_3_self_attn_{p}_proj" for p in ("q", "k", "v", "out")}
    assert pick(["lora_unet_nothing*"]) == set()


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    for i in range(2):
        im = Image.new("RGB", (64, 64), (90, 30, 140))
        ImageDraw.Draw(im).rectangle([8 + 5 * i, 10, 32 + 5 * i, 34], fill=(250, 220, 40))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a yellow square", encoding="utf-8")
    return folder


def test_sdxl_three_stage_plan_writes_one_mixed_rank_file(tiny_sgm_sdxl, concept, tmp_path):
    before = model_fingerprint(tiny_sgm_sdxl)
    stages = [{"targets": "mid_proj", "steps": 2, "network_dim": 8, "network_alpha": 4.0},
              {"targets": "te_last2", "steps": 2, "network_dim": 2, "network_alpha": 1.0, "te_lr": 1e-2},
              {"targets": "cross_attn", "steps": 2, "network_dim": 4, "network_alpha": 4.0}]
    cfg = TrainConfig.from_dict(dict(dataset=str(concept), method="lora", output_name="plan", trigger="sqtok",
                                     output_dir=str(tmp_path), unet_lr=1e-2, te_lr=1e-3, stages=stages,
                                     lr_scheduler="constant", resolution=64, min_bucket=64, save_dtype="fp32",
                                     save_state=False, seed=0))
    dm = DiffusionModel(tiny_sgm_sdxl)
    seen = []

    class Cb:
        def on_stage(self, index, stage):
            seen.append((index, stage.name, stage.start))
    trainer = Trainer(cfg, dm, prepare_data(cfg, dm), Cb())
    result = trainer.run()
    assert model_fingerprint(tiny_sgm_sdxl) == before
    assert seen == [(0, "mid_proj", 0), (1, "te_last2", 2), (2, "cross_attn", 4)]
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))

    tensors = load_file(result.adapter_path)
    rank = {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")}
    s1, s2, s3 = trainer.plan
    assert set(rank) == set(s1.keys) | set(s2.keys) | set(s3.keys)
    assert {rank[k] for k in s1.keys} == {8} and {rank[k] for k in s2.keys} == {2} and {rank[k] for k in s3.keys} == {4}
    assert any(k.startswith("lora_te1_") for k in s2.keys) and any(k.startswith("lora_te2_") for k in s2.keys)
    for s in (s1, s2, s3):  # every stage learned (up matrices start at zero)
        assert all(float(tensors[k + ".lora_up.weight"].abs().sum()) > 0 for k in s.keys), s.name
    with safe_open(result.adapter_path, "pt") as f:
        meta = f.metadata()
    assert [s["name"] for s in json.loads(meta["ss_tune_stages"])] == ["mid_proj", "te_last2", "cross_attn"]
    assert meta["ss_network_dim"] == "8"
    # lib_tune.formats insists on real SDXL text-encoder widths, as in test_train_learning: read it in two parts
    unet = str(tmp_path / "unet.safetensors")
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, unet,
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    loaded = load_adapter(unet)
    assert set(loaded.modules) == set(s1.keys) | set(s3.keys)
    mapped = map_adapter(loaded, dm.targets)
    assert not mapped.unmapped and not mapped.partial and len(mapped.entries) == len(loaded.modules)
    # the whole file (te included) maps onto the model through the trainer's own mapping
    assert len(trainer.adapter.mapped.entries) == len(rank) and not trainer.adapter.mapped.partial
