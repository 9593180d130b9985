"""LoRA / LoCon: dW = up @ down (Linear, conv 1x1 and conv kxk), or the CP/Tucker form with `lora_mid`.

Same math and order of operations as the webui's network_lora.py + lyco_helpers.py: the factors are flattened to
2-D, multiplied, and reshaped to [out, in(, kh, kw)]; with `lora_mid` [r, r, kh, kw] the delta is
einsum('n m k l, i n, m j -> i j k l', mid, up, down). The rank (for alpha/rank) is down.shape[0], also when
`dyn=` (DyLoRA) truncates the factors to their first ranks (cut_rank). PEFT's `lora_A`/`lora_B` are the same thing
(A = down, B = up).

Training (kohya's init): down kaiming-uniform (a=sqrt(5)), up zeros, so the initial delta is 0. Methods: lora (kohya
networks.lora: Linear and 1x1 layers), locon (+ kxk convolutions, still networks.lora with conv_dim) and dora
(LyCORIS algo=lora with dora_wd).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import NetworkModule, Tensor, TrainMethod, UnsupportedModuleError, kaiming_uniform, register

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"
#: PEFT's spelling of the two factors
PEFT_NAMES = MappingProxyType({"lora_A.weight": DOWN, "lora_B.weight": UP})


def cut_rank(up: Tensor, down: Tensor, dyn_dim: Optional[int]) -> Tuple[Tensor, Tensor]:
    """DyLoRA's `dyn=`: only the first dyn_dim ranks of the factors (up [out, r, ...], down [r, in, ...])."""
    if dyn_dim is None:
        return up, down
    return up[:, :dyn_dim], down[:dyn_dim]


@register
class LoraModule(NetworkModule):
    kind = "lora"
    param_keys = (UP, DOWN, MID)
    load_cast_keys = (UP, DOWN, MID)
    aliases = PEFT_NAMES
    train_methods = (
        TrainMethod("lora", network_module="networks.lora"),
        TrainMethod("locon", conv=True, network_module="networks.lora"),
        TrainMethod("dora", conv=True, dora=True, network_args={"algo": "lora", "dora_wd": "True"}),
    )

    @classmethod
    def accepts(cls, weights: Dict[str, Tensor]) -> bool:
        return (UP in weights and DOWN in weights) or all(k in weights for k in PEFT_NAMES)

    def __init__(self, weights: Dict[str, Tensor]):
        super().__init__(weights)
        up, down, mid = self.w(UP), self.w(DOWN), self.w(MID)
        if up.dim() < 2 or down.dim() < 2:
            raise UnsupportedModuleError(f"LoRA factors must be at least 2-D, got up {tuple(up.shape)}, "
                                         f"down {tuple(down.shape)}")
        inner = mid.shape[:2] if mid is not None else (down.shape[0], down.shape[0])
        if mid is not None and mid.dim() != 4:
            raise UnsupportedModuleError(f"lora_mid must be [r, r, kh, kw], got {tuple(mid.shape)}")
        if up.shape[1] != inner[0] or down.shape[0] != inner[1] or up.shape[2:].numel() != 1:
            raise UnsupportedModuleError(f"LoRA shapes do not chain: up {tuple(up.shape)}, down {tuple(down.shape)}"
                                         + (f", mid {tuple(mid.shape)}" if mid is not None else ""))
        self.dim = down.shape[0]

    def in_dim(self) -> Optional[int]:
        return self.w(DOWN).shape[1]

    def calc_updown(self, orig_weight: Tensor, dyn_dim: Optional[int] = None):
        dev = orig_weight.device
        up, down, mid = self.w(UP, dev), self.w(DOWN, dev), self.w(MID, dev)
        conv = orig_weight.dim() == 4
        # the built-in shapes the factors after its target: Linear targets see 2-D factors, conv targets 4-D
        down_spatial = tuple(down.shape[2:]) if conv and down.dim() == 4 else ()
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        output_shape = [up2.shape[0], down.shape[1]]
        if mid is not None:
            if not conv:
                raise RuntimeError("a LoRA with lora_mid (CP/Tucker conv) cannot target a Linear layer")
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up2, down2)
            output_shape += list(mid.shape[2:])
        else:
            if conv:
                output_shape += list(down_spatial or (1, 1))
            up2, down2 = cut_rank(up2, down2, dyn_dim)
            updown = (up2 @ down2).reshape(output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)

    @classmethod
    def init_weights(cls, shape, dim: int, g: torch.Generator, factor: int = -1) -> Dict[str, Tensor]:
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        conv = len(shape) == 4
        return {DOWN: kaiming_uniform((dim, in_dim) + kernel, g),
                UP: torch.zeros((out_dim, dim) + ((1, 1) if conv else ()))}

    # ---- low-rank bypass ----------------------------------------------------------------------
    @property
    def can_bypass(self) -> bool:
        """DoRA needs the merged weight's norm and `bias` is a full-rank term: neither is low-rank."""
        return self.dora_scale is None and self.bias is None

    def can_bypass_on(self, module: torch.nn.Module) -> bool:
        """Plain LoRA (no DoRA, no full-rank `bias` extra) on a Linear, or on an ungrouped Conv2d whose kernel its
        spatial factor has (or with `lora_mid`), as up(down(x)) on the output and as factors."""
        if not self.can_bypass:
            return False
        width = getattr(module, "in_features", None) or getattr(module, "in_channels", None)
        if self.in_dim() != width:  # e.g. an inpainting UNet's 9-channel conv_in: merged (zero-padded) instead
            return False
        if isinstance(module, torch.nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros":
                return False
            if self.w(MID) is None:
                down = self.w(DOWN)
                spatial = tuple(down.shape[2:]) if down.dim() == 4 else (1, 1)
                return spatial == tuple(module.weight.shape[2:])
            return True
        return isinstance(module, torch.nn.Linear)

    def linear_factors(self, dyn_dim: Optional[int] = None) -> Optional[Tuple[Tensor, Tensor]]:
        up, down = self.w(UP), self.w(DOWN)
        return cut_rank(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), dyn_dim)

    def bypass(self, x: Tensor, module: torch.nn.Module, multiplier: float = 1.0,
               dyn_dim: Optional[int] = None) -> Tensor:
        """The adapter's output term for input x of `module` (a Linear or Conv2d) without building dW:
        up(mid(down(x)) * multiplier * scale). Equals F.linear / F.conv2d of x with the delta at that multiplier
        (for conv, the module's stride, padding and dilation go to the spatial factor: down, or mid when present)."""
        if not self.can_bypass:
            raise ValueError("this LoRA has dora_scale or bias; merge it instead of bypassing")
        up, down, mid = (self.w(k, x.device) for k in (UP, DOWN, MID))
        up, down = up.to(x.dtype), down.to(x.dtype)
        if mid is None:
            up, down = cut_rank(up, down, dyn_dim)
        # the scale goes on the rank-r intermediate, not on the output: the same value up to rounding, with an
        # elementwise pass over r channels instead of two over the layer's full output (training's hot path)
        s = multiplier * self.calc_scale()
        if isinstance(module, torch.nn.Conv2d):
            kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
            down4, up4 = _as_conv(down), _as_conv(up)
            if mid is None:
                if down4.shape[2:] != module.weight.shape[2:]:
                    raise ValueError(f"LoRA kernel {tuple(down4.shape[2:])} does not match the conv's "
                                     f"{tuple(module.weight.shape[2:])}")
                h = F.conv2d(x, down4, **kw)
            else:
                h = F.conv2d(F.conv2d(x, down4), mid.to(x.dtype), **kw)
            return F.conv2d(h * s, up4)
        return F.linear(F.linear(x, down.reshape(down.shape[0], -1)) * s, up.reshape(up.shape[0], -1))


def _as_conv(w: Tensor) -> Tensor:
    return w if w.dim() == 4 else w.reshape(w.shape[0], -1, 1, 1)
