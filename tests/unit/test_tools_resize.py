"""lib_tune.tools.resize: the QR-core SVD, kohya's dynamic rank rules, the output file (issue 17)."""
import ast
import json
import os
import tarfile

import pytest
import torch

from lib_tune.formats.read import load_adapter
from lib_tune.formats.write import save_adapter
from lib_tune.tools.cli import main as cli_main
from lib_tune.tools.lowrank import factor_svd, pick_rank
from lib_tune.tools.resize import resize_adapter, resize_file
from lib_tune.tools.sdxl_shapes import SDXL_METADATA, random_lora, sdxl_lora_shapes

KOHYA_TAR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "kohya-src", "sd-scripts.tar.gz")

SD1_SHAPES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 48),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (96, 32),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (64, 16),
    "lora_unet_down_blocks_0_resnets_0_conv1": (24, 16, 3, 3),  # LoCon 3x3
}


def _delta(module):
    """The built-in's delta on a zero weight of the target's shape, flattened to [out, in * kh * kw]."""
    up, down = module.w("lora_up.weight"), module.w("lora_down.weight")
    target = torch.zeros((up.shape[0],) + tuple(down.shape[1:]))
    return module.calc_updown(target)[0].reshape(up.shape[0], -1).double()


def _write(tmp_path, name, tensors, metadata=None):
    path = str(tmp_path / name)
    save_adapter(path, tensors, metadata or {"ss_network_module": "networks.lora"})
    return path


@pytest.mark.parametrize("m,n,r", [(40, 30, 6), (7, 50, 12), (64, 64, 64), (33, 5, 4)])
def test_core_singular_values_equal_a_dense_svd(m, n, r):
    g = torch.Generator().manual_seed(m * n + r)
    up, down = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    u, s, vh = factor_svd(up, down, dtype=torch.float64)
    dense = torch.linalg.svdvals(up @ down)
    k = min(m, n, r)
    assert s.shape == (k,)
    torch.testing.assert_close(s, dense[:k], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u * s @ vh, up @ down, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


def test_resize_to_full_rank_is_the_identity_within_fp32_rounding(tmp_path):
    src = _write(tmp_path, "a.safetensors", random_lora(SD1_SHAPES, rank=8, alpha=4.0, seed=1))
    adapter = load_adapter(src)
    out = str(tmp_path / "b.safetensors")
    report = resize_file(src, out, rank=8)
    back = load_adapter(out)
    assert set(back.modules) == set(adapter.modules)
    for name, module in adapter.modules.items():
        a, b = _delta(module), _delta(back.modules[name])
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), name
        assert back.modules[name].calc_scale() == pytest.approx(module.calc_scale())
        assert back.modules[name].w("lora_down.weight").shape == module.w("lora_down.weight").shape
    assert report.overall == pytest.approx(1.0, abs=1e-6)
    assert all(abs(m.retention - 1) < 1e-6 and m.method == "qr-core" for m in report.modules)


def test_fixed_resize_keeps_the_scale_and_reports_the_truncation(tmp_path):
    src = _write(tmp_path, "a.safetensors", random_lora(SD1_SHAPES, rank=8, alpha=4.0, seed=2, decay=0.3))
    adapter = load_adapter(src)
    tensors, meta, report = resize_adapter(adapter, rank=3)
    # kohya's convention: alpha = old scale x new rank (resize_lora.py rank_resize), so alpha/rank stays 0.5
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(tensors[name + ".alpha"]) == pytest.approx(0.5 * 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (3, 16, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (24, 3, 1, 1)
    for m in report.modules:  # retention = ||best rank-3 approximation|| / ||delta|| from a dense SVD
        s = torch.linalg.svdvals(_delta(adapter.modules[m.name]))
        assert m.retention == pytest.approx(float(s[:3].norm() / s.norm()), rel=1e-5)
        assert 0 <= m.retention <= 1
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    saved = json.loads(meta["ss_tune_resize"])
    assert saved["overall_retention"] == pytest.approx(report.overall, abs=1e-6)
    assert set(saved["modules"]) == set(adapter.modules)


def _kohya_rules(tmp_path):
    """kohya's own index_sv_* and rank_resize, taken from networks/resize_lora.py of the tarball (its module imports
    kohya's library, which needs diffusers/transformers; these functions need only torch)."""
    if not os.path.exists(KOHYA_TAR):
        pytest.skip("../shared/kohya-src/sd-scripts.tar.gz is not here")
    with tarfile.open(KOHYA_TAR) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("networks/resize_lora.py"))
        source = tar.extractfile(member).read().decode()
    tree = ast.parse(source)
    keep = {"index_sv_cumulative", "index_sv_fro", "index_sv_ratio", "rank_resize", "MIN_SV"}
    tree.body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in keep)
                 or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in keep for t in n.targets))]
    ns = {"torch": torch}
    exec(compile(tree, "resize_lora.py", "exec"), ns)
    return ns["rank_resize"]


@pytest.mark.parametrize("method,params", [("sv_fro", (0.5, 0.9, 0.99)), ("sv_ratio", (2.0, 10.0, 100.0)),
                                           ("sv_cumulative", (0.5, 0.9, 0.99))])
def test_dynamic_methods_pick_kohyas_ranks(tmp_path, method, params):
    rank_resize = _kohya_rules(tmp_path)
    g = torch.Generator().manual_seed(7)
    for trial in range(6):
        m, n, r = 48 + trial, 40, 16
        up = torch.randn(m, r, generator=g) * torch.exp(-0.25 * trial * torch.arange(r))
        down = torch.randn(r, n, generator=g)
        dense = torch.linalg.svd(up @ down)[1]  # what kohya computes: the dense matrix's SVD (extract_linear)
        _, s, _ = factor_svd(up, down)
        for p in params:
            for cap in (4, 12, 64):
                want = rank_resize(dense, cap, method, p)["new_rank"]
                assert pick_rank(s, cap, method, p, full_length=min(m, n)) == want, (trial, p, cap)


def test_dynamic_resize_writes_per_module_ranks(tmp_path):
    src = _write(tmp_path, "a.safetensors", random_lora(SD1_SHAPES, rank=12, alpha=12.0, seed=3, decay=0.4))
    tensors, meta, report = resize_adapter(load_adapter(src), rank=10, method="sv_fro", param=0.9)
    assert meta["ss_network_dim"] == "Dynamic"
    for m in report.modules:
        assert 1 <= m.new_rank <= 10
        assert tensors[m.name + ".lora_down.weight"].shape[0] == m.new_rank
        assert m.retention >= 0.9 - 1e-6 or m.new_rank == 10
        assert float(tensors[m.name + ".alpha"]) == pytest.approx(m.new_rank)  # scale 1 kept


def test_loha_and_full_are_reduced_by_a_randomized_svd(tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {"lora_unet_a_loha.hada_w1_a": torch.randn(64, 4, generator=g),
               "lora_unet_a_loha.hada_w1_b": torch.randn(4, 48, generator=g),
               "lora_unet_a_loha.hada_w2_a": torch.randn(64, 4, generator=g),
               "lora_unet_a_loha.hada_w2_b": torch.randn(4, 48, generator=g),
               "lora_unet_a_loha.alpha": torch.tensor(2.0),
               "lora_unet_a_full.diff": torch.randn(40, 36, generator=g)}
    adapter = load_adapter(_write(tmp_path, "h.safetensors", tensors))
    out, meta, report = resize_adapter(adapter, rank=16)
    by = {m.name: m for m in report.modules}
    for name in ("lora_unet_a_loha", "lora_unet_a_full"):
        delta = adapter.modules[name].calc_updown(torch.zeros(64 if "loha" in name else 40, 48 if "loha" in name else 36))[0]
        s = torch.linalg.svdvals(delta.double())
        assert by[name].retention == pytest.approx(float(s[:16].norm() / s.norm()), rel=1e-3)
        assert by[name].method in ("randomized", "exact")
        approx = out[name + ".lora_up.weight"].double() @ out[name + ".lora_down.weight"].double()
        best = float((s[16:] ** 2).sum() ** 0.5)
        assert float((approx - delta.double()).norm()) <= best * 1.05 + 1e-6 * float(delta.norm())  # fp32
    # LoHa's full rank is 16 (4 x 4): rank 16 keeps it whole
    assert by["lora_unet_a_loha"].retention == pytest.approx(1.0, abs=1e-4)


def test_sdxl_real_shapes_run_and_load_back(tmp_path):
    shapes = sdxl_lora_shapes()
    # a slice of every kind of SDXL layer (640/1280 attention, 2048 context, GEGLU, both text encoders)
    pick = {k: v for k, v in shapes.items() if "transformer_blocks_0_" in k or "layers_0_" in k or "layers_31_" in k}
    assert {(640, 2048), (1280, 2048), (10240, 1280), (1280, 5120), (3072, 768), (1280, 1280)} <= set(pick.values())
    src = _write(tmp_path, "xl.safetensors", random_lora(pick, rank=16, alpha=8, seed=5, dtype=torch.float16),
                 SDXL_METADATA)
    out = str(tmp_path / "xl8.safetensors")
    report = resize_file(src, out, rank=8)
    back = load_adapter(out)
    assert back.architecture == "sdxl" and set(back.modules) == set(pick)
    assert back.modules[next(iter(pick))].w("lora_up.weight").dtype == torch.float16  # the input's dtype
    assert 0 < report.overall < 1 and all(m.new_rank == 8 for m in report.modules)
    print("\n" + report.table())


def test_cli_refuses_to_overwrite_and_prints_the_table(tmp_path, capsys):
    src = _write(tmp_path, "a.safetensors", random_lora(SD1_SHAPES, rank=8, alpha=8.0, seed=6))
    out = tmp_path / "b.safetensors"
    assert cli_main(["resize", src, str(out), "--rank", "4"]) == 0
    text = capsys.readouterr().out
    assert "overall Frobenius retention" in text and "lora_te_text_model_encoder_layers_0_mlp_fc1" in text
    before = out.read_bytes()
    assert cli_main(["resize", src, str(out), "--rank", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli_main(["resize", src, str(tmp_path / "c.safetensors"), "--rank", "8", "--method", "sv_fro",
                     "--param", "0.9"]) == 0
