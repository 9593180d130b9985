"""LR schedules (against the diffusers formulas written out by hand) and optimizer construction."""
import math
import sys

import pytest
import torch

from lib_tune.train.optim import (OptimizerUnavailable, available_optimizers, build_optimizer, build_scheduler,
                                  lr_factor)

T, W = 100, 10


def test_constant_ignores_warmup():
    assert [lr_factor("constant", s, T, W) for s in (0, 5, 50, 99)] == [1.0] * 4


def test_constant_with_warmup():
    assert lr_factor("constant_with_warmup", 0, T, W) == 0.0
    assert lr_factor("constant_with_warmup", 5, T, W) == pytest.approx(0.5)
    assert lr_factor("constant_with_warmup", 10, T, W) == 1.0
    assert lr_factor("constant_with_warmup", 99, T, W) == 1.0


def test_linear():
    assert lr_factor("linear", 3, T, W) == pytest.approx(0.3)
    assert lr_factor("linear", 10, T, W) == pytest.approx(1.0)
    assert lr_factor("linear", 55, T, W) == pytest.approx(45 / 90)
    assert lr_factor("linear", 100, T, W) == 0.0


def test_cosine():
    for s in (10, 32, 55, 77, 99):
        p = (s - W) / (T - W)
        assert lr_factor("cosine", s, T, W) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)))
    assert lr_factor("cosine", 55, T, W) == pytest.approx(0.5)
    assert lr_factor("cosine", 7, T, W) == pytest.approx(0.7)


def test_cosine_with_restarts():
    cycles = 3
    for s in (10, 25, 40, 41, 70, 99):
        p = (s - W) / (T - W)
        want = 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1.0)))
        assert lr_factor("cosine_with_restarts", s, T, W, cycles) == pytest.approx(want)
    # a restart: the factor jumps back to 1 at the start of each cycle
    assert lr_factor("cosine_with_restarts", 40, T, W, cycles) == pytest.approx(1.0)
    assert lr_factor("cosine_with_restarts", 39, T, W, cycles) < 0.01
    assert lr_factor("cosine_with_restarts", 100, T, W, cycles) == 0.0


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="unknown lr scheduler"):
        lr_factor("exponential", 0, T)


def test_scheduler_drives_each_group_from_its_own_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("adamw", {"unet": [a], "te": [b], "emb": []}, {"unet": 1e-3, "te": 1e-4, "emb": 5e-3})
    assert [g["name"] for g in opt.param_groups] == ["unet", "te"]
    sched = build_scheduler(opt, "cosine", 20, warmup=4)
    seen = []
    for step in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (lu, lt) in enumerate(seen):
        f = lr_factor("cosine", step, 20, 4)
        assert lu == pytest.approx(1e-3 * f) and lt == pytest.approx(1e-4 * f)


def test_parts_without_lr_or_tensors_are_left_out():
    a = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("adamw", {"unet": [a], "te": [torch.nn.Parameter(torch.zeros(1))]}, {"unet": 1e-3, "te": 0})
    assert [g["name"] for g in opt.param_groups] == ["unet"]
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer("adamw", {"unet": []}, {"unet": 1e-3})


def test_missing_optional_optimizers_say_which_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    a = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(OptimizerUnavailable, match="bitsandbytes"):
        build_optimizer("adamw8bit", {"unet": [a]}, {"unet": 1e-3})
    with pytest.raises(OptimizerUnavailable, match="prodigyopt"):
        build_optimizer("prodigy", {"unet": [a]}, {"unet": 1.0})
    assert available_optimizers() == ["adamw"]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgd", {"unet": [a]}, {"unet": 1e-3})
