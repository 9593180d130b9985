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


def test_type_internals_stay_in_algos_and_formats():
    """The parameter names of the network types (LoRA's up/down/mid, LoHa's hada_*, LoKr's lokr_* tensors) are
    written only by the types themselves (lib_tune/algos) and the file-layout readers (lib_tune/formats). The
    trainer's `lokr_factor` option is a setting's name, not a tensor's, and is not matched."""
    import re
    from pathlib import Path

    import lib_tune

    root = Path(lib_tune.__file__).parent
    internal = re.compile(r"lora_(up|down|mid)|hada_|lokr_(?!factor)")
    offenders = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
                 if p.relative_to(root).parts[0] not in ("algos", "formats")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if internal.search(line)]
    assert not offenders, offenders
