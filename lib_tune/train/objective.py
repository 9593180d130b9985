"""The training objective: noise and timesteps, the target the model must predict, loss weights, priors.

Formulas (kohya sd-scripts train_network.py / library/custom_train_functions.py, DDPM):
- x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, t uniform in [t_min, t_max) (integers), a = alphas_cumprod;
- target: eps for eps-prediction models, v = sqrt(a_t) eps - sqrt(1 - a_t) x0 for v-prediction (SD2-v);
- noise offset: eps += offset * N(0, 1) per sample and channel (broadcast over the pixels), the "offset noise"
  that lets a model learn very dark/bright images;
- min-SNR-gamma (Hang et al. 2023, kohya apply_snr_weight): SNR = a / (1 - a); per-sample weight
  min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v;
- per-sample weights multiply the per-sample mean squared error: class images of prior preservation get
  `prior_loss_weight` (kohya's loss_weights), training images 1.

Prior preservation without class images ("base_prediction", OneTrainer's PRIOR_PREDICTION idea): the same noisy
latents with the class prompt go through the model twice, once with the adapter switched off (the target, no
gradients) and once with it on; the squared difference, weighted by prior_loss_weight, keeps the adapter from
changing what the base model does for the class.

Every random draw comes from a torch.Generator the caller seeds, so a step is a pure function of (seed, step)
and a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch

from .model import Cond

Tensor = torch.Tensor
Predict = Callable[[Tensor, Tensor, Cond], Tensor]


@dataclass(frozen=True)
class ObjectiveConfig:
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    prior_loss_weight: float = 1.0
    #: timesteps are drawn from [t_min, t_max)
    t_min: int = 0
    t_max: int = 1000


def sample_noise(latents: Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> Tensor:
    """Gaussian noise like `latents` (drawn on the CPU generator, moved to the latents' device: the same numbers
    on every device), plus the per-channel offset when noise_offset > 0."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    return noise.to(latents.device)


def sample_timesteps(batch: int, generator: torch.Generator, t_min: int = 0, t_max: int = 1000,
                     device=None) -> Tensor:
    t = torch.randint(t_min, t_max, (batch,), generator=generator, dtype=torch.long)
    return t.to(device) if device is not None else t


def _at(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    a = alphas_cumprod.to(like.device)[t].float()
    return a.reshape(-1, *[1] * (like.dim() - 1))


def add_noise(latents: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    a = _at(alphas_cumprod, t, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target_for(prediction_type: str, latents: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        a = _at(alphas_cumprod, t, latents)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    a = alphas_cumprod.to(t.device)[t].double()
    return (a / (1 - a)).float()


def min_snr_weight(t: Tensor, alphas_cumprod: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample min-SNR-gamma weight (kohya apply_snr_weight)."""
    s = snr(t, alphas_cumprod)
    clipped = torch.clamp(s, max=float(gamma))
    return clipped / (s + 1) if prediction_type == "v" else clipped / s


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)


@dataclass
class LossParts:
    """The step's loss (differentiable) and its parts for logging."""
    loss: Tensor
    main: float
    prior: Optional[float] = None


def diffusion_loss(predict: Predict, latents: Tensor, cond: Cond, alphas_cumprod: Tensor, prediction_type: str,
                   generator: torch.Generator, cfg: ObjectiveConfig, sample_weights: Optional[Tensor] = None,
                   prior_cond_fn: Optional[Callable[[], Cond]] = None,
                   adapter_off: Optional[Callable[[], ContextManager]] = None) -> LossParts:
    """One batch's loss. sample_weights: per-sample factors (prior_loss_weight for class images).
    prior_cond_fn + adapter_off: add the base-prediction prior on the same noisy latents; prior_cond_fn encodes
    the class prompts and is called once with the adapter off (the target: base text encoder too) and once
    with it on."""
    noise = sample_noise(latents, generator, cfg.noise_offset)
    t = sample_timesteps(latents.shape[0], generator, cfg.t_min, cfg.t_max, device=latents.device)
    x_t = add_noise(latents, noise, t, alphas_cumprod)
    target = target_for(prediction_type, latents, noise, t, alphas_cumprod)
    pred = predict(x_t, t, cond)
    per = per_sample_mse(pred, target)
    w = torch.ones_like(per)
    if cfg.min_snr_gamma:
        w = w * min_snr_weight(t, alphas_cumprod, cfg.min_snr_gamma, prediction_type)
    if sample_weights is not None:
        w = w * sample_weights.to(per.device, per.dtype)
    loss = (per * w).mean()
    out = LossParts(loss=loss, main=float(loss.detach()))
    if prior_cond_fn is not None:
        if adapter_off is None:
            raise ValueError("the base-prediction prior needs a way to switch the adapter off")
        with torch.no_grad(), adapter_off():
            base = predict(x_t, t, prior_cond_fn()).float()
        prior = (per_sample_mse(predict(x_t, t, prior_cond_fn()), base) * cfg.prior_loss_weight).mean()
        out.loss = loss + prior
        out.prior = float(prior.detach())
    return out


@torch.no_grad()
def loss_at_fixed_noise(model, latents: Tensor, cond: Cond, seed: int, timesteps: Optional[Tensor] = None,
                        repeats: int = 1) -> float:
    """Deterministic denoising loss (plain MSE against the model's own target type, no weighting): the same
    noise and timesteps for the same seed and shapes, so two states of an adapter (or none) compare fairly.
    `model` is a DiffusionModel; timesteps default to `repeats` draws per sample, spread by the seed."""
    g = torch.Generator().manual_seed(int(seed))
    total, n = 0.0, 0
    for _ in range(repeats):
        noise = sample_noise(latents, g)
        t = timesteps.to(latents.device) if timesteps is not None else \
            sample_timesteps(latents.shape[0], g, 0, model.num_timesteps, device=latents.device)
        x_t = add_noise(latents, noise, t, model.alphas_cumprod)
        target = target_for(model.prediction_type, latents, noise, t, model.alphas_cumprod)
        total += float(per_sample_mse(model.predict(x_t, t, cond), target).sum())
        n += latents.shape[0]
    return total / n


__all__ = ["ObjectiveConfig", "LossParts", "add_noise", "diffusion_loss", "loss_at_fixed_noise", "min_snr_weight",
           "per_sample_mse", "sample_noise", "sample_timesteps", "snr", "target_for"]
