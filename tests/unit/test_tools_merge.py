"""lib_tune.tools.merge: concat (exact), svd (QR core over stacked factors), block weights, the CLI (issue 17)."""
import json

import pytest
import torch

from lib_tune.formats.read import load_adapter
from lib_tune.formats.write import save_adapter
from lib_tune.prompt.blocks import block_multiplier, parse_block_weights
from lib_tune.tools.cli import main as cli_main, parse_source
from lib_tune.tools.lowrank import ToolError
from lib_tune.tools.merge import MergeInput, merge_adapters, merge_files
from lib_tune.tools.sdxl_shapes import SDXL_METADATA, random_lora, sdxl_lora_shapes

SHAPES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (40, 40),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (40, 48),
    "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_ff_net_2": (24, 96),
    "lora_te_text_model_encoder_layers_3_mlp_fc1": (64, 16),
    "lora_unet_down_blocks_0_resnets_0_conv1": (24, 16, 3, 3),
}


def _delta(module):
    up, down = module.w("lora_up.weight"), module.w("lora_down.weight")
    target = torch.zeros((up.shape[0],) + tuple(down.shape[1:]))
    return module.calc_updown(target)[0].reshape(up.shape[0], -1).double()


def _files(tmp_path, n=3, rank=(4, 6, 8), meta=None):
    paths = []
    for i in range(n):
        shapes = dict(SHAPES) if i != 1 else {k: v for k, v in SHAPES.items() if "fc1" not in k}  # a missing module
        path = str(tmp_path / f"in{i}.safetensors")
        save_adapter(path, random_lora(shapes, rank=rank[i], alpha=float(i + 1), seed=10 + i), meta or {})
        paths.append(path)
    return paths


def _weighted_sum(adapters, weights, name, factors=None):
    total = None
    for j, (a, w) in enumerate(zip(adapters, weights)):
        if name in a.modules:
            d = _delta(a.modules[name]) * w * (1.0 if factors is None else factors[j])
            total = d if total is None else total + d
    return total


def test_concat_equals_the_weighted_sum_of_deltas(tmp_path):
    adapters = [load_adapter(p) for p in _files(tmp_path)]
    weights = [0.7, -0.4, 1.3]
    tensors, meta, report = merge_adapters([MergeInput(a, w) for a, w in zip(adapters, weights)], mode="concat")
    out = str(tmp_path / "cat.safetensors")
    save_adapter(out, tensors, meta)
    merged = load_adapter(out)
    for name in SHAPES:
        want = _weighted_sum(adapters, weights, name)
        got = _delta(merged.modules[name])
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), name
        rank = sum(a.modules[name].dim for a in adapters if name in a.modules)
        assert merged.modules[name].dim == rank and merged.modules[name].calc_scale() == 1.0
    assert report.overall == 1.0 and meta["ss_network_dim"] == "Dynamic"
    assert json.loads(meta["ss_tune_merge"])["params"]["mode"] == "concat"


def test_svd_merge_at_full_rank_equals_the_sum_and_reports_retention(tmp_path):
    adapters = [load_adapter(p) for p in _files(tmp_path)]
    weights = [1.0, 0.5, -0.25]
    inputs = [MergeInput(a, w) for a, w in zip(adapters, weights)]
    tensors, meta, report = merge_adapters(inputs, mode="svd", rank=18)
    for m in report.modules:
        up = tensors[m.name + ".lora_up.weight"].double()
        down = tensors[m.name + ".lora_down.weight"].double()
        got = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        want = _weighted_sum(adapters, weights, m.name)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), m.name
        assert m.retention == pytest.approx(1.0, abs=1e-6) and m.method == "qr-core"
    _, _, low = merge_adapters(inputs, mode="svd", rank=3)
    for m in low.modules:
        s = torch.linalg.svdvals(_weighted_sum(adapters, weights, m.name))
        assert 0 <= m.retention <= 1
        assert m.retention == pytest.approx(float(s[:3].norm() / s.norm()), rel=1e-5)
    assert 0 < low.overall < 1


def test_block_weights_scale_each_inputs_blocks(tmp_path):
    adapters = [load_adapter(p) for p in _files(tmp_path, meta={"ss_network_module": "networks.lora"})]
    assert adapters[0].architecture == "sd1"
    lbw = "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"  # BASE only (26 values)
    inputs = [MergeInput(adapters[0], 1.0, lbw), MergeInput(adapters[1], 0.5), MergeInput(adapters[2], 1.0, "ALL")]
    tensors, _, _ = merge_adapters(inputs, mode="concat")
    bw = parse_block_weights(lbw)
    for name in SHAPES:
        f = [block_multiplier(bw, name, "sd1"), 1.0, 1.0]
        want = _weighted_sum(adapters, [1.0, 0.5, 1.0], name, f)
        up = tensors[name + ".lora_up.weight"].double()
        got = up.reshape(up.shape[0], -1) @ tensors[name + ".lora_down.weight"].double().reshape(up.shape[1], -1)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), name


def test_mismatched_shapes_and_unknown_modes_are_refused(tmp_path):
    a = str(tmp_path / "a.safetensors")
    b = str(tmp_path / "b.safetensors")
    save_adapter(a, random_lora({"lora_unet_x": (8, 8)}, 2, 2.0, seed=1))
    save_adapter(b, random_lora({"lora_unet_x": (8, 16)}, 2, 2.0, seed=2))
    with pytest.raises(ToolError, match="shapes differ"):
        merge_adapters([MergeInput(load_adapter(a)), MergeInput(load_adapter(b))])
    with pytest.raises(ToolError, match="mode"):
        merge_adapters([MergeInput(load_adapter(a))], mode="add")
    with pytest.raises(ToolError, match="rank"):
        merge_adapters([MergeInput(load_adapter(a))], mode="svd")


def test_loha_inputs_merge_by_svd_and_not_by_concat(tmp_path):
    g = torch.Generator().manual_seed(3)
    h = str(tmp_path / "h.safetensors")
    save_adapter(h, {"lora_unet_x.hada_w1_a": torch.randn(32, 2, generator=g),
                     "lora_unet_x.hada_w1_b": torch.randn(2, 24, generator=g),
                     "lora_unet_x.hada_w2_a": torch.randn(32, 2, generator=g),
                     "lora_unet_x.hada_w2_b": torch.randn(2, 24, generator=g)})
    lo = str(tmp_path / "l.safetensors")
    save_adapter(lo, random_lora({"lora_unet_x": (32, 24)}, 4, 4.0, seed=4))
    inputs = [MergeInput(load_adapter(h), 0.5), MergeInput(load_adapter(lo), 2.0)]
    with pytest.raises(ToolError, match="concat"):
        merge_adapters(inputs, mode="concat")
    tensors, _, report = merge_adapters(inputs, mode="svd", rank=8)  # 4 (LoHa 2x2) + 4: full rank
    want = inputs[0].adapter.modules["lora_unet_x"].calc_updown(torch.zeros(32, 24))[0].double() * 0.5 \
        + _delta(inputs[1].adapter.modules["lora_unet_x"]) * 2.0
    got = tensors["lora_unet_x.lora_up.weight"].double() @ tensors["lora_unet_x.lora_down.weight"].double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert report.modules[0].retention == pytest.approx(1.0, abs=1e-5)


def test_sdxl_real_shapes_merge_and_load_back(tmp_path):
    shapes = {k: v for k, v in sdxl_lora_shapes().items()
              if "transformer_blocks_1_" in k or "layers_5_" in k or "proj_in" in k}
    assert (1280, 2048) in shapes.values() and (640, 2048) in shapes.values()
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"xl{i}.safetensors"))
        save_adapter(paths[-1], random_lora(shapes, rank=8, alpha=8.0, seed=i, dtype=torch.float16), SDXL_METADATA)
    out = str(tmp_path / "xl.safetensors")
    report = merge_files(out, [(paths[0], 1.0, None), (paths[1], 0.5, "1,1,1,1,1,0,0,0,0,0,0,1")], mode="svd",
                         rank=12)
    back = load_adapter(out)
    assert back.architecture == "sdxl" and set(back.modules) == set(shapes)
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(0 <= m.retention <= 1 and m.new_rank == 12 for m in report.modules)
    assert any(m.retention < 1 for m in report.modules) and any(m.retention > 0.9999 for m in report.modules)


def test_cli_merge(tmp_path, capsys):
    paths = _files(tmp_path)
    out = tmp_path / "m.safetensors"
    assert cli_main(["merge", str(out), f"{paths[0]}:0.5", f"{paths[1]}:1", paths[2], "--mode", "svd",
                     "--rank", "4"]) == 0
    text = capsys.readouterr().out
    assert "overall Frobenius retention" in text
    assert cli_main(["merge", str(out), paths[0], "--mode", "concat"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert parse_source("a:b.safetensors:0.5:1,0,0,0,0,0,0,0,0,0,0,0") == ("a:b.safetensors", 0.5,
                                                                           "1,0,0,0,0,0,0,0,0,0,0,0")
    assert parse_source("x.safetensors") == ("x.safetensors", 1.0, None)
