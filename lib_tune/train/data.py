"""Batches for the trainer, from a discovered Dataset: bucketing, per-sample crop/flip, caption augmentation and
cached VAE latents, addressed by a global micro-batch index.

Why an index and not an iterator: batch i is a pure function of (dataset, seed, i) -- epoch = i // batches per
epoch picks the epoch's deterministic order (BucketPlan.epoch_batches), and every random choice of a sample
(crop, flip, caption shuffle/dropout) comes from a Random derived from (seed, i, position in batch). A resumed run
therefore only needs the index to continue exactly where it stopped, and nothing depends on how many batches a
previous process happened to draw.

Latents come from the LatentCache (memory, optionally a folder shared across runs); a miss is encoded with the
model's VAE right when the batch is first needed, so no separate caching pass is required.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .buckets import (BucketConfig, BucketPlan, Transform, apply_transform, image_to_tensor, plan_buckets,
                      plan_transform)
from .captions import CaptionAugment, augment_caption, derive_rng
from .dataset import Dataset, DatasetConfig, ImageItem, discover, load_image
from .latent_cache import LatentCache, LatentKey
from .model import DiffusionModel, SizeCond

Tensor = torch.Tensor


@dataclass
class Batch:
    index: int
    latents: Tensor  # [B, 4, h, w] on the model's device, float32
    captions: List[str]
    size_cond: List[SizeCond]
    is_reg: Tensor  # [B] bool: class images (prior preservation)
    paths: List[str]


class TrainingData:
    """All batches of a run. `dataset`: from dataset.discover(); `exclude`: paths the validator rejected."""

    def __init__(self, dataset: Dataset, model: DiffusionModel, buckets: BucketConfig, batch_size: int = 1,
                 seed: int = 0, caption_aug: CaptionAugment = CaptionAugment(), flip_aug: bool = False,
                 random_crop: bool = False, cache: Optional[LatentCache] = None, vae_id: str = "loaded-model",
                 exclude: Sequence[str] = ()):
        entries = dataset.entries(exclude=exclude)
        if not entries:
            raise ValueError("the dataset has no images to train on")
        unreadable = [it.path for it, _ in entries if it.size is None]
        if unreadable:
            raise ValueError(f"{len(unreadable)} image(s) cannot be read, e.g. {unreadable[0]}: validate the "
                             f"dataset and exclude them")
        self.dataset = dataset
        self.model = model
        self.items: List[ImageItem] = [it for it, _ in entries]
        self.plan: BucketPlan = plan_buckets([it.size for it in self.items], [r for _, r in entries], buckets)
        self.buckets = buckets
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.caption_aug = caption_aug
        self.flip_aug = flip_aug
        self.random_crop = random_crop
        self.cache = cache if cache is not None else LatentCache()
        self.vae_id = vae_id
        self.batches_per_epoch = self.plan.batches_per_epoch(self.batch_size)
        self._epochs: Dict[int, List[List[int]]] = {}

    @property
    def has_reg(self) -> bool:
        return any(it.is_reg for it in self.items)

    def epoch_of(self, index: int) -> int:
        return index // self.batches_per_epoch

    def _order(self, epoch: int) -> List[List[int]]:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = self.plan.epoch_batches(self.batch_size, self.seed, epoch)
        return self._epochs[epoch]

    def transform(self, index: int, slot: int, entry: int) -> Transform:
        item = self.items[entry]
        rng = derive_rng(self.seed, "transform", index, slot) if (self.random_crop or self.flip_aug) else None
        return plan_transform(item.size, self.plan.assignments[entry], self.random_crop, self.flip_aug, rng)

    def batch(self, index: int) -> Batch:
        epoch, pos = divmod(int(index), self.batches_per_epoch)
        entries = self._order(epoch)[pos]
        transforms = [self.transform(index, k, e) for k, e in enumerate(entries)]
        items = [self.items[e] for e in entries]
        keys = [LatentKey.for_transform(it.content_hash, self.vae_id, t) for it, t in zip(items, transforms)]

        def encode(missing: List[int]) -> Tensor:
            pixels = torch.stack([image_to_tensor(apply_transform(load_image(items[i].path), transforms[i]))
                                  for i in missing])
            return self.model.encode_images(pixels)

        latents = torch.stack(self.cache.get_or_encode(keys, encode)).to(self.model.device, torch.float32)
        captions = [augment_caption(it.caption, self.caption_aug, derive_rng(self.seed, "caption", index, k))
                    if self.caption_aug.active else it.caption for k, it in enumerate(items)]
        return Batch(index=int(index), latents=latents, captions=captions,
                     size_cond=[t.sdxl_size_conditioning() for t in transforms],
                     is_reg=torch.tensor([it.is_reg for it in items], dtype=torch.bool),
                     paths=[it.path for it in items])

    def fixed_set(self, limit: Optional[int] = None, train_only: bool = True) -> List[Batch]:
        """One center-cropped, unaugmented batch per bucket group of training images (for deterministic
        evaluation: validation loss, learning tests)."""
        picked = [i for i, it in enumerate(self.items) if not (train_only and it.is_reg)][:limit]
        by_bucket: Dict[tuple, List[int]] = {}
        for i in picked:
            by_bucket.setdefault(self.plan.assignments[i].bucket, []).append(i)
        out = []
        for bucket in sorted(by_bucket):
            ids = by_bucket[bucket]
            items = [self.items[i] for i in ids]
            ts = [plan_transform(self.items[i].size, self.plan.assignments[i]) for i in ids]
            keys = [LatentKey.for_transform(it.content_hash, self.vae_id, t) for it, t in zip(items, ts)]

            def encode(missing, items=items, ts=ts):
                return self.model.encode_images(torch.stack(
                    [image_to_tensor(apply_transform(load_image(items[i].path), ts[i])) for i in missing]))

            latents = torch.stack(self.cache.get_or_encode(keys, encode)).to(self.model.device, torch.float32)
            out.append(Batch(index=-1, latents=latents, captions=[it.caption for it in items],
                             size_cond=[t.sdxl_size_conditioning() for t in ts],
                             is_reg=torch.zeros(len(items), dtype=torch.bool), paths=[it.path for it in items]))
        return out


def prepare_data(config, model: DiffusionModel, exclude: Sequence[str] = (), cache: Optional[LatentCache] = None,
                 vae_id: str = "loaded-model") -> TrainingData:
    """TrainingData for a TrainConfig: discovers the dataset (class images only with prior "class_images"; the
    trigger word is prepended to training captions that lack it), buckets at the config's resolution (default:
    the model's own) and caches latents in memory or in `latent_cache_dir`. `exclude`: paths the validator
    rejected (validate.Report.excluded)."""
    ds = discover(DatasetConfig(
        train_dir=config.dataset, class_dir=config.class_dir if config.prior == "class_images" else None,
        default_caption=config.default_caption, class_caption=config.class_prompt, trigger_word=config.trigger))
    res = config.resolution or model.native_resolution
    buckets = BucketConfig(resolution=(res, res), min_size=config.min_bucket, max_size=config.max_bucket,
                           step=config.bucket_step, no_upscale=config.bucket_no_upscale,
                           enabled=config.enable_bucket)
    aug = CaptionAugment(shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens,
                         caption_dropout_rate=config.caption_dropout, tag_dropout_rate=config.tag_dropout)
    if cache is None:
        cache = LatentCache(folder=config.latent_cache_dir)
    return TrainingData(ds, model, buckets, config.batch_size, config.seed, aug, config.flip_aug,
                        config.random_crop, cache, vae_id, exclude)
