"""The dataset check: every report item on a dataset built to contain each problem, plus a clean dataset."""
import io
import json
import os
import random

import pytest
from PIL import Image, ImageFile

from lib_tune.train.buckets import BucketConfig
from lib_tune.train.dataset import DatasetConfig
from lib_tune.train.dataset_check import DatasetCheckConfig, check_image, check_dataset


def noise_image(size, seed):
    rnd = random.Random(seed)
    return Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))


def save(path, im, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, **kw)
    return path


def txt(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def truncated_jpeg(path, seed=0):
    buf = io.BytesIO()
    noise_image((320, 320), seed).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


@pytest.fixture
def bad_dataset(tmp_path):
    r = tmp_path / "train"
    save(str(r / "good.png"), noise_image((320, 320), 1))
    txt(str(r / "good.txt"), "sks, a thing")
    save(str(r / "lacks.png"), noise_image((320, 256), 2))
    txt(str(r / "lacks.txt"), "a thing without trigger")
    truncated_jpeg(str(r / "trunc.jpg"))
    txt(str(r / "trunc.txt"), "sks")
    with open(r / "fake.png", "w") as f:
        f.write("this is not a png")
    txt(str(r / "fake.txt"), "sks")
    with open(r / "good.png", "rb") as f:
        (r / "dup.png").write_bytes(f.read())
    txt(str(r / "dup.txt"), "sks, dup")
    save(str(r / "nocap.png"), noise_image((300, 300), 3))
    save(str(r / "empty.png"), noise_image((300, 300), 4))
    txt(str(r / "empty.txt"), "")
    save(str(r / "tiny.png"), noise_image((100, 90), 5))
    txt(str(r / "tiny.txt"), "sks, tiny")
    save(str(r / "5_concept" / "c1.png"), noise_image((400, 300), 6))
    txt(str(r / "5_concept" / "c1.txt"), "sks, concept one")
    save(str(r / "5_concept" / "c2.jpg"), noise_image((300, 400), 7), quality=90)   # caption from folder
    txt(str(r / "stray.txt"), "orphan caption")
    c = tmp_path / "class"
    save(str(c / "k1.png"), noise_image((320, 320), 8))
    txt(str(c / "k1.txt"), "photo of sks")  # trigger leaks into the class prompt
    save(str(c / "k2.png"), noise_image((320, 320), 9))
    return r, c


def problems_for(report, code):
    return [p for p in report.problems if p.code == code]


def names(problems):
    return sorted(os.path.basename(p.path) for p in problems)


def test_bad_dataset_reports_everything(bad_dataset):
    r, c = bad_dataset
    cfg = DatasetCheckConfig(
        dataset=DatasetConfig(train_dir=str(r), class_dir=str(c), trigger_word="sks", prepend_trigger=False,
                              class_caption="photo of a thing"),
        buckets=BucketConfig((256, 256), min_size=128, max_size=512, step=64),
        batch_size=2, epochs=3, on_bad_image="fail")
    rep = check_dataset(cfg)
    assert not rep.ok
    corrupt = problems_for(rep, "corrupt_image") + problems_for(rep, "truncated_image")
    assert names(corrupt) == ["fake.png", "trunc.jpg"] and all(p.severity == "error" for p in corrupt)
    assert "truncated" in [p for p in corrupt if p.path.endswith("trunc.jpg")][0].message
    assert rep.skipped_images == []
    assert sorted(os.path.basename(p) for p in rep.excluded) == ["fake.png", "trunc.jpg"]
    dup = problems_for(rep, "duplicate_image")
    assert len(dup) == 1 and dup[0].severity == "warning" and "good.png" in dup[0].message
    assert names(problems_for(rep, "missing_caption")) == ["nocap.png"]
    assert names(problems_for(rep, "empty_caption")) == ["empty.txt"]
    small = problems_for(rep, "small_image")
    assert names(small) == ["tiny.png"] and "upscaled" in small[0].message
    # trigger: a warning for each training caption lacking it (prepend off), including fallbacks
    missing = names(problems_for(rep, "trigger_missing"))
    assert missing == ["c2.jpg", "empty.png", "lacks.png", "nocap.png"]
    assert names(problems_for(rep, "trigger_in_class_caption")) == ["k1.png"]
    assert names(problems_for(rep, "orphan_caption")) == ["stray.txt"]
    fb = problems_for(rep, "caption_fallback")
    assert names(fb) == ["c2.jpg", "k2.png"] and all(p.severity == "info" for p in fb)
    # counts: 6 usable root images (duplicate included) + 2 concept images x5; class images balanced to that
    assert rep.num_images == 8
    assert rep.num_images_with_repeats == 6 + 10
    assert rep.num_class_images == 2 and rep.num_class_images_balanced == 16
    assert sum(rep.bucket_histogram.values()) == 32
    # batches: per-bucket ceil(n/2), steps = 3 epochs
    expected_batches = sum((n + 1) // 2 for n in rep.bucket_histogram.values())
    assert rep.batches_per_epoch == expected_batches
    assert (rep.steps_per_epoch, rep.epochs, rep.total_steps) == (expected_batches, 3, 3 * expected_batches)
    text = rep.to_text()
    assert text.startswith("NOT READY") and "corrupt_image" in text and "trunc.jpg" in text
    d = rep.to_dict()
    assert json.loads(json.dumps(d))["ok"] is False
    assert d["total_steps"] == rep.total_steps and len(d["problems"]) == len(rep.problems)


def test_bad_images_are_skipped_by_default(bad_dataset):
    """The default on_bad_image="skip": the run can start without the unusable images, each one named with its
    reason as a warning; the counts are those of the strict run minus nothing (bad images never counted)."""
    r, c = bad_dataset
    cfg = DatasetCheckConfig(
        dataset=DatasetConfig(train_dir=str(r), class_dir=str(c), trigger_word="sks", prepend_trigger=False,
                              class_caption="photo of a thing"),
        buckets=BucketConfig((256, 256), min_size=128, max_size=512, step=64), batch_size=2, epochs=3)
    rep = check_dataset(cfg)
    assert rep.ok, rep.to_text()
    bad = problems_for(rep, "corrupt_image") + problems_for(rep, "truncated_image")
    assert names(bad) == ["fake.png", "trunc.jpg"]
    assert all(p.severity == "warning" and p.message.endswith("left out of training") for p in bad)
    assert sorted(os.path.basename(p) for p in rep.skipped_images) == ["fake.png", "trunc.jpg"]
    assert rep.excluded == rep.skipped_images and rep.num_images == 8
    text = rep.to_text()
    assert text.startswith("OK") and "left out: 2 image(s)" in text and "fake.png" in text
    assert rep.to_dict()["skipped_images"] == rep.skipped_images


def test_only_bad_images_is_refused_clearly(tmp_path):
    r = tmp_path / "d"
    r.mkdir()
    truncated_jpeg(str(r / "a.jpg"))
    (r / "b.png").write_bytes(b"")
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r), default_caption="x")))
    assert not rep.ok
    no = problems_for(rep, "no_images")
    assert len(no) == 1 and no[0].severity == "error" and "2 found, none usable" in no[0].message
    assert len(rep.skipped_images) == 2


def test_unknown_bad_image_policy_is_an_error(tmp_path):
    r = tmp_path / "d"
    save(str(r / "a.png"), Image.new("RGB", (256, 256)))
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r)), on_bad_image="ignore"))
    assert not rep.ok and problems_for(rep, "bad_option")


def test_prepended_trigger_is_info(bad_dataset):
    r, _ = bad_dataset
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r), trigger_word="sks"),
                                           buckets=BucketConfig((256, 256), 128, 512)))
    assert not problems_for(rep, "trigger_missing")
    nocap = problems_for(rep, "missing_caption")
    assert names(nocap) == ["nocap.png"] and 'trains with just "sks"' in nocap[0].message
    added = problems_for(rep, "trigger_added")
    assert "lacks.png" in names(added) and all(p.severity == "info" for p in added)


def test_histogram_and_steps_exact(tmp_path):
    r = tmp_path / "ok"
    save(str(r / "a.png"), Image.new("RGB", (512, 512), "red"))
    save(str(r / "b.png"), Image.new("RGB", (512, 512), "blue"))
    save(str(r / "3_x" / "c.png"), Image.new("RGB", (600, 800), "green"))
    for n in ("a", "b"):
        txt(str(r / f"{n}.txt"), f"tok, {n}")
    txt(str(r / "3_x" / "c.txt"), "tok, c")
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r), trigger_word="tok"),
                                           batch_size=2, epochs=4))
    assert rep.ok, rep.to_text()
    assert [p.severity for p in rep.problems] == []
    assert rep.bucket_histogram == {"448x576": 3, "512x512": 2}
    assert rep.num_images == 3 and rep.num_images_with_repeats == 5
    assert (rep.batches_per_epoch, rep.total_steps) == (3, 12)
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r)), batch_size=2, epochs=None,
                                           max_train_steps=7, gradient_accumulation_steps=2))
    assert (rep.steps_per_epoch, rep.epochs, rep.total_steps) == (2, 4, 7)
    assert rep.to_text().startswith("OK")


def test_truncated_detected_even_with_global_flag(tmp_path):
    p = truncated_jpeg(str(tmp_path / "t.jpg"))
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        probs = check_image(p)
        assert [x.code for x in probs] == ["truncated_image"]
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(tmp_path / "empty"))))
    assert not rep.ok and [p.code for p in rep.problems] == ["no_images"]
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(tmp_path / "nope"),
                                                                 class_dir=str(tmp_path / "nope2"))))
    assert not rep.ok and rep.codes()["missing_folder"] == 2


def test_no_upscale_too_small_is_error(tmp_path):
    r = tmp_path / "d"
    save(str(r / "a.png"), Image.new("RGB", (512, 512)))
    save(str(r / "sliver.png"), Image.new("RGB", (40, 500)))
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r), default_caption="x"),
                                           buckets=BucketConfig(no_upscale=True), on_bad_image="fail"))
    assert not rep.ok
    assert names(problems_for(rep, "too_small")) == ["sliver.png"]
    assert rep.num_images == 1 and rep.bucket_histogram == {"512x512": 1}
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r), default_caption="x"),
                                           buckets=BucketConfig(no_upscale=True)))
    assert rep.ok and [os.path.basename(p) for p in rep.skipped_images] == ["sliver.png"]


def test_animated_and_mode_warnings(tmp_path):
    p = str(tmp_path / "anim.png")
    frames = [Image.new("RGB", (300, 300), c) for c in ("red", "blue")]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert [x.code for x in check_image(p)] == ["animated"]
    q = str(tmp_path / "i16.png")
    Image.new("I;16", (300, 300)).save(q)
    assert [x.code for x in check_image(q)] == ["unusual_mode"]


def test_to_text_collapses_repeated_infos(tmp_path):
    r = tmp_path / "d"
    for i in range(6):
        save(str(r / f"{i}.png"), Image.new("RGB", (256, 256), (i, 0, 0)))
    rep = check_dataset(DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(r), default_caption="photo of sks")))
    assert rep.ok and rep.codes() == {"caption_fallback": 6}
    text = rep.to_text()
    assert text.count("INFO caption_fallback: no caption file") == 3
    assert "INFO caption_fallback: ... and 3 more" in text


def test_the_whole_hostile_image_corpus_beside_good_images(tmp_path):
    """Eight good images, seven odd-but-valid ones and the generated bad-image corpus in one dataset: the check
    ends, every bad image is left out with its path and a reason, every good and odd one trains, and the strict
    policy refuses the same dataset."""
    import threading

    from tests.fixtures import hostile
    ds = tmp_path / "mixed"
    good = hostile.write_good_images(ds, 8)
    odd = hostile.write_odd_images(ds)
    bad = hostile.write_bad_images(ds)
    cfg = DatasetCheckConfig(dataset=DatasetConfig(train_dir=str(ds), default_caption="zkw"),
                             buckets=BucketConfig((64, 64), min_size=64, max_size=128, step=64))
    out = []
    t = threading.Thread(target=lambda: out.append(check_dataset(cfg)), daemon=True)
    t.start()
    t.join(120)  # a hang guard (a pipe opened for reading blocks forever), not a speed check
    assert out, "the dataset check did not end"
    rep = out[0]
    readable_by_us = {str(i.path) for i in bad if i.category == "unreadable" and os.path.isfile(i.path)
                      and os.access(i.path, os.R_OK) and i.decodable}  # mode 000 as root
    assert rep.ok, rep.to_text()
    assert rep.num_images == len(good) + len(odd) + len(readable_by_us), rep.to_text()
    skipped = set(rep.skipped_images)
    images = [i for i in bad if i.path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")
              and str(i.path) not in readable_by_us and not os.path.isdir(i.path)]
    missed = [(i.path.name, i.description) for i in images if str(i.path) not in skipped]
    assert not missed, missed
    reasons = {p.path: p.message for p in rep.problems if p.path in skipped}
    assert all(reasons.get(p) for p in skipped)
    strict = check_dataset(DatasetCheckConfig(dataset=cfg.dataset, buckets=cfg.buckets, on_bad_image="fail"))
    assert not strict.ok and not strict.skipped_images
