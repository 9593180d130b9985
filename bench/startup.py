"""How much longer a webui start takes with sd-webui-tune than without it.

Starts the real webui (SD_WEBUI_PATH) alternately without and with the extension, N times each, with the tiny
SD1 checkpoint, and prints: median wall time from launch to API + model ready, the webui's own startup total
(/internal/profile-startup), and the time the webui attributes to this extension's scripts and callbacks
(records naming tune.py). The anchor is the same webui without the extension, measured in the same run.

usage: SD_WEBUI_PATH=... python bench/startup.py [N]
"""
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_tune.tiny import models as tiny_models  # noqa: E402
from tests.e2e import host as webui_host  # noqa: E402


def one_start(work: Path, ckpt: Path, extension: bool):
    h = webui_host.WebuiHost(work, ckpt.parent, extension=extension, ckpt=ckpt)
    try:
        h.start()
        prof = h.get("/internal/profile-startup") or {}
        records = prof.get("records", {})
        own = sum(v for k, v in records.items() if "tune.py" in k)
        return h.start_seconds, float(prof.get("total", 0.0)), own
    finally:
        h.stop()


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    reason = webui_host.skip_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tiny_models.write_checkpoint("sd1", tmp / "ckpt", seed=0)
        res = {False: [], True: []}
        for i in range(n):
            for ext in (False, True):
                res[ext].append(one_start(tmp / f"w{i}{int(ext)}", ckpt, ext))
    for ext in (False, True):
        wall = statistics.median(r[0] for r in res[ext])
        total = statistics.median(r[1] for r in res[ext])
        own = statistics.median(r[2] for r in res[ext])
        label = "with sd-webui-tune   " if ext else "without (anchor)     "
        print(f"{label} start-to-ready {wall:6.2f} s   webui startup total {total:6.2f} s   extension's own {own:.3f} s")
    d_wall = statistics.median(r[0] for r in res[True]) - statistics.median(r[0] for r in res[False])
    d_total = statistics.median(r[1] for r in res[True]) - statistics.median(r[1] for r in res[False])
    ratio = statistics.median(r[1] for r in res[True]) / max(1e-9, statistics.median(r[1] for r in res[False]))
    print(f"difference: start-to-ready {d_wall:+.2f} s, startup total {d_total:+.2f} s (ratio {ratio:.3f}x)")


if __name__ == "__main__":
    main()
