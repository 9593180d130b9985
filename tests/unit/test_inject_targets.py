"""find_targets on small synthetic models whose module paths mirror ldm/sgm's (the other test_inject_* files build
their models from the fakes defined here)."""
import torch
from torch import nn

from lib_tune.inject import find_targets

C, CTX, TXT = 8, 6, 6  # UNet channels, cross-attention context width, text width


# ---- fakes mirroring ldm / sgm / transformers / open_clip module paths ---------------------------------------------
class CrossAttention(nn.Module):
    def __init__(self, dim, ctx):
        super().__init__()
        self.heads = 2
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return self.to_out(att @ v)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 2 * dim)
        self.net = nn.Sequential(proj, nn.Dropout(0.0), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return self.net[2](torch.nn.functional.gelu(self.net[0].proj(x)))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, ctx):
        super().__init__()
        self.attn1, self.attn2, self.ff = CrossAttention(dim, dim), CrossAttention(dim, ctx), FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch, ctx, linear=False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(2, ch)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, ctx)])
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.linear:
            y = self.proj_in(y)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class ResBlock(nn.Module):
    def __init__(self, ch, out=None):
        super().__init__()
        out = out or ch
        self.in_layers = nn.Sequential(nn.GroupNorm(2, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(C, out))
        self.out_layers = nn.Sequential(nn.GroupNorm(2, out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == ch else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)


class Block(nn.Sequential):
    """ldm's TimestepEmbedSequential: passes emb to res blocks and context to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, (ResBlock, Downsample)):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """input_blocks 0 (conv_in), 1 (res + attn), 2 (res + attn), 3 (downsample); middle (res, attn, res);
    output_blocks 0 (res + attn); out (norm, silu, conv_out) — names as in ldm's UNetModel."""

    def __init__(self, ctx=CTX, linear=False):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        self.input_blocks = nn.ModuleList([
            Block(nn.Conv2d(4, C, 3, padding=1)),
            Block(ResBlock(C), SpatialTransformer(C, ctx, linear)),
            Block(ResBlock(C), SpatialTransformer(C, ctx, linear)),
            Block(Downsample(C)),
        ])
        self.middle_block = Block(ResBlock(C), SpatialTransformer(C, ctx, linear), ResBlock(C))
        self.output_blocks = nn.ModuleList([Block(ResBlock(2 * C, C), SpatialTransformer(C, ctx, linear))])
        self.out = nn.Sequential(nn.GroupNorm(2, C), nn.SiLU(), nn.Conv2d(C, 4, 3, padding=1))

    def forward(self, x, t, context):
        emb = self.time_embed(t)
        hs = []
        for blk in self.input_blocks:
            x = blk(x, emb, context)
            hs.append(x)
        x = self.middle_block(x, emb, context)
        x = self.output_blocks[0](torch.cat([x, hs[-1]], 1), emb, context)
        return self.out(x)


class DiffusionWrapper(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class ClipLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = nn.Module()
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, p, nn.Linear(d, d))
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        a = self.self_attn
        h = self.layer_norm1(x)
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        x = x + a.out_proj((q @ k.transpose(-1, -2)).softmax(-1) @ v)
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.layer_norm2(x))))


class FrozenCLIPEmbedder(nn.Module):
    """transformer.text_model.encoder.layers.N.{self_attn.q_proj, mlp.fc1, ...}"""

    def __init__(self, d=TXT, n=2):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.text_model = nn.Module()
        self.transformer.text_model.encoder = nn.Module()
        self.transformer.text_model.encoder.layers = nn.ModuleList([ClipLayer(d) for _ in range(n)])
        self.transformer.text_model.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x):
        for layer in self.transformer.text_model.encoder.layers:
            x = layer(x)
        return self.transformer.text_model.final_layer_norm(x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, 2 * d))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class FrozenOpenCLIPEmbedder(nn.Module):
    """model.transformer.resblocks.N.{attn (MultiheadAttention), mlp.c_fc, mlp.c_proj, ln_1, ln_2}"""

    def __init__(self, d=TXT, n=2):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        self.model.transformer.resblocks = nn.ModuleList([ResidualAttentionBlock(d) for _ in range(n)])
        self.model.ln_final = nn.LayerNorm(d)

    def forward(self, x):  # x: [L, N, D] as open_clip's text transformer
        for blk in self.model.transformer.resblocks:
            x = blk(x)
        return self.model.ln_final(x)


class Timestep(nn.Module):
    def forward(self, t):
        return t


class ConcatTimestepEmbedderND(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedder = Timestep()


class Wrapped(nn.Module):
    """The webui's hijack: the text encoder becomes `.wrapped` of a new module."""

    def __init__(self, inner):
        super().__init__()
        self.wrapped = inner

    def forward(self, x):
        return self.wrapped(x)


def sd1_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Module()
    m.model = DiffusionWrapper(UNet())
    m.cond_stage_model = FrozenCLIPEmbedder()
    return _randomize(m)


def sd2_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Module()
    m.model = DiffusionWrapper(UNet(linear=True))
    m.cond_stage_model = FrozenOpenCLIPEmbedder()
    return _randomize(m)


def sdxl_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Module()
    m.model = DiffusionWrapper(UNet(linear=True))
    m.conditioner = nn.Module()
    m.conditioner.embedders = nn.ModuleList([FrozenCLIPEmbedder(), FrozenOpenCLIPEmbedder(),
                                             ConcatTimestepEmbedderND()])
    return _randomize(m)


def _randomize(m):
    """No zero weights (MHA and ldm zero-initialise biases; that would hide bias deltas)."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m.eval()


def hijack(sd_model):
    """What the webui's hijack does to the text encoders (sd_hijack.py): wrap them."""
    if hasattr(sd_model, "conditioner"):
        e = sd_model.conditioner.embedders
        e[0], e[1] = Wrapped(e[0]), Wrapped(e[1])
    else:
        sd_model.cond_stage_model = Wrapped(sd_model.cond_stage_model)
    return sd_model


# ---- tests -----------------------------------------------------------------------------------------------------------
def test_sd1_names_and_arch():
    t = find_targets(sd1_model())
    assert t.architecture == "sd1"
    assert isinstance(t["transformer_text_model_encoder_layers_0_self_attn_q_proj"], nn.Linear)
    assert isinstance(t["diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"], nn.Linear)
    assert isinstance(t["diffusion_model_input_blocks_1_0_in_layers_2"], nn.Conv2d)
    assert isinstance(t["diffusion_model_out_2"], nn.Conv2d)
    assert t.is_te("transformer_text_model_encoder_layers_1_mlp_fc2")
    assert not t.is_te("diffusion_model_middle_block_1_proj_in")
    assert "" not in t


def test_sd2_detected_by_openclip_resblocks():
    t = find_targets(sd2_model())
    assert t.architecture == "sd2"
    assert isinstance(t["model_transformer_resblocks_0_attn"], nn.MultiheadAttention)
    assert isinstance(t["model_transformer_resblocks_1_mlp_c_proj"], nn.Linear)


def test_sdxl_embedders_prefixed_and_paramless_skipped():
    t = find_targets(sdxl_model())
    assert t.architecture == "sdxl"
    assert "0_transformer_text_model_encoder_layers_0_self_attn_q_proj" in t
    assert isinstance(t["1_model_transformer_resblocks_0_attn"], nn.MultiheadAttention)
    assert not any(k.startswith("2_") for k in t)
    assert t.is_te("1_model_transformer_resblocks_0_mlp_c_fc")
    assert "model_transformer_resblocks" not in t  # so SDXL is never taken for SD2


def test_hijacked_model_has_the_same_names_and_modules():
    for build in (sd1_model, sd2_model, sdxl_model):
        raw = find_targets(build())
        model = build()
        before = {k: id(v) for k, v in find_targets(model).items()}
        hijacked = find_targets(hijack(model))
        assert set(hijacked) == set(raw)
        assert {k: id(v) for k, v in hijacked.items()} == before
        assert hijacked.architecture == raw.architecture
