"""Coexistence with an engine that merges into the same weights lazily and keeps its own backup (an imitation of the
webui's built-in Lora: networks.py network_apply_weights, called from its class-level forward patch and through
Injector.other): both merge in place, our delta never reaches its backup, its restore never drops or doubles
ours, and every weight comes back bit for bit."""
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from lib_tune.inject import ActiveEntry, Injector, inplace
from lib_tune.inject.engine import OtherEngine
from tests.unit.test_inject_engine import entry, merged_like_builtin, rnd
from tests.unit.test_inject_mapping import lora


class BuiltinLike(OtherEngine):
    """The built-in's per-layer protocol: `network_current_names` vs the wanted names of the loaded networks; a CPU
    backup taken from the current weights the first time it wants something on a layer; on a change it restores its
    backup and adds its deltas in place."""

    def __init__(self):
        self.loaded = []  # (name, delta)

    def wanted(self):
        return tuple(name for name, _ in self.loaded)

    def stale(self, module):
        return getattr(module, "network_current_names", ()) != self.wanted()

    def sync(self, module):
        self.apply_weights(module)

    def apply_weights(self, module):
        wanted, current = self.wanted(), getattr(module, "network_current_names", ())
        backup = getattr(module, "network_weights_backup", None)
        if backup is None and wanted != ():
            module.network_weights_backup = backup = module.weight.detach().to("cpu", copy=True)
        if current != wanted:
            with torch.no_grad():
                if backup is not None:
                    module.weight.copy_(backup)
                for _, d in self.loaded:
                    module.weight += d
            module.network_current_names = wanted


def test_both_engines_stack_in_any_order_and_restore_bit_exactly(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    base = lin.weight.detach().clone()
    theirs = BuiltinLike()
    original = nn.Linear.forward

    def patched(self, x):  # the built-in's class-level patch (network_Linear_forward)
        theirs.apply_weights(self)
        return original(self, x)

    monkeypatch.setattr(nn.Linear, "forward", patched)
    net = lora((5, 6), rank=2, seed=1)
    inj = Injector()
    inj.other = theirs
    x = rnd(3, 6, seed=2)
    d = rnd(5, 6, seed=3) * 0.1
    # every transition between the four states (ours on/off x theirs on/off), twice round
    states = [(1, 0), (1, 1), (0, 1), (1, 1), (0, 0), (0, 1), (1, 0), (1, 1), (1, 0), (0, 0), (1, 1), (0, 0)]
    for ours_on, theirs_on in states:
        inj.apply([ActiveEntry(entry(lin, net), 0.8)] if ours_on else [])
        theirs.loaded = [("b", d)] if theirs_on else []
        w_theirs = base + d if theirs_on else base
        want = merged_like_builtin(w_theirs, [(net, 0.8)])[0] if ours_on else w_theirs
        for _ in range(2):  # the second call of a generation changes nothing
            torch.testing.assert_close(lin(x), F.linear(x, want, lin.bias), rtol=1e-6, atol=1e-6)
        backup = getattr(lin, "network_weights_backup", None)
        assert backup is None or torch.equal(backup, base)  # never our delta in their backup
        inj.park()  # end of the generation: merges stay where they are
    assert torch.equal(lin.weight, base)
    inj.clear()
    assert torch.equal(lin.weight, base) and not inplace.merged_layers()


def test_our_static_merge_is_not_redone_while_the_other_engine_is_idle(monkeypatch):
    lin = nn.Linear(4, 4)
    theirs = BuiltinLike()
    net = lora((4, 4), seed=1)
    inj = Injector()
    inj.other = theirs
    for _ in itertools.repeat(None, 3):
        inj.apply([ActiveEntry(entry(lin, net), 1.0)])
        lin(rnd(2, 4))
        lin(rnd(2, 4))
        inj.park()
    assert inj.computed == 1
    theirs.loaded = [("b", torch.ones(4, 4))]  # the other engine changes: ours comes out, theirs in, ours on top
    inj.apply([ActiveEntry(entry(lin, net), 1.0)])
    lin(rnd(2, 4))
    assert inj.computed == 2
    inj.clear()
