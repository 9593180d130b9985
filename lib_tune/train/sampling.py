"""A small deterministic DDIM sampler (eta 0, classifier-free guidance) over DiffusionModel.

Inside the webui previews are rendered by the webui's own samplers (the glue's on_sample); this one exists for
places without a webui: the demo's before/after images and tests. It follows DDIM's update with the model's
own parameterization: x0 and eps from the prediction (eps: x0 = (x - sqrt(1-a) eps) / sqrt(a); v: x0 = sqrt(a) x
- sqrt(1-a) v, eps = sqrt(1-a) x + sqrt(a) v), then x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .model import Cond, DiffusionModel, cond_cat


@torch.no_grad()
def ddim_sample(model: DiffusionModel, cond: Cond, uncond: Cond, latent_shape: Tuple[int, int, int, int],
                steps: int = 20, cfg_scale: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Latents [B, C, h, w] for conditioning `cond` (batch B), guided away from `uncond` (same batch)."""
    a_all = model.alphas_cumprod.double()
    n = model.num_timesteps
    ts = torch.linspace(n - 1, 0, steps).round().long().tolist()
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(latent_shape, generator=g, dtype=torch.float32).to(model.device)
    both = cond_cat([uncond, cond])
    for i, t in enumerate(ts):
        a = float(a_all[t])
        a_prev = float(a_all[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        tt = torch.full((2 * x.shape[0],), t, dtype=torch.long, device=model.device)
        out = model.predict(torch.cat([x, x]), tt, both).float()
        u, c = out.chunk(2)
        pred = u + cfg_scale * (c - u)
        if model.prediction_type == "v":
            x0 = a ** 0.5 * x - (1 - a) ** 0.5 * pred
            eps = (1 - a) ** 0.5 * x + a ** 0.5 * pred
        else:
            eps = pred
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def to_pil(pixels: torch.Tensor):
    """[3, H, W] in [-1, 1] -> PIL RGB image (through bytes, no numpy)."""
    from PIL import Image

    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (x.shape[1], x.shape[0]), bytes(x.cpu().flatten().tolist()))
