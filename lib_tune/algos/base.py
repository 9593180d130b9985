"""The common shape of every network type: one module's weights of one adapter file, and its weight delta.

The numerics follow the webui's built-in Lora (extensions-builtin/Lora/network.py), the reference our
images must match: delta = finalize(calc_updown(W)) where finalize applies the optional `bias` extra,
reshapes to W's shape, multiplies by `scale` (alpha/rank, or an explicit `scale` key), applies DoRA's
weight decomposition when `dora_scale` is present, and finally multiplies by the user's multiplier.
A network type owns everything about itself, with the same verbs for every type (as LyCORIS's
lycoris/functional): which keys it claims (`accepts`, `param_keys`), its delta (`calc_updown` / `delta`), its
low-rank form where it has one (`can_bypass_on`, `bypass`, `linear_factors`), its initial weights for training
(`init_weights`, `for_training`) and the names a trained file declares in its metadata (`train_methods`). A new
type is one new file in this package holding one NetworkModule subclass registered with @register, plus its import
line in algos/__init__.py: the readers, the engine and the trainer find it there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Tuple, Type

import torch

Tensor = torch.Tensor

REGISTRY: List[Type["NetworkModule"]] = []


class UnsupportedModuleError(ValueError):
    """No network type accepts a module's keys, or its tensors have impossible shapes."""


def register(cls):
    """Class decorator: add a network type. Types are tried in registration order (see algos/__init__)."""
    REGISTRY.append(cls)
    return cls


@dataclass(frozen=True)
class TrainMethod:
    """One training method a network type offers (the trainer's `method` names it).

    conv: it adapts convolutions too (ResBlocks, samplers) in the "full" preset, kxk ones at conv_dim/conv_alpha
    (kohya's C3Lier / LyCORIS's conv layers). dora: DoRA's weight decomposition is added (dora_scale, see
    for_training). network_module / network_args: what a trained file declares in its metadata (ss_network_module
    and the `network_args` a kohya user would have passed, e.g. algo=loha)."""
    name: str
    conv: bool = False
    dora: bool = False
    network_module: str = "lycoris.kohya"
    network_args: Mapping[str, str] = field(default_factory=dict)


class NetworkModule:
    """Weights of one adapter for one target module.

    weights: the tensors of this module with the module-name prefix removed, e.g. {"lora_up.weight": ...,
    "lora_down.weight": ..., "alpha": ...}. Subclasses check shapes in __init__ (raising
    UnsupportedModuleError) and read the tensors through self.w() when computing, so that cast_like_builtin
    and trainers that swap tensors in self.weights are seen.
    """

    kind: str = "?"
    #: the keys (after the module prefix) that this type consumes; with common_keys, the rest are unused
    param_keys: Tuple[str, ...] = ()
    #: the keys that make a module this type's (all present); types with alternative layouts override accepts
    required_keys: Tuple[str, ...] = ()
    common_keys = ("alpha", "scale", "dora_scale", "bias")
    #: keys the built-in casts to the webui's compute dtype when it loads a file (see cast_like_builtin)
    load_cast_keys: Tuple[str, ...] = ()
    #: other spellings of param_keys this type reads (file spelling -> ours), e.g. PEFT's lora_A for LoRA
    aliases: Mapping[str, str] = MappingProxyType({})
    #: the training methods of this type (empty: not trainable here)
    train_methods: Tuple[TrainMethod, ...] = ()

    def __init__(self, weights: Dict[str, Tensor]):
        self.weights = {_spelling(k, self.aliases, weights): v for k, v in weights.items()}
        self.alpha = _scalar(weights.get("alpha"))
        self.scale = _scalar(weights.get("scale"))
        self.dim: Optional[int] = None  # rank, set by subclasses that have one

    @property
    def dora_scale(self) -> Optional[Tensor]:
        return self.weights.get("dora_scale")

    @property
    def bias(self) -> Optional[Tensor]:
        return self.weights.get("bias")

    # ---- to implement -------------------------------------------------------------------------
    @classmethod
    def accepts(cls, weights: Dict[str, Tensor]) -> bool:
        return bool(cls.required_keys) and all(k in weights for k in cls.required_keys)

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Return (finalized delta for the weight, delta for the bias or None), multiplier NOT applied.
        dyn_dim (the prompt's `dyn=`) only means something to LoRA; the other types ignore it."""
        raise NotImplementedError

    def in_dim(self) -> Optional[int]:
        """The target's input width as far as the tensors tell (None where they don't): used to guess the
        model family from cross-attention k/v widths."""
        return None

    # ---- low-rank form (types that have one override these) ----------------------------------------------------
    def can_bypass_on(self, module: torch.nn.Module) -> bool:
        """Whether bypass() computes this module's term on `module` (a layer of the model)."""
        return False

    def bypass(self, x: Tensor, module: torch.nn.Module, multiplier: float = 1.0,
               dyn_dim: Optional[int] = None) -> Tensor:
        """The adapter's output term for input x of `module` without building dW (with autograd: training)."""
        raise NotImplementedError(f"{self.kind} has no low-rank form")

    def linear_factors(self, dyn_dim: Optional[int] = None) -> Optional[Tuple[Tensor, Tensor]]:
        """(up [out, r], down [r, in]) with dW = calc_scale() * up @ down on a Linear it can bypass, or None."""
        return None

    # ---- training ---------------------------------------------------------------------------------------------
    @classmethod
    def init_weights(cls, shape: Tuple[int, ...], dim: int, g: torch.Generator, factor: int = -1) -> Dict[str, Tensor]:
        """The initial tensors (float32, CPU, drawn from g) for a weight of `shape` at rank `dim`; `factor`: the
        split of factorised types (LoKr), -1 for the most balanced. Alpha and DoRA are for_training's."""
        raise NotImplementedError(f"{cls.kind} cannot be trained")

    @classmethod
    def for_training(cls, method: TrainMethod, shape: Tuple[int, ...], dim: int, alpha: float, g: torch.Generator,
                     base_weight: Optional[Tensor] = None, factor: int = -1) -> "NetworkModule":
        """A module of trainable Parameters (alpha stays a plain tensor). DoRA methods add dora_scale, the base
        weight's norm on the axis the webui v1.10.1 reads ([1, in, ...], see input_channel_norm), so the initial
        delta stays exactly that of the type's own init."""
        w: Dict[str, Tensor] = {"alpha": torch.tensor(float(alpha))}
        w.update(cls.init_weights(tuple(shape), dim, g, factor))
        if method.dora:
            if base_weight is None:
                raise ValueError("DoRA needs the base weight to initialise dora_scale")
            w["dora_scale"] = input_channel_norm(base_weight.detach().float()).contiguous()
        return cls({k: (v if k == "alpha" else torch.nn.Parameter(v)) for k, v in w.items()})

    # ---- shared ---------------------------------------------------------------------------------
    def calc_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def finalize_updown(self, updown: Tensor, orig_weight: Tensor, output_shape, ex_bias: Optional[Tensor] = None):
        if self.bias is not None:
            updown = updown.reshape(self.bias.shape)
            updown = updown + self.bias.to(orig_weight.device, dtype=updown.dtype)
            updown = updown.reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)
        return updown, ex_bias

    def apply_weight_decompose(self, updown: Tensor, orig_weight: Tensor) -> Tensor:
        """DoRA. The axis follows dora_scale's shape: [1, in, ...] (kohya/webui legacy: norm per input channel)
        or [out, 1, ...] (LyCORIS >= 3.2 wd_on_output: norm per output channel)."""
        orig_weight = orig_weight.to(updown.dtype)
        dora_scale = self.dora_scale.to(device=orig_weight.device, dtype=updown.dtype)
        updown = updown.to(orig_weight.device)
        merged = updown + orig_weight
        nd = merged.dim() - 1
        if dora_scale.dim() > 1 and dora_scale.shape[0] == 1:  # [1, in, ...]: per input channel (webui 1.10)
            norm = input_channel_norm(merged)
        else:  # [out, 1, ...] or [out]: per output channel (LyCORIS wd_on_output)
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1, keepdim=True).reshape(merged.shape[0], *[1] * nd)
            dora_scale = dora_scale.reshape(merged.shape[0], *[1] * nd)
        return merged * (dora_scale / norm) - orig_weight

    def delta(self, orig_weight: Tensor, multiplier: float = 1.0,
              dyn_dim: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """The full change to (weight, bias) at this multiplier, computed in orig_weight's dtype promoted to at
        least the adapter's dtype, exactly as the built-in merges it."""
        up, ex_bias = self.calc_updown(orig_weight, dyn_dim=dyn_dim)
        up = up * multiplier
        if ex_bias is not None:
            ex_bias = ex_bias * multiplier
        return up, ex_bias

    def unused_keys(self) -> List[str]:
        used = set(self.param_keys) | set(self.common_keys)
        return [k for k in self.weights if k not in used]

    def cast_like_builtin(self, dtype: torch.dtype) -> None:
        """The built-in stores LoRA's up/down/mid in the webui's compute dtype (devices.dtype) when it loads a
        file and keeps every other type in the file's dtype; call this once with that dtype to get its numbers."""
        for key in self.load_cast_keys:
            t = self.weights.get(key)
            if t is not None:
                self.weights[key] = t.to(dtype)

    def w(self, key: str, device=None) -> Optional[Tensor]:
        """One of this module's tensors (None if absent), moved to `device` like the built-in does."""
        t = self.weights.get(key)
        if t is None or device is None:
            return t
        t = t.to(device)
        # torch has no float16 matmul on the CPU (2.1): compute such files in float32 there (the built-in fails)
        return t.float() if t.dtype == torch.float16 and t.device.type == "cpu" else t

    def parameters(self) -> List[Tensor]:
        return [t for t in self.weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _spelling(key: str, aliases: Mapping[str, str], weights) -> str:
    """Our name for a file key: its alias target, unless the file also has that key (then it stays an extra)."""
    ours = aliases.get(key)
    return key if ours is None or ours in weights else ours


def input_channel_norm(w: Tensor) -> Tensor:
    """The norm of a weight per input channel, shaped [1, in, 1, ...]: DoRA's magnitude axis as the webui v1.10.1
    reads dora_scale (kohya's / the built-in's legacy axis)."""
    nd = w.dim() - 1
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True).reshape(w.shape[1], *[1] * nd) \
        .transpose(0, 1)


def kaiming_uniform(shape, g: torch.Generator) -> Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) (nn.Linear's default), drawn from g: bound = 1/sqrt(fan_in)."""
    fan_in = int(math.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def normal(shape, std: float, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g) * std


def _scalar(t) -> Optional[float]:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().item()) if t.numel() == 1 else None
    return float(t)
