"""LoHa deltas against explicit formulas."""
import pytest
import torch

from lib_tune.algos import build_module
from lib_tune.algos.base import UnsupportedModuleError

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def entrywise(a, b):
    """(a @ b)[i, j] written as explicit sums."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=D)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = sum(a[i, k] * b[k, j] for k in range(a.shape[1]))
    return out


def test_linear_hadamard_of_two_products_times_alpha_over_rank():
    w = {"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 3, seed=1), "hada_w2_a": rnd(4, 2, seed=2),
         "hada_w2_b": rnd(2, 3, seed=3), "alpha": torch.tensor(1.0)}
    m = build_module(w)
    assert m.kind == "loha" and m.dim == 2 and m.in_dim() == 3
    dw, _ = m.delta(rnd(4, 3, seed=4), multiplier=2.0)
    expect = entrywise(w["hada_w1_a"], w["hada_w1_b"]) * entrywise(w["hada_w2_a"], w["hada_w2_b"]) * 0.5 * 2.0
    torch.testing.assert_close(dw, expect)


def test_conv_with_flattened_b_factors_reshapes_to_the_kernel():
    w = {"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 3 * 9, seed=1), "hada_w2_a": rnd(4, 2, seed=2),
         "hada_w2_b": rnd(2, 3 * 9, seed=3)}
    dw, _ = build_module(w).delta(rnd(4, 3, 3, 3, seed=4))
    expect = (entrywise(w["hada_w1_a"], w["hada_w1_b"]) * entrywise(w["hada_w2_a"], w["hada_w2_b"])).reshape(4, 3, 3, 3)
    torch.testing.assert_close(dw, expect)


def test_tucker_factors_per_kernel_position():
    t1, t2 = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3, seed=1)
    w = {"hada_w1_a": rnd(2, 5, seed=2), "hada_w1_b": rnd(2, 4, seed=3), "hada_w2_a": rnd(2, 5, seed=4),
         "hada_w2_b": rnd(2, 4, seed=5), "hada_t1": t1, "hada_t2": t2, "alpha": torch.tensor(4.0)}
    dw, _ = build_module(w).delta(rnd(5, 4, 3, 3, seed=6))
    expect = torch.zeros(5, 4, 3, 3, dtype=D)
    for k in range(3):
        for l in range(3):
            f1 = w["hada_w1_a"].T @ t1[:, :, k, l] @ w["hada_w1_b"]
            f2 = w["hada_w2_a"].T @ t2[:, :, k, l] @ w["hada_w2_b"]
            expect[:, :, k, l] = f1 * f2 * 2.0
    torch.testing.assert_close(dw, expect)


def test_bad_shapes_are_refused():
    with pytest.raises(UnsupportedModuleError):
        build_module({"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(3, 3), "hada_w2_a": rnd(4, 2), "hada_w2_b": rnd(2, 3)})
