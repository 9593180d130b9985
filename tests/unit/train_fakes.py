"""A tiny stand-in for an ldm model, for trainer unit tests that must run in a second: the attributes
DiffusionModel reads (model.diffusion_model, cond_stage_model, first_stage_model with encoder/quant_conv/decode,
apply_model, get_learned_conditioning, alphas_cumprod, parameterization, scale_factor), with the UNet's modules
named like ldm's (input_blocks.1.1.transformer_blocks.0.attn1.to_q ...) so the target presets and the kohya
naming find them. Weights are seeded; the text encoder is a byte-level embedding, so captions matter."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

C = 16  # channels
CTX = 12  # text width


class Attn(nn.Module):
    def __init__(self, ctx_dim: int):
        super().__init__()
        self.to_q = nn.Linear(C, C, bias=False)
        self.to_k = nn.Linear(ctx_dim, C, bias=False)
        self.to_v = nn.Linear(ctx_dim, C, bias=False)
        self.to_out = nn.Sequential(nn.Linear(C, C))

    def forward(self, x, ctx):
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        w = torch.softmax(q @ k.transpose(1, 2) / C ** 0.5, dim=-1)
        return self.to_out(w @ v)


class GEGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(C, 4 * C)

    def forward(self, x):
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * torch.nn.functional.gelu(b)


class FF(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(GEGLU(), nn.Identity(), nn.Linear(2 * C, C))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = Attn(C)
        self.attn2 = Attn(CTX)
        self.ff = FF()
        self.checkpoint = True  # like ldm's flag; DiffusionModel.session turns it off and back on

    def forward(self, x, context=None):
        x = x + self.attn1(x, x)
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class SpatialTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(C, C, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock()])
        self.proj_out = nn.Conv2d(C, C, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(x).flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            y = blk(y, context=context)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, C), nn.SiLU(), nn.Conv2d(C, C, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(C, C))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, C), nn.SiLU(), nn.Identity(), nn.Conv2d(C, C, 3, padding=1))
        self.use_checkpoint = True

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return x + self.out_layers(h)


class FakeUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        self.input_blocks = nn.ModuleList([nn.Conv2d(4, C, 3, padding=1),
                                           nn.ModuleList([ResBlock(), SpatialTransformer()])])
        self.out = nn.Sequential(nn.GroupNorm(4, C), nn.SiLU(), nn.Conv2d(C, 4, 3, padding=1))

    def forward(self, x, timesteps, context):
        half = C // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (9.0 / half)).to(x.device)
        args = timesteps.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        h = self.input_blocks[0](x)
        h = self.input_blocks[1][0](h, emb)
        h = self.input_blocks[1][1](h, context)
        return self.out(h)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = FakeUNet()


class TextEncoder(nn.Module):
    """Bytes of the caption (padded to 16) -> [B, 16, CTX]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, CTX)
        self.proj = nn.Linear(CTX, CTX)

    def forward(self, captions):
        ids = torch.zeros(len(captions), 16, dtype=torch.long)
        for i, c in enumerate(captions):
            b = c.encode("utf-8")[:16]
            ids[i, :len(b)] = torch.tensor(list(b))
        ids = ids.to(self.embed.weight.device)
        return self.proj(self.embed(ids))


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 8, stride=8)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.dec = nn.ConvTranspose2d(4, 3, 8, stride=8)

    def decode(self, z):
        return self.dec(z)


class FakeLDM(nn.Module):
    parameterization = "eps"

    def __init__(self, seed: int = 0, parameterization: str = "eps"):
        super().__init__()
        self.parameterization = parameterization
        g = torch.Generator().manual_seed(seed)
        self.model = Wrapper()
        self.cond_stage_model = TextEncoder()
        self.first_stage_model = VAE()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.scale_factor = 0.5
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5 if p.dim() > 1
                        else 0.05 * torch.randn(p.shape, generator=g))
        self.eval()

    def get_learned_conditioning(self, captions):
        return self.cond_stage_model(list(captions))

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, cond)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter/buffer (name, dtype, shape, bytes), requires_grad flags and module modes."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape), bool(getattr(t, "requires_grad", False)))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for name, m in model.named_modules():
        h.update(f"{name}:{m.training}:{sorted(k for k in m.__dict__ if k == 'forward')}".encode())
        for flag in ("checkpoint", "use_checkpoint", "device"):
            if hasattr(m, flag) and not callable(getattr(m, flag)):
                h.update(f"{flag}={getattr(m, flag)}".encode())
    return h.hexdigest()


def write_images(folder, n: int = 4, size: int = 64, caption: str = "a red square"):
    """n small images of one concept with caption files."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (20, 40, 160))
        ImageDraw.Draw(im).rectangle([4 + 6 * i, 8 + 4 * i, 28 + 6 * i, 32 + 4 * i], fill=(230, 40, 30))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return folder
