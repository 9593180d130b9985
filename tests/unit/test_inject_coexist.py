"""Coexistence with an engine that merges into the weights (the webui's built-in Lora): Injector.before_call lets
it update the real weight first; our merge then stacks on top and is recomputed when the base changed."""
import torch
import torch.nn.functional as F
from torch import nn

from lib_tune.inject import ActiveEntry, Injector
from tests.unit.test_inject_engine import entry, merged_like_builtin, rnd
from tests.unit.test_inject_mapping import lora


def test_before_call_sees_real_weights_and_merge_follows_base_changes():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    net = lora((5, 6), rank=2, seed=1)
    inj = Injector()
    seen = []
    other = {"delta": torch.zeros_like(layer.weight), "applied": torch.zeros_like(layer.weight)}

    def builtin_like(module):
        seen.append(module.weight)
        with torch.no_grad():  # merge/restore in place, as the built-in does on its own schedule
            module.weight += other["delta"] - other["applied"]
        other["applied"] = other["delta"].clone()

    inj.before_call = builtin_like
    inj.apply([ActiveEntry(entry(layer, net), 0.8)])
    x = rnd(3, 6, seed=2)
    base = layer.weight.detach().clone()
    y1 = layer(x)
    w1, _ = merged_like_builtin(base, [(net, 0.8)])
    assert torch.equal(y1, F.linear(x, w1, layer.bias))
    assert seen[-1] is layer.weight  # the real parameter, never our merged tensor
    other["delta"] = torch.full_like(layer.weight, 0.25)  # the other engine activates its own adapter
    y2 = layer(x)
    w2, _ = merged_like_builtin(base + 0.25, [(net, 0.8)])
    assert torch.allclose(y2, F.linear(x, w2, layer.bias), atol=1e-6)
    other["delta"] = torch.zeros_like(layer.weight)  # ... and restores
    y3 = layer(x)
    assert torch.allclose(y3, y1, atol=1e-6)
    inj.clear()
    assert torch.allclose(layer.weight, base, atol=1e-6)
