"""DreamBooth class-image planning: the cache key and folder, which images are missing, atomic writes, and the
config's dreambooth defaulting to generated class images."""
import os

import pytest
from PIL import Image

from lib_tune.train.class_images import (KEY_FILE, cache_key, count_images, image_name, plan_class_images,
                                         write_class_image)
from lib_tune.train.config import ConfigError, TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.model import DiffusionModel
from tests.unit.train_fakes import FakeLDM, write_images


def cfg(tmp_path, **over):
    data = tmp_path / "data"
    if not data.exists():
        write_images(data)
    values = dict(dataset=str(data), method="dreambooth", steps=4, output_name="db", trigger="zkw",
                  class_prompt="a photo of a dog", num_class_images=3, resolution=64, min_bucket=64, seed=7)
    values.update(over)
    return TrainConfig.from_dict(values)


def test_dreambooth_with_class_prompt_and_count_uses_generated_class_images(tmp_path):
    c = cfg(tmp_path)
    assert c.method == "lora" and c.prior == "class_images" and c.class_dir is None and c.num_class_images == 3
    # without a count (or a prompt) dreambooth keeps the base model's prediction as the prior
    assert cfg(tmp_path, num_class_images=0).prior == "base_prediction"
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, class_prompt="")
    assert e.value.field == "class_prompt"
    with pytest.raises(ConfigError) as e:  # a plain prior class_images still needs a folder or a count
        cfg(tmp_path, method="lora", prior="class_images", num_class_images=0)
    assert e.value.field == "class_dir"
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, method="lora", prior="none")
    assert e.value.field == "num_class_images"
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, num_class_images=-1)
    assert e.value.field == "num_class_images"


def test_cache_key_covers_every_setting_that_changes_the_pixels():
    base = dict(model_hash="abc", prompt="a dog", width=512, height=512, seed=1, sampler="Euler", steps=20,
                cfg_scale=7.0, negative_prompt="", scheduler="Automatic", vae="")
    k = cache_key(**base)
    assert k == cache_key(**base) and len(k) == 16
    for name, value in [("model_hash", "abd"), ("prompt", "a cat"), ("width", 576), ("height", 576), ("seed", 2),
                        ("sampler", "DDIM"), ("steps", 21), ("cfg_scale", 7.5), ("negative_prompt", "blurry"),
                        ("scheduler", "Karras"), ("vae", "other.vae.pt")]:
        assert cache_key(**dict(base, **{name: value})) != k, name


def test_plan_finds_what_is_missing_and_a_second_plan_finds_nothing(tmp_path):
    c = cfg(tmp_path)
    root = tmp_path / "cache"
    p = plan_class_images(c, "hash1", str(root), 64)
    assert p.cached and p.folder == os.path.join(str(root), p.key) and p.missing == [0, 1, 2] and p.existing == 0
    assert (p.width, p.height, p.prompt, p.steps, p.sampler) == (64, 64, "a photo of a dog", 20, "Euler")
    assert [p.seed_of(i) for i in p.missing] == [7, 8, 9]
    write_class_image(p, 0, Image.new("RGB", (64, 64), (10, 20, 30)))
    write_class_image(p, 2, Image.new("RGB", (64, 64), (10, 20, 30)))
    again = plan_class_images(c, "hash1", str(root), 64)
    assert again.folder == p.folder and again.missing == [1] and again.existing == 2
    write_class_image(again, 1, Image.new("RGB", (64, 64), (1, 2, 3)))
    done = plan_class_images(c, "hash1", str(root), 64)
    assert done.missing == [] and done.existing == 3
    names = sorted(os.listdir(p.folder))
    assert names == sorted([image_name(i) for i in range(3)] + [image_name(i)[:-4] + ".txt" for i in range(3)]
                           + [KEY_FILE])  # no temporary files left
    assert open(p.caption_path(1), encoding="utf-8").read() == "a photo of a dog"
    # another model, resolution or seed: another folder
    assert plan_class_images(c, "hash2", str(root), 64).folder != p.folder
    assert plan_class_images(c, "hash1", str(root), 128).folder != p.folder
    assert plan_class_images(cfg(tmp_path, seed=8), "hash1", str(root), 64).folder != p.folder
    # more images asked for than cached: only the new ones are missing
    assert plan_class_images(cfg(tmp_path, num_class_images=5), "hash1", str(root), 64).missing == [3, 4]
    # nothing to plan without a count
    assert plan_class_images(cfg(tmp_path, num_class_images=0), "hash1", str(root), 64) is None


def test_a_given_class_dir_is_filled_up_counting_the_users_images(tmp_path):
    mine = tmp_path / "class"
    write_images(mine, n=1, caption="a dog")  # img0.png: one image of the user's
    c = cfg(tmp_path, class_dir=str(mine))
    p = plan_class_images(c, "hash1", str(tmp_path / "cache"), 64)
    assert not p.cached and p.folder == str(mine) and p.existing == 1 and p.missing == [0, 1]
    for i in p.missing:
        write_class_image(p, i, Image.new("RGB", (64, 64)))
    assert count_images(str(mine)) == 3 and not os.path.exists(os.path.join(str(mine), KEY_FILE))
    assert plan_class_images(c, "hash1", str(tmp_path / "cache"), 64).missing == []


def test_a_failed_write_leaves_no_image_that_counts(tmp_path):
    p = plan_class_images(cfg(tmp_path), "hash1", str(tmp_path / "cache"), 64)

    class Broken:
        def save(self, path, format=None):
            with open(path, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        write_class_image(p, 0, Broken())
    assert not os.path.exists(p.image_path(0)) and count_images(p.folder) == 0
    assert [n for n in os.listdir(p.folder) if n.endswith(".tmp")] == []
    assert plan_class_images(cfg(tmp_path), "hash1", str(tmp_path / "cache"), 64).missing == [0, 1, 2]


def test_generated_folder_becomes_the_prior_class_images(tmp_path):
    c = cfg(tmp_path, num_class_images=2)
    p = plan_class_images(c, "hash1", str(tmp_path / "cache"), 64)
    for i in p.missing:
        write_class_image(p, i, Image.new("RGB", (64, 64), (200, 200, 200)))
    c.class_dir = p.folder  # what the webui glue does after generating
    c.validate()
    data = prepare_data(c, DiffusionModel(FakeLDM(seed=0)))
    reg = [it for it in data.items if it.is_reg]
    assert len(reg) == 2 and {it.caption for it in reg} == {"a photo of a dog"}


def test_prepare_data_refuses_class_images_that_were_never_generated(tmp_path):
    with pytest.raises(ValueError, match="no class images folder"):
        prepare_data(cfg(tmp_path), DiffusionModel(FakeLDM(seed=0)))
