"""Aspect-ratio bucketing, the per-sample resize/crop/flip, and the deterministic batch order.

Bucket resolutions and the image -> bucket choice reproduce kohya sd-scripts (library/model_util.py
make_bucket_resolutions, library/train_util.py BucketManager.select_bucket), so the same dataset lands in the
same buckets (and the same ss_bucket_info) as with kohya:

- buckets: every (w, h) on a `step` grid with both sides in [min_size, max_size] and w*h <= the base
  resolution's area, plus the square of that area; an image goes to the bucket with the closest aspect ratio
  and is resized to cover it, then cropped;
- `no_upscale`: the bucket comes from the image itself (scaled down to the base area if larger, never up),
  floored to the step; min/max_size do not apply (as in kohya);
- `enabled=False`: one bucket, the base resolution.

Crop coordinates are real pixel offsets of the crop inside the resized image (what SDXL's `crop_coords_top_left`
conditioning means in Stability's training code). kohya's `get_crop_ltrb` returns a letterbox offset instead;
we deliberately do not copy that. With a horizontal flip the left offset is mirrored, since the flipped crop is
the crop of the flipped resized image at `resized_w - left - bucket_w`.

Batch order: within an epoch every batch holds images of one bucket; each bucket's samples (repeats expanded)
are shuffled, cut into batches, and the list of batches is shuffled, all from a Random derived from
(seed, epoch), so epoch e's order is a pure function of the seed and the dataset and a resume can jump to any
(epoch, batch index).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .captions import derive_rng

Size = Tuple[int, int]
try:
    _LANCZOS = Image.Resampling.LANCZOS
    _FLIP = Image.Transpose.FLIP_LEFT_RIGHT
except AttributeError:  # Pillow < 9.1
    _LANCZOS = Image.LANCZOS
    _FLIP = Image.FLIP_LEFT_RIGHT


@dataclass(frozen=True)
class BucketConfig:
    #: base resolution (w, h); its area is the pixel budget of every bucket
    resolution: Size = (512, 512)
    min_size: int = 256
    max_size: int = 1024
    step: int = 64
    no_upscale: bool = False
    enabled: bool = True

    @property
    def area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class BucketAssignment:
    bucket: Size
    #: size the image is resized to before cropping to the bucket (covers the bucket)
    resized: Size
    #: bucket aspect ratio minus image aspect ratio
    ar_error: float


def make_bucket_resolutions(cfg: BucketConfig) -> List[Size]:
    """Sorted bucket sizes for the non-no_upscale mode (kohya make_bucket_resolutions)."""
    if not cfg.enabled:
        return [tuple(cfg.resolution)]
    area, d = cfg.area, cfg.step
    resos = set()
    side = int(math.sqrt(area) // d) * d
    resos.add((side, side))
    w = cfg.min_size
    while w <= cfg.max_size:
        h = min(cfg.max_size, int((area // w) // d) * d)
        if h >= cfg.min_size:
            resos.add((w, h))
            resos.add((h, w))
        w += d
    return sorted(resos)


def assign_bucket(size: Size, cfg: BucketConfig, resolutions: Optional[Sequence[Size]] = None) -> BucketAssignment:
    """The bucket of an image of `size` (w, h). Raises ValueError when the image cannot fill any bucket (in
    no_upscale mode, a side shorter than the step)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"invalid image size {w}x{h}")
    ar = w / h
    if cfg.enabled and cfg.no_upscale:
        return _assign_no_upscale(w, h, ar, cfg)
    resos = list(resolutions) if resolutions is not None else make_bucket_resolutions(cfg)
    if (w, h) in resos:
        reso = (w, h)
    else:
        reso = min(range(len(resos)), key=lambda i: abs(resos[i][0] / resos[i][1] - ar))
        reso = tuple(resos[reso])
    if ar > reso[0] / reso[1]:  # wider than the bucket: match heights
        scale = reso[1] / h
    else:
        scale = reso[0] / w
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    resized = (max(resized[0], reso[0]), max(resized[1], reso[1]))  # guard against rounding below the bucket
    return BucketAssignment(bucket=reso, resized=resized, ar_error=reso[0] / reso[1] - ar)


def _assign_no_upscale(w: int, h: int, ar: float, cfg: BucketConfig) -> BucketAssignment:
    d = cfg.step

    def round_to_step(x: float) -> int:
        x = int(x + 0.5)
        return x - x % d

    if w * h > cfg.area:
        rw = math.sqrt(cfg.area * ar)
        rh = cfg.area / rw
        bw = round_to_step(rw)
        bh_w = round_to_step(bw / ar) if bw else 0
        bh = round_to_step(rh)
        bw_h = round_to_step(bh * ar) if bh else 0
        ar_w = bw / bh_w if bh_w else math.inf
        ar_h = bw_h / bh if bh else math.inf
        if abs(ar_w - ar) < abs(ar_h - ar):
            resized = (bw, int(bw / ar + 0.5))
        else:
            resized = (int(bh * ar + 0.5), bh)
    else:
        resized = (w, h)
    bucket = (resized[0] - resized[0] % d, resized[1] - resized[1] % d)
    if bucket[0] < d or bucket[1] < d:
        raise ValueError(f"image {w}x{h} is smaller than the bucket step {d} (no_upscale)")
    return BucketAssignment(bucket=bucket, resized=resized, ar_error=bucket[0] / bucket[1] - ar)


@dataclass
class BucketPlan:
    """Bucket of every dataset entry and the per-epoch sample counts."""
    assignments: List[BucketAssignment]
    #: samples per epoch of each entry (repeats)
    repeats: List[int]

    @property
    def counts(self) -> Dict[Size, int]:
        """{bucket: samples per epoch}, buckets sorted."""
        out: Dict[Size, int] = {}
        for a, r in sorted(zip(self.assignments, self.repeats), key=lambda t: t[0].bucket):
            if r > 0:
                out[a.bucket] = out.get(a.bucket, 0) + r
        return out

    def histogram(self) -> Dict[str, int]:
        return {f"{w}x{h}": n for (w, h), n in self.counts.items()}

    @property
    def mean_ar_error(self) -> float:
        errs = [abs(a.ar_error) for a, r in zip(self.assignments, self.repeats) if r > 0]
        return float(sum(errs) / len(errs)) if errs else 0.0

    def bucket_info(self) -> dict:
        """kohya's ss_bucket_info: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}."""
        buckets = {i: {"resolution": list(b), "count": n} for i, (b, n) in enumerate(self.counts.items())}
        return {"buckets": buckets, "mean_img_ar_error": self.mean_ar_error}

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches never mix buckets, so this is the sum over buckets of ceil(count / batch_size)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        return sum(math.ceil(n / batch_size) for n in self.counts.values())

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> List[List[int]]:
        """The batches of one epoch as lists of entry indices (an entry appears once per repeat)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        rng = derive_rng(seed, "bucket-order", epoch)
        per_bucket: Dict[Size, List[int]] = {}
        for i, (a, r) in enumerate(zip(self.assignments, self.repeats)):
            per_bucket.setdefault(a.bucket, []).extend([i] * r)
        batches: List[List[int]] = []
        for bucket in sorted(per_bucket):
            samples = per_bucket[bucket]
            rng.shuffle(samples)
            batches.extend(samples[k:k + batch_size] for k in range(0, len(samples), batch_size))
        rng.shuffle(batches)
        return batches


def plan_buckets(sizes: Sequence[Size], repeats: Sequence[int], cfg: BucketConfig) -> BucketPlan:
    """Assign every entry (image size, repeats). Raises ValueError naming the first size that fits no bucket;
    run the dataset check first to get all such problems at once."""
    if len(sizes) != len(repeats):
        raise ValueError("sizes and repeats differ in length")
    resos = None if cfg.no_upscale and cfg.enabled else make_bucket_resolutions(cfg)
    return BucketPlan(assignments=[assign_bucket(s, cfg, resos) for s in sizes], repeats=list(repeats))


@dataclass(frozen=True)
class Schedule:
    batches_per_epoch: int
    #: optimizer steps per epoch: ceil(batches / gradient_accumulation_steps)
    steps_per_epoch: int
    epochs: int
    total_steps: int


def derive_schedule(batches_per_epoch: int, epochs: Optional[int] = None, max_steps: Optional[int] = None,
                    gradient_accumulation_steps: int = 1) -> Schedule:
    """Total optimizer steps from epochs and/or a step cap (the smaller wins when both are given); epochs is
    then the number of (possibly partial) epochs those steps need."""
    if gradient_accumulation_steps < 1:
        raise ValueError("gradient_accumulation_steps must be >= 1")
    if epochs is None and max_steps is None:
        raise ValueError("give epochs or max_steps")
    spe = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    totals = []
    if epochs is not None:
        totals.append(max(0, epochs) * spe)
    if max_steps is not None:
        totals.append(max(0, max_steps))
    total = min(totals)
    n_epochs = math.ceil(total / spe) if spe else 0
    return Schedule(batches_per_epoch=batches_per_epoch, steps_per_epoch=spe, epochs=n_epochs, total_steps=total)


@dataclass(frozen=True)
class Transform:
    """How one sample is cut from its image: resize to `resized`, crop `bucket` at `crop_left_top`, maybe flip."""
    original_size: Size
    resized: Size
    bucket: Size
    #: crop offset in the resized, unflipped image
    crop_left_top: Tuple[int, int]
    flipped: bool = False

    @property
    def cond_crop_left_top(self) -> Tuple[int, int]:
        """Crop offset as seen in the flipped image when flipped: the value for SDXL crop conditioning."""
        left, top = self.crop_left_top
        if self.flipped:
            left = self.resized[0] - left - self.bucket[0]
        return left, top

    def sdxl_size_conditioning(self) -> Tuple[int, int, int, int, int, int]:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w): sgm's original_size_as_tuple,
        crop_coords_top_left and target_size_as_tuple, in that order."""
        left, top = self.cond_crop_left_top
        return (self.original_size[1], self.original_size[0], top, left, self.bucket[1], self.bucket[0])


def plan_transform(original_size: Size, assignment: BucketAssignment, random_crop: bool = False,
                   flip_aug: bool = False, rng: Optional[random.Random] = None) -> Transform:
    """Decide crop and flip without touching pixels (so a latent-cache key can be made before loading).
    Center crop unless random_crop; flip with probability 0.5 when flip_aug. rng is required for either."""
    rw, rh = assignment.resized
    bw, bh = assignment.bucket
    if (random_crop or flip_aug) and rng is None:
        raise ValueError("random_crop / flip_aug need an rng")
    if random_crop:
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    flipped = bool(flip_aug and rng.random() < 0.5)
    return Transform(original_size=tuple(original_size), resized=assignment.resized, bucket=assignment.bucket,
                     crop_left_top=(left, top), flipped=flipped)


def apply_transform(image: Image.Image, t: Transform) -> Image.Image:
    """Resize (Lanczos, antialiased both ways), crop to the bucket, flip."""
    if image.size != tuple(t.original_size):
        raise ValueError(f"image is {image.size}, transform expects {t.original_size}")
    if image.size != tuple(t.resized):
        image = image.resize(t.resized, _LANCZOS)
    left, top = t.crop_left_top
    image = image.crop((left, top, left + t.bucket[0], top + t.bucket[1]))
    if t.flipped:
        image = image.transpose(_FLIP)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1] (the VAE's input range). Goes through bytes, not numpy,
    so it works whatever numpy the host has."""
    image = image.convert("RGB")
    w, h = image.size
    t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return t.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
