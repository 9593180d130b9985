"""DoRA (dora_scale): weight decomposition along the axis that dora_scale's shape names."""
import torch

from lib_tune.algos import build_module

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def lora(up, down, **extra):
    return build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), **extra})


def test_input_axis_legacy_layout():
    W, up, down, s = rnd(4, 3), rnd(4, 2, seed=1), rnd(2, 3, seed=2), rnd(1, 3, seed=3).abs()
    merged = W + up @ down * 0.5
    cols = torch.stack([merged[:, j] * s[0, j] / merged[:, j].norm() for j in range(3)], dim=1)
    dw, _ = lora(up, down, dora_scale=s).delta(W, multiplier=0.7)
    torch.testing.assert_close(dw, (cols - W) * 0.7)


def test_output_axis_lycoris_and_peft_layouts():
    W, up, down = rnd(4, 3), rnd(4, 2, seed=1), rnd(2, 3, seed=2)
    s = rnd(4, seed=3).abs()
    merged = W + up @ down * 0.5
    rows = torch.stack([merged[i] * s[i] / merged[i].norm() for i in range(4)])
    for shape in ((4, 1), (4,)):
        dw, _ = lora(up, down, dora_scale=s.reshape(shape)).delta(W)
        torch.testing.assert_close(dw, rows - W)


def test_conv_input_axis():
    W, up, down, s = rnd(4, 3, 3, 3), rnd(4, 2, 1, 1, seed=1), rnd(2, 3, 3, 3, seed=2), rnd(1, 3, 1, 1, seed=3).abs()
    dw_plain, _ = lora(up, down).delta(W)
    merged = W + dw_plain
    expect = torch.stack([merged[:, j] * s[0, j, 0, 0] / merged[:, j].norm() for j in range(3)], dim=1) - W
    torch.testing.assert_close(lora(up, down, dora_scale=s).delta(W)[0], expect)
