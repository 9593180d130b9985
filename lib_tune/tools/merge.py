"""Merge several adapters into one LoRA, each with a weight and optional per-block weights (the tag's `lbw=` syntax,
lib_tune.prompt.blocks).

Module by module, every input's factors are scaled by weight x block factor x its alpha/rank (folded into up) and
stacked: up = [w1 s1 up1 | w2 s2 up2 | ...] [out, R], down = [down1; down2; ...] [R, in], so up @ down is exactly
the weighted sum of the deltas.
- `concat`: those stacked factors are the output (rank R = the sum of the ranks, alpha = R: scale 1). Exact.
- `svd`: the exact SVD of the stacked product from the factors (lowrank.factor_svd: QR of each, SVD of the R x R
  core; no dense out x in matrix) truncated to the target rank (`conv_rank` for 4-D modules), alpha = rank.
  Modules of other types (LoHa, LoKr, full) are materialised, added densely and reduced by a randomized SVD.
The report gives each module's Frobenius retention against the exact weighted sum (1.0 for concat).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..formats.model import AdapterFile
from ..formats.read import load_adapter
from ..formats.write import save_adapter
from ..prompt.blocks import BlockWeights, block_multiplier, parse_block_weights
from .lowrank import (ToolError, dense_svd, factor_svd, is_lora_family, lora_factors, materialise, save_dtype,
                      to_kohya)
from .report import Report, module_report
from .resize import check_target

MODES = ("concat", "svd")


@dataclass
class MergeInput:
    adapter: AdapterFile
    weight: float = 1.0
    lbw: Optional[Union[str, BlockWeights]] = None


def _block_factor(inp: MergeInput, bw: Optional[BlockWeights], name: str, arch: Optional[str]) -> float:
    if bw is None:
        return inp.weight
    return inp.weight * block_multiplier(bw, name, arch)


def merge_adapters(inputs: Sequence[MergeInput], mode: str = "concat", rank: Optional[int] = None,
                   conv_rank: Optional[int] = None, dtype: Optional[str] = None,
                   progress=None) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], Report]:
    """(tensors in kohya layout, metadata, report)."""
    if mode not in MODES:
        raise ToolError(f"unknown merge mode {mode!r}; expected one of {', '.join(MODES)}")
    if not inputs:
        raise ToolError("nothing to merge")
    if mode == "svd" and (rank is None or rank < 1):
        raise ToolError("svd merge needs a target rank of at least 1 (--rank)")
    conv_rank = rank if conv_rank is None else conv_rank
    blocks: List[Optional[BlockWeights]] = []
    for inp in inputs:
        bw = inp.lbw
        if isinstance(bw, str):
            bw = parse_block_weights(bw)
        if bw is not None and inp.adapter.architecture is None:
            raise ToolError(f"{os.path.basename(inp.adapter.path)}: block weights need the architecture, which "
                            f"this file does not tell")
        blocks.append(bw)
    names = sorted({n for inp in inputs for n in inp.adapter.modules})
    report = Report("merge", params={"mode": mode, "rank": rank, "conv_rank": conv_rank,
                                     "sources": [{"file": os.path.basename(i.adapter.path), "weight": i.weight,
                                                  "lbw": None if b is None else b.to_text()}
                                                 for i, b in zip(inputs, blocks)]})
    first = next((t for i in inputs for m in i.adapter.modules.values() for t in m.parameters()), None)
    out_dtype = save_dtype(dtype, first.dtype if first is not None else torch.float32)
    tensors: Dict[str, torch.Tensor] = {}
    ranks = set()
    for j, name in enumerate(names):
        if progress is not None:
            progress(j, len(names), name)
        ups, downs, dense, shape = [], [], None, None
        for inp, bw in zip(inputs, blocks):
            module = inp.adapter.modules.get(name)
            if module is None:
                continue
            f = _block_factor(inp, bw, name, inp.adapter.architecture)
            try:
                if is_lora_family(module):
                    up2, down2, s = lora_factors(module)
                    ups.append(up2 * f)
                    downs.append(down2)
                else:
                    if mode == "concat":
                        raise ToolError(f"{module.kind} has no LoRA factors to concatenate; use --mode svd")
                    d = materialise(module)
                    s = tuple(d.shape)
                    d = d.reshape(s[0], -1) * f
                    dense = d if dense is None else dense + d
            except ToolError as e:
                raise ToolError(f"{os.path.basename(inp.adapter.path)}: {name} ({module.kind}): {e}") from None
            if shape is not None and (shape[0], _flat(shape)) != (s[0], _flat(s)):
                raise ToolError(f"{name}: the inputs' shapes differ ({_fmt(shape)} vs {_fmt(s)}); they were made "
                                f"for different models")
            shape = shape if shape is not None and len(shape) >= len(s) else s
        up = torch.cat(ups, dim=1) if ups else None
        down = torch.cat(downs, dim=0) if downs else None
        stacked = 0 if down is None else down.shape[0]
        if mode == "concat":
            k = stacked
            tensors.update(to_kohya(name, up, down, shape, float(k), out_dtype))
            report.add(module_report(name, stacked, k, 1.0, 1.0, "concat"))
            ranks.add(k)
            continue
        cap = conv_rank if len(shape) == 4 else rank
        if dense is None:
            u, s_, vh = factor_svd(up, down)
            k = min(cap, len(s_))
            kept, total = _sq(s_, k)
            how = "qr-core"
        else:
            if up is not None:
                dense = dense + up @ down
            k = min(cap, *dense.shape)
            u, s_, vh = dense_svd(dense, k)
            kept = float(s_[:k].double().pow(2).sum())
            total = float(dense.double().pow(2).sum())
            how = "randomized" if k + 10 < min(dense.shape) else "exact"
        report.add(module_report(name, stacked or None, k, kept, total, how))
        ranks.add(k)
        tensors.update(to_kohya(name, u[:, :k] * s_[:k], vh[:k], shape, float(k), out_dtype))
    embedded = [n for inp in inputs for n in inp.adapter.embeddings]
    if embedded:
        report.notes.append(f"bundled embeddings are not merged: {', '.join(embedded)}")
    return tensors, _metadata(inputs, report, ranks, mode), report


def _flat(shape) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


def _sq(s: torch.Tensor, k: int) -> Tuple[float, float]:
    sq = s.double().pow(2)
    return float(sq[:k].sum()), float(sq.sum())


def _metadata(inputs: Sequence[MergeInput], report: Report, ranks, mode: str) -> Dict[str, str]:
    meta: Dict[str, str] = {"ss_network_module": "networks.lora"}
    for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "ss_sd_model_name"):
        value = next((i.adapter.metadata.get(key) for i in inputs if i.adapter.metadata.get(key)), None)
        if value is not None:
            meta[key] = value
    dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_dim"] = dim
    meta["ss_network_alpha"] = dim  # alpha = rank in every module: scale 1
    sources = ", ".join(f"{os.path.basename(i.adapter.path)}:{i.weight:g}" for i in inputs)
    meta["ss_training_comment"] = f"{mode} merge of {sources} (sd-webui-tune)"
    meta["ss_tune_merge"] = report.to_json()
    return meta


def merge_files(dst: str, sources: Sequence[Tuple[str, float, Optional[str]]], mode: str = "concat",
                rank: Optional[int] = None, conv_rank: Optional[int] = None, dtype: Optional[str] = None,
                progress=None) -> Report:
    """sources: (path, weight, lbw text or None). Writes dst (kohya layout); never overwrites it."""
    check_target(dst)
    inputs = [MergeInput(load_adapter(p), float(w), lbw) for p, w, lbw in sources]
    tensors, meta, report = merge_adapters(inputs, mode, rank, conv_rank, dtype, progress)
    check_target(dst)
    save_adapter(dst, tensors, meta)
    return report
