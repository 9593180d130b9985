"""Full (stored delta) and Norm (stored norm-parameter deltas)."""
import torch

from lib_tune.algos import build_module

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def test_full_returns_the_stored_delta_and_bias_times_multiplier():
    diff, diff_b = rnd(4, 3), rnd(4, seed=1)
    m = build_module({"diff": diff, "diff_b": diff_b, "alpha": torch.tensor(9.0)})
    assert m.kind == "full" and m.in_dim() == 3
    dw, db = m.delta(rnd(4, 3, seed=2), multiplier=0.25)
    torch.testing.assert_close(dw, diff * 0.25)  # no rank: alpha does not scale
    torch.testing.assert_close(db, diff_b * 0.25)


def test_norm_adds_weight_and_bias():
    w, b = rnd(6), rnd(6, seed=1)
    m = build_module({"w_norm": w, "b_norm": b})
    assert m.kind == "norm"
    dw, db = m.delta(rnd(6, seed=2), multiplier=2.0)
    torch.testing.assert_close(dw, w * 2)
    torch.testing.assert_close(db, b * 2)


def test_bias_extra_is_added_into_the_delta_before_scaling():
    up, down, extra = rnd(3, 1), rnd(1, 2, seed=1), rnd(3, 2, seed=2)
    dw, _ = build_module({"lora_up.weight": up, "lora_down.weight": down, "bias": extra,
                          "alpha": torch.tensor(0.5)}).delta(rnd(3, 2, seed=3))
    torch.testing.assert_close(dw, (up @ down + extra) * 0.5)
