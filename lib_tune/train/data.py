"""Batches for the trainer, from a discovered Dataset: bucketing, per-sample crop/flip, caption augmentation and
cached VAE latents, addressed by a global micro-batch index.

Why an index and not an iterator: batch i is a pure function of (dataset, seed, i) -- epoch = i // batches per
epoch picks the epoch's deterministic order (BucketPlan.epoch_batches), and every random choice of a sample
(crop, flip, caption shuffle/dropout) comes from a Random derived from (seed, i, position in batch). A resumed run
therefore only needs the index to continue exactly where it stopped, and nothing depends on how many batches a
previous process happened to draw.

Latents come from the LatentCache (memory, optionally a folder shared across runs); a miss is encoded with the
model's VAE right when the batch is first needed, so no separate caching pass is required.

Held-out (validation) images: `held_out_split` picks them from the training images (never class images) by a hash
of (seed, relative path), so the same dataset and seed always hold out the same images whatever the folder
listing order; TrainingData leaves them out of every training batch and serves them, unaugmented and
center-cropped, through `validation_set()` (validation.py scores them).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .buckets import (BucketConfig, BucketPlan, Transform, apply_transform, image_to_tensor, plan_buckets,
                      plan_transform)
from .captions import CaptionAugment, augment_caption, derive_rng
from .config_checks import ConfigError
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
    #: positions of the samples in the list they came from (validation_set: indices into val_items)
    ids: Optional[List[int]] = None


def held_out_split(dataset: Dataset, seed: int, count: int = 0, split: float = 0.0,
                   exclude: Sequence[str] = ()) -> List[str]:
    """Paths of the training images held out for validation: `count` of them, else round(split x the number of
    training images) and at least one when split > 0. Class images are never held out; `exclude`d (unreadable)
    images are neither candidates nor counted. The choice is the first images ordered by sha256(seed, relative
    path): deterministic, independent of listing order. Raises ConfigError when no training image would stay."""
    excluded = set(exclude)
    candidates = [it for it in dataset.train_items if it.path not in excluded and it.size is not None]
    if count:
        k, field = int(count), "validation_count"
    elif split:
        k, field = max(1, int(round(float(split) * len(candidates)))), "validation_split"
    else:
        return []
    if k >= len(candidates):
        raise ConfigError(field, f"holds out {k} of {len(candidates)} training image(s): at least one must stay "
                                 f"for training")

    def key(it: ImageItem):
        return hashlib.sha256(f"{int(seed)}:validation:{it.rel_path}".encode()).hexdigest(), it.rel_path, it.path

    return [it.path for it in sorted(candidates, key=key)[:k]]


class TrainingData:
    """All batches of a run. `dataset`: from dataset.discover(); `exclude`: paths the dataset check rejected."""

    def __init__(self, dataset: Dataset, model: DiffusionModel, buckets: BucketConfig, batch_size: int = 1,
                 seed: int = 0, caption_aug: CaptionAugment = CaptionAugment(), flip_aug: bool = False,
                 random_crop: bool = False, cache: Optional[LatentCache] = None, vae_id: str = "loaded-model",
                 exclude: Sequence[str] = (), held_out: Sequence[str] = ()):
        held = set(held_out)
        entries = dataset.entries(exclude=list(exclude) + sorted(held))
        if not entries:
            raise ValueError("the dataset has no images to train on")
        unreadable = [it.path for it, _ in entries if it.size is None]
        if unreadable:
            raise ValueError(f"{len(unreadable)} image(s) cannot be read, e.g. {unreadable[0]}: validate the "
                             f"dataset and exclude them")
        self.dataset = dataset
        #: paths left out because they cannot train (the dataset check's report), counted in the file's metadata
        self.excluded: List[str] = sorted(set(exclude))
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
        #: held-out images (validation), in held_out_split's order; never in a training batch
        by_path = {it.path: it for it in dataset.train_items}
        self.val_items: List[ImageItem] = [by_path[p] for p in held_out if p in by_path]
        if len(self.val_items) != len(held):
            raise ValueError("held-out images must be training images of the dataset")
        self.val_plan: Optional[BucketPlan] = plan_buckets([it.size for it in self.val_items],
                                                           [1] * len(self.val_items), buckets) \
            if self.val_items else None

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
        return self._fixed_batches(self.items, self.plan, picked)

    def validation_set(self) -> List[Batch]:
        """The held-out images as center-cropped, unaugmented batches of at most batch_size images of one bucket
        each, in a fixed order; Batch.ids are their indices in val_items (validation.py seeds noise by them)."""
        if not self.val_items:
            return []
        return self._fixed_batches(self.val_items, self.val_plan, list(range(len(self.val_items))),
                                   max_batch=self.batch_size)

    def _fixed_batches(self, all_items: List[ImageItem], plan: BucketPlan, picked: List[int],
                       max_batch: Optional[int] = None) -> List[Batch]:
        by_bucket: Dict[tuple, List[int]] = {}
        for i in picked:
            by_bucket.setdefault(plan.assignments[i].bucket, []).append(i)
        groups = []
        for bucket in sorted(by_bucket):
            ids = by_bucket[bucket]
            step = max_batch or len(ids)
            groups.extend(ids[k:k + step] for k in range(0, len(ids), step))
        out = []
        for ids in groups:
            items = [all_items[i] for i in ids]
            ts = [plan_transform(all_items[i].size, plan.assignments[i]) for i in ids]
            keys = [LatentKey.for_transform(it.content_hash, self.vae_id, t) for it, t in zip(items, ts)]

            def encode(missing, items=items, ts=ts):
                return self.model.encode_images(torch.stack(
                    [image_to_tensor(apply_transform(load_image(items[i].path), ts[i])) for i in missing]))

            latents = torch.stack(self.cache.get_or_encode(keys, encode)).to(self.model.device, torch.float32)
            out.append(Batch(index=-1, latents=latents, captions=[it.caption for it in items],
                             size_cond=[t.sdxl_size_conditioning() for t in ts],
                             is_reg=torch.zeros(len(items), dtype=torch.bool), paths=[it.path for it in items],
                             ids=list(ids)))
        return out


def prepare_data(config, model: DiffusionModel, exclude: Sequence[str] = (), cache: Optional[LatentCache] = None,
                 vae_id: str = "loaded-model") -> TrainingData:
    """TrainingData for a TrainConfig: discovers the dataset (class images only with prior "class_images"; the
    trigger word is prepended to training captions that lack it), buckets at the config's resolution (default:
    the model's own) and caches latents in memory or in `latent_cache_dir`. `exclude`: paths the dataset
    check rejected (dataset_check.Report.excluded). The config's validation_count / validation_split hold images out of
    training (held_out_split)."""
    if config.prior == "class_images" and not config.class_dir:
        raise ValueError("prior 'class_images' has no class images folder: num_class_images are generated by the "
                         "webui glue before training (lib_tune/train/class_images.py), which then sets class_dir")
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
    held = held_out_split(ds, config.seed, getattr(config, "validation_count", 0),
                          getattr(config, "validation_split", 0.0), exclude)
    return TrainingData(ds, model, buckets, config.batch_size, config.seed, aug, config.flip_aug,
                        config.random_crop, cache, vae_id, exclude, held_out=held)
