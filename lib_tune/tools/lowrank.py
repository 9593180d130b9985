"""The SVD of up @ down without the dense matrix, kohya's dynamic rank rules, and the kohya-layout output.

factor_svd(up [m, r], down [r, n]): QR of up (Qu Ru) and of down^T (Qd Rd), so up @ down = Qu (Ru Rd^T) Qd^T; the
SVD of the small core Ru Rd^T = Uc S Vc^T gives U = Qu Uc, V = Qd Vc with the same nonzero singular values as a dense
SVD of up @ down, at O((m + n) r^2) instead of O(m n min(m, n)).

pick_rank: kohya sd-scripts (48d368fa) networks/resize_lora.py, `index_sv_cumulative` / `index_sv_fro` /
`index_sv_ratio` (lines 59-86) and `rank_resize` (lines 155-199): the index is computed on the singular values of
the dense m x n matrix, whose length is min(m, n) (kohya's `len(S) - 1` cap), `+ 1`, a zero matrix (S[0] <= 1e-6)
gets rank 1, and the result is capped at the requested rank. Our S has only r values (the others are exactly 0), so
it is padded with zeros to min(m, n) before the same rules run.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..algos.base import NetworkModule
from ..algos.lora import DOWN, MID, UP

Tensor = torch.Tensor

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # resize_lora.py line 21


class ToolError(ValueError):
    """A tool cannot run on these inputs; the message says which and why."""


def factor_svd(up: Tensor, down: Tensor, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
    """(U [m, k], S [k], Vh [k, n]) with up @ down = U diag(S) Vh, k = min(m, n, r); S descending."""
    up, down = up.to(dtype), down.to(dtype)
    qu, ru = torch.linalg.qr(up, mode="reduced")        # [m, a], [a, r]
    qd, rd = torch.linalg.qr(down.T, mode="reduced")    # [n, b], [b, r]
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)  # core [a, b]
    return qu @ uc, s, vch @ qd.T


def dense_svd(mat: Tensor, rank_hint: int, dtype: torch.dtype = torch.float32,
              exact: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Top singular triplets of a dense [m, n] matrix: a randomized SVD (torch.svd_lowrank, 10 oversampling
    columns, 2 power iterations) for rank_hint + 10 < min(m, n), else (or with exact) the full SVD."""
    mat = mat.to(dtype)
    small = min(mat.shape)
    if exact or rank_hint + 10 >= small:
        return torch.linalg.svd(mat, full_matrices=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same input gives the same file
        u, s, v = torch.svd_lowrank(mat, q=rank_hint + 10, niter=2)
    return u, s, v.T


# --- kohya's dynamic rules (resize_lora.py lines 59-86, 155-199) ----------------------------------------------
def _index_sv_cumulative(S: Tensor, target: float) -> int:
    cumulative = torch.cumsum(S, dim=0) / float(torch.sum(S))
    return max(1, min(int(torch.searchsorted(cumulative, target)) + 1, len(S) - 1))


def _index_sv_fro(S: Tensor, target: float) -> int:
    sq = S.pow(2)
    cumulative = torch.cumsum(sq, dim=0) / float(torch.sum(sq))
    return max(1, min(int(torch.searchsorted(cumulative, target ** 2)) + 1, len(S) - 1))


def _index_sv_ratio(S: Tensor, target: float) -> int:
    return max(1, min(int(torch.sum(S > S[0] / target).item()), len(S) - 1))


_INDEX = {"sv_ratio": _index_sv_ratio, "sv_fro": _index_sv_fro, "sv_cumulative": _index_sv_cumulative}


def pick_rank(S: Tensor, rank: int, method: Optional[str] = None, param: Optional[float] = None,
              full_length: Optional[int] = None) -> int:
    """kohya's rank_resize: the new rank for singular values S (descending) of a matrix whose dense SVD has
    full_length values (min(m, n); S is zero-padded to it), capped at `rank`."""
    S = S.detach().float().cpu()
    if full_length is not None and full_length > len(S):
        S = torch.cat([S, S.new_zeros(full_length - len(S))])
    if method:
        if method not in _INDEX:
            raise ToolError(f"unknown dynamic method {method!r}; expected one of {', '.join(DYNAMIC_METHODS)}")
        if param is None:
            raise ToolError(f"method {method} needs a parameter (e.g. --param 0.9)")
        new_rank = _INDEX[method](S, float(param)) + 1
    else:
        new_rank = rank
    if len(S) == 0 or float(S[0]) <= MIN_SV:
        return 1
    return min(new_rank, rank)


def retention(S: Tensor, k: int) -> Tuple[float, float]:
    """(retained squared Frobenius norm, total squared Frobenius norm) of keeping the first k values."""
    sq = S.detach().double().pow(2)
    return float(sq[:k].sum()), float(sq.sum())


# --- module <-> tensors ---------------------------------------------------------------------------------------
def is_lora_family(module: NetworkModule) -> bool:
    """A plain LoRA/LoCon (no CP mid, no DoRA, no full-rank bias): its delta is scale * up @ down."""
    return module.kind == "lora" and module.w(MID) is None and module.dora_scale is None \
        and module.bias is None


def lora_factors(module: NetworkModule, fold_scale: bool = True) -> Tuple[Tensor, Tensor, Tuple[int, ...]]:
    """(up [out, r] (with the module's scale folded in unless fold_scale is False), down [r, in * kh * kw], the
    target shape [out, in(, kh, kw)]: a 4-D down means a conv target, as kohya's scripts decide)."""
    up, down = module.w(UP), module.w(DOWN)
    up2, down2 = up.reshape(up.shape[0], -1).float(), down.reshape(down.shape[0], -1).float()
    shape = (up.shape[0], down.shape[1]) + tuple(down.shape[2:] if down.dim() == 4 else ())
    return (up2 * module.calc_scale() if fold_scale else up2), down2, shape


def materialise(module: NetworkModule) -> Tensor:
    """The module's delta (scale applied, multiplier 1) in its own shape, for types without a low-rank form."""
    if module.dora_scale is not None:
        raise ToolError("DoRA modules need the base model's weight to be materialised")
    error = None
    for probe in (torch.zeros(0), torch.zeros(1, 1, 1, 1)):  # no target shape; 4-D: conv-only forms (CP mid)
        try:
            delta, ex_bias = module.calc_updown(probe)
            break
        except Exception as e:  # noqa: PERF203
            error = e
    else:
        raise ToolError(f"{module.kind} delta cannot be built without the model's layer shape "
                        f"({type(error).__name__}: {error})")
    if ex_bias is not None:
        raise ToolError(f"{module.kind} module has a bias delta, which a LoRA cannot hold")
    return delta.float()


def to_kohya(name: str, up2: Tensor, down2: Tensor, shape: Tuple[int, ...], alpha: float,
             dtype: torch.dtype) -> Dict[str, Tensor]:
    """kohya LoRA tensors for one module: conv targets get down [k, in, kh, kw] and up [out, k, 1, 1]."""
    k = down2.shape[0]
    if len(shape) == 4:
        down = down2.reshape(k, shape[1], shape[2], shape[3])
        up = up2.reshape(shape[0], k, 1, 1)
    else:
        down, up = down2, up2
    return {f"{name}.{DOWN}": down.to(dtype).contiguous(),
            f"{name}.{UP}": up.to(dtype).contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha), dtype=dtype)}


def original_tensors(name: str, module: NetworkModule) -> Dict[str, Tensor]:
    """A module's own tensors under kohya names (kept unchanged), alpha/scale included."""
    out = {f"{name}.{k}": v.detach() for k, v in module.weights.items() if isinstance(v, torch.Tensor)}
    return out


def embedding_tensors(adapter) -> Dict[str, Tensor]:
    """Bundled embeddings as `bundle_emb.<name>.<vector>` (the webui's networks.py layout)."""
    out: Dict[str, Tensor] = {}
    for name, emb in adapter.embeddings.items():
        for vec, t in emb.vectors.items():
            key = f"bundle_emb.{name}.string_to_param.*" if vec == "emb" else f"bundle_emb.{name}.{vec}"
            out[key] = t.detach()
    return out


DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(name: Optional[str], fallback: torch.dtype) -> torch.dtype:
    if name is None:
        return fallback if fallback in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    if name not in DTYPES:
        raise ToolError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]
