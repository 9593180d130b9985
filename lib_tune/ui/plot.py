"""The Tune tab's training plot: raw loss (light grey), its smoothed trend (blue, lib_tune.train.plot's EMA),
the validation loss on held-out images (magenta dots joined by a thin line, the best one ringed in green; on the
loss axis, whose range covers both) and the learning rate (orange) on a second axis at the right, drawn with PIL alone (the webui's environment has
no matplotlib). Pure: returns a PIL image; non-finite losses are left out of the scale and the lines (a NaN loss
is reported elsewhere, it must not blank the whole plot). Text uses a common TrueType font when one is
installed (readable when the browser scales the image down), else PIL's built-in bitmap font."""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

from ..train.plot import smooth

RAW = (185, 185, 185)
SMOOTH = (30, 90, 200)
LR = (230, 120, 20)
VAL = (200, 30, 140)
BEST = (20, 150, 60)
INK = (0, 0, 0)
GRID = (232, 232, 232)
#: plot area margins (left, right, top, bottom): axis labels live outside the area, lines inside
MARGINS = (62, 78, 30, 38)
_FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf", "Helvetica.ttc")


@functools.lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont
    for name in _FONTS:
        try:
            return ImageFont.truetype(name, size)
        except (OSError, ValueError):
            continue
    return ImageFont.load_default()


def _range(values: Sequence[float]) -> Optional[Tuple[float, float]]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _segments(points: List[Optional[Tuple[float, float]]]) -> List[List[Tuple[float, float]]]:
    """Runs of consecutive drawable points (a None breaks the line)."""
    runs, cur = [], []
    for p in points:
        if p is None:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(p)
    if cur:
        runs.append(cur)
    return runs


def plot_area(size) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the area the lines are drawn in."""
    left, right, top, bottom = MARGINS
    return left, top, size[0] - right, size[1] - bottom


def _validation(d, vals, rng, x_of_step, ys, best_step: Optional[int]) -> None:
    """Validation scores: dots joined by a thin line, the best one ringed."""
    lo, hi = rng
    y0, y1 = ys
    pts = [(x_of_step(s), y1 - (y1 - y0) * (v - lo) / (hi - lo)) if math.isfinite(v) else None for s, v in vals]
    for run in _segments(pts):
        if len(run) > 1:
            d.line(run, fill=VAL, width=1)
    for p in pts:
        if p is not None:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=VAL)
    finite = [(s, v, p) for (s, v), p in zip(vals, pts) if p is not None]
    if not finite:
        return
    best = next((f for f in finite if f[0] == best_step), None) if best_step is not None else None
    if best is None:
        best = min(finite, key=lambda f: f[1])
    px, py = best[2]
    d.ellipse([px - 6, py - 6, px + 6, py + 6], outline=BEST, width=2)


def training_plot(losses: Sequence[float], lrs: Sequence[float] = (), size=(640, 280),
                  title: str = "training loss", first_step: int = 1,
                  val_losses: Sequence[Sequence[float]] = (), best_step: Optional[int] = None):
    """The plot as a PIL RGB image of `size`. Entry i of `losses` is training step first_step + i; when one
    list is shorter (a resumed job keeps its earlier losses but logs learning rates from the resume on), it is
    aligned to the last steps. val_losses: (step, loss) pairs of the validation scores, drawn at their steps;
    best_step: the one to ring (default: the lowest)."""
    from PIL import Image, ImageDraw

    font = _font(12)
    w, h = size
    x0, y0, x1, y1 = plot_area(size)
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)

    def text_w(s: str) -> int:
        return int(d.textlength(s, font=font))

    for i in range(1, 4):
        y = y0 + (y1 - y0) * i / 4
        d.line([(x0, y), (x1, y)], fill=GRID)
    d.rectangle([x0, y0, x1, y1], outline=INK)
    d.text((x0, 8), title, fill=INK, font=font)
    losses = [float(v) for v in losses]
    lrs = [float(v) for v in lrs]
    vals = [(int(s), float(v)) for s, v in val_losses]
    x = x1
    legend = (("learning rate", LR), ("validation", VAL), ("smoothed", SMOOTH), ("raw", RAW))
    for label, color in legend if vals else legend[:1] + legend[2:]:
        x -= text_w(label)
        d.text((x, 8), label, fill=color, font=font)
        x -= 12
    n = max(len(losses), len(lrs), max((s - first_step + 1 for s, _ in vals), default=0))
    if n == 0:
        msg = "no steps yet"
        d.text(((x0 + x1 - text_w(msg)) // 2, (y0 + y1) // 2 - 6), msg, fill=INK, font=font)
        return img

    def x_of(i: int) -> float:
        return x0 + (x1 - x0) * (i / max(1, n - 1))

    def line(values: Sequence[float], rng, color, width):
        lo, hi = rng
        offset = n - len(values)  # a shorter list (LRs after a resume) covers the last steps
        pts = [(x_of(offset + i), y1 - (y1 - y0) * (v - lo) / (hi - lo)) if math.isfinite(v) else None
               for i, v in enumerate(values)]
        for run in _segments(pts):
            if len(run) == 1:
                d.point(run, fill=color)
            else:
                d.line(run, fill=color, width=width)

    loss_rng = _range(losses + [v for _, v in vals])
    if loss_rng:
        finite = [v for v in losses if math.isfinite(v)]
        smoothed, it = [], iter(smooth(finite))
        for v in losses:  # the EMA over the finite losses, placed at their steps
            smoothed.append(next(it) if math.isfinite(v) else float("nan"))
        line(losses, loss_rng, RAW, 1)
        line(smoothed, loss_rng, SMOOTH, 2)
        for label, y in ((f"{loss_rng[1]:.3g}", y0), (f"{loss_rng[0]:.3g}", y1), ("loss", (y0 + y1) // 2)):
            d.text((x0 - 6 - text_w(label), y - 7), label, fill=SMOOTH, font=font)
        _validation(d, vals, loss_rng, lambda s: x_of(s - first_step), (y0, y1), best_step)
    lr_rng = _range(lrs)
    if lr_rng:
        lo, hi = lr_rng
        lr_rng = (min(lo, 0.0), hi) if lo >= 0 else lr_rng  # learning rates read best from 0
        line(lrs, lr_rng, LR, 2)
        for label, y in ((f"{lr_rng[1]:.2e}", y0), (f"{lr_rng[0]:.2g}", y1), ("LR", (y0 + y1) // 2)):
            d.text((x1 + 6, y - 7), label, fill=LR, font=font)
    last = str(first_step + n - 1)
    d.text((x0, y1 + 4), str(first_step), fill=INK, font=font)
    d.text((x1 - text_w(last), y1 + 4), last, fill=INK, font=font)
    d.text(((x0 + x1 - text_w("step")) // 2, y1 + 18), "step", fill=INK, font=font)
    return img
