"""Adapter tools against kohya sd-scripts (issue 17, item 7), one run, CPU, printed as ratios and retention.

- resize: an SDXL-shaped LoRA of kohya's default layout (networks.lora, no conv_dim: 722 UNet transformer Linears
  and 264 text-encoder Linears, lib_tune.tools.sdxl_shapes), rank 128, fp16, to rank 32, and with sv_fro 0.9 (cap
  128): ours (lib_tune.tools.resize.resize_file) vs kohya's networks/resize_lora.py --verbose (its "Average Frobenius
  norm retention" is compared with our mean per-module retention).
- svd merge: four such files at rank 32 (weights 1, 0.5, 0.5, 0.25) to rank 64: ours (merge_files, mode svd) vs
  kohya's networks/svd_merge_lora.py (which reports no retention; ours is printed).
Kohya runs as a subprocess of its own venv (../shared/tools/build-kohya.sh DEST; --kohya DEST); its time is the
process's wall time less the time the same python takes to import the script's modules (measured in the same run),
ours is the in-process call (read, compute, write). Both sides use --threads threads (1 by default: this machine
has 2 shared cores, see bench/train.py). The random factors have geometrically decaying rank weights (decay 0.03),
a trained LoRA's kind of spectrum, so sv_fro picks varied ranks.

  .venv/bin/python bench/tools.py --dry-run              # small shapes, same code path, no kohya
  .venv/bin/python bench/tools.py --kohya /tmp/kohya-build

Measured 2026-12-02 on the 2-core shared CPU machine, 1 thread, torch 2.1.2 (986 modules, input 912 MB fp16):
  ours  resize rank 128->32   13.77 s  retention overall 92.88% mean 92.98%  ranks 32
  ours  resize sv_fro 0.9     14.53 s  retention overall 90.92% mean 90.90%  ranks 26..29
  ours  svd merge 4x32->64    16.55 s  retention overall 94.21% mean 94.39%  ranks 64
  kohya resize_lora.py rank 128->32: still running after 7.5 minutes (so ours/kohya < 0.031x); the complete
  kohya figures and retention comparison are still to be filled in from a full run.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lib_tune.formats.write import save_adapter  # noqa: E402
from lib_tune.tools.merge import merge_files  # noqa: E402
from lib_tune.tools.resize import resize_file  # noqa: E402
from lib_tune.tools.sdxl_shapes import SDXL_METADATA, random_lora, sdxl_lora_shapes  # noqa: E402

DRY_SHAPES = {k: (max(8, v[0] // 16), max(8, v[1] // 16)) for k, v in list(sdxl_lora_shapes().items())[::40]}


def _make(path, shapes, rank, seed):
    save_adapter(path, random_lora(shapes, rank=rank, alpha=rank / 2, seed=seed, dtype=torch.float16, decay=0.03),
                 dict(SDXL_METADATA, ss_network_dim=str(rank), ss_network_alpha=str(rank / 2)))


def _kohya(kohya, script, args, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    py = os.path.join(kohya, "venv", "bin", "python")
    cwd = os.path.join(kohya, "sd-scripts")
    t = time.perf_counter()
    proc = subprocess.run([py, os.path.join("networks", script)] + args, cwd=cwd, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"kohya {script} failed:\n{proc.stderr[-3000:]}")
    mod = script[:-3]
    t = time.perf_counter()
    subprocess.run([py, "-c", f"import sys; sys.path.insert(0, 'networks'); import {mod}"], cwd=cwd, env=env,
                   check=True, capture_output=True)
    imports = time.perf_counter() - t
    return wall, imports, proc.stdout + proc.stderr


def _ours(fn, *a, **kw):
    t = time.perf_counter()
    report = fn(*a, **kw)
    return time.perf_counter() - t, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--kohya", default=os.environ.get("KOHYA_DIR", "/tmp/kohya-build"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = DRY_SHAPES if args.dry_run else sdxl_lora_shapes()
    big, small, target, merged_rank = (16, 4, 4, 8) if args.dry_run else (128, 32, 32, 64)
    work = args.out or tempfile.mkdtemp(prefix="tune-bench-tools-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "in.safetensors")
    _make(src, shapes, big, seed=0)
    parts = [os.path.join(work, f"m{i}.safetensors") for i in range(4)]
    for i, q in enumerate(parts):
        _make(q, shapes, small, seed=100 + i)
    weights = [1.0, 0.5, 0.5, 0.25]
    print(f"{len(shapes)} modules, {'dry run (small shapes)' if args.dry_run else 'SDXL shapes'}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")

    rows = []
    t_fix, r_fix = _ours(resize_file, src, os.path.join(work, "ours_fixed.safetensors"), target)
    t_fro, r_fro = _ours(resize_file, src, os.path.join(work, "ours_fro.safetensors"), big, method="sv_fro", param=0.9)
    t_mrg, r_mrg = _ours(merge_files, os.path.join(work, "ours_merge.safetensors"),
                         [(q, w, None) for q, w in zip(parts, weights)], mode="svd", rank=merged_rank)
    rows.append(("resize rank %d->%d" % (big, target), t_fix, r_fix, ["--new_rank", str(target)], "resize_lora.py"))
    rows.append(("resize sv_fro 0.9", t_fro, r_fro, ["--new_rank", str(big), "--dynamic_method", "sv_fro",
                                                      "--dynamic_param", "0.9"], "resize_lora.py"))
    rows.append(("svd merge 4x%d->%d" % (small, merged_rank), t_mrg, r_mrg, None, "svd_merge_lora.py"))
    for name, t, rep, _, _ in rows:
        ranks = sorted(m.new_rank for m in rep.modules)
        print(f"ours  {name:<22} {t:8.2f} s  retention overall {rep.overall:.4%} mean {rep.mean:.4%}  "
              f"ranks {ranks[0]}..{ranks[-1]}")
    if args.dry_run:
        print("dry run: kohya not run")
        return 0
    if not os.path.exists(os.path.join(args.kohya, "venv", "bin", "python")):
        raise SystemExit(f"no kohya build at {args.kohya}; run ../shared/tools/build-kohya.sh {args.kohya}")
    for i, (name, t, rep, kargs, script) in enumerate(rows):
        out = os.path.join(work, f"kohya_{i}.safetensors")
        if script == "resize_lora.py":
            cmd = ["--model", src, "--save_to", out, "--verbose", "--device", "cpu"] + kargs
        else:
            cmd = ["--models"] + parts + ["--ratios"] + [str(w) for w in weights] + \
                  ["--new_rank", str(merged_rank), "--save_to", out, "--device", "cpu"]
        wall, imports, log = _kohya(args.kohya, script, cmd, args.threads)
        m = re.search(r"Average Frobenius norm retention: ([\d.]+)%", log)
        theirs = f"mean retention {float(m.group(1)) / 100:.4%} (ours {rep.mean:.4%})" if m else "no retention"
        net = max(wall - imports, 1e-9)
        print(f"kohya {name:<22} {wall:8.2f} s wall, {net:8.2f} s less imports ({imports:.1f} s); "
              f"ratio ours/kohya {t / net:.4f}x; {theirs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
