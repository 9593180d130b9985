"""The training plot: raw and smoothed loss on the left axis, learning rate on the right, robust to empty,
constant, NaN and resumed (shorter LR) series."""
import math

from lib_tune.ui import plot


def count(img, color, tol=40):
    px = img.getdata()
    return sum(1 for p in px if all(abs(a - b) <= tol for a, b in zip(p, color)))


def has_color_in(img, color, box, tol=40):
    return count(img.crop(box), color, tol) > 0


def test_draws_loss_smoothed_and_lr_lines():
    losses = [1.0 / (1 + 0.1 * i) + 0.05 * math.sin(i) for i in range(100)]
    lrs = [5e-4 * min(1, i / 10) for i in range(100)]
    img = plot.training_plot(losses, lrs, size=(720, 300))
    assert img.size == (720, 300) and img.mode == "RGB"
    inner = (65, 27, 720 - 71, 300 - 35)
    assert has_color_in(img, plot.RAW, inner, tol=5)
    assert has_color_in(img, plot.SMOOTH, inner, tol=5)
    assert has_color_in(img, plot.LR, inner, tol=5)


def test_loss_decrease_goes_down_the_plot():
    img = plot.training_plot([1.0, 0.5, 0.25, 0.1], [], size=(400, 200))
    blue = [(x, y) for y in range(27, 166) for x in range(65, 330) if img.getpixel((x, y)) == plot.SMOOTH]
    left = min(blue)[1]
    right = max(blue)[1]
    assert left < right  # image y grows downwards: the trend starts high and ends low


def test_without_lr_there_is_no_lr_line():
    img = plot.training_plot([1.0, 0.9, 0.8], [])
    assert not has_color_in(img, plot.LR, (65, 27, 720 - 71, 300 - 35), tol=5)


def test_empty_constant_and_nan_series_draw():
    assert plot.training_plot([], []).size == (720, 300)
    img = plot.training_plot([0.5] * 10, [1e-3] * 10)
    assert has_color_in(img, plot.SMOOTH, (65, 27, 649, 265), tol=5)
    img = plot.training_plot([float("nan"), 1.0, 0.5, float("inf"), 0.3], [1e-3] * 5)
    assert has_color_in(img, plot.SMOOTH, (65, 27, 649, 265), tol=5)
    assert plot.training_plot([float("nan")] * 3, []).size == (720, 300)


def test_shorter_lr_series_is_aligned_to_the_last_steps():
    img = plot.training_plot([1.0] * 100, [1e-3] * 10, size=(720, 300))
    orange_x = [x for x in range(65, 650) for y in range(27, 266) if img.getpixel((x, y)) == plot.LR]
    assert min(orange_x) > 65 + 0.8 * (650 - 65)
