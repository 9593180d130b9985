"""OFT / BOFT: the rotation built independently (Cayley by solve, block-diagonal and butterfly matrices)."""
import torch

from lib_tune.algos import build_module

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def cayley(b):
    q = b - b.transpose(-1, -2)
    eye = torch.eye(b.shape[-1], dtype=D)
    # (I + Q)(I - Q)^-1 == ((I - Q)^-T (I + Q)^T)^T, computed by a solve instead of an inverse
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)


def test_cayley_blocks_rotate_rows_blockwise():
    blocks, W = rnd(3, 2, 2) * 0.3, rnd(6, 4, seed=1)
    m = build_module({"oft_blocks": blocks})
    assert m.kind == "oft"
    r = cayley(blocks)
    assert torch.allclose(r[0].T @ r[0], torch.eye(2, dtype=D))
    big = torch.block_diag(*[r[k].T for k in range(3)])  # the built-in applies R^T per block
    torch.testing.assert_close(m.delta(W, multiplier=0.5)[0], (big @ W - W) * 0.5)


def test_constraint_shrinks_q_to_alpha_times_out_dim():
    blocks, W = rnd(2, 2, 2), rnd(4, 3, seed=1)
    alpha = 0.01
    q = blocks - blocks.transpose(-1, -2)
    shrunk = q * (alpha * 4 / q.norm())  # the Frobenius norm of Q over all blocks becomes alpha * out_dim
    expect_r = cayley(shrunk / 2)  # cayley() rebuilds Q = B - B^T, so B = Q / 2 gives Q back
    big = torch.block_diag(*[expect_r[k].T for k in range(2)])
    dw = build_module({"oft_blocks": blocks, "alpha": torch.tensor(alpha, dtype=D)}).delta(W)[0]
    torch.testing.assert_close(dw, big @ W - W)


def test_old_oft_diag_is_r_itself_and_rescale_multiplies_rows():
    r, W, rescale = rnd(2, 3, 3), rnd(6, 2, 3, 3, seed=1), rnd(6, 1, 1, 1, seed=2)
    dw = build_module({"oft_diag": r, "rescale": rescale}).delta(W)[0]
    big = torch.block_diag(r[0].T, r[1].T)
    expect = rescale * torch.einsum("ab,bikl->aikl", big, W) - W
    torch.testing.assert_close(dw, expect)


def butterfly_perm(n, b, i):
    """Permutation matrix P with (P x) = x reordered (c g k) -> (c k g), g = 2, k = 2^i * b/2."""
    k = 2 ** i * (b // 2)
    idx = torch.arange(n).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
    return torch.eye(n, dtype=D)[idx]


def test_boft_is_a_product_of_permuted_block_rotations():
    m_stages, n_blocks, b = 2, 4, 2
    blocks, W, rescale = rnd(m_stages, n_blocks, b, b) * 0.3, rnd(8, 3, seed=1), rnd(8, 1, seed=2)
    mod = build_module({"oft_blocks": blocks, "rescale": rescale})
    assert mod.kind == "oft" and mod.is_boft
    r = cayley(blocks)
    M = torch.eye(8, dtype=D)
    for i in range(m_stages):
        P = butterfly_perm(8, b, i)
        M = P.T @ torch.block_diag(*r[i]) @ P @ M
    torch.testing.assert_close(mod.delta(W)[0], rescale * (M @ W) - W)


def test_multiplier_is_linear_on_the_delta_and_scale_key_is_ignored():
    blocks, W = rnd(2, 2, 2) * 0.3, rnd(4, 4, seed=1)
    full = build_module({"oft_blocks": blocks}).delta(W)[0]
    half = build_module({"oft_blocks": blocks, "scale": torch.tensor(9.0)}).delta(W, multiplier=0.5)[0]
    torch.testing.assert_close(half, full * 0.5)
