"""LoRA/LoCon deltas against explicit formulas, and the low-rank bypass against F.linear/F.conv2d with dW."""
import pytest
import torch
import torch.nn.functional as F

from lib_tune.algos import build_module
from lib_tune.algos.base import UnsupportedModuleError
from lib_tune.algos.lora import LoraModule

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=D)


def outer_sum(up, down):
    """dW as the sum over the rank of outer products (independent of a matmul)."""
    return sum(torch.outer(up[:, k], down[k]) for k in range(up.shape[1]))


def test_linear_delta_is_scaled_sum_of_outer_products():
    up, down, W = rnd(6, 3), rnd(3, 5, seed=1), rnd(6, 5, seed=2)
    m = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5)})
    assert isinstance(m, LoraModule) and m.dim == 3 and m.in_dim() == 5
    dw, db = m.delta(W, multiplier=0.8)
    torch.testing.assert_close(dw, outer_sum(up, down) * (1.5 / 3) * 0.8)
    assert db is None


def test_scale_rules_alpha_missing_and_explicit_scale():
    up, down, W = rnd(4, 2), rnd(2, 4, seed=1), rnd(4, 4, seed=2)
    plain = build_module({"lora_up.weight": up, "lora_down.weight": down}).delta(W)[0]
    torch.testing.assert_close(plain, outer_sum(up, down))
    scaled = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(8.0),
                           "scale": torch.tensor(0.25)}).delta(W)[0]
    torch.testing.assert_close(scaled, outer_sum(up, down) * 0.25)


def test_peft_names_equal_kohya_names():
    up, down, W = rnd(4, 2), rnd(2, 4, seed=1), rnd(4, 4, seed=2)
    a = build_module({"lora_B.weight": up, "lora_A.weight": down}).delta(W)[0]
    b = build_module({"lora_up.weight": up, "lora_down.weight": down}).delta(W)[0]
    assert torch.equal(a, b)


def test_conv3x3_delta_acts_like_down_then_up_convolutions():
    up, down, W = rnd(6, 2, 1, 1), rnd(2, 4, 3, 3, seed=1), rnd(6, 4, 3, 3, seed=2)
    dw, _ = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}).delta(W)
    x = rnd(1, 4, 7, 7, seed=3)
    expect = F.conv2d(F.conv2d(x, down, padding=1), up) * 0.5
    torch.testing.assert_close(F.conv2d(x, dw, padding=1), expect)


def test_conv1x1_with_2d_factors_gets_the_conv_shape():
    up, down, W = rnd(6, 2), rnd(2, 4, seed=1), rnd(6, 4, 1, 1, seed=2)
    dw, _ = build_module({"lora_up.weight": up, "lora_down.weight": down}).delta(W)
    assert dw.shape == (6, 4, 1, 1)
    torch.testing.assert_close(dw[:, :, 0, 0], outer_sum(up, down))


def test_tucker_mid_matches_explicit_loops():
    up, down, mid, W = rnd(5, 2, 1, 1), rnd(2, 3, 1, 1, seed=1), rnd(2, 2, 3, 3, seed=2), rnd(5, 3, 3, 3, seed=3)
    dw, _ = build_module({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid}).delta(W)
    expect = torch.zeros(5, 3, 3, 3, dtype=D)
    for i in range(5):
        for j in range(3):
            for n in range(2):
                for m in range(2):
                    expect[i, j] += mid[n, m] * up[i, n, 0, 0] * down[m, j, 0, 0]
    torch.testing.assert_close(dw, expect)


def test_dyn_dim_truncates_the_rank_but_keeps_alpha_over_full_rank():
    up, down, W = rnd(4, 3), rnd(3, 4, seed=1), rnd(4, 4, seed=2)
    m = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)})
    torch.testing.assert_close(m.delta(W, dyn_dim=2)[0], outer_sum(up[:, :2], down[:2]) * 1.0)


def test_shapes_that_do_not_chain_are_refused():
    with pytest.raises(UnsupportedModuleError, match="do not chain"):
        build_module({"lora_up.weight": rnd(4, 3), "lora_down.weight": rnd(2, 4)})


def test_cast_like_builtin_casts_only_the_factors():
    m = build_module({"lora_up.weight": rnd(4, 2).float(), "lora_down.weight": rnd(2, 4).float(),
                      "alpha": torch.tensor(1.0), "dora_scale": rnd(1, 4).float()})
    m.cast_like_builtin(torch.bfloat16)
    assert m.weights["lora_up.weight"].dtype == m.weights["lora_down.weight"].dtype == torch.bfloat16
    assert m.dora_scale.dtype == torch.float32


def test_bypass_linear_equals_f_linear_with_delta():
    up, down = rnd(6, 3), rnd(3, 5, seed=1)
    layer = torch.nn.Linear(5, 6).to(D)
    m = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)})
    x = rnd(2, 7, 5, seed=4)
    dw, _ = m.delta(layer.weight.data, multiplier=0.6)
    torch.testing.assert_close(m.bypass(x, layer, multiplier=0.6), F.linear(x, dw))


@pytest.mark.parametrize("mid", [False, True])
def test_bypass_conv_equals_f_conv2d_with_delta(mid):
    layer = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1).to(D)
    w = {"lora_up.weight": rnd(6, 2, 1, 1), "alpha": torch.tensor(1.0)}
    if mid:
        w.update({"lora_down.weight": rnd(2, 4, 1, 1, seed=1), "lora_mid.weight": rnd(2, 2, 3, 3, seed=2)})
    else:
        w["lora_down.weight"] = rnd(2, 4, 3, 3, seed=1)
    m = build_module(w)
    x = rnd(1, 4, 9, 9, seed=5)
    dw, _ = m.delta(layer.weight.data)
    torch.testing.assert_close(m.bypass(x, layer), F.conv2d(x, dw, stride=2, padding=1))


def test_bypass_refuses_dora():
    m = build_module({"lora_up.weight": rnd(4, 2), "lora_down.weight": rnd(2, 4), "dora_scale": rnd(1, 4)})
    assert not m.can_bypass
    with pytest.raises(ValueError):
        m.bypass(rnd(1, 4), torch.nn.Linear(4, 4).to(D))


def test_one_rank_cut_for_delta_bypass_and_factors():
    """DyLoRA's `dyn=` cuts the same ranks in the three low-rank forms (cut_rank)."""
    up, down = rnd(6, 4), rnd(4, 5, seed=1)
    layer = torch.nn.Linear(5, 6).to(D)
    m = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)})
    dw, _ = m.delta(layer.weight.data, multiplier=0.5, dyn_dim=2)
    f_up, f_down = m.linear_factors(2)
    torch.testing.assert_close(f_up @ f_down * m.calc_scale() * 0.5, dw)
    x = rnd(3, 5, seed=2)
    torch.testing.assert_close(m.bypass(x, layer, multiplier=0.5, dyn_dim=2), F.linear(x, dw))


def test_can_bypass_on_which_layers():
    lin = build_module({"lora_up.weight": rnd(6, 2), "lora_down.weight": rnd(2, 4)})
    assert lin.can_bypass_on(torch.nn.Linear(4, 6)) and not lin.can_bypass_on(torch.nn.Linear(9, 6))
    k3 = build_module({"lora_up.weight": rnd(6, 2, 1, 1), "lora_down.weight": rnd(2, 4, 3, 3)})
    assert k3.can_bypass_on(torch.nn.Conv2d(4, 6, 3)) and not k3.can_bypass_on(torch.nn.Conv2d(4, 6, 1))
    assert not k3.can_bypass_on(torch.nn.Conv2d(9, 6, 3))  # inpainting conv_in: merged, zero-padded
    assert not k3.can_bypass_on(torch.nn.Conv2d(4, 6, 3, groups=2))
    dora = build_module({"lora_up.weight": rnd(6, 2), "lora_down.weight": rnd(2, 4), "dora_scale": rnd(1, 4)})
    assert not dora.can_bypass_on(torch.nn.Linear(4, 6))
