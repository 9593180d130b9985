"""The choice of network type: the built-in's order, first acceptor wins, a clear error otherwise."""
import pytest
import torch

from lib_tune.algos import KINDS, build_module
from lib_tune.algos.base import UnsupportedModuleError


def test_kinds_in_builtin_order():
    assert KINDS == ("lora", "loha", "ia3", "lokr", "full", "norm", "glora", "oft")


def test_first_acceptor_wins_and_extra_keys_are_reported_unused():
    w = {"lora_up.weight": torch.ones(2, 1), "lora_down.weight": torch.ones(1, 2), "diff": torch.ones(2, 2)}
    m = build_module(w)
    assert m.kind == "lora" and m.unused_keys() == ["diff"]


def test_unknown_keys_name_the_keys():
    with pytest.raises(UnsupportedModuleError, match="foo, lora_up.weight"):
        build_module({"lora_up.weight": torch.ones(2, 1), "foo": torch.ones(1)})


def test_every_kind_is_reachable():
    t = torch.ones
    samples = [
        {"lora_up.weight": t(2, 1), "lora_down.weight": t(1, 2)},
        {"hada_w1_a": t(2, 1), "hada_w1_b": t(1, 2), "hada_w2_a": t(2, 1), "hada_w2_b": t(1, 2)},
        {"weight": t(2), "on_input": torch.tensor(False)},
        {"lokr_w1": t(1, 1), "lokr_w2": t(2, 2)},
        {"diff": t(2, 2)},
        {"w_norm": t(2), "b_norm": t(2)},
        {"a1.weight": t(1, 2), "a2.weight": t(2, 1), "b1.weight": t(1, 2), "b2.weight": t(2, 1)},
        {"oft_blocks": t(1, 2, 2)},
    ]
    assert tuple(build_module(s).kind for s in samples) == KINDS
