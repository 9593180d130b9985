"""Dataset discovery: folder rules (kohya N_name repeats), captions and their fallbacks, trigger word, class
images and their balancing, hashes and sizes."""
import hashlib
import os

import pytest
from PIL import Image

from lib_tune.train.dataset import (DatasetConfig, add_trigger, balanced_reg_repeats, discover, has_trigger,
                                    load_image, read_image_size)


def img(path, size=(64, 48), color=(200, 30, 30), mode="RGB", fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def txt(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture
def layout(tmp_path):
    r = tmp_path / "data"
    img(str(r / "a.png"))
    txt(str(r / "a.txt"), "sks, red square")
    img(str(r / "5_concept" / "b.jpg"), size=(80, 40))
    txt(str(r / "5_concept" / "b.caption"), "blue thing")
    img(str(r / "5_concept" / "c.png"), color=(1, 2, 3))          # no caption: folder name / default
    img(str(r / "plain" / "d.webp"), color=(9, 9, 9))
    txt(str(r / "plain" / "d.TXT"), "upper case extension")        # case-insensitive caption lookup
    img(str(r / "0_skipped" / "e.png"))
    img(str(r / "5_concept" / "nested" / "f.png"))
    txt(str(r / "notes.md"), "not data")
    txt(str(r / "orphan.txt"), "caption without image")
    img(str(r / ".hidden" / "g.png"))
    return r


def test_folders_repeats_and_skips(layout):
    ds = discover(DatasetConfig(train_dir=str(layout)))
    by_name = {s.name: s for s in ds.subsets}
    assert set(by_name) == {"data", "5_concept", "plain"}
    assert by_name["data"].repeats == 1 and by_name["plain"].repeats == 1
    assert by_name["5_concept"].repeats == 5 and by_name["5_concept"].class_tokens == "concept"
    assert [os.path.basename(i.path) for i in by_name["5_concept"].items] == ["b.jpg", "c.png"]
    assert ds.num_train_images == 1 + 5 * 2 + 1
    skipped = {os.path.basename(p): why for p, why in ds.skipped}
    assert "repeats 0" in skipped["0_skipped"]
    assert "nested" in skipped["nested"]
    assert ".hidden" not in skipped
    assert [os.path.basename(p) for p in ds.ignored_files] == ["notes.md"]
    assert [os.path.basename(p) for p in ds.orphan_captions] == ["orphan.txt"]
    assert ds.dataset_dirs() == {"data": {"n_repeats": 1, "img_count": 1},
                                 "5_concept": {"n_repeats": 5, "img_count": 2},
                                 "plain": {"n_repeats": 1, "img_count": 1}}


def test_captions_fallbacks_and_sizes(layout):
    ds = discover(DatasetConfig(train_dir=str(layout)))
    items = {os.path.basename(i.path): i for i in ds.items}
    assert (items["a.png"].caption, items["a.png"].caption_source) == ("sks, red square", "file")
    assert (items["b.jpg"].caption, items["b.jpg"].caption_source) == ("blue thing", "file")
    assert (items["c.png"].caption, items["c.png"].caption_source) == ("concept", "folder")
    assert items["d.webp"].caption == "upper case extension"
    assert items["b.jpg"].size == (80, 40)
    # an instance prompt beats the folder name; caption_from_folder=False leaves it empty
    ds2 = discover(DatasetConfig(train_dir=str(layout), default_caption="photo of sks"))
    c = [i for i in ds2.items if i.path.endswith("c.png")][0]
    assert (c.caption, c.caption_source) == ("photo of sks", "default")
    ds3 = discover(DatasetConfig(train_dir=str(layout), caption_from_folder=False))
    c = [i for i in ds3.items if i.path.endswith("c.png")][0]
    assert (c.caption, c.caption_source) == ("", "none")


def test_caption_extension_order_and_issues(tmp_path):
    r = tmp_path / "d"
    img(str(r / "x.png"))
    txt(str(r / "x.txt"), "from txt")
    txt(str(r / "x.caption"), "from caption")
    img(str(r / "m.png"))
    txt(str(r / "m.txt"), "\nfirst line\nsecond line\n")
    img(str(r / "e.png"))
    txt(str(r / "e.txt"), "  \n")
    img(str(r / "bad.png"))
    with open(r / "bad.txt", "wb") as f:
        f.write(b"\xff\xfe\xfa not utf8")
    ds = discover(DatasetConfig(train_dir=str(r)))
    it = {os.path.basename(i.path): i for i in ds.items}
    assert it["x.png"].caption == "from txt"
    ds = discover(DatasetConfig(train_dir=str(r), caption_extensions=(".caption", ".txt"), default_caption="dflt"))
    it = {os.path.basename(i.path): i for i in ds.items}
    assert it["x.png"].caption == "from caption"
    assert (it["m.png"].caption, it["m.png"].caption_issue) == ("first line", "multiline")
    assert (it["e.png"].caption, it["e.png"].caption_source, it["e.png"].caption_issue) == ("dflt", "default", "empty")
    assert it["bad.png"].caption_issue.startswith("unreadable")


def test_trigger_word(tmp_path):
    r = tmp_path / "d"
    img(str(r / "1_x" / "has.png"))
    txt(str(r / "1_x" / "has.txt"), "a photo of SKS, smiling")
    img(str(r / "1_x" / "lacks.png"))
    txt(str(r / "1_x" / "lacks.txt"), "a photo, smiling")
    img(str(r / "1_x" / "part.png"))
    txt(str(r / "1_x" / "part.txt"), "sksy dog")  # not a whole word
    cls = tmp_path / "cls"
    img(str(cls / "k.png"))
    txt(str(cls / "k.txt"), "a photo of a dog")
    cfg = DatasetConfig(train_dir=str(r), class_dir=str(cls), trigger_word="sks")
    it = {os.path.basename(i.path): i for i in discover(cfg).items}
    assert it["has.png"].caption == "a photo of SKS, smiling" and not it["has.png"].trigger_added
    assert it["lacks.png"].caption == "sks, a photo, smiling" and it["lacks.png"].trigger_added
    assert it["part.png"].caption == "sks, sksy dog"
    assert it["k.png"].caption == "a photo of a dog" and it["k.png"].is_reg  # class captions untouched
    it = {os.path.basename(i.path): i for i in discover(
        DatasetConfig(train_dir=str(r), trigger_word="sks", prepend_trigger=False)).items}
    assert it["lacks.png"].caption == "a photo, smiling" and not it["lacks.png"].trigger_added
    assert has_trigger("x, <lora-tok>, y", "<lora-tok>") and not has_trigger("sksx", "sks")
    assert add_trigger("", "sks") == "sks"


def test_class_images_and_balancing(tmp_path):
    r = tmp_path / "train"
    for i in range(3):
        img(str(r / "2_dog" / f"{i}.png"), color=(i, 0, 0))
    cls = tmp_path / "class"
    for i in range(4):
        img(str(cls / "1_dog" / f"{i}.png"), color=(0, i, 0))
    ds = discover(DatasetConfig(train_dir=str(r), class_dir=str(cls), class_caption="a dog"))
    assert ds.num_train_images == 6 and ds.num_reg_images == 4
    assert all(i.caption == "a dog" for i in ds.reg_items)
    entries = ds.entries()
    reg = [n for it, n in entries if it.is_reg]
    assert reg == [2, 2, 1, 1] and sum(reg) == 6
    assert ds.dataset_dirs(reg=True) == {"1_dog": {"n_repeats": 1, "img_count": 4}}
    # excluding a training image lowers the class balance too
    entries = ds.entries(exclude=[ds.train_items[0].path])
    assert sum(n for it, n in entries if not it.is_reg) == 4
    assert sum(n for it, n in entries if it.is_reg) == 4


@pytest.mark.parametrize("n_train, reps, expected", [
    (10, [1, 1, 1], [4, 3, 3]),
    (2, [1, 1, 1, 1], [1, 1, 0, 0]),   # surplus class images unused
    (2, [3, 3], [3, 0]),               # first pass keeps folder repeats
    (7, [2, 1], [4, 3]),
    (0, [1], [0]),
    (5, [], []),
])
def test_balanced_reg_repeats(n_train, reps, expected):
    assert balanced_reg_repeats(n_train, reps) == expected


def test_tag_frequency_and_hash(layout):
    ds = discover(DatasetConfig(train_dir=str(layout), trigger_word="sks"))
    freq = ds.tag_frequency()
    assert freq["data"] == {"sks": 1, "red square": 1}
    assert freq["5_concept"] == {"sks": 2, "blue thing": 1, "concept": 1}
    a = [i for i in ds.items if i.path.endswith("a.png")][0]
    with open(a.path, "rb") as f:
        assert a.content_hash == hashlib.sha256(f.read()).hexdigest()


def test_duplicate_subset_names_are_disambiguated(tmp_path):
    r = tmp_path / "dog"
    img(str(r / "x.png"))
    img(str(r / "1_dog" / "y.png"))
    cls = tmp_path / "cls"
    img(str(cls / "1_dog" / "z.png"))
    ds = discover(DatasetConfig(train_dir=str(r), class_dir=str(cls)))
    names = [s.name for s in ds.subsets]
    assert names == ["dog", "1_dog", "1_dog (2)"]
    assert ds.reg_items[0].subset == "1_dog (2)"


def test_exif_orientation_and_alpha(tmp_path):
    p = str(tmp_path / "rot.jpg")
    im = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed as 20x60
    im.save(p, exif=exif.tobytes())
    assert read_image_size(p) == (20, 60)
    assert load_image(p).size == (20, 60)
    q = str(tmp_path / "alpha.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(q)
    out = load_image(q)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255)


def test_missing_folder_gives_empty_dataset(tmp_path):
    ds = discover(DatasetConfig(train_dir=str(tmp_path / "nope")))
    assert ds.items == [] and ds.num_train_images == 0
