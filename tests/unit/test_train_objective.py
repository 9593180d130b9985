"""Noise, targets, min-SNR weights (vs a hand computation), loss weighting, priors and fixed-noise evaluation."""
import contextlib

import pytest
import torch

from lib_tune.train.objective import (ObjectiveConfig, add_noise, diffusion_loss, min_snr_weight, sample_noise,
                                      sample_timesteps, snr, target_for)

ALPHAS = torch.tensor([0.99, 0.9, 0.5, 0.1, 0.01])


def test_min_snr_weight_matches_hand_computation():
    t = torch.tensor([0, 1, 2, 3, 4])
    gamma = 5.0
    snrs = [a / (1 - a) for a in (0.99, 0.9, 0.5, 0.1, 0.01)]  # 99, 9, 1, 0.111, 0.0101
    eps_want = [min(s, gamma) / s for s in snrs]
    v_want = [min(s, gamma) / (s + 1) for s in snrs]
    assert snr(t, ALPHAS).tolist() == pytest.approx(snrs, rel=1e-5)
    assert min_snr_weight(t, ALPHAS, gamma, "eps").tolist() == pytest.approx(eps_want, rel=1e-5)
    assert min_snr_weight(t, ALPHAS, gamma, "v").tolist() == pytest.approx(v_want, rel=1e-5)
    # hand values at gamma 5: eps weights 5/99, 5/9, 1, 1, 1; v weights 5/100, 5/10, 0.5, 0.1, 0.01
    assert min_snr_weight(t, ALPHAS, gamma, "eps").tolist() == pytest.approx([5 / 99, 5 / 9, 1, 1, 1], rel=1e-5)
    assert min_snr_weight(t, ALPHAS, gamma, "v").tolist() == pytest.approx([0.05, 0.5, 0.5, 0.1, 0.01], rel=1e-4)


def test_noising_and_targets():
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 3])
    a = ALPHAS[t].reshape(2, 1, 1, 1)
    assert torch.allclose(add_noise(x0, eps, t, ALPHAS), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.equal(target_for("eps", x0, eps, t, ALPHAS), eps)
    v = target_for("v", x0, eps, t, ALPHAS)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    # v and x_t give back x0: x0 = sqrt(a) x_t - sqrt(1-a) v
    x_t = add_noise(x0, eps, t, ALPHAS)
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-6)
    with pytest.raises(ValueError):
        target_for("x0", x0, eps, t, ALPHAS)


def test_draws_follow_the_generator_and_offset_is_per_channel():
    lat = torch.zeros(3, 4, 5, 5)
    n1 = sample_noise(lat, torch.Generator().manual_seed(7))
    n2 = sample_noise(lat, torch.Generator().manual_seed(7))
    assert torch.equal(n1, n2)
    off = sample_noise(lat, torch.Generator().manual_seed(7), noise_offset=0.5)
    extra = off - n1
    assert not torch.allclose(extra, torch.zeros_like(extra))
    # the offset is constant over each sample's channel (broadcast over pixels)
    assert torch.allclose(extra, extra[:, :, :1, :1].expand_as(extra))
    t = sample_timesteps(1000, torch.Generator().manual_seed(3), 100, 200)
    assert t.min() >= 100 and t.max() < 200 and t.dtype == torch.long


def _linear_predict(weight):
    def predict(x, t, cond):
        return x * weight + cond.mean() * 0
    return predict


def test_loss_weights_and_class_image_weight():
    lat = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(4, 1, 1)
    cfg = ObjectiveConfig(t_max=5)
    pred = _linear_predict(torch.tensor(0.3))
    base = diffusion_loss(pred, lat, cond, ALPHAS, "eps", torch.Generator().manual_seed(5), cfg)
    # per-sample weights scale each sample's loss: doubling all doubles the loss, a zero weight removes it
    doubled = diffusion_loss(pred, lat, cond, ALPHAS, "eps", torch.Generator().manual_seed(5), cfg,
                             sample_weights=torch.full((4,), 2.0))
    assert doubled.main == pytest.approx(2 * base.main, rel=1e-6)
    # by hand: same noise/timesteps as the function draws
    g = torch.Generator().manual_seed(5)
    noise = sample_noise(lat, g)
    t = sample_timesteps(4, g, 0, 5)
    x_t = add_noise(lat, noise, t, ALPHAS)
    per = ((x_t * 0.3 - noise) ** 2).reshape(4, -1).mean(1)
    w = torch.tensor([1.0, 0.0, 1.0, 0.5])
    got = diffusion_loss(pred, lat, cond, ALPHAS, "eps", torch.Generator().manual_seed(5), cfg, sample_weights=w)
    assert got.main == pytest.approx(float((per * w).mean()), rel=1e-6)
    snr_cfg = ObjectiveConfig(t_max=5, min_snr_gamma=1.0)
    got = diffusion_loss(pred, lat, cond, ALPHAS, "eps", torch.Generator().manual_seed(5), snr_cfg)
    assert got.main == pytest.approx(float((per * min_snr_weight(t, ALPHAS, 1.0, "eps")).mean()), rel=1e-6)


def test_base_prediction_prior_compares_with_the_adapter_off():
    lat = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    scale = {"w": torch.tensor(0.5, requires_grad=True)}
    state = {"on": True}

    def predict(x, t, cond):
        return x * (scale["w"] if state["on"] else torch.tensor(0.2)) + cond

    @contextlib.contextmanager
    def off():
        state["on"] = False
        try:
            yield
        finally:
            state["on"] = True

    prompts = []

    def prior_cond():
        prompts.append(state["on"])
        return torch.zeros(())

    cfg = ObjectiveConfig(t_max=5, prior_loss_weight=3.0)
    plain = diffusion_loss(predict, lat, torch.zeros(()), ALPHAS, "eps", torch.Generator().manual_seed(9), cfg)
    out = diffusion_loss(predict, lat, torch.zeros(()), ALPHAS, "eps", torch.Generator().manual_seed(9), cfg,
                         prior_cond_fn=prior_cond, adapter_off=off)
    assert prompts == [False, True]  # the target's prompt was encoded with the adapter off, the other with it on
    g = torch.Generator().manual_seed(9)
    noise = sample_noise(lat, g)
    t = sample_timesteps(2, g, 0, 5)
    x_t = add_noise(lat, noise, t, ALPHAS)
    want = float((((x_t * 0.5 - x_t * 0.2) ** 2).reshape(2, -1).mean(1) * 3.0).mean())
    assert out.prior == pytest.approx(want, rel=1e-5)
    assert out.main == pytest.approx(plain.main, rel=1e-6)
    out.loss.backward()
    assert scale["w"].grad is not None and scale["w"].grad != 0
    with pytest.raises(ValueError, match="switch the adapter off"):
        diffusion_loss(predict, lat, torch.zeros(()), ALPHAS, "eps", torch.Generator().manual_seed(9), cfg,
                       prior_cond_fn=prior_cond)
