"""Resize the rank of an adapter: fixed (`rank`, `conv_rank` for modules with a 4-D down, as kohya) or dynamic
(kohya's `sv_ratio`, `sv_fro`, `sv_cumulative`, capped at the rank).

LoRA/LoCon modules: the SVD of up @ down from the factors (lowrank.factor_svd, exact, no dense matrix). The output
follows kohya's resize_lora.py (48d368fa, lines 106-124 and 155-176): up = U S, down = Vh, alpha = old scale x new
rank, so alpha/rank and the delta's scale are unchanged. LoHa/LoKr/full/CP modules: the delta is materialised and
reduced by a randomized SVD (torch.svd_lowrank; sv_cumulative needs every singular value, so it uses a dense
svdvals), written as a LoRA with alpha = rank. DoRA modules and LoRAs with a full-rank bias cannot be a plain LoRA;
they are kept unchanged and named in the report's notes.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from ..formats.model import AdapterFile
from ..formats.read import load_adapter
from ..formats.write import save_adapter
from .lowrank import (ToolError, dense_svd, embedding_tensors, factor_svd, is_lora_family, lora_factors,
                      materialise, original_tensors, pick_rank, save_dtype, to_kohya)
from .report import Report, module_report

STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def resize_adapter(adapter: AdapterFile, rank: int, conv_rank: Optional[int] = None, method: Optional[str] = None,
                   param: Optional[float] = None, dtype: Optional[str] = None,
                   progress=None) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], Report]:
    """(tensors in kohya layout, metadata, report). progress(i, n, name) is called before each module."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ToolError("the rank must be at least 1")
    conv_rank = rank if conv_rank is None else conv_rank
    report = Report("resize", params={"rank": rank, "conv_rank": conv_rank, "method": method, "param": param,
                                      "source": os.path.basename(adapter.path)})
    first = next((t for m in adapter.modules.values() for t in m.parameters()), None)
    out_dtype = save_dtype(dtype, first.dtype if first is not None else torch.float32)
    tensors: Dict[str, torch.Tensor] = {}
    alphas = set()
    n = len(adapter.modules)
    for i, (name, module) in enumerate(sorted(adapter.modules.items())):
        if progress is not None:
            progress(i, n, name)
        try:
            if is_lora_family(module):
                up2, down2, shape = lora_factors(module, fold_scale=False)
                cap = conv_rank if len(shape) == 4 else rank
                u, s, vh = factor_svd(up2, down2)
                k = min(pick_rank(s, cap, method, param, full_length=min(up2.shape[0], down2.shape[1])), len(s))
                scale = module.calc_scale()
                alpha = scale * k
                kept, total = _sq(s, k)
                report.add(module_report(name, down2.shape[0], k, kept, total, "qr-core"))
            else:
                delta = materialise(module)
                shape = tuple(delta.shape)
                mat = delta.reshape(shape[0], -1)
                cap = conv_rank if len(shape) == 4 else rank
                k, u, s, vh, how = _reduce_dense(mat, cap, method, param)
                alpha = float(k)
                kept = float(s[:k].double().pow(2).sum())
                total = float(mat.double().pow(2).sum())
                report.add(module_report(name, module.dim, k, kept, total, how))
                scale = 1.0
        except ToolError as e:
            tensors.update(original_tensors(name, module))
            report.add(module_report(name, module.dim, module.dim or 0, 1.0, 0.0, "kept"))
            report.notes.append(f"{name} ({module.kind}) kept unchanged: {e}")
            continue
        alphas.add(round(alpha, 6))
        tensors.update(to_kohya(name, u[:, :k] * s[:k], vh[:k], shape, alpha, out_dtype))
    tensors.update(embedding_tensors(adapter))
    if adapter.unplaced:
        report.notes.append(f"{len(adapter.unplaced)} key(s) of the source could not be read and are not in the "
                            f"output: {', '.join(adapter.unplaced[:5])}{', ...' if len(adapter.unplaced) > 5 else ''}")
    return tensors, _metadata(adapter, report, rank, conv_rank, method, param, alphas), report


def _sq(s: torch.Tensor, k: int) -> Tuple[float, float]:
    sq = s.double().pow(2)
    return float(sq[:k].sum()), float(sq.sum())


def _reduce_dense(mat: torch.Tensor, cap: int, method, param):
    """(k, U, S, Vh, how) for a materialised [m, n] delta."""
    full = min(mat.shape)
    if method == "sv_cumulative":  # needs the sum of every singular value
        s_all = torch.linalg.svdvals(mat.float())
        k = min(pick_rank(s_all, cap, method, param, full_length=full), full)
        u, s, vh = dense_svd(mat, k)
        return k, u, s, vh, "randomized" if k + 10 < full else "exact"
    u, s, vh = dense_svd(mat, min(cap, full))
    how = "randomized" if min(cap, full) + 10 < full else "exact"
    s_for_rank = s
    if method == "sv_fro":  # the share of the part the randomized SVD did not return, as one value after S
        rest = float(mat.double().pow(2).sum()) - float(s.double().pow(2).sum())
        s_for_rank = torch.cat([s.float(), torch.tensor([max(rest, 0.0) ** 0.5])])
    k = min(pick_rank(s_for_rank, cap, method, param, full_length=full), len(s))
    return k, u, s, vh, how


def _metadata(adapter: AdapterFile, report: Report, rank, conv_rank, method, param, alphas) -> Dict[str, str]:
    meta = {k: v for k, v in adapter.metadata.items() if k not in STALE_KEYS}
    comment = meta.get("ss_training_comment", "")
    old = max((m.old_rank or 0) for m in report.modules) if report.modules else 0
    if method:
        meta["ss_training_comment"] = f"Dynamic resize with {method}: {param} from {old}; {comment}"
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    else:
        conv_desc = "" if rank == conv_rank else f" (conv: {conv_rank})"
        meta["ss_training_comment"] = f"dimension is resized from {old} to {rank}{conv_desc}; {comment}"
        meta["ss_network_dim"] = str(rank)
        meta["ss_network_alpha"] = str(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
    if any(m.method in ("randomized", "exact") for m in report.modules):
        meta["ss_network_module"] = "networks.lora"  # LoHa/LoKr/full modules became LoRA
    meta.setdefault("ss_network_module", "networks.lora")
    meta["ss_tune_resize"] = report.to_json()
    return meta


def check_target(dst: str) -> None:
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst} already exists; choose another output name (files are never overwritten)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ToolError(f"the output folder {folder} does not exist")


def resize_file(src: str, dst: str, rank: int, conv_rank: Optional[int] = None, method: Optional[str] = None,
                param: Optional[float] = None, dtype: Optional[str] = None, progress=None) -> Report:
    """Read src (any supported format), resize, write dst (kohya layout safetensors). Never overwrites dst."""
    check_target(dst)
    adapter = load_adapter(src)
    tensors, meta, report = resize_adapter(adapter, rank, conv_rank, method, param, dtype, progress)
    check_target(dst)
    save_adapter(dst, tensors, meta)
    return report


def report_from_metadata(metadata: Dict[str, str], key: str = "ss_tune_resize") -> Optional[dict]:
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError):
        return None
