"""Our deltas against lycoris-lora's own code (the independent oracle). Runs only where lycoris is installed
(.venv-oracle, torch 2.14).

Scaling conventions bridged here: LyCORIS functions take `gamma` = the scale (alpha/rank for LoRA/LoHa), except
lokr.diff_weight, which divides gamma by its own idea of the rank (w1a.shape[1], else w2a.shape[1]); OFT takes
the absolute norm bound (alpha * out_dim); DoRA's weight_decompose works on the merged weight at multiplier 1.
Where the webui and LyCORIS disagree (old GLoRA layout and its ignored alpha, multiplier applied to the DoRA
scale instead of the delta), we follow the webui and nothing is compared here.
"""
import pytest

lycoris = pytest.importorskip("lycoris")

import torch  # noqa: E402
from lycoris.functional import boft, diag_oft, locon, loha, lokr  # noqa: E402
from lycoris.functional.general import add_scaled, apply_dora_scale, weight_decompose  # noqa: E402
from lycoris.modules.glora import _glora_weight  # noqa: E402
from lycoris.modules.ia3 import _ia3_weight  # noqa: E402

from lib_tune.algos import build_module  # noqa: E402

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 31 + sum(shape)), dtype=D)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["linear", "conv3x3", "tucker"])
def test_lora(case):
    W = rnd(6, 4) if case == "linear" else rnd(6, 4, 3, 3)
    down = {"linear": rnd(2, 4), "conv3x3": rnd(2, 4, 3, 3), "tucker": rnd(2, 4, 1, 1)}[case]
    up = rnd(6, 2, seed=1) if case == "linear" else rnd(6, 2, 1, 1, seed=1)
    mid = rnd(2, 2, 3, 3, seed=2) if case == "tucker" else None
    w = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}
    if mid is not None:
        w["lora_mid.weight"] = mid
    close(build_module(w).delta(W, multiplier=0.7)[0], locon.diff_weight(down, up, mid, gamma=1.5 * 0.7))


@pytest.mark.parametrize("conv", [False, True])
def test_lora_bypass(conv):
    if conv:
        layer = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1).to(D)
        down, up, x = rnd(2, 4, 3, 3), rnd(6, 2, 1, 1, seed=1), rnd(1, 4, 8, 8, seed=2)
        extra = {"stride": (2, 2), "padding": (1, 1)}
    else:
        layer = torch.nn.Linear(4, 6).to(D)
        down, up, x, extra = rnd(2, 4), rnd(6, 2, seed=1), rnd(3, 4, seed=2), {}
    m = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)})
    expect = locon.bypass_forward_diff(x, None, down, up, None, gamma=0.5, extra_args=extra)
    close(m.bypass(x, layer), expect)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(tucker):
    if tucker:
        W, a1, b1, a2, b2 = rnd(5, 4, 3, 3), rnd(2, 5), rnd(2, 4, seed=1), rnd(2, 5, seed=2), rnd(2, 4, seed=3)
        t1, t2 = rnd(2, 2, 3, 3, seed=4), rnd(2, 2, 3, 3, seed=5)
    else:
        W, a1, b1, a2, b2 = rnd(5, 4), rnd(5, 2), rnd(2, 4, seed=1), rnd(5, 2, seed=2), rnd(2, 4, seed=3)
        t1 = t2 = None
    w = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "alpha": torch.tensor(1.0)}
    if tucker:
        w.update(hada_t1=t1, hada_t2=t2)
    # LyCORIS: w1d = down = hada_w1_b, w1u = up = hada_w1_a
    close(build_module(w).delta(W)[0], loha.diff_weight(b1, a1, b2, a2, t1, t2, gamma=0.5))


LOKR_CASES = {
    "full": (rnd(6, 4), dict(lokr_w1=rnd(2, 2), lokr_w2=rnd(3, 2, seed=1))),
    "low-rank w2": (rnd(6, 4), dict(lokr_w1=rnd(2, 2), lokr_w2_a=rnd(3, 1, seed=1), lokr_w2_b=rnd(1, 2, seed=2))),
    "both low-rank": (rnd(6, 4), dict(lokr_w1_a=rnd(2, 1), lokr_w1_b=rnd(1, 2, seed=1), lokr_w2_a=rnd(3, 1, seed=2),
                                      lokr_w2_b=rnd(1, 2, seed=3))),
    "conv full": (rnd(6, 4, 3, 3), dict(lokr_w1=rnd(2, 2), lokr_w2=rnd(3, 2, 3, 3, seed=1))),
    "conv low-rank": (rnd(6, 4, 3, 3), dict(lokr_w1=rnd(2, 2), lokr_w2_a=rnd(3, 2, seed=1),
                                            lokr_w2_b=rnd(2, 2, 3, 3, seed=2))),
    "conv tucker": (rnd(6, 4, 3, 3), dict(lokr_w1=rnd(2, 2), lokr_w2_a=rnd(2, 3, seed=1), lokr_w2_b=rnd(2, 2, seed=2),
                                          lokr_t2=rnd(2, 2, 3, 3, seed=3))),
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr(case):
    W, w = LOKR_CASES[case]
    m = build_module({**w, "alpha": torch.tensor(1.0)})
    ours = m.delta(W)[0]
    ly_rank = w["lokr_w1_a"].shape[1] if "lokr_w1_a" in w else w["lokr_w2_a"].shape[1] if "lokr_w2_a" in w else None
    gamma = m.calc_scale() * ly_rank if ly_rank else 1.0
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    close(ours, lokr.diff_weight(*(w.get(k) for k in keys), gamma=gamma).reshape(W.shape))


# OFT in fp32: LyCORIS (like the webui) inverts in fp32 and cannot mix that with fp64 blocks
@pytest.mark.parametrize("alpha,rescale", [(None, False), (1e-3, False), (0.0, True)])
def test_diag_oft(alpha, rescale):
    W, blocks = rnd(6, 4, 3, 3).float(), rnd(3, 2, 2, seed=1).float() * 0.3
    rs = rnd(6, 1, 1, 1, seed=2).float() if rescale else None
    w = {"oft_blocks": blocks}
    if alpha is not None:
        w["alpha"] = torch.tensor(alpha)
    if rs is not None:
        w["rescale"] = rs
    constraint = None if alpha is None else alpha * 6
    expect = diag_oft.diff_weight(W, blocks, rs, constraint=constraint)
    torch.testing.assert_close(build_module(w).delta(W)[0], expect, rtol=1e-5, atol=1e-6)  # eps placement differs


@pytest.mark.parametrize("alpha", [None, 1e-3])
def test_boft(alpha):
    W, blocks, rs = rnd(8, 3).float(), rnd(3, 4, 2, 2, seed=1).float() * 0.3, rnd(8, 1, seed=2).float()
    w = {"oft_blocks": blocks, "rescale": rs}
    if alpha is not None:
        w["alpha"] = torch.tensor(alpha)
    expect = boft.diff_weight(W, blocks, rs, constraint=None if alpha is None else alpha * 8)
    torch.testing.assert_close(build_module(w).delta(W)[0], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv,on_input", [(False, False), (False, True), (True, False), (True, True)])
def test_ia3(conv, on_input):
    W = rnd(6, 4, 3, 3) if conv else rnd(6, 4)
    n = 4 if on_input else 6
    g = rnd(1, n, 1, 1, seed=1) if conv else rnd(n, seed=1)  # LyCORIS's stored shapes
    ours = build_module({"weight": g, "on_input": torch.tensor(int(on_input))}).delta(W, multiplier=0.5)[0]
    close(ours, _ia3_weight(W, g, on_input, 0.5, True))


@pytest.mark.parametrize("conv", [False, True])
def test_glora_new_layout(conv):
    if conv:
        W, a1, a2 = rnd(5, 4, 3, 3), rnd(4, 2, 1, 1), rnd(2, 4, 1, 1, seed=1)
        b1, b2 = rnd(5, 2, 1, 1, seed=2), rnd(2, 4, 3, 3, seed=3)
    else:
        W, a1, a2, b1, b2 = rnd(5, 4), rnd(4, 2), rnd(2, 4, seed=1), rnd(5, 2, seed=2), rnd(2, 4, seed=3)
    m = build_module({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(1.0)})
    assert m.new_layout
    close(m.delta(W)[0], _glora_weight(W, a1, a2, b1, b2, None, 0.5))


def test_full():
    W, diff = rnd(4, 3), rnd(4, 3, seed=1)
    close(build_module({"diff": diff}).delta(W, multiplier=0.3)[0], add_scaled(W, diff, 0.3) - W)


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_weight_decompose(wd_on_out):
    W, up, down = rnd(5, 4), rnd(5, 2, seed=1), rnd(2, 4, seed=2)
    scale = (rnd(5, 1, seed=3) if wd_on_out else rnd(1, 4, seed=3)).abs()
    m = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": scale})
    merged = W + locon.diff_weight(down, up, None, gamma=0.5)
    torch.testing.assert_close(m.delta(W)[0], weight_decompose(merged, scale, 1, wd_on_out) - W, rtol=1e-9,
                               atol=1e-9)  # LyCORIS adds eps to the norm


def test_dora_multiplier_scales_the_delta_like_kohya():
    W, up, down, scale = rnd(5, 4), rnd(5, 2, seed=1), rnd(2, 4, seed=2), rnd(1, 4, seed=3).abs()
    m = build_module({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": scale})
    expect = apply_dora_scale(W, locon.diff_weight(down, up, None, gamma=0.5), scale, 0.6) - W
    close(m.delta(W, multiplier=0.6)[0], expect)
