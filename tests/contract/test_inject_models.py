"""Injection on the real ldm / sgm model classes (tiny): kohya-named adapters for every layer map completely, and
a UNet / text-encoder forward with them equals the same forward on a copy whose weights were merged the built-in's
way, whatever CrossAttention.forward is installed, while the model's own parameters stay bit-identical."""
import copy
import re

import pytest
import torch
from torch import nn

from lib_tune.algos.full import FullModule
from lib_tune.algos.loha import LohaModule
from lib_tune.algos.lora import LoraModule
from lib_tune.algos.norm import NormModule
from lib_tune.formats.model import AdapterFile
from lib_tune.inject import Injector, activate, find_targets, map_adapter
from lib_tune.inject.mapping import weight_of
from tests.fixtures import adapters

ARCH = {"tiny_ldm_sd1": "sd1", "tiny_ldm_sd2v": "sd2", "tiny_sgm_sdxl": "sdxl"}
TE, UNET = 0.8, 0.6


@pytest.fixture(params=list(ARCH))
def model(request):
    return request.getfixturevalue(request.param)


# ---- kohya key generation (the inverse of the built-in's rules) -------------------------------------------------
def _openclip_to_hf(rest):
    return rest.replace("mlp_c_fc", "mlp_fc1").replace("mlp_c_proj", "mlp_fc2")


def te_keys(t):
    """kohya TE key -> (layer, part) for every text-encoder layer the built-in's rules can reach."""
    out = {}
    for name, m in t.items():
        if not t.is_te(name):
            continue
        if isinstance(m, nn.MultiheadAttention):
            m_ = re.fullmatch(r"(1_)?model_transformer_resblocks_(\d+)_attn", name)
            prefix = "lora_te2_" if m_[1] else "lora_te_"
            for p in ("q", "k", "v", "out"):
                out[f"{prefix}text_model_encoder_layers_{m_[2]}_self_attn_{p}_proj"] = (name, p)
            continue
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)) or weight_of(m, None) is None:
            continue
        if re.fullmatch(r"(1_)?model_transformer_resblocks_\d+_attn_out_proj", name):
            continue  # part "out" of the attention above
        m_ = re.fullmatch(r"(1_)?model_transformer_resblocks_(\d+)_(mlp_c_fc|mlp_c_proj)", name)
        if m_:
            out[f"{'lora_te2_' if m_[1] else 'lora_te_'}text_model_encoder_layers_{m_[2]}_{_openclip_to_hf(m_[3])}"] = \
                (name, None)
        elif name.startswith("0_transformer_text_model_"):
            out["lora_te1_text_model_" + name[len("0_transformer_text_model_"):]] = (name, None)
        elif name.startswith("transformer_text_model_encoder_layers_"):
            out["lora_te_text_model_" + name[len("transformer_text_model_"):]] = (name, None)
    return out


def unet_ldm_keys(t):
    kinds = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
    return {"lora_unet_" + name[len("diffusion_model_"):]: (name, None) for name, m in t.items()
            if name.startswith("diffusion_model_") and isinstance(m, kinds)}


def diffusers_name(layer):
    """The kohya diffusers-style name of an SD1/SD2 UNet layer (the fixtures' inverse of the built-in's block
    arithmetic, itself checked against the built-in in test_inject_builtin_names), or None where there is none."""
    return adapters.diffusers_key("lora_unet_" + layer[len("diffusion_model_"):])


def net_for(shape, i, is_norm):
    """A varied adapter module (LoRA, LoCon, LoHa, Full with bias, DoRA-LoRA, Norm) whose delta has `shape`."""
    g = torch.Generator().manual_seed(1000 + i)

    def r(*s):
        return torch.randn(s, generator=g) * 0.3

    if is_norm:
        return NormModule({"w_norm": r(*shape), "b_norm": r(*shape)})
    out, inn, k = shape[0], shape[1], tuple(shape[2:])
    kind = i % 4
    if kind == 1 and not k:
        return LohaModule({"hada_w1_a": r(out, 2), "hada_w1_b": r(2, inn), "hada_w2_a": r(out, 2),
                           "hada_w2_b": r(2, inn), "alpha": torch.tensor(1.0)})
    if kind == 2:
        return FullModule({"diff": r(*shape), "diff_b": r(out)})
    w = {"lora_down.weight": r(2, inn, *k), "lora_up.weight": r(out, 2, *((1, 1) if k else ())),
         "alpha": torch.tensor(1.0)}
    if kind == 3:
        w["dora_scale"] = r(1, inn, *([1] * len(k))).abs() + 0.5
    return LoraModule(w)


def adapter(t, keys, arch):
    mods = {}
    for i, (key, (layer, part)) in enumerate(keys.items()):
        m = t[layer]
        mods[key] = net_for(weight_of(m, part).shape, i, isinstance(m, (nn.GroupNorm, nn.LayerNorm)))
    return AdapterFile(path=f"synthetic-{arch}.safetensors", modules=mods, architecture=arch)


# ---- reference: the built-in's merge on a copy -------------------------------------------------------------------
@torch.no_grad()
def merge_copy_like_builtin(model, mapped, te, unet):
    ref = copy.deepcopy(model)
    rt = find_targets(ref)
    mha_parts = {}
    for e in mapped.entries:
        m = te if e.is_te else unet
        mod = rt[e.layer]
        if e.part is not None:
            mha_parts.setdefault(e.layer, {})[e.part] = (e.net, m)
            continue
        up, ex_bias = e.net.calc_updown(mod.weight)
        up = up * m
        mod.weight.copy_((mod.weight.to(dtype=up.dtype) + up).to(dtype=mod.weight.dtype))
        if ex_bias is not None:
            if mod.bias is None:
                mod.bias = nn.Parameter((ex_bias * m).to(mod.weight.dtype))
            else:
                mod.bias.copy_((mod.bias + ex_bias * m).to(dtype=mod.bias.dtype))
    for layer, parts in mha_parts.items():  # networks.py L486-513: all four parts
        mha = rt[layer]
        qkv = mha.in_proj_weight.chunk(3, 0)
        ups = [parts[p][0].calc_updown(w)[0] * parts[p][1] for p, w in zip("qkv", qkv)]
        mha.in_proj_weight += torch.vstack(ups)
        up, ex_bias = parts["out"][0].calc_updown(mha.out_proj.weight)
        mha.out_proj.weight += up * parts["out"][1]
        if ex_bias is not None:
            mha.out_proj.bias += ex_bias * parts["out"][1]
    return ref


# ---- forwards --------------------------------------------------------------------------------------------------
def _unet_inputs(unet):
    g = torch.Generator().manual_seed(7)
    ctx_dim = next(m.in_features for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    kw = {"context": torch.randn(2, 5, ctx_dim, generator=g)}
    if getattr(unet, "num_classes", None) is not None:
        kw["y"] = torch.randn(2, unet.label_emb[0][0].in_features, generator=g)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), kw


def run_unet(model):
    unet = model.model.diffusion_model
    x, t, kw = _unet_inputs(unet)
    with torch.no_grad():
        return unet(x, timesteps=t, **kw)


def _text_encoders(model):
    if hasattr(model, "conditioner"):
        return list(model.conditioner.embedders[:2])
    return [model.cond_stage_model]


def run_text(model):
    outs = []
    with torch.no_grad():
        for enc in _text_encoders(model):
            if hasattr(enc, "transformer"):  # HF CLIP
                n = min(77, enc.transformer.config.max_position_embeddings)
                g = torch.Generator().manual_seed(3)
                ids = torch.randint(0, enc.transformer.config.vocab_size, (1, n), generator=g)
                outs.append(enc.transformer(input_ids=ids).last_hidden_state)
            else:  # open_clip
                shape = (1, enc.model.positional_embedding.shape[0])
                ids = torch.randint(0, enc.model.token_embedding.num_embeddings, shape,
                                    generator=torch.Generator().manual_seed(3))
                o = enc.encode_with_transformer(ids)
                outs.extend(o.values() if isinstance(o, dict) else [o])
    return outs


def snapshot(model):
    return {n: (p.data_ptr(), p._version, p.detach().clone()) for n, p in model.named_parameters()}


def assert_untouched(model, snap):
    for n, p in model.named_parameters():
        ptr, ver, val = snap[n]
        assert p.data_ptr() == ptr and p._version == ver and torch.equal(p.detach(), val), n
    assert not any("forward" in m.__dict__ for m in model.modules())


# ---- tests -------------------------------------------------------------------------------------------------------
def test_kohya_keys_for_every_layer_map_completely(model):
    t = find_targets(model)
    keys = {**te_keys(t), **unet_ldm_keys(t)}
    assert len(te_keys(t)) >= 12 and len(unet_ldm_keys(t)) >= 100
    mapped = map_adapter(adapter(t, keys, t.architecture), t)
    assert not mapped.unmapped and not mapped.mismatched and not mapped.partial
    assert {e.key: (e.layer, e.part) for e in mapped.entries} == keys
    assert all(e.is_te == t.is_te(e.layer) for e in mapped.entries)
    unet = {n for n, m in t.items() if n.startswith("diffusion_model_") and isinstance(m, (nn.Linear, nn.Conv2d))}
    assert unet <= {e.layer for e in mapped.entries}


def test_diffusers_style_unet_names_map_completely(model):
    t = find_targets(model)
    if t.architecture == "sdxl":
        pytest.skip("kohya SDXL files use ldm names")
    keys = {}
    for layer, m in t.items():
        if layer.startswith("diffusion_model_") and isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
            name = diffusers_name(layer)
            if name is not None:
                keys[name] = (layer, None)
    attn = [k for k in keys if "_attentions_" in k and "transformer_blocks" in k]
    assert len(keys) >= 100 and len(attn) >= 50
    mapped = map_adapter(adapter(t, keys, t.architecture), t)
    assert not mapped.unmapped
    assert {e.key: (e.layer, e.part) for e in mapped.entries} == keys


def _sdp_forward(self, x, context=None, mask=None, **kwargs):
    """Another CrossAttention.forward, the way the webui's optimizations replace it: it still calls the Linears."""
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, d = q.shape
    q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
    return self.to_out(out)


def _cross_attention_classes(model):
    return sorted({type(m) for m in model.modules() if type(m).__name__ == "CrossAttention"}, key=str)


def test_forward_equals_builtin_merge_and_base_is_untouched(model, monkeypatch):
    t = find_targets(model)
    mapped = map_adapter(adapter(t, {**te_keys(t), **unet_ldm_keys(t)}, t.architecture), t)
    ref = merge_copy_like_builtin(model, mapped, TE, UNET)
    snap = snapshot(model)
    base_unet, base_text = run_unet(model), run_text(model)
    inj = Injector()
    inj.apply(activate(mapped, te=TE, unet=UNET))
    try:
        classes = _cross_attention_classes(model)
        assert classes
        for variant in (None, _sdp_forward):
            if variant is not None:
                for cls in classes:
                    monkeypatch.setattr(cls, "forward", variant)
            y, text = run_unet(model), run_text(model)
            assert torch.equal(y, run_unet(ref))
            for a, b, base in zip(text, run_text(ref), base_text):
                assert torch.equal(a, b) and not torch.equal(a, base)
            assert not torch.allclose(y, base_unet)
        assert torch.equal(run_unet(model), y)  # second "generation": served from the cache
        computed = inj.computed
        inj.clear()
        inj.apply(activate(mapped, te=TE, unet=UNET))
        run_unet(model), run_text(model)
        assert inj.computed == computed
    finally:
        inj.clear()
        monkeypatch.undo()
    assert torch.equal(run_unet(model), base_unet)
    assert_untouched(model, snap)


def test_scheduled_unet_weight_follows_steps_without_remerging(model):
    t = find_targets(model)
    keys = {k: v for k, v in unet_ldm_keys(t).items() if "attn" in k or "proj" in k}
    ad = adapter(t, keys, t.architecture)
    mapped = map_adapter(ad, t)
    snap = snapshot(model)
    inj = Injector()
    try:
        want = []
        for step in range(3):
            inj.apply(activate(mapped, unet=0.5 * step))
            want.append(run_unet(model))
        inj.apply(activate(mapped, unet=lambda s, n: 0.5 * s))
        run_unet(model)
        computed = inj.computed
        for step in range(3):
            inj.set_step(step, 3)
            torch.testing.assert_close(run_unet(model), want[step], rtol=1e-4, atol=1e-4)
        assert inj.computed == computed
    finally:
        inj.clear()
    assert_untouched(model, snap)


def test_kohya_file_read_back_maps_completely(model, tmp_path):
    """The same keys through a real file and the project's reader (lib_tune.formats): nothing lost on the way."""
    from lib_tune.formats.read import load_adapter
    from lib_tune.formats.write import save_adapter

    t = find_targets(model)
    keys = {**te_keys(t), **unet_ldm_keys(t)}
    if t.architecture != "sdxl":
        keys.update({diffusers_name(layer): (layer, part) for layer, part in list(keys.values())
                     if layer.startswith("diffusion_model_") and "attn" in layer and diffusers_name(layer)})
    written = adapter(t, keys, None)
    path = tmp_path / "kohya.safetensors"
    save_adapter(str(path), {f"{k}.{n}": v for k, net in written.modules.items() for n, v in net.weights.items()}, {})
    back = load_adapter(str(path))
    assert set(back.modules) == set(keys) and not back.unplaced
    mapped = map_adapter(back, t)
    assert not mapped.unmapped and not mapped.mismatched
    assert {e.key: (e.layer, e.part) for e in mapped.entries} == keys
