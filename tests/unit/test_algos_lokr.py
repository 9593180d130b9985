"""LoKr deltas against the Kronecker product written out index by index."""
import torch

from lib_tune.algos import build_module
from lib_tune.algos.lokr import factorization

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def kron_loops(w1, w2):
    """dW[a*P + i, b*Q + j, ...] = w1[a, b] * w2[i, j, ...]."""
    A, B = w1.shape
    P, Q = w2.shape[:2]
    out = torch.zeros(A * P, B * Q, *w2.shape[2:], dtype=D)
    for a in range(A):
        for b in range(B):
            out[a * P:(a + 1) * P, b * Q:(b + 1) * Q] = w1[a, b] * w2
    return out


def test_full_factors_have_scale_one_whatever_alpha_says():
    w1, w2 = rnd(2, 3), rnd(3, 2, seed=1)
    m = build_module({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)})
    assert m.kind == "lokr" and m.dim is None and m.in_dim() == 6
    torch.testing.assert_close(m.delta(rnd(6, 6, seed=2), multiplier=0.5)[0], kron_loops(w1, w2) * 0.5)


def test_low_rank_factors_scale_by_alpha_over_rank():
    w1a, w1b, w2a, w2b = rnd(2, 1), rnd(1, 3, seed=1), rnd(3, 2, seed=2), rnd(2, 2, seed=3)
    m = build_module({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b,
                      "alpha": torch.tensor(1.0)})
    assert m.dim == 2  # w2_b's rank wins, as in the webui
    torch.testing.assert_close(m.delta(rnd(6, 6, seed=4))[0], kron_loops(w1a @ w1b, w2a @ w2b) * 0.5)


def test_conv_full_w2_spreads_the_kernel():
    w1, w2 = rnd(2, 2), rnd(3, 2, 3, 3, seed=1)
    dw, _ = build_module({"lokr_w1": w1, "lokr_w2": w2}).delta(rnd(6, 4, 3, 3, seed=2))
    torch.testing.assert_close(dw, kron_loops(w1, w2))


def test_conv_low_rank_w2_in_lycoris_layout():
    w1, w2a, w2b = rnd(2, 2), rnd(3, 2, seed=1), rnd(2, 2, 3, 3, seed=2)
    dw, _ = build_module({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b,
                          "alpha": torch.tensor(2.0)}).delta(rnd(6, 4, 3, 3, seed=3))
    w2 = torch.einsum("pr,rqkl->pqkl", w2a, w2b)
    torch.testing.assert_close(dw, kron_loops(w1, w2))


def test_conv_tucker_w2():
    w1, t2, w2a, w2b = rnd(2, 2), rnd(2, 2, 3, 3, seed=1), rnd(2, 3, seed=2), rnd(2, 2, seed=3)
    dw, _ = build_module({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "lokr_t2": t2,
                          "alpha": torch.tensor(1.0)}).delta(rnd(6, 4, 3, 3, seed=4))
    w2 = torch.zeros(3, 2, 3, 3, dtype=D)
    for k in range(3):
        for l in range(3):
            w2[:, :, k, l] = w2a.T @ t2[:, :, k, l] @ w2b
    torch.testing.assert_close(dw, kron_loops(w1, w2) * 0.5)


def test_factorization_matches_lycoris_table():
    # values printed by lycoris-lora 4.1.3's lycoris.functional.general.factorization (its docstring's table is
    # stale for 360 at factor -1)
    cases = {(128, -1): (8, 16), (250, -1): (10, 25), (360, -1): (18, 20), (1024, -1): (32, 32), (127, 4): (1, 127),
             (512, 4): (4, 128), (360, 8): (8, 45), (1024, 16): (16, 64), (320, -1): (16, 20), (768, -1): (24, 32),
             (640, -1): (20, 32), (1280, -1): (32, 40), (64, -1): (8, 8), (32, -1): (4, 8), (256, 8): (8, 32)}
    for (dim, factor), want in cases.items():
        assert factorization(dim, factor) == want, (dim, factor)
