"""Latent cache: a second run encodes nothing (memory and disk), keys separate what changes the latent, bad
files are misses, writes leave no temporary files."""
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_tune.train.buckets import BucketConfig, apply_transform, assign_bucket, image_to_tensor, plan_transform
from lib_tune.train.dataset import DatasetConfig, discover, load_image
from lib_tune.train.latent_cache import LatentCache, LatentKey


class CountingEncoder:
    """Fake VAE: 8x downsample by average pooling, counting images encoded."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, pixels):
        self.calls += 1
        self.images += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8)[:, :3]


def key(h="a" * 64, vae="vae1", bucket=(64, 64), resized=(64, 80), crop=(0, 8), flip=False):
    return LatentKey(h, vae, bucket, resized, crop, flip)


def encode_for(keys, enc):
    def encode(missing):
        return enc(torch.stack([torch.full((3, keys[i].bucket[1], keys[i].bucket[0]), float(i)) for i in missing]))
    return encode


def test_memory_cache_hits():
    cache = LatentCache()
    enc = CountingEncoder()
    keys = [key(h=str(i) * 64) for i in range(3)]
    first = cache.get_or_encode(keys, encode_for(keys, enc))
    assert enc.images == 3 and cache.stats["encoded"] == 3
    second = cache.get_or_encode(keys, encode_for(keys, enc))
    assert enc.images == 3 and enc.calls == 1
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert cache.stats["hits"] == 3 and cache.stats["misses"] == 3


def test_key_fields_all_matter():
    base = key()
    variants = [key(h="b" * 64), key(vae="vae2"), key(bucket=(64, 56)), key(resized=(64, 81)), key(crop=(0, 9)),
                key(flip=True)]
    digests = {base.digest} | {v.digest for v in variants}
    assert len(digests) == 1 + len(variants)
    assert key().digest == base.digest


def test_duplicate_keys_in_one_call_encode_once():
    cache = LatentCache()
    enc = CountingEncoder()
    keys = [key(), key(), key(flip=True)]
    out = cache.get_or_encode(keys, encode_for(keys, enc))
    assert enc.images == 2 and torch.equal(out[0], out[1])


def test_disk_cache_survives_a_new_process_state(tmp_path):
    folder = str(tmp_path / "cache")
    keys = [key(h=str(i) * 64) for i in range(4)]
    enc = CountingEncoder()
    a = LatentCache(folder).get_or_encode(keys, encode_for(keys, enc))
    assert enc.images == 4
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    assert len(files) == 4 and all(f.endswith(".safetensors") for f in files)
    assert not any(os.path.basename(f).startswith(".tmp") for f in files)
    with safe_open(files[0], framework="pt") as f:
        assert f.metadata()["format"].startswith("sd-webui-tune-latent/")
    fresh = LatentCache(folder, keep_in_memory=False)
    b = fresh.get_or_encode(keys, encode_for(keys, enc))
    assert enc.images == 4  # nothing encoded the second time
    assert fresh.stats["hits"] == 4 and fresh.stats["encoded"] == 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_corrupt_or_mismatched_file_is_a_miss(tmp_path):
    folder = str(tmp_path / "c")
    k1, k2 = key(h="1" * 64), key(h="2" * 64)
    cache = LatentCache(folder, keep_in_memory=False)
    cache.put(k1, torch.ones(4, 8, 8))
    cache.put(k2, torch.zeros(4, 8, 8))
    with open(cache.path_for(k1), "wb") as f:
        f.write(b"garbage")
    assert cache.get(k1) is None and cache.stats["bad_files"] == 1
    # a file copied under another key's name is rejected by its metadata
    os.replace(cache.path_for(k2), cache.path_for(k1))
    assert cache.get(k1) is None and cache.stats["bad_files"] == 2
    enc = CountingEncoder()
    cache.get_or_encode([k1], encode_for([k1], enc))
    assert enc.images == 1 and cache.get(k1) is not None  # rewritten


def test_requires_storage():
    with pytest.raises(ValueError):
        LatentCache(None, keep_in_memory=False)


def test_with_real_dataset_pipeline(tmp_path):
    """Dataset item -> bucket -> transform -> key -> encode: a second pass over the data encodes nothing."""
    r = tmp_path / "d"
    r.mkdir()
    for i, size in enumerate([(320, 320), (300, 400), (320, 320)]):
        Image.new("RGB", size, (i * 40, 10, 10)).save(r / f"{i}.png")
    items = discover(DatasetConfig(train_dir=str(r), default_caption="x")).items
    cfg = BucketConfig((256, 256), 128, 512)
    enc = CountingEncoder()
    folder = str(tmp_path / "cache")

    def one_pass():
        cache = LatentCache(folder)
        transforms = [plan_transform(it.size, assign_bucket(it.size, cfg)) for it in items]
        keys = [LatentKey.for_transform(it.content_hash, "fakevae", t) for it, t in zip(items, transforms)]

        def pixels(i):  # images of different buckets are encoded one at a time
            return image_to_tensor(apply_transform(load_image(items[i].path), transforms[i]))[None]
        return [cache.get_or_encode([k], lambda missing, i=i: enc(pixels(i)))[0] for i, k in enumerate(keys)]

    first = one_pass()
    assert enc.images == 3
    second = one_pass()
    assert enc.images == 3
    bw, bh = assign_bucket(items[1].size, cfg).bucket
    assert first[1].shape == (3, bh // 8, bw // 8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
