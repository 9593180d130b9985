"""Adapters merged into the model's own parameters, and a bit-exact way back.

Why in place (and not a merged copy swapped in per call): a copy of every touched layer on the model's device costs
as much VRAM as those layers (0.66 GiB for a usual SD1.5 LoRA in fp16, several GiB on SDXL), and under the webui's
--medvram/--lowvram a copy does not travel with its block. Writing into `param.data` keeps the Parameter objects,
so the webui's module moves (`module.to(device)`: torch assigns `param.data`, keeping object and version counter)
carry the merged weights, and nothing of ours stays behind on a device.

State per module, in one process-wide table (every Injector sees the same truth):
- backup: the values of the layer's parameters before our merge (weight and bias; MultiheadAttention's in_proj
  and out_proj), on the CPU by default, taken once and kept while the parameters hold those values or our merge;
  a parameter the merge had to create (a bias where the layer has none, as the built-in does) is backed up as None
  and removed on restore;
- marks: which Parameter object and which in-place version each slot had after our last write. A write by anyone
  else (a checkpoint loaded into the same model, the built-in Lora restoring its own backup) shows as another
  version or another object: the backup is then stale, so it is forgotten and never written back;
- key: what is merged now (None: the parameters equal the backup); folded: per-step low-rank multipliers already
  added into the weight (see Injector).
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch

Tensor = torch.Tensor
Slot = Tuple[str, str]  # (submodule of the layer, "" for itself; parameter name)

PLAIN_SLOTS: Tuple[Slot, ...] = (("", "weight"), ("", "bias"))
MHA_SLOTS: Tuple[Slot, ...] = (("", "in_proj_weight"), ("out_proj", "weight"), ("out_proj", "bias"))


def slots_of(module: torch.nn.Module) -> Tuple[Slot, ...]:
    return MHA_SLOTS if isinstance(module, torch.nn.MultiheadAttention) else PLAIN_SLOTS


def owner_of(module: torch.nn.Module, sub: str) -> torch.nn.Module:
    return getattr(module, sub) if sub else module


class State:
    """One layer's merge bookkeeping (see the module docstring). Holds no reference to any module or parameter
    except weakly, so an unloaded model goes away with its entries."""
    __slots__ = ("owner", "backup", "marks", "key", "folded", "__weakref__")

    def __init__(self, owner):
        self.owner = weakref.ref(owner)
        self.backup: Dict[Slot, Optional[Tensor]] = {}
        self.marks: List[tuple] = []  # (sub, name, weakref to the Parameter or None, version)
        self.key = None
        self.folded: tuple = ()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.backup.values() if t is not None)


#: module -> State, for every layer that holds (or held) one of our merges
STATES: "weakref.WeakKeyDictionary[torch.nn.Module, State]" = weakref.WeakKeyDictionary()


def _param(module: torch.nn.Module, slot: Slot) -> Optional[Tensor]:
    return owner_of(module, slot[0])._parameters.get(slot[1])


def mark(module: torch.nn.Module, st: State) -> None:
    """Remember the parameters as they are after our write."""
    marks = []
    for slot in slots_of(module):
        p = _param(module, slot)
        marks.append((slot[0], slot[1], None if p is None else weakref.ref(p), None if p is None else p._version))
    st.marks = marks


def intact(module: torch.nn.Module, st: State) -> bool:
    """True while nobody but us wrote the layer's parameters since our last write (checked on every call: plain
    attribute and dict lookups only)."""
    for sub, name, ref, version in st.marks:
        p = (getattr(module, sub) if sub else module)._parameters.get(name)
        if ref is None:
            if p is not None:
                return False
        elif p is None or ref() is not p or p._version != version:
            return False
    return True


def _copy_of(t: Tensor, device: Optional[str]) -> Tensor:
    """A backup copy of a parameter: on the CPU by default (the built-in's choice, store_weights_backup), or on the
    parameter's own device (device="layer", the opt-in). A parameter on the `meta` device (a placement check
    without a GPU) gets an uninitialised backup of its shape: it has no values to keep."""
    t = t.detach()
    target = t.device if device == "layer" else torch.device(device or "cpu")
    if t.is_meta:
        return torch.empty(t.shape, dtype=t.dtype, device=target)
    return t.to(target, copy=True)


def take_backup(module: torch.nn.Module, owner, device: Optional[str]) -> State:
    st = State(owner)
    for slot in slots_of(module):
        p = _param(module, slot)
        st.backup[slot] = None if p is None else _copy_of(p, device)
    mark(module, st)
    STATES[module] = st
    return st


def put_back(module: torch.nn.Module, st: State) -> None:
    """Write the backup into the parameters (in place; a parameter we created is removed). Caller: no_grad."""
    for slot, b in st.backup.items():
        owner = owner_of(module, slot[0])
        p = owner._parameters.get(slot[1])
        if b is None:
            if p is not None:
                owner._parameters[slot[1]] = None
        elif p is not None:
            p.copy_(b)
    st.key, st.folded = None, ()
    mark(module, st)


def restore(module: torch.nn.Module, st: Optional[State] = None) -> bool:
    """Undo our merge on `module` bit for bit. Returns False (and forgets the state) when someone else wrote the
    parameters since our last write: they are theirs now and the backup is stale."""
    st = STATES.get(module) if st is None else st
    if st is None:
        return False
    if not intact(module, st):
        forget(module)
        return False
    if st.key is not None or st.folded:
        with torch.inference_mode(False), torch.no_grad():
            put_back(module, st)
    return True


def forget(module: torch.nn.Module) -> None:
    STATES.pop(module, None)


def owned_by(owner) -> Iterator[Tuple[torch.nn.Module, State]]:
    for module, st in list(STATES.items()):
        if st.owner() is owner:
            yield module, st


def restore_all(keep_owner=None) -> int:
    """Restore every layer merged by any owner but `keep_owner` (and those of owners that are gone). Returns the
    number of layers restored."""
    n = 0
    for module, st in list(STATES.items()):
        if keep_owner is not None and st.owner() is keep_owner:
            continue
        if st.key is not None or st.folded:
            n += bool(restore(module, st))
    return n


def merged_layers() -> List[torch.nn.Module]:
    """Layers that hold one of our merges right now (diagnostics, tests)."""
    return [m for m, st in list(STATES.items()) if (st.key is not None or st.folded) and intact(m, st)]
