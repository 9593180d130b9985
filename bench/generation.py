"""Generation with adapters: sd-webui-tune against the webui's built-in Lora, in one run on the same webui build
and checkpoint (the tiny SD1 by default; pass a real checkpoint with --ckpt for meaningful absolute numbers).

Prints, for each engine: (a) seconds per generation with 1 and with 4 adapters (steady state: the same prompt
again), (b) the cost of changing the adapter set between two generations (alternating two sets, minus the steady
state), (c) peak resident memory of the webui process above its idle level; and the ratios tune / built-in.
Each engine runs in its own fresh webui process so that memory and caches do not mix; the two run side by side and
every measurement alternates between them (paired samples), so that a busy spell of the machine hits both alike.

usage: SD_WEBUI_PATH=... python bench/generation.py [--repeats N] [--steps S] [--size PX] [--ckpt FILE]
"""
import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e import host as webui_host  # noqa: E402


class PeakRss:
    def __init__(self, pid):
        import psutil
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self):
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.1)

    def __enter__(self):
        self.base = self._rss()
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def timed(h, prompt, args):
    t = time.perf_counter()
    h.txt2img(prompt, seed=1, steps=args.steps, size=args.size)
    return time.perf_counter() - t


def start_engine(net, names, work, ckpt):
    h = webui_host.WebuiHost(work, ckpt.parent, extension=True, ckpt=ckpt)
    h.lora_dir.mkdir(parents=True, exist_ok=True)
    for p in names.values():
        (h.lora_dir / p.name).write_bytes(p.read_bytes())
    h.start()
    h.set_options(live_previews_enable=False, show_progress_type="Approx cheap")
    h.post("/sdapi/v1/refresh-loras")
    h.post("/tune/v1/refresh")
    return h


def prompts(net, stems):
    base = "a photo of a cat"
    return {"none": base, "one": base + f" <{net}:{stems[0]}:0.8>",
            "four": base + "".join(f" <{net}:{s}:0.5>" for s in stems[:4]),
            "set_a": base + "".join(f" <{net}:{s}:0.5>" for s in stems[:2]),
            "set_b": base + "".join(f" <{net}:{s}:0.5>" for s in stems[2:4])}


def paired(hosts, fn, repeats):
    """fn(net, host, i) timed on each engine in turn, the order alternating per repeat (paired samples: a slow
    spell of the machine hits both engines alike)."""
    out = {net: [] for net in hosts}
    nets = list(hosts)
    for i in range(repeats):
        for net in (nets if i % 2 == 0 else nets[::-1]):
            out[net].append(fn(net, hosts[net], i))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--ckpt", type=Path)
    args = ap.parse_args()
    reason = webui_host.skip_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    from tests.fixtures import adapters, tiny_models
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.ckpt or tiny_models.write_checkpoint("sd1", tmp / "ckpt", seed=0)
        corpus = adapters.write_corpus("sd1", ckpt, tmp / "corpus", seed=0)
        picked = {k: corpus[k] for k in ("lora", "locon", "loha", "lokr")}
        stems = [p.stem for p in picked.values()]
        hosts, mems = {}, {}
        try:
            # both webuis run side by side (each its own process, memory and caches); timings alternate
            for net in ("lora", "tune"):
                hosts[net] = start_engine(net, picked, tmp / f"w-{net}", ckpt)
            for net, h in hosts.items():
                mems[net] = PeakRss(h.proc.pid).__enter__()
            res = {net: {} for net in hosts}
            for label in ("none", "one", "four"):
                # warm-up: the first use loads files and merges
                paired(hosts, lambda net, h, i: timed(h, prompts(net, stems)[label], args), 1)
                times = paired(hosts, lambda net, h, i: timed(h, prompts(net, stems)[label], args), args.repeats)
                for net in hosts:
                    res[net][label] = statistics.median(times[net])
            paired(hosts, lambda net, h, i: (timed(h, prompts(net, stems)["set_a"], args),
                                             timed(h, prompts(net, stems)["set_b"], args)), 1)
            switch = paired(hosts, lambda net, h, i: timed(h, prompts(net, stems)["set_a" if i % 2 else "set_b"],
                                                           args), args.repeats)
            steady = paired(hosts, lambda net, h, i: timed(h, prompts(net, stems)["set_a"], args), args.repeats)
            for net in hosts:
                res[net]["switch"] = max(0.0, statistics.median(switch[net]) - statistics.median(steady[net]))
                mems[net].__exit__(None, None, None)
                res[net]["peak_mb"] = (mems[net].peak - mems[net].base) / 2 ** 20
        finally:
            for h in hosts.values():
                h.stop()
    b, t = res["lora"], res["tune"]
    print(f"checkpoint {ckpt.name}, {args.size}px, {args.steps} steps, median of {args.repeats} paired runs")
    print(f"{'':28s}{'built-in':>12s}{'tune':>12s}{'ratio':>9s}")
    for key, label in (("none", "no adapter (s/gen)"), ("one", "1 adapter (s/gen)"), ("four", "4 adapters (s/gen)"),
                       ("switch", "set change (extra s)"), ("peak_mb", "peak RSS above idle (MB)")):
        ratio = t[key] / b[key] if b[key] > 1e-9 else float("nan")
        print(f"{label:28s}{b[key]:12.4f}{t[key]:12.4f}{ratio:9.3f}")


if __name__ == "__main__":
    main()
