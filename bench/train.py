"""Training speed and memory: sd-webui-tune's Trainer against kohya sd-scripts' train_network.py, same settings,
one run, printed as ratios (these machines are noisy; only the ratios of one run mean much).

Settings on both sides (those of ../shared/tools/kohya-bench.sh): an SD1.5-architecture checkpoint with random
weights (bench/sd15_checkpoint.py, made locally once, ~4 GB under ~/.cache/sd-webui-tune/bench), 8 synthetic
captioned 256x256 images (kohya-bench.sh's generator: same seed, drawing and caption), LoRA dim 16 alpha 8 on the
UNet only, batch 1, fp32 on the CPU, AdamW lr 1e-4 (weight decay 0.01, constant schedule, gradient clipping 1.0),
latents cached before training, seed 1, SDPA attention, 12 steps.

Our side runs in its own process (so its memory is its own): it builds ldm's LatentDiffusion from the v1 yaml and
reads the weights into it (what the webui holds), swaps ldm's CrossAttention.forward for an SDPA one the way the
webui's sdp optimization does (the webui's default), caches the 8 latents, and trains with lib_tune's Trainer.
Kohya's LoRA puts 192 modules on an SD1.5 UNet: every Linear and 1x1 conv of the transformer blocks (attention
q/k/v/out, feed-forward, proj_in/proj_out). Our "full" preset selects exactly that set for plain LoRA (the
matched comparison); "attn" (q/k/v/out only, 128 modules) is measured too.

Threads: 1 on both sides by default (OMP_NUM_THREADS / MKL_NUM_THREADS for both processes; --threads 0 keeps
torch's default, one per core). On a 2-core machine shared with other jobs, two-thread OpenMP regions stall
whenever one of the threads is descheduled: the same kohya run measured 6.9 and 23.6 s/step twenty minutes apart
(and a no-grad UNet forward 12 s vs 2.7 s), while one thread per side gave 10.75 (kohya) vs 10.4 s/step (ours)
back to back. --rounds N alternates the two sides N times and keeps each side's fastest round.

Printed: seconds per step after the first two (median and mean of steps 3..N; kohya's from tqdm's whole-second
stamps, as kohya-bench.sh reads them), peak RSS of the training process, our RSS with the model loaded (what the
webui already holds) and the training's own increment (peak - loaded); ratios ours/kohya of step time and peak
RSS, and our increment / kohya's whole process (what training in the webui adds vs. what a separate kohya run
needs).

Measured 2026-11-26 on a 2-core CPU machine, 1 thread each:
- first session (fastest of 2 alternating rounds, a shared machine): kohya 9.90 s/step, peak RSS 8.46 GiB; ours
  "full" (192 modules) 9.76 s/step (ratio 0.99), peak 5.65 GiB of which 4.56 GiB is the loaded model (increment
  1.08 GiB, 0.13 of kohya's process); ours "attn" (128 modules) 9.19 s/step, 5.45 GiB;
- second session, after the text-encoder output cache (train/text_cache.py) and the LoRA scale on the rank-r
  intermediate (1 round, a quiet machine): kohya 10.80 s/step, 8.46 GiB; ours "full" 9.60 s/step (ratio 0.89),
  5.49 GiB (0.65; increment 0.93 GiB, 0.11); "attn" 9.73 s/step (0.90), 5.35 GiB (0.63). kohya's own figure moved
  by 9% between the sessions: single rounds carry that much noise.

usage (from the repository root, with the project venv; ~10 minutes per round on 2 cores, more the first time):
    .venv/bin/python bench/train.py [--steps 12] [--targets full,attn] [--threads 1] [--rounds 1] [--skip-kohya]
kohya is built once with ../shared/tools/build-kohya.sh into ~/.cache/sd-webui-tune/kohya (its own venv, torch
2.1.2; needs pip access the first time); when it cannot be built or run, the reason is printed and our side is
still measured.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-webui-tune"
CAPTION = "benchconcept, red discs, teal background"
TRIGGER = "benchconcept"
GIB = 2 ** 30


def make_images(folder: Path) -> Path:
    """kohya-bench.sh's 8 images, byte for byte the same drawing (same seed, same order of random draws)."""
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    for i in range(8):
        im = Image.new("RGB", (256, 256), (20, 120 + rng.randint(0, 40), 140))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            r = rng.randint(20, 60)
            x, y = rng.randint(r, 256 - r), rng.randint(r, 256 - r)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(220, rng.randint(20, 80), 40))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(CAPTION)
    return folder


# ---- our side (runs in its own process: `bench/train.py --worker ...`) -------------------------------------------
def sdp_attention_forward(self, x, context=None, mask=None, **kwargs):
    """ldm CrossAttention with torch's scaled_dot_product_attention, as the webui's sd_hijack_optimizations
    scaled_dot_product_attention_forward (less its hypernetwork and upcast options, off by default)."""
    import torch

    b, h = x.shape[0], self.heads
    q_in = self.to_q(x)
    context = x if context is None else context
    k_in, v_in = self.to_k(context), self.to_v(context)
    d = q_in.shape[-1] // h
    q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q_in, k_in, v_in))
    if mask is not None:  # ldm's mask: [B, ...] bool over the context tokens
        mask = mask.reshape(b, 1, 1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return self.to_out(out.transpose(1, 2).reshape(b, -1, h * d))


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def worker(ckpt: Path, yaml: Path, targets: str, steps: int, profile: str = "") -> dict:
    t_proc = time.monotonic()
    from omegaconf import OmegaConf

    import ldm.modules.attention as ldm_attention
    from bench.sd15_checkpoint import load_into
    from lib_tune.tiny.models import instantiate

    rss_start = _rss_now()
    t0 = time.monotonic()
    # the webui builds with torch's init switched off (DisableInitialization) and loads the state dict
    model = instantiate(OmegaConf.to_container(OmegaConf.load(yaml)))
    load_into(model, ckpt)
    load_s = time.monotonic() - t0
    rss_loaded, peak_loaded = _rss_now(), _rss_peak()
    ldm_attention.CrossAttention.forward = sdp_attention_forward  # the webui's default optimization: sdp

    work = Path(tempfile.mkdtemp(prefix="tune-bench-train-"))
    try:
        return _train(model, work, targets, steps, profile, dict(
            rss_start=rss_start, rss_loaded=rss_loaded, peak_loaded=peak_loaded, load_s=load_s, t_proc=t_proc))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train(model, work: Path, targets: str, steps: int, profile: str, loaded: dict) -> dict:
    import torch

    from lib_tune.train.config import TrainConfig
    from lib_tune.train.data import prepare_data
    from lib_tune.train.loop import Trainer
    from lib_tune.train.model import DiffusionModel

    images = make_images(work / "data" / f"1_{TRIGGER}")  # kohya's folder layout: 1 repeat
    cfg = TrainConfig.from_dict(dict(
        dataset=str(images.parent), method="lora", steps=steps,
        output_name="bench", trigger=TRIGGER, output_dir=str(work / "out"), targets=targets, network_dim=16,
        network_alpha=8.0, train_text_encoder=False, unet_lr=1e-4, optimizer="adamw", weight_decay=0.01,
        lr_scheduler="constant", warmup_steps=0, min_snr_gamma=None, noise_offset=0.0, max_grad_norm=1.0,
        batch_size=1, mixed_precision="no", resolution=256, save_state=False, save_dtype="fp16", seed=1,
        keep_tokens=0))
    dm = DiffusionModel(model)
    data = prepare_data(cfg, dm)
    t0 = time.monotonic()
    for i in range(data.batches_per_epoch):  # kohya's --cache_latents: all latents before the first step
        data.batch(i)
    cache_s = time.monotonic() - t0

    stamps, cpu = [], []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None

    class Clock:
        def on_step(self, step, total, loss, lr):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if prof is not None and step == 2:  # steps 3.. only, like the timings
                prof.__enter__()

    trainer = Trainer(cfg, dm, data, Clock())
    modules = len(trainer.adapter.modules)
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    result = trainer.run()
    if prof is not None:
        prof.__exit__(None, None, None)
        Path(profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    per = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = per[2:]
    cpu_steady = [b - a for a, b in zip(cpu, cpu[1:])][2:]
    return {"targets": targets, "modules": modules, "steps": result.steps_done, "per_step": per,
            "median": statistics.median(steady) if steady else float("nan"),
            "mean": statistics.fmean(steady) if steady else float("nan"),
            "rss_start": loaded["rss_start"], "rss_loaded": loaded["rss_loaded"], "peak_loaded": loaded["peak_loaded"],
            "peak": _rss_peak(), "cpu_mean": statistics.fmean(cpu_steady) if cpu_steady else float("nan"),
            "load_s": loaded["load_s"], "cache_s": cache_s, "losses": result.losses,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "wall": time.monotonic() - loaded["t_proc"]}


# ---- kohya ----------------------------------------------------------------------------------------------------
class KohyaUnavailable(RuntimeError):
    pass


def _tools() -> Path:
    env = os.environ.get("TUNE_SHARED")
    cands = ([Path(env)] if env else []) + [REPO.parent / "shared", Path("/work/shared")]
    for c in cands:
        if (c / "tools" / "build-kohya.sh").is_file() and (c / "tools" / "kohya-bench.sh").is_file():
            return c / "tools"
    raise KohyaUnavailable("no tools/build-kohya.sh + tools/kohya-bench.sh in " + ", ".join(map(str, cands))
                           + " (set TUNE_SHARED to the shared folder)")


def _tail(text: str, n: int = 20) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


def ensure_kohya(dest: Path, log=print) -> Path:
    if (dest / "venv" / "bin" / "python").exists() and (dest / "sd-scripts" / "train_network.py").is_file():
        return dest
    tools = _tools()
    log(f"building kohya sd-scripts into {dest} (once; minutes) ...")
    p = subprocess.run(["bash", str(tools / "build-kohya.sh"), str(dest)], capture_output=True, text=True)
    if p.returncode != 0:
        raise KohyaUnavailable(f"build-kohya.sh exited with {p.returncode}:\n{_tail(p.stdout + p.stderr)}")
    return dest


_KOHYA_LINE = re.compile(r"kohya: (\S+) s/step .*?median of per-step (\S+)\), peak RSS ([\d.]+) GiB, (\S+) LoRA "
                         r"modules, process wall (\d+) s")


def thread_env(threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_kohya(kohya: Path, ckpt: Path, tokenizers: Path, steps: int, threads: int) -> dict:
    tools = _tools()
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(tools / "kohya-bench.sh"), str(kohya), str(ckpt), str(tokenizers), str(steps)],
                       capture_output=True, text=True, env=thread_env(threads))
    out = p.stdout + p.stderr
    m = _KOHYA_LINE.search(out)
    if p.returncode != 0 or not m:
        raise KohyaUnavailable(f"kohya-bench.sh exited with {p.returncode}:\n{_tail(out)}")
    return {"mean": float(m[1]), "median": float(m[2]), "peak": float(m[3]) * GIB,
            "modules": int(m[4]) if m[4].isdigit() else None, "wall": int(m[5]), "line": m[0],
            "script_s": time.monotonic() - t0}


# ---- ours, from the orchestrator ---------------------------------------------------------------------------------
def run_ours(ckpt: Path, yaml: Path, targets: str, steps: int, threads: int, profile: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--ckpt", str(ckpt),
               "--yaml", str(yaml), "--targets", targets, "--steps", str(steps)] + (
               ["--profile", profile] if profile else [])
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=thread_env(threads))
        if p.returncode != 0 or not out.is_file():
            raise RuntimeError(f"our training run failed ({p.returncode}):\n{_tail(p.stdout + p.stderr, 40)}")
        return json.loads(out.read_text())


# ---- report ---------------------------------------------------------------------------------------------------
def _g(v) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def _best(runs):
    """The fastest round (lowest mean s/step) of one side; the others only show how noisy the machine was."""
    return min(runs, key=lambda r: r["mean"])


def report(kohya_runs, ours_runs, kohya_error=None, threads=0) -> str:
    """ours_runs: {targets: [result per round]}."""
    kohya = _best(kohya_runs) if kohya_runs else None
    ours = [_best(runs) for runs in ours_runs.values()]
    rows = [("", "s/step median", "s/step mean", "peak RSS GiB", "loaded GiB", "increment GiB", "modules",
             "wall s")]
    if kohya:
        rows.append(("kohya train_network", f"{kohya['median']:.1f}*", f"{kohya['mean']:.2f}*", _g(kohya["peak"]),
                     "-", "-", str(kohya["modules"]), str(kohya["wall"])))
    for o in ours:
        rows.append((f"tune Trainer ({o['targets']})", f"{o['median']:.2f}", f"{o['mean']:.2f}", _g(o["peak"]),
                     _g(o["rss_loaded"]), _g(o["peak"] - o["rss_loaded"]), str(o["modules"]), f"{o['wall']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"threads per process: {threads or 'torch default'}; steps 3..N; fastest of "
             f"{max([len(kohya_runs)] + [len(r) for r in ours_runs.values()])} round(s)"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    if kohya:
        lines.append("  * kohya: from tqdm's whole-second stamps (mean = (tN - t2) / (N - 2); median of whole seconds)")
        for o in ours:
            increment = o["peak"] - o["rss_loaded"]
            lines.append(f"ratios tune ({o['targets']}, {o['modules']} modules) / kohya ({kohya['modules']}): "
                         f"step time {o['mean'] / kohya['mean']:.2f} (mean), peak RSS {o['peak'] / kohya['peak']:.2f}, "
                         f"training increment / kohya whole process {increment / kohya['peak']:.2f}")
        if len(kohya_runs) > 1:
            lines.append("kohya s/step per round: " + " ".join(f"{r['mean']:.2f}" for r in kohya_runs))
    else:
        lines.append(f"kohya unavailable, no ratios: {kohya_error}")
    for o in ours:
        rounds = " ".join(f"{r['mean']:.2f}" for r in ours_runs[o["targets"]])
        lines.append(f"tune ({o['targets']}): per-step s {' '.join(f'{x:.2f}' for x in o['per_step'])}; CPU s/step "
                     f"{o['cpu_mean']:.2f}; model load {o['load_s']:.0f} s, latent caching {o['cache_s']:.1f} s, RSS "
                     f"before loading {_g(o['rss_start'])} GiB, peak while loading {_g(o['peak_loaded'])} GiB, "
                     f"{o['threads']} thread(s), torch {o['torch']}"
                     + (f"; s/step per round {rounds}" if len(ours_runs[o["targets"]]) > 1 else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/train.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--targets", default="full,attn", help="our presets to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/MKL threads of both training processes (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times")
    parser.add_argument("--cache", type=Path, default=CACHE / "bench", help="where the checkpoint is kept")
    parser.add_argument("--kohya", type=Path, default=CACHE / "kohya", help="kohya build folder")
    parser.add_argument("--skip-kohya", action="store_true")
    parser.add_argument("--profile", default="",
                        help="also write a torch profiler table of steps 3.. of an extra, unmeasured run of ours here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--yaml", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        res = worker(args.ckpt, args.yaml, args.targets, args.steps, args.profile)
        args.worker.write_text(json.dumps(res))
        return 0

    # the checkpoint in its own process too: building it holds the model and its serialised bytes
    p = subprocess.run([sys.executable, str(REPO / "bench" / "sd15_checkpoint.py"), str(args.cache)],
                       capture_output=True, text=True, cwd=str(REPO))
    if p.returncode != 0:
        print(f"could not make the SD1.5-architecture checkpoint:\n{_tail(p.stdout + p.stderr)}")
        return 1
    paths = {k: Path(v) for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}
    print(f"checkpoint: {paths['ckpt']} ({paths['ckpt'].stat().st_size / GIB:.2f} GiB)")

    kdir, kohya_error = None, "--skip-kohya"
    if not args.skip_kohya:
        try:
            kdir = ensure_kohya(args.kohya)
        except KohyaUnavailable as e:
            kohya_error = str(e)
            print(f"kohya unavailable: {e}", flush=True)
    targets = [t for t in args.targets.split(",") if t]
    kohya_runs, ours_runs = [], {t: [] for t in targets}
    for r in range(max(1, args.rounds)):
        if kdir is not None:  # one at a time, never in parallel
            print(f"[round {r + 1}] kohya train_network.py ...", flush=True)
            try:
                kohya_runs.append(run_kohya(kdir, paths["ckpt"], paths["tokenizers"], args.steps, args.threads))
                print("  " + kohya_runs[-1]["line"], flush=True)
            except KohyaUnavailable as e:
                kohya_error, kdir = str(e), None
                print(f"kohya unavailable: {e}", flush=True)
        for t in targets:
            print(f"[round {r + 1}] our Trainer (targets {t}) ...", flush=True)
            ours_runs[t].append(run_ours(paths["ckpt"], paths["yaml"], t, args.steps, args.threads))
            o = ours_runs[t][-1]
            print(f"  tune: {o['mean']:.2f} s/step, peak RSS {_g(o['peak'])} GiB, {o['modules']} modules", flush=True)
    if args.profile:  # an extra run: the profiler slows the steps and holds GBs of events, so it is not measured
        print(f"profiling our Trainer (targets {targets[0]}), not counted ...", flush=True)
        run_ours(paths["ckpt"], paths["yaml"], targets[0], args.steps, args.threads, args.profile)
        print(f"  profile of steps 3..{args.steps}: {args.profile}")
    print()
    print(report(kohya_runs, ours_runs, kohya_error, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
