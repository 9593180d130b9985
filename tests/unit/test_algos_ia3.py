"""(IA)^3: a per-channel gain on the target's rows or columns."""
import torch

from lib_tune.algos import build_module

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def test_rows_when_not_on_input():
    W, g = rnd(4, 3), rnd(4, seed=1)
    dw, _ = build_module({"weight": g, "on_input": torch.tensor(False)}).delta(W, multiplier=0.5)
    expect = torch.stack([W[i] * g[i] for i in range(4)]) * 0.5
    torch.testing.assert_close(dw, expect)


def test_columns_when_on_input():
    W, g = rnd(4, 3), rnd(3, seed=1)
    m = build_module({"weight": g, "on_input": torch.tensor(True)})
    assert m.kind == "ia3" and m.in_dim() == 3
    expect = torch.stack([W[:, j] * g[j] for j in range(3)], dim=1)
    torch.testing.assert_close(m.delta(W)[0], expect)


def test_conv_targets_scale_channels():
    W, g_out, g_in = rnd(4, 3, 3, 3), rnd(4, seed=1), rnd(3, seed=2)
    out = build_module({"weight": g_out, "on_input": torch.tensor(0)}).delta(W)[0]
    inp = build_module({"weight": g_in, "on_input": torch.tensor(1)}).delta(W)[0]
    torch.testing.assert_close(out, W * g_out[:, None, None, None])
    torch.testing.assert_close(inp, W * g_in[None, :, None, None])


def test_weight_without_on_input_is_not_ia3():
    from lib_tune.algos.ia3 import Ia3Module
    assert not Ia3Module.accepts({"weight": rnd(4)})
