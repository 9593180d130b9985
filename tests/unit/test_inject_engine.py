"""Injector on single layers: results equal the built-in's merged weights bit for bit, base weights are never
written, caching, per-step multipliers, training gradients, and coexistence with other forwards."""
import torch
import torch.nn.functional as F
from torch import nn

from lib_tune.algos.full import FullModule
from lib_tune.algos.ia3 import Ia3Module
from lib_tune.algos.loha import LohaModule
from lib_tune.algos.lora import LoraModule
from lib_tune.algos.norm import NormModule
from lib_tune.formats.model import AdapterFile
from lib_tune.inject import ActiveEntry, Injector, MappedEntry
from tests.unit.test_inject_mapping import lora


def rnd(*shape, seed=0, scale=0.5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def entry(module, net, part=None, layer="layer", adapter=None):
    return MappedEntry(key=layer, layer=layer, module=module, net=net, part=part, is_te=False,
                       adapter=adapter or AdapterFile(path="a"))


def merged_like_builtin(weight, nets_and_m, bias=None):
    """The built-in's merge (networks.py network_apply_weights), written out: per net, on the running weight."""
    w, b = weight.detach().clone(), None if bias is None else bias.detach().clone()
    for net, m in nets_and_m:
        up, ex_bias = net.calc_updown(w)
        up, ex_bias = up * m, (None if ex_bias is None else ex_bias * m)
        w = (w.to(dtype=up.dtype) + up).to(dtype=weight.dtype)
        if ex_bias is not None:
            b = ex_bias.to(weight.dtype) if b is None else (b + ex_bias).to(dtype=bias.dtype)
    return w, b


def snapshot(model):
    """Identity, storage, in-place version and exact bytes of every parameter."""
    return {n: (id(p), p.data_ptr(), p._version, p.detach().clone()) for n, p in model.named_parameters()}


def assert_untouched(model, snap):
    now = dict(model.named_parameters())
    assert set(now) == set(snap)
    for n, (i, ptr, ver, val) in snap.items():
        p = now[n]
        assert (id(p), p.data_ptr(), p._version) == (i, ptr, ver), n
        assert torch.equal(p.detach(), val), n
    assert not any("forward" in m.__dict__ for m in model.modules())


def counting(net):
    """Count calls of net.calc_updown (the expensive part of a merge)."""
    calls = [0]
    orig = net.calc_updown

    def calc(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    net.calc_updown = calc
    return calls


# ---- merged results --------------------------------------------------------------------------------------------
def test_linear_stack_is_bit_identical_to_builtin_merge():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    a = lora((5, 6), seed=1)
    b = Ia3Module({"weight": rnd(5, seed=2), "on_input": torch.tensor(0)})  # depends on the running weight
    c = FullModule({"diff": rnd(5, 6, seed=3), "diff_b": rnd(5, seed=4)})
    x = rnd(3, 6, seed=5)
    base = lin(x)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, a), 0.7), ActiveEntry(entry(lin, b), -0.4), ActiveEntry(entry(lin, c), 1.3)])
    y = lin(x)
    w, bias = merged_like_builtin(lin.weight, [(a, 0.7), (b, -0.4), (c, 1.3)], lin.bias)
    assert torch.equal(y, F.linear(x, w, bias))
    assert not torch.allclose(y, base)
    inj.clear()
    assert torch.equal(lin(x), base)


def test_conv_dora_and_loha_bit_identical():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    dora = LoraModule({"lora_down.weight": rnd(2, 4, 3, 3, seed=1), "lora_up.weight": rnd(6, 2, 1, 1, seed=2),
                       "alpha": torch.tensor(1.0), "dora_scale": rnd(1, 4, 1, 1, seed=3).abs() + 1})
    loha = LohaModule({"hada_w1_a": rnd(6, 2, seed=4), "hada_w1_b": rnd(2, 36, seed=5),
                       "hada_w2_a": rnd(6, 2, seed=6), "hada_w2_b": rnd(2, 36, seed=7), "alpha": torch.tensor(2.0)})
    x = rnd(2, 4, 5, 5, seed=8)
    inj = Injector()
    inj.apply([ActiveEntry(entry(conv, dora), 0.8), ActiveEntry(entry(conv, loha), 0.5)])
    w, _ = merged_like_builtin(conv.weight, [(dora, 0.8), (loha, 0.5)])
    assert torch.equal(conv(x), F.conv2d(x, w, conv.bias, padding=1))


def test_norm_layers_weight_and_bias():
    torch.manual_seed(0)
    for norm, x in ((nn.GroupNorm(2, 4), rnd(2, 4, 3, 3, seed=1)), (nn.LayerNorm(4), rnd(2, 3, 4, seed=1))):
        net = NormModule({"w_norm": rnd(4, seed=2), "b_norm": rnd(4, seed=3)})
        ref = type(norm)(*([2, 4] if isinstance(norm, nn.GroupNorm) else [4]))
        w, b = merged_like_builtin(norm.weight, [(net, 0.6)], norm.bias)
        ref.load_state_dict({"weight": w, "bias": b})
        inj = Injector()
        inj.apply([ActiveEntry(entry(norm, net), 0.6)])
        assert torch.equal(norm(x), ref(x))
        inj.clear()


def test_low_precision_layer_with_fp32_adapter_keeps_builtin_casts():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).to(torch.bfloat16)
    a, b = lora((5, 6), seed=1), lora((5, 6), seed=2)  # fp32 factors: the delta is fp32
    x = rnd(3, 6, seed=3).to(torch.bfloat16)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, a), 0.3), ActiveEntry(entry(lin, b), 0.9)])
    w, _ = merged_like_builtin(lin.weight, [(a, 0.3), (b, 0.9)])
    assert w.dtype == torch.bfloat16
    assert torch.equal(lin(x), F.linear(x, w, lin.bias))


def _mha_builtin(mha, parts_m):
    """The built-in's MultiheadAttention merge, in place on a copy (networks.py L486-513), zeros for missing parts."""
    ref = nn.MultiheadAttention(mha.embed_dim, mha.num_heads).to(mha.in_proj_weight.dtype)
    ref.load_state_dict(mha.state_dict())
    with torch.no_grad():
        for parts in parts_m:
            qkv = ref.in_proj_weight.chunk(3, 0)
            ups = [(parts[p][0].calc_updown(c)[0] * parts[p][1]) if p in parts else None for p, c in zip("qkv", qkv)]
            dt = next(u.dtype for u in ups if u is not None)
            ups = [u if u is not None else torch.zeros(c.shape, dtype=dt) for u, c in zip(ups, qkv)]
            ref.in_proj_weight += torch.vstack(ups)
            if "out" in parts:
                up, ex_bias = parts["out"][0].calc_updown(ref.out_proj.weight)
                ref.out_proj.weight += up * parts["out"][1]
                if ex_bias is not None:
                    ref.out_proj.bias += ex_bias * parts["out"][1]
    return ref


def test_multihead_attention_full_and_partial_sets():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        mha = nn.MultiheadAttention(8, 2).to(dtype)
        with torch.no_grad():
            mha.out_proj.bias.normal_()
        ad1, ad2 = AdapterFile(path="one"), AdapterFile(path="two")
        full = {p: lora((8, 8), seed=i) for i, p in enumerate(("q", "k", "v", "out"))}
        full["out"] = FullModule({"diff": rnd(8, 8, seed=9), "diff_b": rnd(8, seed=10)})
        partial = {"k": lora((8, 8), seed=11), "v": lora((8, 8), seed=12)}  # no q, no out
        entries = [ActiveEntry(entry(mha, n, p, adapter=ad1), 0.6) for p, n in full.items()]
        entries += [ActiveEntry(entry(mha, n, p, adapter=ad2), 1.5) for p, n in partial.items()]
        ref = _mha_builtin(mha, [{p: (n, 0.6) for p, n in full.items()}, {p: (n, 1.5) for p, n in partial.items()}])
        x = rnd(4, 1, 8, seed=13).to(dtype)
        base = mha(x, x, x)[0]
        inj = Injector()
        inj.apply(entries)
        y = mha(x, x, x, need_weights=False)[0]
        assert torch.equal(y, ref(x, x, x, need_weights=False)[0]), dtype
        assert not torch.equal(y, base)
        inj.clear()
        assert torch.equal(mha(x, x, x)[0], base)


# ---- base weights are never written ---------------------------------------------------------------------------
def test_base_parameters_unchanged_through_any_sequence_including_exceptions():
    from tests.unit.test_inject_targets import sd2_model

    model = sd2_model()
    snap = snapshot(model)
    te = model.cond_stage_model
    lin = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    mha = te.model.transformer.resblocks[0].attn
    gn = model.model.diffusion_model.input_blocks[1][0].in_layers[0]
    ad = AdapterFile(path="a")
    entries = [ActiveEntry(entry(lin, lora(lin.weight.shape)), 0.9),
               ActiveEntry(entry(gn, NormModule({"w_norm": rnd(8), "b_norm": rnd(8)})), 0.5),
               ActiveEntry(entry(mha, lora((6, 6), seed=3), "q", adapter=ad), 1.0),
               ActiveEntry(entry(mha, FullModule({"diff": rnd(6, 6), "diff_b": rnd(6)}), "out", adapter=ad), 1.0),
               ActiveEntry(entry(lin, lora(lin.weight.shape, seed=7)), lambda s, n: s / n)]
    x, t, ctx, tok = rnd(1, 4, 8, 8), rnd(1, 8), rnd(1, 3, 6), rnd(5, 1, 6)
    base = model.model.diffusion_model(x, t, ctx)
    inj = Injector()
    for train in (False, True, False):
        inj.apply(entries, train=train)
        for step in range(3):
            inj.set_step(step, 3)
            out = model.model.diffusion_model(x, t, ctx)
            te(tok)
        if train:
            out.sum().backward()
        for bad in (lambda: lin(rnd(2, 5)), lambda: mha(rnd(5, 1, 4), rnd(5, 1, 4), rnd(5, 1, 4)),
                    lambda: gn(rnd(1, 3, 2, 2))):
            try:
                bad()
            except (RuntimeError, AssertionError):  # F.linear / MHA's embed-dim assertion / group_norm
                pass
            else:
                raise AssertionError("the bad input should have failed inside forward")
            assert lin._parameters["weight"] is dict(model.named_parameters())[
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    entries[0].multiplier = 0.1
    inj.apply(entries[:2])
    model.model.diffusion_model(x, t, ctx)
    inj.clear()
    assert torch.equal(model.model.diffusion_model(x, t, ctx), base)
    assert all(p.grad is None for e in entries for p in e.entry.module.parameters())
    assert_untouched(model, snap)


def test_only_touched_modules_get_a_wrapper_and_zero_multipliers_none():
    from tests.unit.test_inject_targets import sd1_model

    model = sd1_model()
    a = model.model.diffusion_model.input_blocks[1][1].proj_in
    b = model.model.diffusion_model.out[2]
    inj = Injector()
    inj.apply([ActiveEntry(entry(a, lora(a.weight.shape)), 1.0), ActiveEntry(entry(b, lora(b.weight.shape)), 0.0)])
    assert [m for m in model.modules() if "forward" in m.__dict__] == [a]
    assert inj.touched == ["layer"]
    inj.clear()
    assert not any("forward" in m.__dict__ for m in model.modules())


# ---- caching ------------------------------------------------------------------------------------------------------
def test_same_set_is_computed_once_and_a_multiplier_change_only_recomputes_its_layer():
    torch.manual_seed(0)
    l1, l2 = nn.Linear(4, 4), nn.Linear(4, 4)
    n1, n2 = lora((4, 4), seed=1), lora((4, 4), seed=2)
    c1, c2 = counting(n1), counting(n2)
    x = rnd(2, 4)
    inj = Injector()

    def generation(m1, m2, steps=3):
        inj.apply([ActiveEntry(entry(l1, n1), m1), ActiveEntry(entry(l2, n2), m2)])
        for _ in range(steps):
            y = l2(l1(x))
        inj.clear()
        return y

    y1 = generation(0.5, 0.5)
    assert (c1[0], c2[0], inj.computed) == (1, 1, 2)
    assert torch.equal(generation(0.5, 0.5), y1)
    assert (c1[0], c2[0], inj.computed) == (1, 1, 2)
    generation(0.5, 0.9)
    assert (c1[0], c2[0]) == (1, 2)
    generation(0.5, 0.9)
    assert (c1[0], c2[0]) == (1, 2)


def test_cache_follows_base_and_adapter_changes():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    net = lora((4, 4), seed=1)
    calls = counting(net)
    x = rnd(2, 4)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, net), 1.0)])
    lin(x)
    with torch.no_grad():  # a checkpoint (re)load writes the weights in place: the merge must follow
        lin.weight.copy_(rnd(4, 4, seed=9))
    y = lin(x)
    assert calls[0] == 2
    w, _ = merged_like_builtin(lin.weight, [(net, 1.0)])  # (a third call)
    assert torch.equal(y, F.linear(x, w, lin.bias))
    with torch.no_grad():  # a training step on the adapter, then apply again
        net.weights["lora_up.weight"].add_(1.0)
    inj.apply([ActiveEntry(entry(lin, net), 1.0)])
    lin(x)
    assert calls[0] == 4
    inj.clear()


def test_untouched_layers_lose_their_cache_on_the_next_apply():
    l1, l2 = nn.Linear(4, 4), nn.Linear(4, 4)
    e1, e2 = entry(l1, lora((4, 4), seed=1)), entry(l2, lora((4, 4), seed=2))
    inj = Injector()
    inj.apply([ActiveEntry(e1, 1.0), ActiveEntry(e2, 1.0)])
    l1(rnd(1, 4)), l2(rnd(1, 4))
    inj.apply([ActiveEntry(e1, 1.0)])
    assert set(inj._cache.keys()) == {l1}
    inj.clear()


# ---- per-step multipliers -----------------------------------------------------------------------------------------
def _layers_and_nets():
    torch.manual_seed(0)
    lin, conv, gn = nn.Linear(6, 5), nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(2, 4)
    return [
        (lin, lora((5, 6), seed=1), rnd(3, 6, seed=9)),  # LoRA: bypass
        (lin, FullModule({"diff": rnd(5, 6, seed=2), "diff_b": rnd(5, seed=3)}), rnd(3, 6, seed=9)),  # op term
        (conv, lora((6, 4, 3, 3), seed=4), rnd(2, 4, 5, 5, seed=9)),
        (conv, LohaModule({"hada_w1_a": rnd(6, 2), "hada_w1_b": rnd(2, 36), "hada_w2_a": rnd(6, 2, seed=5),
                           "hada_w2_b": rnd(2, 36, seed=6)}), rnd(2, 4, 5, 5, seed=9)),
        (gn, NormModule({"w_norm": rnd(4, seed=7), "b_norm": rnd(4, seed=8)}), rnd(2, 4, 3, 3, seed=9)),
    ]


def test_scheduled_equals_static_at_each_step_without_recomputing():
    for module, net, x in _layers_and_nets():
        calls = counting(net)
        inj = Injector()
        expected = []
        for step in range(4):
            inj.apply([ActiveEntry(entry(module, net), 0.25 * step - 0.2)])
            expected.append(module(x))
        inj.clear()
        before = calls[0]
        inj.apply([ActiveEntry(entry(module, net), lambda s, n: 0.25 * s - 0.2)])
        for step in range(4):
            inj.set_step(step, 4)
            torch.testing.assert_close(module(x), expected[step], rtol=1e-5, atol=1e-5)
        assert calls[0] - before <= 1, type(net).__name__  # LoRA bypass: 0; others: dW once
        inj.clear()


def test_static_and_per_step_entries_on_one_layer():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    fixed, lo1, lo2 = lora((5, 6), seed=1), lora((5, 6), seed=2), lora((5, 6), seed=3)
    full = FullModule({"diff": rnd(5, 6, seed=4), "diff_b": rnd(5, seed=5)})
    x = rnd(3, 6, seed=6)
    curves = {lo1: lambda s, n: s / n, lo2: lambda s, n: 1 - s / n, full: lambda s, n: 0.5 if s % 2 else 0.0}
    inj = Injector()
    for step in range(4):
        inj.apply([ActiveEntry(entry(lin, fixed), 0.8)] +
                  [ActiveEntry(entry(lin, n), f(step, 4)) for n, f in curves.items()])
        want = lin(x)
        inj.apply([ActiveEntry(entry(lin, fixed), 0.8)] + [ActiveEntry(entry(lin, n), f) for n, f in curves.items()])
        inj.set_step(step, 4)
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    layer = inj.layers[lin]
    assert [a.entry.net for a in layer.lowrank] == [lo1, lo2] and [a.entry.net for a in layer.sched] == [full]
    inj.clear()


def test_flat_parts_of_a_schedule_reuse_the_step_weights():
    lin = nn.Linear(4, 4)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, lora((4, 4), seed=1)), lambda s, n: min(s, 2) / 2)])
    seen = []
    for step in range(5):
        inj.set_step(step, 5)
        lin(rnd(1, 4))
        seen.append(inj.layers[lin].cached.step_swaps.get(("", "weight")))
    assert seen[0] is None  # multiplier 0: the layer's own weight
    assert seen[1] is not seen[2] and seen[2] is seen[3] is seen[4]
    inj.clear()


def test_scheduled_multihead_attention_and_mixed_static():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    ad_s, ad_d = AdapterFile(path="static"), AdapterFile(path="sched")
    static = [ActiveEntry(entry(mha, lora((8, 8), seed=1), "q", adapter=ad_s), 0.5)]
    sched_nets = {"k": lora((8, 8), seed=2), "out": lora((8, 8), seed=3)}
    x = rnd(4, 1, 8)
    inj = Injector()
    for step in range(3):
        m = 1.0 - 0.5 * step
        inj.apply(static + [ActiveEntry(entry(mha, n, p, adapter=ad_d), m) for p, n in sched_nets.items()])
        want = mha(x, x, x)[0]
        inj.apply(static + [ActiveEntry(entry(mha, n, p, adapter=ad_d), lambda s, t: 1.0 - 0.5 * s)
                            for p, n in sched_nets.items()])
        inj.set_step(step, 3)
        torch.testing.assert_close(mha(x, x, x)[0], want, rtol=1e-5, atol=1e-6)
    inj.clear()


def test_block_multiplier_scales_the_delta():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    net, x = lora((4, 4), seed=1), rnd(2, 4)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, net), 0.5, block=0.4)])
    y = lin(x)
    inj.apply([ActiveEntry(entry(lin, net), 0.2)])
    assert torch.equal(y, lin(x))
    inj.clear()


# ---- training -----------------------------------------------------------------------------------------------------
def test_training_gradients_reach_adapters_not_base():
    torch.manual_seed(0)
    lin, conv, mha = nn.Linear(6, 6), nn.Conv2d(6, 6, 3, padding=1), nn.MultiheadAttention(6, 2)
    nets = {"lin": lora((6, 6), seed=1), "lin_full": FullModule({"diff": rnd(6, 6), "diff_b": rnd(6)}),
            "conv": lora((6, 6, 3, 3), seed=2), "q": lora((6, 6), seed=3), "out": lora((6, 6), seed=4)}
    factors = {n: [t for k, t in net.weights.items() if k != "alpha"] for n, net in nets.items()}
    for ts in factors.values():
        for t in ts:
            t.requires_grad_(True)
    ad = AdapterFile(path="t")
    entries = [ActiveEntry(entry(lin, nets["lin"]), 1.0), ActiveEntry(entry(lin, nets["lin_full"]), 0.5),
               ActiveEntry(entry(conv, nets["conv"]), 1.0),
               ActiveEntry(entry(mha, nets["q"], "q", adapter=ad), 1.0),
               ActiveEntry(entry(mha, nets["out"], "out", adapter=ad), lambda s, n: 0.5)]
    inj = Injector()
    inj.apply(entries, train=True)
    x = rnd(2, 6, 4, 4)
    h = conv(x).flatten(2).permute(2, 0, 1)  # [L, N, C]
    h = mha(h, h, h)[0]
    loss = lin(h).pow(2).mean()
    loss.backward()
    for name, ts in factors.items():
        grads = [t.grad for t in ts]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for m in (lin, conv, mha) for p in m.parameters())
    # no cache in training: an optimizer step on the adapter shows in the very next forward
    y1 = lin(h.detach())
    with torch.no_grad():
        nets["lin"].weights["lora_up.weight"].mul_(2)
    assert not torch.equal(lin(h.detach()), y1)
    inj.clear()


def test_training_output_matches_inference_output():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    net, x = lora((5, 6), seed=1), rnd(3, 6)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, net), 0.8)])
    want = lin(x)
    inj.apply([ActiveEntry(entry(lin, net), 0.8)], train=True)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-6)
    inj.clear()


# ---- coexistence ----------------------------------------------------------------------------------------------------
def test_class_level_patches_and_prior_instance_forwards_still_run(monkeypatch):
    torch.manual_seed(0)
    calls = []
    original = nn.Linear.forward

    def patched(self, input):  # what the webui's lora_patches / other extensions do
        calls.append(self)
        return original(self, input)

    monkeypatch.setattr(nn.Linear, "forward", patched)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    prior = []
    b.forward = lambda x: prior.append(1) or nn.Linear.forward(b, x) + 1.0
    inj = Injector()
    inj.apply([ActiveEntry(entry(a, lora((4, 4), seed=1)), 1.0), ActiveEntry(entry(b, lora((4, 4), seed=2)), 1.0)])
    x = rnd(2, 4)
    ya, yb = a(x), b(x)
    assert calls == [a, b] and prior == [1]
    wb, _ = merged_like_builtin(b.weight, [(inj.layers[b].static[0].entry.net, 1.0)])
    assert torch.equal(yb, F.linear(x, wb, b.bias) + 1.0)
    inj.clear()
    assert "forward" not in a.__dict__ and b.__dict__["forward"] is not None
    b(x)
    assert prior == [1, 1]


def test_a_wrapper_installed_over_ours_survives_clear():
    lin = nn.Linear(4, 4)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, lora((4, 4), seed=1)), 1.0)])
    ours = lin.forward
    lin.forward = lambda x: ours(x) * 2
    x = rnd(2, 4)
    base = nn.Linear.forward(lin, x)
    inj.clear()
    assert torch.equal(lin(x), base * 2)  # ours became a pass-through


def _sdp_forward(self, x, context=None):
    """A different CrossAttention.forward, as the webui's optimizations install (sd_hijack_optimizations.py): it
    still calls to_q / to_k / to_v / to_out."""
    context = x if context is None else context
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
               for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
    return self.to_out(out)


def test_any_cross_attention_forward_variant_sees_the_adapters(monkeypatch):
    import copy

    from tests.unit.test_inject_targets import CTX, CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(8, CTX)
    nets = {name: lora(getattr(attn, name).weight.shape, seed=i) for i, name in enumerate(("to_q", "to_k", "to_v"))}
    nets["to_out"] = lora((8, 8), seed=5)
    mods = {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}
    ref = copy.deepcopy(attn)
    ref_mods = {"to_q": ref.to_q, "to_k": ref.to_k, "to_v": ref.to_v, "to_out": ref.to_out[0]}
    with torch.no_grad():
        for name, net in nets.items():
            w, _ = merged_like_builtin(mods[name].weight, [(net, 0.75)])
            ref_mods[name].weight.copy_(w)
    x, ctx = rnd(2, 5, 8, seed=7), rnd(2, 3, CTX, seed=8)
    inj = Injector()
    inj.apply([ActiveEntry(entry(mods[n], net), 0.75) for n, net in nets.items()])
    for variant in (None, _sdp_forward):
        if variant is not None:
            monkeypatch.setattr(CrossAttention, "forward", variant)
        assert torch.equal(attn(x, ctx), ref(x, ctx))
    inj.clear()
    assert not torch.equal(attn(x, ctx), ref(x, ctx))


def test_fp8_storage_merges_all_adapters_from_the_fp16_copy():
    """The webui keeps `fp16_weight` beside an fp8-stored layer; every adapter must apply (the built-in only
    keeps the last one, webui issue #15995)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    full = lin.weight.detach().clone()
    lin.fp16_weight = full
    with torch.no_grad():
        lin.weight.copy_(full.to(torch.bfloat16).float())  # stand-in for the lossy storage
    a, b = lora((5, 6), seed=1), lora((5, 6), seed=2)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, a), 1.0), ActiveEntry(entry(lin, b), 1.0)])
    x = rnd(3, 6)
    w, _ = merged_like_builtin(full, [(a, 1.0), (b, 1.0)])
    assert torch.equal(lin(x), F.linear(x, w, lin.bias))
    inj.clear()


def test_cache_does_not_keep_a_dropped_model_alive():
    import gc
    import weakref

    lin = nn.Linear(4, 4)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, lora((4, 4), seed=1)), 1.0)])
    lin(rnd(1, 4))
    inj.clear()
    ref = weakref.ref(lin)
    del lin
    gc.collect()
    assert ref() is None and len(inj._cache) == 0


# ---- devices (run where CUDA is present) --------------------------------------------------------------------------
cuda = __import__("pytest").mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_half_layers_with_cpu_adapters():
    """Deltas are computed on the layer's device, the cache lives there in the layer's dtype, results stay
    bit-identical to the built-in's merge; per-step LoRA reads device copies; training works on the device."""
    torch.manual_seed(0)
    dev, half = torch.device("cuda"), torch.float16
    lin = nn.Linear(64, 32).to(dev, half)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(dev, half)
    mha = nn.MultiheadAttention(16, 2).to(dev, half)
    a, b, c = lora((32, 64), seed=1), FullModule({"diff": rnd(32, 64, seed=2), "diff_b": rnd(32, seed=3)}), \
        lora((16, 8, 3, 3), seed=4)
    ad = AdapterFile(path="m")
    parts = {p: lora((16, 16), seed=10 + i) for i, p in enumerate(("q", "k", "v", "out"))}
    snap = {(id(m), n): (p.data_ptr(), p._version, p.detach().clone())
            for m in (lin, conv, mha) for n, p in m.named_parameters()}
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, a), 0.7), ActiveEntry(entry(lin, b), 0.3), ActiveEntry(entry(conv, c), 1.1)]
              + [ActiveEntry(entry(mha, n, p, adapter=ad), 0.9) for p, n in parts.items()])
    x = rnd(4, 64, seed=5).to(dev, half)
    xc = rnd(2, 8, 6, 6, seed=6).to(dev, half)
    xm = rnd(5, 2, 16, seed=7).to(dev, half)
    w, bias = merged_like_builtin(lin.weight, [(a, 0.7), (b, 0.3)], lin.bias)
    assert torch.equal(lin(x), F.linear(x, w, bias))
    wc, _ = merged_like_builtin(conv.weight, [(c, 1.1)])
    assert torch.equal(conv(xc), F.conv2d(xc, wc, conv.bias, padding=1))
    ref = nn.MultiheadAttention(16, 2).to(dev, half)
    ref.load_state_dict(mha.state_dict())
    with torch.no_grad():
        qkv = ref.in_proj_weight.chunk(3, 0)
        ref.in_proj_weight += torch.vstack([parts[p].calc_updown(t)[0] * 0.9 for p, t in zip("qkv", qkv)])
        ref.out_proj.weight += parts["out"].calc_updown(ref.out_proj.weight)[0] * 0.9
    assert torch.equal(mha(xm, xm, xm)[0], ref(xm, xm, xm)[0])
    for m in (lin, conv, mha):
        assert all(t.device.type == "cuda" and t.dtype == half for t in inj._cache[m].swaps.values())

    inj.apply([ActiveEntry(entry(lin, a), lambda s, n: 0.5)])
    y = lin(x)
    _, _, up, down = inj._cache[lin].factors.items[0]  # the per-step factors live on the device, in the layer's dtype
    assert up.device.type == down.device.type == "cuda" and up.dtype == down.dtype == half
    inj.apply([ActiveEntry(entry(lin, a), 0.5)])
    torch.testing.assert_close(y, lin(x), rtol=2e-2, atol=2e-2)

    for k in ("lora_up.weight", "lora_down.weight"):  # a trainer's adapter lives on the device
        a.weights[k] = a.weights[k].to(dev).requires_grad_(True)
    inj.apply([ActiveEntry(entry(lin, a), 1.0), ActiveEntry(entry(mha, parts["q"], "q", adapter=ad), 1.0)], train=True)
    parts["q"].weights["lora_up.weight"].requires_grad_(True)
    h = lin(x.float().half()).float()[:, :16].reshape(4, 1, 16).half()
    loss = mha(h, h, h)[0].float().pow(2).mean()
    loss.backward()
    assert a.weights["lora_up.weight"].grad is not None and a.weights["lora_up.weight"].grad.abs().sum() > 0
    assert parts["q"].weights["lora_up.weight"].grad is not None
    inj.clear()
    for m in (lin, conv, mha):
        for n, p in m.named_parameters():
            ptr, ver, val = snap[(id(m), n)]
            assert p.grad is None and p.data_ptr() == ptr and p._version == ver and torch.equal(p.detach(), val)


def test_tensors_made_in_inference_mode_work_with_autograd_later():
    """Sampling may run under torch.inference_mode; the cached tensors must still serve a later forward that
    records autograd (e.g. a textual-inversion training step with the adapter applied)."""
    lin = nn.Linear(4, 4)
    inj = Injector()
    inj.apply([ActiveEntry(entry(lin, lora((4, 4), seed=1)), 0.5),
               ActiveEntry(entry(lin, lora((4, 4), seed=2)), lambda s, n: 0.25)])
    with torch.inference_mode():
        want = lin(rnd(2, 4))
    x = rnd(2, 4).requires_grad_(True)
    y = lin(x)
    y.sum().backward()
    assert x.grad is not None and torch.equal(y.detach(), want)
    inj.clear()
