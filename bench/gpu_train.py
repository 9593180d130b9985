"""LoRA training steps on a GPU, on an SD1.5-size UNet: sd-webui-tune's training path against a kohya-style LoRA,
in one process, alternating, on the same modules, weights and data.

Why this shape: kohya sd-scripts cannot be installed on the lent GPU machines (no network there), so the anchor
measured in the same run is kohya's LoRA mechanism itself, re-stated in a few lines (networks/lora.py
LoRAModule: the layer's forward replaced by org_forward(x) + lora_up(lora_down(x)) * multiplier * scale, with
Linear / 1x1-conv factors, kaiming-uniform down and zero up), on the modules kohya picks on SD1.5 (every Linear and
1x1 conv inside the transformer blocks: 192). Ours is what the trainer runs: lib_tune.train.methods.create_adapter
(preset "full" selects the same 192 modules for plain LoRA) applied by lib_tune.inject.Injector in train mode.

The model is ldm's UNetModel with SD1.5's v1-inference.yaml settings and random weights, held in bf16 as kohya holds
a LoRA run's UNet (weight_dtype) and trained under bf16 autocast with fp32 adapter weights, AdamW (lr 1e-4,
weight decay 0.01), gradient clipping 1.0, MSE against a fixed target, SDPA attention (the webui's default
optimization, bench/train.py sdp_attention_forward). Random latents at 512 px (64x64) and a random 77x768 context:
what both sides compute per step is the same, so the data does not matter for speed.

Printed per batch size: milliseconds per step (median of the steady steps of each round, fastest round), peak CUDA
memory allocated above the loaded model, and the ratios tune / kohya-style.

Measured 2026-11-26 on an NVIDIA H200 (torch 2.11.0+cu130, the lent machine; 3 alternating rounds of 20 steps,
2 of 15 for batch 16), SD1.5 UNet in bf16 (1.66 GiB loaded), 192 modules each side:
    batch 1: tune 176.2 ms/step, kohya-style 196.1 (ratio 0.90); peak above the model 1.28 vs 1.28 GiB (1.00)
    batch 4: tune 172.7 ms/step, kohya-style 180.2 (ratio 0.96); peak 4.62 vs 4.63 GiB (1.00)
    batch 16: tune 186.8 ms/step, kohya-style 190.7 (ratio 0.98); peak 18.00 vs 18.02 GiB (1.00)
Step time barely grows from batch 1 to 16: on that machine an eager SD1.5 step is bound by the host launching
kernels, not by the GPU, and both sides launch about the same kernels.

usage: python bench/gpu_train.py [--batch 1,4] [--steps 20] [--rounds 3] [--tiny] [--device cuda]
(needs ldm on the path: PyPI stable-diffusion-sdkit's `ldm` package, pure Python; --tiny --device cpu for a dry run)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
TINY = dict(SD15, model_channels=32, num_heads=2, context_dim=64)


class _Wrap(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class _Shell(nn.Module):
    """What find_targets reads from an ldm LatentDiffusion: .model.diffusion_model (and a text encoder)."""

    def __init__(self, unet):
        super().__init__()
        self.model = _Wrap(unet)
        self.cond_stage_model = nn.Identity()


class KohyaLoRA(nn.Module):
    """kohya networks/lora.py LoRAModule, reduced to what a training step computes."""

    def __init__(self, org: nn.Module, dim: int, alpha: float):
        super().__init__()
        if isinstance(org, nn.Conv2d):
            self.lora_down = nn.Conv2d(org.in_channels, dim, 1, bias=False)
            self.lora_up = nn.Conv2d(dim, org.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / dim
        self.multiplier = 1.0
        self.org = org

    def install(self):
        self.org_forward = type(self.org).forward.__get__(self.org)
        self.org.forward = self.forward

    def remove(self):
        del self.org.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


def kohya_modules(unet: nn.Module):
    """kohya's SD1 UNet targets: Linear and 1x1 Conv2d inside each SpatialTransformer ("Transformer2DModel")."""
    from ldm.modules.attention import SpatialTransformer
    out = []
    for m in unet.modules():
        if isinstance(m, SpatialTransformer):
            for c in m.modules():
                if isinstance(c, nn.Linear) or (isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1)):
                    out.append(c)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    args = ap.parse_args()

    import ldm.modules.attention as ldm_attention
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from bench.train import sdp_attention_forward
    from lib_tune.inject import Injector, find_targets
    from lib_tune.train.methods import MethodSpec, create_adapter

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    ldm_attention.CrossAttention.forward = sdp_attention_forward
    torch.manual_seed(0)
    unet = UNetModel(**(TINY if args.tiny else SD15))  # random init on the CPU (seconds), then moved
    unet.to(dev, dtype).requires_grad_(False).train()
    shell = _Shell(unet)

    targets = find_targets(shell)
    ours = create_adapter(targets, MethodSpec(method="lora", dim=16, alpha=8.0, preset="full"), device=dev)
    injector = Injector()
    theirs = [KohyaLoRA(m, 16, 8.0).to(dev) for m in kohya_modules(unet)]
    sides = {
        "tune": (list(ours.parameters()), lambda: injector.apply(ours.entries(), train=True), injector.clear),
        "kohya-style": ([p for k in theirs for p in k.parameters()], lambda: [k.install() for k in theirs],
                        lambda: [k.remove() for k in theirs]),
    }
    ctx_dim = (TINY if args.tiny else SD15)["context_dim"]
    model_bytes = torch.cuda.memory_allocated(dev) if cuda else 0

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def run_side(name, batch):
        params, on, off = sides[name]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        g = torch.Generator(device=dev).manual_seed(batch)
        x = torch.randn(batch, 4, args.latent, args.latent, generator=g, device=dev)
        target = torch.randn(batch, 4, args.latent, args.latent, generator=g, device=dev)
        c = torch.randn(batch, 77, ctx_dim, generator=g, device=dev)
        t = torch.randint(0, 1000, (batch,), generator=g, device=dev)
        on()
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            stamps, losses = [], []
            sync()
            stamps.append(time.perf_counter())
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    out = unet(x.to(dtype), t, context=c.to(dtype))
                loss = F.mse_loss(out.float(), target)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))  # one sync per step, the same on both sides (a trainer logs it)
                stamps.append(time.perf_counter())
            peak = torch.cuda.max_memory_allocated(dev) - model_bytes if cuda else 0
        finally:
            off()
        per = [b - a for a, b in zip(stamps, stamps[1:])][3:]
        return statistics.median(per), peak, losses

    report = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
              "modules": {"tune": len(ours.modules), "kohya-style": len(theirs)},
              "model_gib": model_bytes / 2 ** 30, "batches": {}}
    print(f"{report['device']}, torch {report['torch']}, UNet {'tiny' if args.tiny else 'SD1.5'} in {dtype}, "
          f"loaded {report['model_gib']:.2f} GiB; LoRA dim 16 on {len(ours.modules)} (tune) / {len(theirs)} "
          f"(kohya-style) modules", flush=True)
    for batch in [int(b) for b in args.batch.split(",")]:
        best = {}
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                s, peak, losses = run_side(name, batch)
                if name not in best or s < best[name][0]:
                    best[name] = (s, peak, losses[-1])
        tn, ko = best["tune"], best["kohya-style"]
        report["batches"][batch] = {"tune_ms": tn[0] * 1e3, "kohya_ms": ko[0] * 1e3, "tune_peak_gib": tn[1] / 2 ** 30,
                                    "kohya_peak_gib": ko[1] / 2 ** 30}
        print(f"batch {batch} @{args.latent * 8}px: tune {tn[0] * 1e3:.1f} ms/step, kohya-style {ko[0] * 1e3:.1f} ms/step "
              f"(ratio {tn[0] / ko[0]:.3f}); peak above the model: tune {tn[1] / 2 ** 30:.2f} GiB, kohya-style "
              f"{ko[1] / 2 ** 30:.2f} GiB (ratio {tn[1] / max(ko[1], 1):.3f})", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
