"""Device memory and the webui's --medvram / --lowvram, on the real ldm / sgm classes (tiny SD1 and SDXL).

1. Placement: the model on the `meta` device (a GPU's stand-in without a GPU: same code path, no values) with a
   usual kohya LoRA set active. Counted by each tensor's `.device`: what the engine holds on the model's device
   (nothing for a fixed set; the per-step factors, i.e. the adapters' own tensors, for a scheduled one) and in CPU
   memory (the backups of the touched layers), against the model's own size. The old engine held a merged copy of
   every touched layer on the model's device: `touched bytes` in the report.
2. Block moves: modules/lowvram.py's setup re-stated (send_me_to_gpu as a forward pre-hook, with its `parents`
   map, one module on the GPU at a time; medvram: the text encoder, the UNet and the VAE; lowvram: also each of the
   UNet's time_embed / input / middle / output blocks). "GPU" is CUDA when there is one; otherwise a CPU stand-in
   that keeps every property the engine relies on: `module.to(...)` assigns `param.data` (same Parameter objects,
   same version counters) with data converted, here float32 ("GPU", where blocks compute) <-> float64 ("CPU"), a
   lossless round trip, so outputs can be compared bit for bit. Checked: outputs equal those without the moves, each
   touched layer is merged once per set (not per step, not per move), and nothing the engine holds is on the GPU.

Byte counts go to test-output/contract-devices.json.
"""
import copy
import json
import re

import pytest
import torch
from torch import nn

from lib_tune.algos.lora import LoraModule
from lib_tune.formats.model import AdapterFile
from lib_tune.inject import Injector, activate, find_targets, inplace, map_adapter
from tests.contract.test_inject_models import te_keys, unet_ldm_keys

ARCH = {"tiny_ldm_sd1": "sd1", "tiny_sgm_sdxl": "sdxl"}
#: kohya's usual LoRA layout: attention, feed-forward and proj layers of the UNet, attention and MLP of the TE
USUAL = re.compile(r"(attn[12]_to_(q|k|v|out_0)|ff_net_(0_proj|2)|proj_(in|out)|self_attn_(q|k|v|out)_proj|"
                   r"mlp_fc[12]|attn_(q|k|v|out)_proj|mlp_c_(fc|proj))$")
CUDA = torch.cuda.is_available()


@pytest.fixture(params=list(ARCH))
def model(request):
    return copy.deepcopy(request.getfixturevalue(request.param))  # moved and hooked here: never the session's own


def usual_lora(model, rank=4, seed=0):
    """A rank-`rank` LoRA on the usual layers, as a kohya file maps (LoRA for MHA parts too)."""
    t = find_targets(model)
    keys = {k: v for k, v in {**te_keys(t), **unet_ldm_keys(t)}.items()
            if USUAL.search(k.replace("_self_attn_", "_self_attn_"))}
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for key, (layer, part) in keys.items():
        m = t[layer]
        w = m.in_proj_weight.chunk(3, 0)[0] if part in ("q", "k", "v") else \
            (m.out_proj.weight if part == "out" else m.weight)
        out, inn, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
        mods[key] = LoraModule({"lora_down.weight": torch.randn((rank, inn) + k, generator=g) * 0.1,
                                "lora_up.weight": torch.randn((out, rank) + ((1, 1) if k else ()), generator=g) * 0.1,
                                "alpha": torch.tensor(float(rank))})
    return AdapterFile(path="usual.safetensors", modules=mods, architecture=t.architecture)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def by_device(tensors):
    out = {}
    for t in tensors:
        out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
    return out


def touched_bytes(inj):
    return nbytes([p for m in inj.layers for p in m.parameters()])


def _record(output_dir, key, data):
    path = output_dir / "contract-devices.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old[key] = data
    path.write_text(json.dumps(old, indent=2))


# ---- forwards that go through the modules the webui hooks ----------------------------------------------------------
def _inputs(model, device, dtype):
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(7)
    ctx_dim = next(m.in_features for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    ctx = torch.randn(2, 5, ctx_dim, generator=g).to(device, dtype)
    y = None
    if getattr(unet, "num_classes", None) is not None:
        y = torch.randn(2, unet.label_emb[0][0].in_features, generator=g).to(device, dtype)
    return torch.randn(2, 4, 8, 8, generator=g).to(device, dtype), torch.tensor([10, 500], device=device), ctx, y


def run_unet_wrapped(model, device="cpu", dtype=torch.float32):
    """Through `sd_model.model` (where medvram's hook sits), as the webui's samplers do."""
    x, t, ctx, y = _inputs(model, device, dtype)
    with torch.no_grad():
        if hasattr(model, "conditioner"):
            return model.model(x, t, {"crossattn": ctx, "vector": y})
        return model.model(x, t, c_crossattn=[ctx])


def run_text(model, device="cpu", hooks=None):
    """The text encoder(s) (SD1: through cond_stage_model.transformer, where lowvram's hook sits; SDXL: the webui
    calls the conditioner, whose hook is fired here before its embedders run)."""
    outs = []
    with torch.no_grad():
        if hasattr(model, "conditioner"):
            if hooks is not None:
                hooks.send_me_to_gpu(model.conditioner, None)
            encoders = list(model.conditioner.embedders[:2])
        else:
            encoders = [model.cond_stage_model]
        for enc in encoders:
            if hasattr(enc, "transformer"):
                n = min(77, enc.transformer.config.max_position_embeddings)
                ids = torch.randint(0, enc.transformer.config.vocab_size, (1, n),
                                    generator=torch.Generator().manual_seed(3)).to(device)
                outs.append(enc.transformer(input_ids=ids).last_hidden_state)
            else:
                shape = (1, enc.model.positional_embedding.shape[0])
                ids = torch.randint(0, enc.model.token_embedding.num_embeddings, shape,
                                    generator=torch.Generator().manual_seed(3)).to(device)
                o = enc.encode_with_transformer(ids)
                outs.extend(o.values() if isinstance(o, dict) else [o])
    return outs


# ---- 1. placement on the model's device ---------------------------------------------------------------------------
def call_te_layers(inj, t):
    """Call each touched text-encoder layer once with an input of its shape on its device."""
    with torch.no_grad():
        for module, layer in inj.layers.items():
            if not t.is_te(layer.layer):
                continue
            dev = next(module.parameters()).device
            if isinstance(module, nn.MultiheadAttention):
                x = torch.empty(3, 1, module.embed_dim, device=dev)
                module(x, x, x, need_weights=False)
            elif isinstance(module, nn.Linear):
                module(torch.empty(2, module.in_features, device=dev))
            elif isinstance(module, nn.LayerNorm):
                module(torch.empty(2, *module.normalized_shape, device=dev))



@pytest.mark.parametrize("scheduled", [False, True], ids=["fixed", "scheduled"])
def test_on_the_models_device_only_the_adapters_own_tensors(model, scheduled, output_dir):
    model.to("meta")
    mapped = map_adapter(usual_lora(model), find_targets(model))
    unet = (lambda s, n: 0.2 + 0.1 * s) if scheduled else 0.8
    inj = Injector()
    inj.apply(activate(mapped, te=0.8, unet=unet))
    for step in range(3):
        inj.set_step(step, 3)
        run_unet_wrapped(model, "meta")
        call_te_layers(inj, find_targets(model))  # (HF's CLIP cannot run on meta: its layers are called one by one)
    held = by_device(inj.held_tensors())
    model_bytes = nbytes(list(model.parameters()))
    adapter_bytes = nbytes([t for e in mapped.entries for t in e.net.weights.values()])
    touched = touched_bytes(inj)
    on_device = held.get("meta", 0)
    if scheduled:
        factors = nbytes([t for layer in inj.layers.values() if layer.factors for t in layer.factors.tensors()])
        assert 0 < on_device == factors <= adapter_bytes  # the per-step adapters' own tensors, one copy
    else:
        assert on_device == 0
    assert held.get("cpu", 0) == nbytes(b for _, st in inplace.owned_by(inj) for b in st.backup.values()
                                        if b is not None)
    assert inj.computed == len(inj.layers)
    _record(output_dir, f"{mapped.architecture}-meta-{'scheduled' if scheduled else 'fixed'}", {
        "model_bytes": model_bytes, "touched_layers": len(inj.layers), "touched_bytes": touched,
        "adapter_bytes": adapter_bytes, "ours_on_model_device": on_device, "ours_in_cpu_memory": held.get("cpu", 0)})
    inj.clear()


def test_the_opt_in_keeps_the_backups_on_the_models_device(model, output_dir):
    """Settings -> Tune -> keep the original weights in GPU memory (backup_device="layer"): the backups, the size
    of the touched layers, move to the model's device; nothing else changes."""
    model.to("meta")
    mapped = map_adapter(usual_lora(model), find_targets(model))
    inj = Injector()
    inj.backup_device = "layer"
    inj.apply(activate(mapped, te=0.8, unet=0.8))
    run_unet_wrapped(model, "meta")
    call_te_layers(inj, find_targets(model))
    held = by_device(inj.held_tensors())
    assert set(held) == {"meta"} and held["meta"] == nbytes(
        b for _, st in inplace.owned_by(inj) for b in st.backup.values() if b is not None)
    _record(output_dir, f"{mapped.architecture}-meta-backup-on-device", {
        "touched_bytes": touched_bytes(inj), "ours_on_model_device": held["meta"]})
    inj.clear()


# ---- 2. the webui's block moves ---------------------------------------------------------------------------------------
class Places:
    """Where a block is: CUDA and the CPU, or the float32/float64 stand-in described in the module docstring."""

    def __init__(self):
        self.gpu_device = torch.device("cuda") if CUDA else torch.device("cpu")

    def to_gpu(self, m):
        return m.to(self.gpu_device) if CUDA else m.to(torch.float32)

    def to_cpu(self, m):
        return m.to("cpu") if CUDA else m.to(torch.float64)

    def on_gpu(self, t) -> bool:
        return t.device.type == "cuda" if CUDA else t.dtype == torch.float32


class LowVram:
    """modules/lowvram.py setup_for_low_vram, with `devices.device` / `cpu` moves replaced by Places."""

    def __init__(self, sd_model, use_medvram: bool, places: Places):
        self.places, self.parents, self.module_in_gpu, self.handles = places, {}, None, []
        is_sdxl = hasattr(sd_model, "conditioner")
        to_remain_in_cpu = [(sd_model, "first_stage_model"), (sd_model, "model")]
        to_remain_in_cpu.append((sd_model, "conditioner") if is_sdxl else (sd_model.cond_stage_model, "transformer"))
        stored = []
        for obj, field in to_remain_in_cpu:
            stored.append(getattr(obj, field, None))
            setattr(obj, field, None)
        places.to_gpu(sd_model)
        for (obj, field), module in zip(to_remain_in_cpu, stored):
            setattr(obj, field, module)
            places.to_cpu(module)  # (the webui loads them there)
        if is_sdxl:
            self._hook(sd_model.conditioner)
        else:
            self._hook(sd_model.cond_stage_model.transformer)
            self.parents[sd_model.cond_stage_model.transformer] = sd_model.cond_stage_model
        self._hook(sd_model.first_stage_model)
        if use_medvram:
            self._hook(sd_model.model)
        else:
            dm = sd_model.model.diffusion_model
            stored = dm.input_blocks, dm.middle_block, dm.output_blocks, dm.time_embed
            dm.input_blocks, dm.middle_block, dm.output_blocks, dm.time_embed = None, None, None, None
            places.to_gpu(sd_model.model)
            dm.input_blocks, dm.middle_block, dm.output_blocks, dm.time_embed = stored
            self._hook(dm.time_embed)
            for block in dm.input_blocks:
                self._hook(block)
            self._hook(dm.middle_block)
            for block in dm.output_blocks:
                self._hook(block)

    def _hook(self, m):
        self.handles.append(m.register_forward_pre_hook(self.send_me_to_gpu))

    def send_me_to_gpu(self, module, _):
        module = self.parents.get(module, module)
        if self.module_in_gpu is module:
            return
        if self.module_in_gpu is not None:
            self.places.to_cpu(self.module_in_gpu)
        self.places.to_gpu(module)
        self.module_in_gpu = module
        self.moves += 1

    moves = 0

    def remove(self, sd_model):
        for h in self.handles:
            h.remove()
        self.places.to_gpu(sd_model)


def _generation(model, inj, entries, steps, device, hooks=None):
    inj.apply(entries)
    outs = run_text(model, device, hooks)
    for step in range(steps):
        inj.set_step(step, steps)
        outs.append(run_unet_wrapped(model, device))
        if hooks is not None:  # after each step: nothing of ours on the GPU for a block that is on the CPU
            assert not any(hooks.places.on_gpu(t) for t in inj.held_tensors() if t.device.type != "cpu")
    inj.park()
    return outs


@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_block_moves_merge_once_and_change_nothing(model, mode, output_dir):
    places = Places()
    ref = copy.deepcopy(model)
    places.to_gpu(ref)
    device = places.gpu_device
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    adapter = usual_lora(model)
    steps = 3
    runs = {}
    for name, sd_model in (("without", ref), ("with", model)):
        hooks = LowVram(sd_model, mode == "medvram", places) if name == "with" else None
        mapped = map_adapter(adapter, find_targets(sd_model))
        inj = Injector()
        inj.keep_on_device = name == "without"  # the runtime's choice on a model the webui moves
        fixed = activate(mapped, te=0.8, unet=0.8)
        sched = activate(mapped, te=0.8, unet=lambda s, n: 0.2 + 0.3 * s)
        outs = _generation(sd_model, inj, fixed, steps, device, hooks)
        merges_first = inj.computed
        outs += _generation(sd_model, inj, fixed, steps, device, hooks)  # the same set again: nothing to do
        merges_again = inj.computed - merges_first
        outs += _generation(sd_model, inj, sched, steps, device, hooks)
        merges_sched = inj.computed - merges_first
        t = find_targets(sd_model)
        unet_layers = sum(1 for layer in inj.layers.values() if not t.is_te(layer.layer))
        runs[name] = dict(outs=outs, touched=len(inj.layers), merges_first=merges_first, merges_again=merges_again,
                          merges_sched=merges_sched, step_merges=inj.step_merges,
                          moves=hooks.moves if hooks else 0, held=by_device(inj.held_tensors()),
                          unet_hooks=len(hooks.handles) - 2 if hooks else 0, unet_layers=unet_layers)
        inj.apply([])  # a generation without tags: every weight back
        inj.clear()
        if hooks is not None:
            hooks.remove(sd_model)
    w, wo = runs["with"], runs["without"]
    # the hooks did move blocks: medvram the text encoder and the UNet per generation, lowvram every UNet block per step
    assert w["moves"] >= (2 * 3 if mode == "medvram" else 3 * steps * w["unet_hooks"])
    assert len(w["outs"]) == len(wo["outs"])
    for a, b in zip(w["outs"], wo["outs"]):
        assert torch.equal(a, b)
    # each touched layer merged once for the fixed set, not again for the same set; the scheduled set re-merges the
    # UNet layers once (its per-step LoRA needs no re-merge per step; the text encoder's entries did not change);
    # however often the blocks moved
    assert w["merges_first"] == w["touched"] == wo["merges_first"]
    assert w["merges_again"] == 0 and w["merges_sched"] == w["unet_layers"] and w["step_merges"] == 0
    assert set(w["held"]) <= {"cpu"}
    places.to_gpu(model)
    now = model.state_dict()
    if CUDA:
        model.to("cpu")
        now = model.state_dict()
    assert all(torch.equal(now[n].cpu(), base[n].cpu()) for n in base)
    _record(output_dir, f"{find_targets(model).architecture}-{mode}", {
        "touched_layers": w["touched"], "block_moves": w["moves"], "merges_first_generation": w["merges_first"],
        "merges_same_set_again": w["merges_again"], "merges_scheduled_set": w["merges_sched"],
        "step_merges": w["step_merges"], "ours_by_device": w["held"], "gpu": "cuda" if CUDA else "float32 stand-in"})
