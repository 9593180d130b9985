"""A new trainable network type is one class plus one registry line: the toy type below is defined here, registered
with one `register(...)` call, and then trained, saved, read back and applied (merged, per step through its factors,
bypassed while training) by the trainer, the file readers and the engine, none of which names it."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib_tune.algos import build_module, train_method
from lib_tune.algos.base import REGISTRY, NetworkModule, TrainMethod, kaiming_uniform, register
from lib_tune.formats import load_adapter, save_adapter
from lib_tune.formats.keys import place_key
from lib_tune.inject import Injector, activate, map_adapter
from lib_tune.train.methods import MethodSpec, create_adapter, methods
from lib_tune.train.model import DiffusionModel
from tests.unit.train_fakes import FakeLDM


class ToyModule(NetworkModule):
    """dW = scale · b @ a, written only against the uniform verbs (LoRA's math under names no other file knows)."""
    kind = "toy"
    param_keys = ("toy_a", "toy_b")
    train_methods = (TrainMethod("toy", network_args={"algo": "toy"}),)

    @classmethod
    def accepts(cls, weights):
        return "toy_a" in weights and "toy_b" in weights

    def __init__(self, weights):
        super().__init__(weights)
        self.dim = self.w("toy_a").shape[0]

    def in_dim(self):
        return self.w("toy_a").shape[1]

    def calc_updown(self, orig_weight, dyn_dim=None):
        b, a = (t.to(orig_weight.device) for t in self.linear_factors(dyn_dim))
        return self.finalize_updown((b @ a).reshape(orig_weight.shape), orig_weight, orig_weight.shape)

    def can_bypass_on(self, module):
        return isinstance(module, torch.nn.Linear) and self.dora_scale is None and self.bias is None

    def bypass(self, x, module, multiplier=1.0, dyn_dim=None):
        b, a = (t.to(x.device, x.dtype) for t in self.linear_factors(dyn_dim))
        return F.linear(F.linear(x, a) * (multiplier * self.calc_scale()), b)

    def linear_factors(self, dyn_dim=None):
        return self.w("toy_b"), self.w("toy_a").reshape(self.dim, -1)

    @classmethod
    def init_weights(cls, shape, dim, g, factor=-1):
        return {"toy_a": kaiming_uniform((dim, int(math.prod(shape[1:]))), g), "toy_b": torch.zeros(shape[0], dim)}


@pytest.fixture()
def toy():
    register(ToyModule)  # the one registry line
    try:
        yield ToyModule
    finally:
        REGISTRY.remove(ToyModule)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 16, 12, generator=g)


def test_the_registry_line_makes_a_method(toy):
    assert "toy" in methods()
    cls, method = train_method("toy")
    assert cls is ToyModule and method.network_args == {"algo": "toy"} and method.network_module == "lycoris.kohya"
    assert build_module({"toy_a": torch.ones(1, 2), "toy_b": torch.ones(2, 1)}).kind == "toy"
    # dotted file layouts (diffusers / PEFT style) know its parameter names too
    assert place_key("unet.down_blocks.0.attentions.0.proj_in.toy_a").param == "toy_a"


def test_unregistered_it_is_gone():
    assert "toy" not in methods()
    with pytest.raises(ValueError, match="unknown method"):
        create_adapter(DiffusionModel(FakeLDM(seed=0)).targets, MethodSpec(method="toy"))


def test_train_save_read_and_apply(toy, tmp_path):
    dm = DiffusionModel(FakeLDM(seed=0))
    adapter = create_adapter(dm.targets, MethodSpec(method="toy", preset="attn_mlp", dim=2, alpha=1.0, seed=1))
    assert adapter.modules and all(isinstance(m, ToyModule) for m in adapter.modules.values())
    x, t, ctx = inputs()
    base = dm.predict(x, t, ctx)

    # training: the engine bypasses it (its low-rank form), gradients reach it, the initial delta is 0
    inj = Injector()
    g = torch.Generator().manual_seed(3)
    with dm.session():
        inj.apply(adapter.entries(), train=True)
        try:
            assert all(layer.bypass and not layer.static for layer in inj.layers.values())
            y = dm.predict(x, t, ctx)
            torch.testing.assert_close(y, base)
            y.square().mean().backward()
            assert any(float(p.grad.abs().sum()) > 0 for p in adapter.parameters())
            with torch.no_grad():  # as if trained
                for p in adapter.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
                live = dm.predict(x, t, ctx)
        finally:
            inj.clear()
    assert not torch.allclose(live, base, atol=1e-4)

    # the file: kohya keys with the type's own parameter names, read back as the same type
    path = str(tmp_path / "toy.safetensors")
    save_adapter(path, adapter.tensors())
    loaded = load_adapter(path)
    assert loaded.kinds == {"toy": len(adapter.modules)} and not loaded.unplaced
    mapped = map_adapter(loaded, dm.targets)
    assert mapped.n_mapped == len(adapter.modules)

    # inference: merged once (calc_updown), and per sampling step through its factors
    inj.apply(activate(mapped, unet=0.5))
    with torch.no_grad():
        merged = dm.predict(x, t, ctx)
    inj.apply(activate(mapped, unet=lambda step, total: 0.5))
    assert all(layer.lowrank for layer in inj.layers.values())
    with torch.no_grad():
        stepped = dm.predict(x, t, ctx)
    inj.apply(activate(mapped, unet=1.0))
    with torch.no_grad():
        full = dm.predict(x, t, ctx)
    inj.clear()
    torch.testing.assert_close(stepped, merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, live, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged, full, atol=1e-4)
