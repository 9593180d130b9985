"""A loss curve as a PNG drawn with PIL alone (no matplotlib in the webui's environment or ours): the raw
per-step loss in light grey, its exponential moving average (what people read trends from) in blue, axes with
the step and loss ranges."""
from __future__ import annotations

from typing import List, Sequence


def smooth(values: Sequence[float], beta: float = 0.9) -> List[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta ** i))
    return out


def loss_curve(losses: Sequence[float], path: str, size=(640, 360), title: str = "training loss") -> str:
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 16, 28, 36
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill=(0, 0, 0))
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    if losses:
        lo, hi = min(losses), max(losses)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        n = len(losses)

        def xy(i, v):
            x = left + (w - left - right) * (i / max(1, n - 1))
            y = top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))
            return x, y

        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(190, 190, 190), width=1)
        d.line([xy(i, v) for i, v in enumerate(smooth(losses))], fill=(30, 90, 200), width=2)
        d.text((4, top - 4), f"{hi:.3g}", fill=(0, 0, 0))
        d.text((4, h - bottom - 8), f"{lo:.3g}", fill=(0, 0, 0))
        d.text((left, h - bottom + 6), "1", fill=(0, 0, 0))
        d.text((w - right - 8 * len(str(n)), h - bottom + 6), f"{n}", fill=(0, 0, 0))
        d.text(((w - 40) // 2, h - bottom + 18), "step", fill=(0, 0, 0))
    img.save(path)
    return path
