"""GLoRA: both on-disk layouts, told apart by shapes, against their formulas."""
import pytest
import torch

from lib_tune.algos import build_module
from lib_tune.algos.base import UnsupportedModuleError

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def test_old_layout_is_webui_formula_and_ignores_alpha():
    W = rnd(5, 4)
    a1, a2, b1, b2 = rnd(2, 4), rnd(4, 2, seed=1), rnd(2, 4, seed=2), rnd(5, 2, seed=3)
    m = build_module({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(1.0)})
    assert m.kind == "glora" and not m.new_layout and m.in_dim() == 4
    torch.testing.assert_close(m.delta(W, multiplier=0.5)[0], (b2 @ b1 + W @ a2 @ a1) * 0.5)


def test_new_layout_linear_scales_by_alpha_over_rank():
    W = rnd(5, 4)
    a1, a2, b1, b2 = rnd(4, 2), rnd(2, 4, seed=1), rnd(5, 2, seed=2), rnd(2, 4, seed=3)
    m = build_module({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(1.0)})
    assert m.new_layout and m.dim == 2 and m.in_dim() == 4
    torch.testing.assert_close(m.delta(W)[0], (b1 @ b2 + W @ a1 @ a2) * 0.5)


@pytest.mark.parametrize("new", [False, True])
def test_square_targets_pick_the_lower_rank_reading(new):
    W = rnd(6, 6)
    if new:
        a1, a2, b1, b2 = rnd(6, 2), rnd(2, 6, seed=1), rnd(6, 2, seed=2), rnd(2, 6, seed=3)
        expect = (b1 @ b2 + W @ a1 @ a2) * (4.0 / 2)
    else:
        a1, a2, b1, b2 = rnd(2, 6), rnd(6, 2, seed=1), rnd(2, 6, seed=2), rnd(6, 2, seed=3)
        expect = b2 @ b1 + W @ a2 @ a1
    m = build_module({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(4.0)})
    assert m.new_layout is new
    torch.testing.assert_close(m.delta(W)[0], expect)


def test_new_layout_conv():
    W = rnd(5, 3, 3, 3)
    a1, a2, b1, b2 = rnd(3, 2, 1, 1), rnd(2, 3, 1, 1, seed=1), rnd(5, 2, 1, 1, seed=2), rnd(2, 3, 3, 3, seed=3)
    dw, _ = build_module({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2}).delta(W)
    A = a1[:, :, 0, 0] @ a2[:, :, 0, 0]  # [in, in]: mixes input channels of W
    expect = torch.einsum("oikl,ij->ojkl", W, A) + torch.einsum("or,rikl->oikl", b1[:, :, 0, 0], b2)
    torch.testing.assert_close(dw, expect)


def test_shapes_fitting_no_layout_are_refused():
    with pytest.raises(UnsupportedModuleError, match="neither layout"):
        build_module({"a1.weight": rnd(3, 2), "a2.weight": rnd(5, 4), "b1.weight": rnd(5, 2), "b2.weight": rnd(2, 4)})
