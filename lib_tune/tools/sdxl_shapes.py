"""The layer shapes of a kohya SDXL LoRA of the default layout (networks.lora without conv_dim), for tests and
benchmarks: random factors with real SDXL shapes, no model needed.

UNet (sgm `sd_xl_base.yaml`): transformers at input_blocks 4, 5 (640 wide, depth 2), 7, 8 (1280, depth 10),
middle_block 1 (1280, depth 10), output_blocks 0-2 (1280, depth 10) and 3-5 (640, depth 2); in each block attn1
q/k/v/out (C x C), attn2 q/out (C x C) and k/v (C x 2048 context), ff GEGLU proj (8C x C) and ff out (C x 4C);
proj_in/proj_out Linear C x C. Text encoders: CLIP-L (te1, 12 layers, 768, MLP 3072) and OpenCLIP-G in HF names
(te2, 32 layers, 1280, MLP 5120): q/k/v/out_proj and fc1/fc2.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..algos.lora import DOWN, UP

CONTEXT = 2048
_TRANSFORMERS = ([(f"input_blocks_{i}_1", 640, 2) for i in (4, 5)] + [(f"input_blocks_{i}_1", 1280, 10) for i in (7, 8)]
                 + [("middle_block_1", 1280, 10)] + [(f"output_blocks_{i}_1", 1280, 10) for i in (0, 1, 2)]
                 + [(f"output_blocks_{i}_1", 640, 2) for i in (3, 4, 5)])


def sdxl_lora_shapes(text_encoders: bool = True) -> Dict[str, Tuple[int, ...]]:
    """kohya module name -> target weight shape [out, in]."""
    out: Dict[str, Tuple[int, ...]] = {}
    for block, c, depth in _TRANSFORMERS:
        p = f"lora_unet_{block}_"
        out[p + "proj_in"] = (c, c)
        out[p + "proj_out"] = (c, c)
        for d in range(depth):
            t = f"{p}transformer_blocks_{d}_"
            for q in ("to_q", "to_k", "to_v", "to_out_0"):
                out[f"{t}attn1_{q}"] = (c, c)
            out[f"{t}attn2_to_q"] = (c, c)
            out[f"{t}attn2_to_k"] = (c, CONTEXT)
            out[f"{t}attn2_to_v"] = (c, CONTEXT)
            out[f"{t}attn2_to_out_0"] = (c, c)
            out[f"{t}ff_net_0_proj"] = (8 * c, c)
            out[f"{t}ff_net_2"] = (c, 4 * c)
    if text_encoders:
        for te, width, layers in (("lora_te1_", 768, 12), ("lora_te2_", 1280, 32)):
            for i in range(layers):
                p = f"{te}text_model_encoder_layers_{i}_"
                for q in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    out[f"{p}self_attn_{q}"] = (width, width)
                out[f"{p}mlp_fc1"] = (4 * width, width)
                out[f"{p}mlp_fc2"] = (width, 4 * width)
    return out


def random_lora(shapes: Dict[str, Tuple[int, ...]], rank: int, alpha: float, seed: int = 0,
                dtype: torch.dtype = torch.float32, decay: float = 0.0) -> Dict[str, torch.Tensor]:
    """kohya-layout tensors with random factors; decay > 0 gives the rank directions geometrically falling
    weights (exp(-decay * i)), like a trained LoRA's spectrum, so that dynamic methods pick varied ranks."""
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    weights = torch.exp(-decay * torch.arange(rank, dtype=torch.float32))
    for name, shape in shapes.items():
        o, i = shape[0], shape[1]
        kernel = tuple(shape[2:])
        down = torch.randn((rank, i) + kernel, generator=g) / (i * max(1, len(kernel) and kernel[0] * kernel[1])) ** 0.5
        up = torch.randn((o, rank) + ((1, 1) if kernel else ()), generator=g) * 0.01
        up = up * weights.reshape((1, rank) + ((1, 1) if kernel else ()))
        out[f"{name}.{DOWN}"] = down.to(dtype)
        out[f"{name}.{UP}"] = up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(alpha)).to(dtype)
    return out


SDXL_METADATA = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"}
