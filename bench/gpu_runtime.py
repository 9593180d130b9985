"""The generation runtime on a GPU: sd-webui-tune's injection engine against the webui's built-in Lora, in one
process, on SD1.5- and SDXL-architecture models with random weights in fp16, with one and four rank-32 LoRAs of a
usual kohya layout (UNet attention q/k/v/out, feed-forward, proj_in/proj_out; text encoders' attention and MLP).

Printed per architecture, engine and number of LoRAs:
- peak `torch.cuda.max_memory_allocated()` above the loaded model during a generation, and what stays allocated
  between generations above it (the old engine kept a merged copy of every touched layer there);
- s/it: the median UNet step (CFG batch 2) of generations with the set already merged;
- switch: the extra seconds of a generation whose set differs from the previous one (sets A and B alternating,
  minus the steady generation), merges included;
- the same with --medvram-style moves (modules/lowvram.py's forward pre-hooks re-stated: the text encoder and the
  UNet go to the GPU in turn, the other back to the CPU);
- tune with the set scheduled per step (loractl-style ramps) against the same set fixed: s/it ratio.

The built-in Lora is re-stated faithfully from the webui v1.10.1 source, extensions-builtin/Lora/networks.py (the
webui's modules cannot be imported without a webui around them): its class-level forward patches of Linear,
Conv2d, GroupNorm, LayerNorm and MultiheadAttention call network_apply_weights on every layer call (wanted names
vs network_current_names; on a change: restore from the CPU backup taken the first time, `store_weights_backup`,
then add each network's calc_updown in place; LoRA factors held in the CPU memory and moved per merge). Its patches
stay installed while ours run, with no network loaded, as in a webui; our engine gets it as its `other` engine.

Models: SD1.5 = ldm's UNetModel with v1-inference.yaml's settings (SDP attention as the webui's default
optimization) and a CLIP ViT-L/14-shaped text encoder; SDXL = sgm's UNetModel with sd_xl_base.yaml's settings and
CLIP-L + OpenCLIP-bigG-shaped text encoders (bigG's attention is nn.MultiheadAttention, as in open_clip). The text
encoders are plain torch re-statements of those layer shapes (no transformers/open_clip needed); 512 px for SD1.5,
1024 px for SDXL, Euler-like steps (one UNet call per step).

usage (a lent GPU; needs `ldm` (PyPI stable-diffusion-sdkit, pure Python) and, for SDXL, `sgm` importable or
--sgm DIR; about 3 minutes on an H200):
    python bench/gpu_runtime.py [--arch sd15,sdxl] [--steps 10] [--rounds 3] [--json OUT.json]
dry run (the same code path on the CPU, tiny models, fp32, no CUDA figures; a test of the script itself):
    python bench/gpu_runtime.py --dry-run
item 3's CPU measurement (3 scheduled rank-32 LoRAs against the same set fixed, SD1.5's full UNet, 256 px):
    python bench/gpu_runtime.py --device cpu --arch sd15 --size 256 --schedule-only --loras 3 --steps 4 --rounds 3

Figures: none measured on a GPU yet (no GPU was lent to the session that wrote this). CPU, item 3 (2 shared cores,
torch 2.1.2, fp32, SD1.5 UNet at 256 px, 4 steps x 3 alternating rounds): see the closing note of issue 15.
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

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
SDXL_UNET = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4,
                 model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
                 num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                 transformer_depth=[0, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax",
                 legacy=False)
TE_L = dict(width=768, layers=12, heads=12, mlp=3072, mha=False)
TE_G = dict(width=1280, layers=32, heads=20, mlp=5120, mha=True)
TINY = {"sd15": (dict(SD15_UNET, model_channels=32, num_heads=2, context_dim=64),
                 [dict(TE_L, width=64, layers=2, heads=2, mlp=128)]),
        "sdxl": (dict(SDXL_UNET, model_channels=32, num_head_channels=16, transformer_depth=[0, 1, 2],
                      context_dim=96, adm_in_channels=64),
                 [dict(TE_L, width=32, layers=2, heads=2, mlp=64), dict(TE_G, width=64, layers=2, heads=2, mlp=128)])}
FULL = {"sd15": (SD15_UNET, [TE_L]), "sdxl": (SDXL_UNET, [TE_L, TE_G])}
RANK = 32


# ---- models ------------------------------------------------------------------------------------------------------
class TextBlock(nn.Module):
    """One CLIP text-encoder layer: HF CLIP's Linear q/k/v/out_proj + fc1/fc2, or open_clip's MultiheadAttention +
    c_fc/c_proj."""

    def __init__(self, width, heads, mlp, mha):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.heads = heads
        if mha:
            self.attn = nn.MultiheadAttention(width, heads)
        else:
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x):
        h = self.ln_1(x)
        if hasattr(self, "attn"):
            t = h.transpose(0, 1)
            a = self.attn(t, t, t, need_weights=False)[0].transpose(0, 1)
        else:
            b, n, c = h.shape
            q, k, v = (p(h).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                    self.v_proj))
            a = self.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c))
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


class TextEncoder(nn.Module):
    def __init__(self, width, layers, heads, mlp, mha):
        super().__init__()
        self.token_embedding = nn.Embedding(49408, width)
        self.positional_embedding = nn.Parameter(torch.zeros(77, width))
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp, mha) for _ in range(layers))

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        return x


class UNetWrapper(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, context, y=None):
        kw = {"y": y} if y is not None else {}
        return self.diffusion_model(x, timesteps=t, context=context, **kw)


class Conditioner(nn.Module):
    def __init__(self, encoders):
        super().__init__()
        self.embedders = nn.ModuleList(encoders)

    def forward(self, ids):
        return torch.cat([e(ids) for e in self.embedders], -1)


class Model(nn.Module):
    """What lib_tune.inject.find_targets reads: .model.diffusion_model and .cond_stage_model / .conditioner."""

    def __init__(self, unet, encoders, sdxl):
        super().__init__()
        self.model = UNetWrapper(unet)
        if sdxl:
            self.conditioner = Conditioner(encoders)
        else:
            self.cond_stage_model = encoders[0]
        self.sdxl = sdxl

    @property
    def text(self):
        return self.conditioner if self.sdxl else self.cond_stage_model


def build_model(arch, tiny, device, dtype, sgm_dir=None):
    unet_cfg, te_cfgs = (TINY if tiny else FULL)[arch]
    if arch == "sdxl":
        if sgm_dir:
            sys.path.append(sgm_dir)
        try:
            from sgm.modules.diffusionmodules.openaimodel import UNetModel
        except ImportError:
            from tests.fixtures import tiny_models
            tiny_models.import_sgm()
            from sgm.modules.diffusionmodules.openaimodel import UNetModel
    else:
        import ldm.modules.attention as ldm_attention
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        from bench.train import sdp_attention_forward
        ldm_attention.CrossAttention.forward = sdp_attention_forward  # the webui's default optimization
    import contextlib
    import io
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):  # (random weights made on the device)
        model = Model(UNetModel(**unet_cfg), [TextEncoder(**c) for c in te_cfgs], arch == "sdxl")
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
        for b in model.buffers():
            b.zero_()
    return model.to(dtype).eval().requires_grad_(False)


# ---- adapters ----------------------------------------------------------------------------------------------------
USUAL_UNET = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
              "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
USUAL_TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "attn")


def usual_layers(model):
    """(name, module, is_te) for the layers of kohya's usual LoRA layout."""
    out = []
    for name, m in model.model.diffusion_model.named_modules():
        if name.endswith(USUAL_UNET) and isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append(("unet." + name, m, False))
    for name, m in model.text.named_modules():
        if name.endswith(USUAL_TE) and isinstance(m, (nn.Linear, nn.MultiheadAttention)) and ".attn.out_proj" \
                not in name:
            out.append(("te." + name, m, True))
    return out


def make_lora(layers, seed, dtype):
    """{layer name: LoraModule or {part: LoraModule}} rank 32, factors in the CPU memory in `dtype` (the built-in
    keeps them there in the webui's dtype and moves them per merge; load_like_builtin holds ours the same way)."""
    from lib_tune.algos.lora import LoraModule
    g = torch.Generator().manual_seed(seed)

    def lora(out, inn, k=()):
        return LoraModule({"lora_down.weight": (torch.randn((RANK, inn) + k, generator=g) * inn ** -0.5).to(dtype),
                           "lora_up.weight": (torch.randn((out, RANK) + ((1, 1) if k else ()), generator=g)
                                              * 0.01).to(dtype), "alpha": torch.tensor(float(RANK))})
    nets = {}
    for name, m, _ in layers:
        if isinstance(m, nn.MultiheadAttention):
            e = m.embed_dim
            nets[name] = {p: lora(e, e) for p in ("q", "k", "v", "out")}
        elif isinstance(m, nn.Conv2d):
            nets[name] = lora(m.out_channels, m.in_channels, tuple(m.kernel_size))
        else:
            nets[name] = lora(m.out_features, m.in_features)
    return nets


def tune_entries(layers, loras, mult):
    """ActiveEntries for our engine; `mult`: a float or one schedule per LoRA index (callables)."""
    from lib_tune.formats.model import AdapterFile
    from lib_tune.inject import ActiveEntry, MappedEntry
    out = []
    for i, nets in enumerate(loras):
        ad = AdapterFile(path=f"lora{i}")
        m = mult[i] if isinstance(mult, list) else mult
        for name, module, is_te in layers:
            n = nets[name]
            parts = n.items() if isinstance(n, dict) else [(None, n)]
            for part, net in parts:
                e = MappedEntry(key=name, layer=name, module=module, net=net, part=part, is_te=is_te, adapter=ad)
                out.append(ActiveEntry(e, m(0, 1) if is_te and callable(m) else m))
    return out


# ---- the built-in Lora, re-stated from networks.py ------------------------------------------------------------------
class BuiltinLora:
    """extensions-builtin/Lora/networks.py: the per-layer protocol (network_apply_weights, store_weights_backup,
    network_restore_weights_from_backup) and its class-level forward patches."""

    PATCHED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)

    class Net:
        def __init__(self, name, modules, mult):
            self.name, self.modules, self.te_multiplier, self.unet_multiplier, self.dyn_dim = name, modules, mult, \
                mult, None

    def __init__(self, model, layers):
        self.loaded_networks = []
        self.originals = {}
        for name, m in model.named_modules():  # (assign_network_names_to_compvis_modules: every layer named)
            m.network_layer_name = name
        for name, m, _ in layers:  # the touched ones under the names the adapters use
            m.network_layer_name = name

    def install(self):
        for cls in self.PATCHED:
            orig = cls.forward
            self.originals[cls] = orig

            def patched(mod, *args, _orig=orig, **kwargs):
                self.network_apply_weights(mod)
                return _orig(mod, *args, **kwargs)
            cls.forward = patched

    def uninstall(self):
        for cls, orig in self.originals.items():
            cls.forward = orig

    def load(self, layers, loras, mult):  # load_networks: the wanted set; weights change lazily per layer
        self.loaded_networks = [self.Net(f"lora{id(nets)}", {n: nets[n] for n, _, _ in layers}, mult)
                                for nets in loras]  # (names: one per file, as the built-in's)

    @staticmethod
    def store_weights_backup(weight):
        return None if weight is None else weight.to("cpu", copy=True)

    @staticmethod
    def restore(obj, field, weight):
        if weight is None:
            setattr(obj, field, None)
        else:
            getattr(obj, field).copy_(weight)

    def restore_from_backup(self, mod):
        wb, bb = getattr(mod, "network_weights_backup", None), getattr(mod, "network_bias_backup", None)
        if wb is None and bb is None:
            return
        if isinstance(mod, nn.MultiheadAttention):
            self.restore(mod, "in_proj_weight", wb[0])
            self.restore(mod.out_proj, "weight", wb[1])
            self.restore(mod.out_proj, "bias", bb)
        else:
            self.restore(mod, "weight", wb)
            self.restore(mod, "bias", bb)

    @torch.no_grad()
    def network_apply_weights(self, mod):
        name = getattr(mod, "network_layer_name", None)
        if name is None:
            return
        current = getattr(mod, "network_current_names", ())
        wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in self.loaded_networks)
        wb = getattr(mod, "network_weights_backup", None)
        if wb is None and wanted != ():
            if isinstance(mod, nn.MultiheadAttention):
                wb = (self.store_weights_backup(mod.in_proj_weight), self.store_weights_backup(mod.out_proj.weight))
            else:
                wb = self.store_weights_backup(mod.weight)
            mod.network_weights_backup = wb
        bb = getattr(mod, "network_bias_backup", None)
        if bb is None and wanted != ():
            if isinstance(mod, nn.MultiheadAttention) and mod.out_proj.bias is not None:
                bb = self.store_weights_backup(mod.out_proj.bias)
            elif getattr(mod, "bias", None) is not None:
                bb = self.store_weights_backup(mod.bias)
            mod.network_bias_backup = bb
        if current != wanted:
            self.restore_from_backup(mod)
            for net in self.loaded_networks:
                n = net.modules.get(name)
                if n is None:
                    continue
                mult = net.te_multiplier
                if isinstance(n, dict):
                    qkv = mod.in_proj_weight.chunk(3, 0)
                    ups = [n[p].calc_updown(w)[0] * mult for p, w in zip("qkv", qkv)]
                    mod.in_proj_weight += torch.vstack(ups)
                    mod.out_proj.weight += n["out"].calc_updown(mod.out_proj.weight)[0] * mult
                else:
                    up, _ = n.calc_updown(mod.weight)
                    up = up * mult
                    mod.weight.copy_((mod.weight.to(dtype=up.dtype) + up).to(dtype=mod.weight.dtype))
            mod.network_current_names = wanted


class BuiltinAsOther:
    """The built-in imitation as our injector's other engine (what lib_tune/webui/networks.py BuiltinLora does)."""

    def __init__(self, builtin):
        self.b = builtin

    def stale(self, mod):
        if getattr(mod, "network_layer_name", None) is None:
            return False
        wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in self.b.loaded_networks)
        return getattr(mod, "network_current_names", ()) != wanted

    def sync(self, mod):
        self.b.network_apply_weights(mod)


# ---- medvram-style moves ----------------------------------------------------------------------------------------------
class MedVram:
    """modules/lowvram.py with use_medvram: the text encoder and the UNet hooked, one of them on the GPU at a time."""

    def __init__(self, model, device):
        self.device, self.in_gpu, self.handles = device, None, []
        for m in (model.text, model.model):
            m.to("cpu")
            self.handles.append(m.register_forward_pre_hook(self.send_me_to_gpu))

    def send_me_to_gpu(self, module, _):
        if self.in_gpu is module:
            return
        if self.in_gpu is not None:
            self.in_gpu.to("cpu")
        module.to(self.device)
        self.in_gpu = module

    def remove(self, model):
        for h in self.handles:
            h.remove()
        model.to(self.device)


# ---- one generation ----------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generation(model, engine, steps, size, device, dtype):
    """Text encoder once (cond + uncond), then `steps` UNet calls with CFG batch 2. Returns (seconds in all, seconds
    of the UNet steps after the first)."""
    lat = size // 8
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49408, (2, 77), generator=g).to(device)
    x = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    y = torch.randn(2, model.model.diffusion_model.label_emb[0][0].in_features, generator=g).to(device, dtype) \
        if model.sdxl else None
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        ctx = model.text(ids)
        tail = 0.0
        for s in range(steps):
            engine.set_step(s, steps)
            t1 = time.perf_counter()
            out = model.model(x, t, ctx, y)
            sync(device)
            if s:
                tail += time.perf_counter() - t1
            x = x + 0.0 * out  # (one Euler-like step: the next call depends on this one)
    engine.end()
    sync(device)
    return time.perf_counter() - t0, tail / max(steps - 1, 1)


class TuneSide:
    name = "tune"

    def __init__(self, builtin):
        from lib_tune.inject import Injector
        self.inj = Injector()
        self.inj.other = BuiltinAsOther(builtin)
        self.builtin = builtin

    def use(self, layers, loras, mult):
        self.builtin.loaded_networks = []
        self.inj.apply(tune_entries(layers, loras, mult))

    def set_step(self, s, n):
        self.inj.set_step(s, n)

    def end(self):
        self.inj.park()

    def reset(self):
        self.inj.clear()


class BuiltinSide:
    name = "built-in"

    def __init__(self, builtin):
        self.b = builtin

    def use(self, layers, loras, mult):
        self.b.load(layers, loras, mult)

    def set_step(self, s, n):
        pass

    def end(self):
        pass

    def reset(self):
        self.b.loaded_networks = []


def measure(model, side, layers, sets, args, device, dtype, mult=0.8):
    """steady s/it, seconds per generation, switch cost, peak memory above `base` and memory left between."""
    cuda = device.type == "cuda"
    a, b = sets
    side.use(layers, a, mult)
    generation(model, side, args.steps, args.size, device, dtype)  # warm-up: merges
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steady, its, switch = [], [], []
    for r in range(args.rounds):
        side.use(layers, a, mult)
        total, it = generation(model, side, args.steps, args.size, device, dtype)
        steady.append(total)
        its.append(it)
        side.use(layers, b if r % 2 == 0 else a, mult)  # alternate: every one of these is a set change
        switch.append(generation(model, side, args.steps, args.size, device, dtype)[0])
        side.use(layers, b if r % 2 == 0 else a, mult)
        steady.append(generation(model, side, args.steps, args.size, device, dtype)[0])
    out = {"s_per_it": statistics.median(its), "s_per_gen": statistics.median(steady),
           "switch_s": max(0.0, statistics.median(switch) - statistics.median(steady))}
    if cuda:
        out["peak_above_model_gib"] = (torch.cuda.max_memory_allocated() - args.model_bytes) / 2 ** 30
        out["held_above_model_gib"] = (torch.cuda.memory_allocated() - args.model_bytes) / 2 ** 30
        out["held_since_warmup_gib"] = (torch.cuda.memory_allocated() - base) / 2 ** 30
    side.reset()
    generation(model, side, 1, args.size, device, dtype)  # (the built-in restores lazily, at a call)
    return out


def schedules(n, kind="ramp"):
    """Per-step weights, a different one per LoRA. "ramp": every weight changes at every step (the worst case);
    "loractl": what prompts usually say: `0@0,1@0.5` (a ramp, then flat), `0.5@0,1@0.3`, `1:start=` a quarter in
    (a step), repeating."""
    if kind == "ramp":
        return [(lambda s, t, i=i: 0.2 + 0.6 * (s / max(t - 1, 1)) ** (1 + 0.5 * i)) for i in range(n)]
    kinds = [lambda s, t: min(1.0, 2.0 * s / t), lambda s, t: min(1.0, 0.5 + 0.5 * s / (0.3 * t)),
             lambda s, t: 1.0 if s >= t / 4 else 0.0]
    return [kinds[i % 3] for i in range(n)]


def schedule_ratio(model, layers, loras, args, device, dtype, builtin):
    """tune: the same set with fixed weights and scheduled per step, in back-to-back pairs whose order alternates;
    the median of the pairs' ratios (a busy spell of a shared machine hits both sides of a pair alike)."""
    side = TuneSide(builtin)
    fixed, sched, ratios = [], [], []
    for r in range(args.rounds + 1):
        pair = {}
        for label in (("fixed", "sched") if r % 2 == 0 else ("sched", "fixed")):
            mult = 0.5 if label == "fixed" else schedules(len(loras), args.schedule)
            side.use(layers, loras, mult)
            generation(model, side, 1, args.size, device, dtype)  # (the set's merges, outside the timing)
            side.use(layers, loras, mult)  # (every generation activates its set: here nothing left to merge)
            pair[label] = generation(model, side, args.steps, args.size, device, dtype)[1]
        if r:  # round 0 warms up
            fixed.append(pair["fixed"])
            sched.append(pair["sched"])
            ratios.append(pair["sched"] / pair["fixed"])
    side.reset()
    return {"fixed_s_per_it": statistics.median(fixed), "scheduled_s_per_it": statistics.median(sched),
            "ratio": statistics.median(ratios), "pair_ratios": [round(x, 3) for x in ratios], "rounds": args.rounds,
            "kind": args.schedule,
            "step_merges": side.inj.step_merges}


def run_arch(arch, args, device, dtype):
    cuda = device.type == "cuda"
    model = build_model(arch, args.dry_run, device, dtype, args.sgm)
    sync(device)
    args.model_bytes = torch.cuda.memory_allocated() if cuda else 0
    n_params = sum(p.numel() for p in model.parameters())
    layers = usual_layers(model)
    n_loras = max(args.loras_list)
    loras_a = [make_lora(layers, 100 + i, dtype if cuda else torch.float32) for i in range(n_loras)]
    loras_b = [make_lora(layers, 200 + i, dtype if cuda else torch.float32) for i in range(n_loras)]
    builtin = BuiltinLora(model, layers)
    builtin.install()
    res = {"arch": arch, "params_m": n_params / 1e6, "touched_layers": len(layers),
           "touched_params_m": sum(sum(p.numel() for p in m.parameters()) for _, m, _ in layers) / 1e6}
    try:
        if args.schedule_only:
            res["schedule"] = schedule_ratio(model, layers, loras_a[:n_loras], args, device, dtype, builtin)
            return res
        for n in args.loras_list:
            for side in (BuiltinSide(builtin), TuneSide(builtin)):
                res[f"{side.name} x{n}"] = measure(model, side, layers, (loras_a[:n], loras_b[:n]), args, device,
                                                   dtype)
        res["schedule"] = schedule_ratio(model, layers, loras_a[:n_loras], args, device, dtype, builtin)
        mv = MedVram(model, device)  # --medvram-style moves, one LoRA
        try:
            sync(device)
            args.model_bytes = torch.cuda.memory_allocated() if cuda else 0
            for side in (BuiltinSide(builtin), TuneSide(builtin)):
                if isinstance(side, TuneSide):
                    side.inj.keep_on_device = False  # the runtime's choice on a model the webui moves
                res[f"{side.name} x1 medvram"] = measure(model, side, layers, (loras_a[:1], loras_b[:1]), args,
                                                         device, dtype)
        finally:
            mv.remove(model)
    finally:
        builtin.uninstall()
        del model
        if cuda:
            torch.cuda.empty_cache()
    return res


def report(res, cuda):
    print(f"\n== {res['arch']}: {res['params_m']:.0f} M parameters, {res['touched_layers']} touched layers "
          f"({res['touched_params_m']:.0f} M parameters)")
    cols = ["s_per_it", "s_per_gen", "switch_s"] + (["peak_above_model_gib", "held_above_model_gib"] if cuda else [])
    print(f"{'':22s}" + "".join(f"{c:>22s}" for c in cols))
    for key, v in res.items():
        if isinstance(v, dict) and "s_per_it" in v:
            print(f"{key:22s}" + "".join(f"{v[c]:22.4f}" for c in cols))
    for key in [k for k in res if k.startswith("tune x")]:
        other = res.get(key.replace("tune", "built-in"))
        if other:
            print(f"ratio {key:16s}" + "".join(
                f"{(res[key][c] / other[c] if other[c] > 1e-9 else float('nan')):22.3f}" for c in cols))
    s = res.get("schedule")
    if s:
        print(f"schedule ({s['kind']}): {s['scheduled_s_per_it']:.4f} s/it scheduled vs {s['fixed_s_per_it']:.4f} fixed: "
              f"ratio {s['ratio']:.3f} (median of {s['rounds']} back-to-back pairs {s['pair_ratios']}; "
              f"step re-merges {s['step_merges']})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sd15,sdxl")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512 for sd15, 1024 for sdxl)")
    ap.add_argument("--loras", default="1,4", help="numbers of LoRAs to compare (the schedule uses the largest)")
    ap.add_argument("--schedule-only", action="store_true", help="only tune fixed vs scheduled (item 3)")
    ap.add_argument("--schedule", default="ramp", choices=["ramp", "loractl"], help="the per-step weights")
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, fp32: the same code path")
    ap.add_argument("--sgm", default=None, help="folder holding the sgm package (SDXL)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.loras_list = [int(x) for x in args.loras.split(",")]
    if args.dry_run:
        args.device = args.device or "cpu"
        args.steps, args.rounds = min(args.steps, 3), min(args.rounds, 2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32  # (torch 2.1 has no fp16 matmul on the CPU)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'no CUDA figures'}), torch "
          f"{torch.__version__}, {dtype}, {args.steps} steps, {args.rounds} rounds"
          + (", DRY RUN (tiny models)" if args.dry_run else ""))
    out = []
    for arch in args.arch.split(","):
        size_arg = args.size
        args.size = size_arg or (64 if args.dry_run else 512 if arch == "sd15" else 1024)
        t0 = time.perf_counter()
        res = run_arch(arch, args, device, dtype)
        res["seconds"] = time.perf_counter() - t0
        res["size"] = args.size
        args.size = size_arg
        report(res, cuda)
        out.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
