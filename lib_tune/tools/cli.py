"""`python -m lib_tune tools resize IN OUT --rank R [--conv-rank R] [--method sv_fro --param 0.9]` and
`python -m lib_tune tools merge OUT IN1[:w1[:lbw]] IN2[:w2] ... --mode concat|svd [--rank R]`.

Prints the retention table; never overwrites OUT (exit status 2 with a message)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from .lowrank import DTYPES, DYNAMIC_METHODS, ToolError


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_source(text: str) -> Tuple[str, float, Optional[str]]:
    """`path`, `path:weight` or `path:weight:lbw` (lbw: 12/17/20/26 comma-separated numbers or a preset name)."""
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and _is_number(parts[1]) and parts[0]:
        return parts[0], float(parts[1]), parts[2]
    parts = text.rsplit(":", 1)
    if len(parts) == 2 and _is_number(parts[1]) and parts[0]:
        return parts[0], float(parts[1]), None
    return text, 1.0, None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_tune tools", description="adapter tools: resize, merge")
    sub = p.add_subparsers(dest="tool", required=True)
    r = sub.add_parser("resize", help="change the rank of a LoRA/LoCon (or reduce LoHa/LoKr/full to a LoRA)")
    r.add_argument("src")
    r.add_argument("dst")
    r.add_argument("--rank", type=int, required=True, help="new rank (the cap with --method)")
    r.add_argument("--conv-rank", type=int, default=None, help="rank of conv modules (default: --rank)")
    r.add_argument("--method", choices=DYNAMIC_METHODS, default=None, help="kohya's dynamic methods")
    r.add_argument("--param", type=float, default=None, help="the dynamic method's target, e.g. 0.9")
    m = sub.add_parser("merge", help="merge adapters: concat (exact) or svd to a rank")
    m.add_argument("dst")
    m.add_argument("sources", nargs="+", metavar="IN[:WEIGHT[:LBW]]")
    m.add_argument("--mode", choices=("concat", "svd"), default="concat")
    m.add_argument("--rank", type=int, default=None)
    m.add_argument("--conv-rank", type=int, default=None)
    for q in (r, m):
        q.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="saved dtype (default: the input's)")
        q.add_argument("--table", default="20", help="rows of the retention table: a number (lowest first) or all")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    limit = None if args.table == "all" else int(args.table)
    try:
        if args.tool == "resize":
            from .resize import resize_file

            report = resize_file(args.src, args.dst, args.rank, args.conv_rank, args.method, args.param, args.dtype)
        else:
            from .merge import merge_files

            report = merge_files(args.dst, [parse_source(s) for s in args.sources], args.mode, args.rank,
                                 args.conv_rank, args.dtype)
    except FileExistsError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except (ToolError, ValueError, OSError) as e:  # AdapterFormatError and TagError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table(limit))
    print(f"wrote {args.dst}")
    return 0
