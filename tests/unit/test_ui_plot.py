"""The training plot: raw and smoothed loss on the left axis, learning rate on the right, robust to empty,
constant, NaN and resumed (shorter LR) series."""
import math

from lib_tune.ui import plot

SIZE = (640, 280)
AREA = plot.plot_area(SIZE)
INNER = (AREA[0] + 1, AREA[1] + 1, AREA[2], AREA[3])


def pixels(img, color, box=INNER):
    """(x, y) of the pixels of exactly `color` inside box (in image coordinates)."""
    x0, y0, x1, y1 = box
    return [(x, y) for y in range(y0, y1) for x in range(x0, x1) if img.getpixel((x, y)) == color]


def test_draws_loss_smoothed_and_lr_lines():
    losses = [1.0 / (1 + 0.1 * i) + 0.05 * math.sin(i) for i in range(100)]
    lrs = [5e-4 * min(1, i / 10) for i in range(100)]
    img = plot.training_plot(losses, lrs, size=SIZE)
    assert img.size == SIZE and img.mode == "RGB"
    for color in (plot.RAW, plot.SMOOTH, plot.LR):
        assert pixels(img, color), color


def test_loss_decrease_goes_down_the_plot_and_lr_warmup_goes_up():
    img = plot.training_plot([1.0, 0.5, 0.25, 0.1], [0.0, 1e-3, 2e-3, 3e-3], size=SIZE)
    blue, orange = pixels(img, plot.SMOOTH), pixels(img, plot.LR)
    assert min(blue)[1] < max(blue)[1]  # leftmost point high (small y), rightmost low
    assert min(orange)[1] > max(orange)[1]


def test_without_lr_there_is_no_lr_line():
    assert not pixels(plot.training_plot([1.0, 0.9, 0.8], [], size=SIZE), plot.LR)


def test_empty_constant_and_nan_series_draw():
    assert plot.training_plot([], [], size=SIZE).size == SIZE
    assert pixels(plot.training_plot([0.5] * 10, [1e-3] * 10, size=SIZE), plot.SMOOTH)
    img = plot.training_plot([float("nan"), 1.0, 0.5, float("inf"), 0.3], [1e-3] * 5, size=SIZE)
    assert pixels(img, plot.SMOOTH)
    assert plot.training_plot([float("nan")] * 3, [], size=SIZE).size == SIZE


def test_shorter_lr_series_is_aligned_to_the_last_steps():
    img = plot.training_plot([1.0] * 100, [1e-3] * 10, size=SIZE)
    xs = [x for x, _ in pixels(img, plot.LR)]
    assert min(xs) > AREA[0] + 0.85 * (AREA[2] - AREA[0])


def test_validation_series_is_drawn_at_its_steps_with_the_best_ringed():
    losses = [1.0 / (1 + 0.1 * i) for i in range(100)]
    assert not pixels(plot.training_plot(losses, [], size=SIZE), plot.VAL)
    img = plot.training_plot(losses, [], size=SIZE, val_losses=[(25, 0.6), (50, 0.4), (100, 0.39)], best_step=50)
    magenta, green = pixels(img, plot.VAL), pixels(img, plot.BEST)
    assert magenta and green
    xs = [x for x, _ in magenta]
    span = AREA[2] - AREA[0]
    assert AREA[0] + 0.2 * span < min(xs) < AREA[0] + 0.3 * span  # the first score sits at step 25 of 100
    assert max(xs) > AREA[0] + 0.95 * span
    gx = sum(x for x, _ in green) / len(green)
    assert abs(gx - (AREA[0] + span * 49 / 99)) < 8  # the ring is around step 50 (not the lower 100: min_delta)
    # without best_step the lowest score is ringed; the loss axis covers the validation values too
    img = plot.training_plot([0.9, 0.8, 0.7, 0.6], [], size=SIZE, val_losses=[(2, 0.2), (4, 1.5)])
    green = pixels(img, plot.BEST)
    assert green and sum(x for x, _ in green) / len(green) < AREA[0] + 0.5 * span
    blue_ys = [y for _, y in pixels(img, plot.SMOOTH)]
    assert min(blue_ys) > AREA[1] + 10 and max(blue_ys) < AREA[3] - 10  # training losses inside the wider range


def test_validation_only_and_non_finite_scores_draw():
    assert pixels(plot.training_plot([], [], size=SIZE, val_losses=[(10, 0.3)]), plot.VAL)
    img = plot.training_plot([0.5] * 10, [], size=SIZE, val_losses=[(5, float("nan")), (10, 0.4)])
    assert pixels(img, plot.VAL) and pixels(img, plot.BEST)
