"""Place an adapter's modules on the loaded model's layers, and refuse an adapter made for another model.

Unlike the built-in (which logs unmatched keys at DEBUG and needs all four q/k/v/out parts of a packed
MultiheadAttention), every key ends up either mapped or listed, partial attention sets are accepted (missing
parts contribute nothing) and reported, and an adapter for another architecture is refused with a message that
says so instead of producing "Networks with errors (n)".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..algos.base import NetworkModule
from ..formats.arch import ARCH_NAMES, explain_architecture
from ..formats.model import AdapterFile
from ..layer_names import resolve
from .merge import QKV, qkv_parts
from .targets import Targets

MHA_PARTS = QKV + ("out",)
#: the layer types the engine can wrap (the ones the built-in patches, lora_patches.py)
SUPPORTED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)


class ArchitectureMismatch(ValueError):
    """The adapter does not fit the loaded model (other architecture, wrong shapes, or most keys unknown)."""


@dataclass(eq=False)
class MappedEntry:
    """One adapter module placed on one layer.

    layer/module: the layer the engine wraps. part: None, or "q"/"k"/"v"/"out" when `module` is a
    MultiheadAttention and this entry is one of its packed projections (q/k/v rows of in_proj_weight, or
    out_proj). is_te: the layer belongs to a text encoder (takes the te multiplier), else the UNet.
    """
    key: str
    layer: str
    module: torch.nn.Module
    net: NetworkModule
    part: Optional[str]
    is_te: bool
    adapter: AdapterFile


@dataclass(eq=False)
class MappedAdapter:
    adapter: AdapterFile
    architecture: str
    entries: List[MappedEntry] = field(default_factory=list)
    #: adapter module keys that found no layer (or a layer the engine cannot change), with the reason
    unmapped: Dict[str, str] = field(default_factory=dict)
    #: MultiheadAttention layer -> parts the adapter lacks (they count as zero)
    partial: Dict[str, List[str]] = field(default_factory=dict)
    #: key -> why its delta does not fit its layer (only filled when map_adapter(strict=False))
    mismatched: Dict[str, str] = field(default_factory=dict)

    @property
    def n_mapped(self) -> int:
        return len(self.entries)

    @property
    def n_unmapped(self) -> int:
        return len(self.unmapped) + len(self.mismatched)

    def summary(self) -> str:
        s = f"{self.n_mapped}/{len(self.adapter.modules)} modules mapped"
        if self.unmapped:
            s += f", {len(self.unmapped)} unmapped (e.g. {next(iter(self.unmapped))})"
        if self.mismatched:
            s += f", {len(self.mismatched)} with wrong shapes"
        if self.partial:
            s += f", {len(self.partial)} attention layers with missing q/k/v/out parts"
        return s


def weight_of(module: torch.nn.Module, part: Optional[str]) -> Optional[torch.Tensor]:
    """The tensor a delta for (module, part) is added to."""
    if isinstance(module, torch.nn.MultiheadAttention):
        if part == "out":
            return module.out_proj.weight
        w = module.in_proj_weight
        if part is None or w is None:
            return None
        return qkv_parts(w)[part]
    return getattr(module, "weight", None)


def place(key: str, targets: Targets) -> Tuple[Optional[str], Optional[str], str]:
    """Where adapter module `key` goes on the model: (layer, part, reason-if-unplaced). The names are
    layer_names.resolve's; here a packed attention's out_proj becomes its part "out"."""
    layer, part = resolve(key, targets.__contains__, targets.architecture == "sd2")
    if layer is None:
        return None, None, "no layer with this name in the loaded model"
    module = targets[layer]
    if layer.endswith("_out_proj") and isinstance(module, torch.nn.Linear):
        owner = targets.get(layer[: -len("_out_proj")])
        if isinstance(owner, torch.nn.MultiheadAttention) and owner.out_proj is module:
            # MultiheadAttention reads out_proj.weight directly and never calls out_proj's forward
            return layer[: -len("_out_proj")], "out", ""
    if not isinstance(module, SUPPORTED):
        return None, None, f"layer {layer} is a {type(module).__name__}, which adapters cannot change"
    if isinstance(module, torch.nn.MultiheadAttention) and (part is None or module.in_proj_weight is None):
        return None, None, f"layer {layer} is a MultiheadAttention; only its q/k/v/out projections can be changed"
    if weight_of(module, part) is None:
        return None, None, f"layer {layer} has no weight"
    return layer, part, ""


def delta_shape(net: NetworkModule, weight: torch.Tensor) -> Tuple[torch.Size, Optional[torch.Size]]:
    """Shapes of the (weight, bias) delta `net` produces for `weight`, computed on the meta device (no memory,
    no arithmetic); types whose math needs real values (data-dependent branches) are computed for real."""
    dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) \
        else torch.float32
    probe = torch.empty(weight.shape, dtype=dtype, device="meta")
    with torch.no_grad():
        try:
            up, b = net.calc_updown(probe)
        except Exception:  # noqa: BLE001 - meta unsupported by this type's math; the real call below decides
            up, b = net.calc_updown(weight)
    return up.shape, (b.shape if b is not None else None)


def _fits(delta: torch.Size, weight: torch.Size) -> bool:
    if tuple(delta) == tuple(weight):
        return True
    # inpainting UNet: 9 input channels, the built-in zero-pads a 4-channel delta (networks.py L472-474)
    return (len(weight) == 4 and weight[1] == 9 and len(delta) == 4 and delta[1] == 4
            and (delta[0], *delta[2:]) == (weight[0], *weight[2:]))


def _check_shape(e: MappedEntry) -> str:
    w = weight_of(e.module, e.part)
    try:
        up, b = delta_shape(e.net, w)
    except Exception as ex:  # noqa: BLE001 - any failure of the math on this layer is a misfit to report
        return f"{e.net.kind} delta cannot be computed for weight {list(w.shape)}: {ex}"
    if not _fits(up, w.shape):
        return f"delta {list(up)} vs weight {list(w.shape)} of {e.layer}"
    if b is not None:
        owner = e.module.out_proj if isinstance(e.module, torch.nn.MultiheadAttention) else e.module
        n = w.shape[0]
        if getattr(owner, "bias", None) is not None:
            n = owner.bias.shape[0]
        if b.numel() != n:
            return f"bias delta {list(b)} vs {n} outputs of {e.layer}"
    return ""


def _evidence(adapter: AdapterFile) -> str:
    md = adapter.metadata or {}
    arch, why = explain_architecture(adapter.modules, md)
    if arch and arch == adapter.architecture:
        return why
    for k in ("modelspec.architecture", "ss_base_model_version"):
        if md.get(k):
            return f"{k}={md[k]}"
    if md.get("ss_v2") == "True":
        return "ss_v2=True"
    keys = list(adapter.modules)
    for prefix in ("lora_te2_", "lora_te1_", "lora_te_", "lora_unet_input_blocks", "lora_unet_down_blocks"):
        n = sum(k.startswith(prefix) for k in keys)
        if n:
            return f"{n} keys start with {prefix}"
    return "guessed from its keys"


def _arch(a: Optional[str]) -> str:
    return ARCH_NAMES.get(a or "", str(a))


def map_adapter(adapter: AdapterFile, targets: Targets, strict: bool = True) -> MappedAdapter:
    """Place every module of `adapter` on a layer of the model `targets` was built from.

    Raises ArchitectureMismatch when the adapter's guessed architecture differs from the model's, when fewer
    than half of its modules find a layer, or (strict) when any mapped delta has the wrong shape for its layer.
    With strict=False the misfits are dropped and listed in `mismatched` instead.
    """
    name = adapter.path or "<adapter>"
    if adapter.architecture and adapter.architecture != targets.architecture:
        raise ArchitectureMismatch(
            f"adapter {name} is for {_arch(adapter.architecture)} ({_evidence(adapter)}), "
            f"the loaded model is {_arch(targets.architecture)}")

    out = MappedAdapter(adapter=adapter, architecture=targets.architecture)
    for key, net in adapter.modules.items():
        layer, part, why = place(key, targets)
        if layer is None:
            out.unmapped[key] = why
            continue
        out.entries.append(MappedEntry(key=key, layer=layer, module=targets[layer], net=net, part=part,
                                       is_te=targets.is_te(layer), adapter=adapter))

    total = len(adapter.modules)
    if total and len(out.entries) * 2 < total:
        raise ArchitectureMismatch(
            f"adapter {name} does not fit the loaded {_arch(targets.architecture)} model: only "
            f"{len(out.entries)} of {total} modules match a layer (e.g. {next(iter(out.unmapped))}: "
            f"{next(iter(out.unmapped.values()))})")

    bad = {}
    for e in out.entries:
        why = _check_shape(e)
        if why:
            bad[e.key] = why
    if bad and strict:
        k = next(iter(bad))
        raise ArchitectureMismatch(
            f"adapter {name} does not fit the loaded {_arch(targets.architecture)} model: {len(bad)} of "
            f"{len(out.entries)} mapped modules have the wrong shape (e.g. {k}: {bad[k]}); it is probably made "
            f"for another architecture")
    if bad:
        out.mismatched = bad
        out.entries = [e for e in out.entries if e.key not in bad]

    seen: Dict[Tuple[int, str], set] = {}
    for e in out.entries:
        if e.part is not None:
            seen.setdefault((id(e.module), e.layer), set()).add(e.part)
    for (_, layer), parts in seen.items():
        missing = [p for p in MHA_PARTS if p not in parts]
        if missing:
            out.partial[layer] = missing
    return out
