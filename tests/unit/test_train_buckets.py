"""Bucketing: kohya-identical bucket sets and assignments, crops/flip and their SDXL conditioning, deterministic
bucket-pure batches, step derivation."""
import ast
import math
import os
import random
import tarfile
import types
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from lib_tune.train.buckets import (BucketConfig, apply_transform, assign_bucket, derive_schedule, image_to_tensor,
                                    make_bucket_resolutions, plan_buckets, plan_transform)
from lib_tune.train.captions import derive_rng

KOHYA_TAR = "/work/shared/kohya-src/sd-scripts.tar.gz"


def kohya_defs(member, names, ns):
    """Execute only the named top-level defs of a kohya source file (reference implementation for parity)."""
    with tarfile.open(KOHYA_TAR) as tf:
        src = tf.extractfile("./" + member).read().decode("utf-8")
    body = [n for n in ast.parse(src).body if getattr(n, "name", None) in names]
    assert len(body) == len(names)
    exec(compile(ast.Module(body=body, type_ignores=[]), member, "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def kohya():
    if not os.path.isfile(KOHYA_TAR):
        pytest.skip("kohya sd-scripts source not available")
    ns = {"math": math, "np": np, "random": random, "Tuple": Tuple}
    kohya_defs("library/model_util.py", ["make_bucket_resolutions"], ns)
    ns["model_util"] = types.SimpleNamespace(make_bucket_resolutions=ns["make_bucket_resolutions"])
    kohya_defs("library/train_util.py", ["BucketManager"], ns)
    return ns


CONFIGS = [BucketConfig(), BucketConfig((768, 768), 320, 1536, 64), BucketConfig((1024, 1024), 256, 2048, 32),
           BucketConfig((640, 512), 256, 1024, 64)]
SIZES = [(512, 512), (600, 800), (1920, 1080), (300, 2000), (257, 255), (4000, 100), (100, 4000), (1024, 768)] + \
        [(random.Random(i).randint(64, 3000), random.Random(-i).randint(64, 3000)) for i in range(60)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_bucket_resolutions_match_kohya(kohya, cfg):
    ours = make_bucket_resolutions(cfg)
    assert ours == kohya["make_bucket_resolutions"](cfg.resolution, cfg.min_size, cfg.max_size, cfg.step)
    for w, h in ours:
        assert w % cfg.step == 0 and h % cfg.step == 0 and w * h <= cfg.area


@pytest.mark.parametrize("cfg", CONFIGS)
def test_assignment_matches_kohya(kohya, cfg):
    bm = kohya["BucketManager"](False, cfg.resolution, cfg.min_size, cfg.max_size, cfg.step)
    bm.make_buckets()
    resos = make_bucket_resolutions(cfg)
    for size in SIZES:
        a = assign_bucket(size, cfg, resos)
        reso, resized, ar_err = bm.select_bucket(*size)
        assert (a.bucket, a.resized) == (tuple(reso), tuple(resized)), size
        assert a.ar_error == pytest.approx(ar_err)
        assert a.resized[0] >= a.bucket[0] and a.resized[1] >= a.bucket[1]


@pytest.mark.parametrize("res", [(512, 512), (1024, 1024)])
def test_no_upscale_matches_kohya(kohya, res):
    cfg = BucketConfig(res, no_upscale=True)
    bm = kohya["BucketManager"](True, res, None, None, 64)
    for size in SIZES:
        a = assign_bucket(size, cfg)
        reso, resized, _ = bm.select_bucket(*size)
        assert (a.bucket, a.resized) == (tuple(reso), tuple(resized)), size
        assert a.resized[0] <= size[0] and a.resized[1] <= size[1]  # never upscaled


def test_no_upscale_too_small_raises_and_disabled_is_single_bucket():
    with pytest.raises(ValueError):
        assign_bucket((40, 500), BucketConfig(no_upscale=True))
    cfg = BucketConfig((512, 512), enabled=False)
    assert make_bucket_resolutions(cfg) == [(512, 512)]
    a = assign_bucket((600, 800), cfg)
    assert a.bucket == (512, 512) and a.resized == (512, 683)


def test_center_and_random_crop_and_flip():
    cfg = BucketConfig()
    a = assign_bucket((600, 800), cfg)  # -> 448x576 bucket, resized 448x597
    t = plan_transform((600, 800), a)
    assert t.crop_left_top == (0, (597 - 576) // 2) and not t.flipped
    seen = set()
    for s in range(40):
        t = plan_transform((600, 800), a, random_crop=True, flip_aug=True, rng=derive_rng(1, s))
        left, top = t.crop_left_top
        assert left == 0 and 0 <= top <= 597 - 576
        seen.add((top, t.flipped))
    assert len({f for _, f in seen}) == 2 and len({t for t, _ in seen}) > 3
    t1 = plan_transform((600, 800), a, True, True, derive_rng(3, 3))
    t2 = plan_transform((600, 800), a, True, True, derive_rng(3, 3))
    assert t1 == t2
    with pytest.raises(ValueError):
        plan_transform((600, 800), a, random_crop=True)


def test_apply_transform_pixels_and_conditioning():
    # x-coordinate encoded in red, y in green: the crop's first pixel tells where it was cut
    w, h = 300, 200
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(w)[None, :] % 256
    arr[..., 1] = np.arange(h)[:, None]
    im = Image.fromarray(arr)
    cfg = BucketConfig((256, 256), no_upscale=True)  # no resize: resized == original
    a = assign_bucket((w, h), cfg)
    assert a.resized == (w, h) and a.bucket == (256, 192)
    t = plan_transform((w, h), a)
    out = apply_transform(im, t)
    assert out.size == (256, 192)
    left, top = t.crop_left_top
    assert (left, top) == (22, 4)
    assert out.getpixel((0, 0))[:2] == (left, top)
    tf = plan_transform((w, h), a, flip_aug=True, rng=_rng_giving_flip())
    assert tf.flipped
    outf = apply_transform(im, tf)
    assert outf.getpixel((0, 0))[0] == (left + 255) % 256  # rightmost column of the crop comes first
    # flipped image == crop of the flipped original at the mirrored offset used for conditioning
    mirrored = im.transpose(Image.FLIP_LEFT_RIGHT)
    cl, ct = tf.cond_crop_left_top
    assert cl == w - left - 256
    assert list(outf.getdata()) == list(mirrored.crop((cl, ct, cl + 256, ct + 192)).getdata())
    assert tf.sdxl_size_conditioning() == (200, 300, 4, cl, 192, 256)
    with pytest.raises(ValueError):
        apply_transform(im.resize((10, 10)), t)


def _rng_giving_flip():
    for s in range(100):
        if derive_rng("f", s).random() < 0.5:
            return derive_rng("f", s)


def test_image_to_tensor():
    im = Image.new("RGB", (4, 2), (0, 255, 128))
    t = image_to_tensor(im)
    assert t.shape == (3, 2, 4) and t.dtype == torch.float32
    assert t[0].eq(-1).all() and t[1].eq(1).all()
    assert torch.allclose(t[2], torch.full((2, 4), 128 / 127.5 - 1), atol=1e-6)


def test_plan_histogram_batches_and_determinism():
    cfg = BucketConfig()
    sizes = [(512, 512), (600, 800), (800, 600), (512, 512), (1000, 250), (600, 800)]
    repeats = [3, 1, 2, 5, 1, 0]
    plan = plan_buckets(sizes, repeats, cfg)
    assert plan.histogram() == {"448x576": 1, "512x512": 8, "576x448": 2, "1024x256": 1}
    info = plan.bucket_info()
    assert [b["resolution"] for b in info["buckets"].values()] == [[448, 576], [512, 512], [576, 448], [1024, 256]]
    assert [b["count"] for b in info["buckets"].values()] == [1, 8, 2, 1]
    assert plan.batches_per_epoch(3) == 1 + 3 + 1 + 1
    b0 = plan.epoch_batches(3, seed=11, epoch=0)
    assert len(b0) == plan.batches_per_epoch(3)
    flat = sorted(i for b in b0 for i in b)
    assert flat == sorted(i for i, r in enumerate(repeats) for _ in range(r))
    for b in b0:
        assert len({plan.assignments[i].bucket for i in b}) == 1 and 1 <= len(b) <= 3
    assert b0 == plan.epoch_batches(3, seed=11, epoch=0)
    assert any(plan.epoch_batches(3, seed=11, epoch=e) != b0 for e in range(1, 6))
    assert any(plan.epoch_batches(3, seed=s, epoch=0) != b0 for s in range(12, 18))
    with pytest.raises(ValueError):
        plan.batches_per_epoch(0)


def test_derive_schedule():
    s = derive_schedule(10, epochs=5)
    assert (s.steps_per_epoch, s.epochs, s.total_steps) == (10, 5, 50)
    s = derive_schedule(10, epochs=5, gradient_accumulation_steps=4)
    assert (s.steps_per_epoch, s.total_steps) == (3, 15)
    s = derive_schedule(10, max_steps=25)
    assert (s.epochs, s.total_steps) == (3, 25)
    s = derive_schedule(10, epochs=5, max_steps=25)
    assert (s.epochs, s.total_steps) == (3, 25)
    s = derive_schedule(10, epochs=2, max_steps=1000)
    assert s.total_steps == 20
    with pytest.raises(ValueError):
        derive_schedule(10)
