"""Dataset discovery: which images train, with which caption, how many times.

Folder rules follow kohya sd-scripts' DreamBooth folder mode (library/config_util.py
generate_dreambooth_subsets_config_by_subdirs, library/train_util.py load_dreambooth_dir) so a dataset prepared for
kohya works unchanged here:

- a sub-folder named `N_name` trains its images N times per epoch ("repeats"); `name` is the folder's "class
  tokens", the caption of last resort for its images; `0_name` is skipped like kohya skips it;
- unlike kohya, images directly in the dataset folder and plain sub-folders (no `N_` prefix) are used with 1
  repeat, because a user pointing the UI at a folder of images expects them to train;
- only one level of sub-folders is read (like kohya); deeper folders are listed in `Dataset.skipped`;
- the caption of `img.png` is the first existing `img<ext>` for ext in `caption_extensions` (first line used,
  like kohya without wildcards); without one: `default_caption` (the instance prompt), else the folder's class
  tokens, else "".

Class images for prior preservation (`class_dir`) follow the same rules; their repeats are balanced to the
number of training images like kohya does (see `balanced_reg_repeats`). The trigger word is only added to
training captions: class captions must stay free of it or the prior loss would teach the identifier to the class.

Nothing here opens the full image: sizes come from headers, hashes are computed on first use, and problems are
recorded on the item (never raised) so `dataset_check.py` can report all of them at once.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, ImageOps

from .image_check import incomplete, not_a_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_CAPTION_EXTENSIONS = (".txt", ".caption")
_REPEATS_RE = re.compile(r"^(\d+)_(.*)$")
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class DatasetConfig:
    train_dir: str
    class_dir: Optional[str] = None
    #: tried in this order next to each image; include the dot
    caption_extensions: Tuple[str, ...] = DEFAULT_CAPTION_EXTENSIONS
    #: the instance prompt: caption of training images that have no caption file
    default_caption: str = ""
    #: the class prompt: caption of class images that have no caption file
    class_caption: str = ""
    #: use the `name` of an `N_name` folder when no caption file and no default caption exist (kohya behaviour)
    caption_from_folder: bool = True
    trigger_word: str = ""
    #: prepend `trigger_word + ", "` to training captions that lack it (keep_tokens=1 then keeps it first)
    prepend_trigger: bool = True


@dataclass
class ImageItem:
    path: str
    #: path relative to its dataset root, for messages and stable ordering
    rel_path: str
    #: name of the folder (subset) it came from; keys of ss_dataset_dirs / ss_tag_frequency
    subset: str
    #: folder repeats (before reg balancing)
    repeats: int
    is_reg: bool
    #: final caption (after fallback and trigger word)
    caption: str
    caption_path: Optional[str] = None
    #: "file" | "default" | "folder" | "none"
    caption_source: str = "none"
    #: None, or "empty" / "multiline" / "unreadable: <why>" about the caption file
    caption_issue: Optional[str] = None
    trigger_added: bool = False
    #: (width, height) after EXIF orientation, from the header; None when the header cannot be read
    size: Optional[Tuple[int, int]] = None
    size_error: Optional[str] = None
    _content_hash: Optional[str] = field(default=None, repr=False, compare=False)

    @property
    def content_hash(self) -> str:
        """sha256 of the file bytes, computed once (duplicate detection and latent-cache key)."""
        if self._content_hash is None:
            self._content_hash = file_sha256(self.path)
        return self._content_hash


@dataclass
class Subset:
    name: str
    path: str
    repeats: int
    is_reg: bool
    #: "name" part of an `N_name` folder, None for plain folders
    class_tokens: Optional[str]
    items: List[ImageItem] = field(default_factory=list)


@dataclass
class Dataset:
    config: DatasetConfig
    subsets: List[Subset] = field(default_factory=list)
    #: (path, reason) for folders that were not read
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    #: files that are neither images nor caption files (unsupported formats land here)
    ignored_files: List[str] = field(default_factory=list)
    #: caption files without an image of the same name (often a misnamed image)
    orphan_captions: List[str] = field(default_factory=list)

    @property
    def train_items(self) -> List[ImageItem]:
        return [it for s in self.subsets if not s.is_reg for it in s.items]

    @property
    def reg_items(self) -> List[ImageItem]:
        return [it for s in self.subsets if s.is_reg for it in s.items]

    @property
    def items(self) -> List[ImageItem]:
        return [it for s in self.subsets for it in s.items]

    @property
    def num_train_images(self) -> int:
        """Training images times folder repeats (kohya's num_train_images / ss_num_train_images)."""
        return sum(it.repeats for it in self.train_items)

    @property
    def num_reg_images(self) -> int:
        """Class images times folder repeats, before balancing (kohya's ss_num_reg_images)."""
        return sum(it.repeats for it in self.reg_items)

    def entries(self, exclude: Iterable[str] = ()) -> List[Tuple[ImageItem, int]]:
        """(item, repeats per epoch) for every image that trains: training images with their folder repeats,
        then class images with repeats balanced to the training count. `exclude`: paths to leave out (e.g. the
        files the dataset check found unreadable)."""
        excluded = set(exclude)
        train = [(it, it.repeats) for it in self.train_items if it.path not in excluded]
        reg = [it for it in self.reg_items if it.path not in excluded]
        n_train = sum(r for _, r in train)
        reg_reps = balanced_reg_repeats(n_train, [it.repeats for it in reg])
        return train + [(it, r) for it, r in zip(reg, reg_reps) if r > 0]

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        """{subset: {tag: count}} over final captions, tags lower-cased (kohya set_tag_frequency, incl. reg)."""
        out: Dict[str, Dict[str, int]] = {}
        for s in self.subsets:
            freq = out.setdefault(s.name, {})
            for it in s.items:
                for tag in it.caption.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        freq[tag] = freq.get(tag, 0) + 1
        return out

    def dataset_dirs(self, reg: bool = False) -> Dict[str, Dict[str, int]]:
        """{subset: {"n_repeats", "img_count"}} (kohya ss_dataset_dirs; reg=True gives ss_reg_dataset_dirs)."""
        return {s.name: {"n_repeats": s.repeats, "img_count": len(s.items)} for s in self.subsets if s.is_reg == reg}


def discover(config: DatasetConfig) -> Dataset:
    """Read the folder layout and captions. Missing folders give an empty dataset (the dataset check says why)."""
    ds = Dataset(config=config)
    names: Dict[str, int] = {}
    for root, is_reg in ((config.train_dir, False), (config.class_dir, True)):
        if not root or not os.path.isdir(root):
            continue
        for subset in _discover_root(root, is_reg, config, ds):
            n = names.get(subset.name, 0) + 1
            names[subset.name] = n
            if n > 1:  # kohya's own de-duplication of subset names in metadata
                subset.name = f"{subset.name} ({n})"
                for it in subset.items:
                    it.subset = subset.name
            ds.subsets.append(subset)
    return ds


def _discover_root(root: str, is_reg: bool, config: DatasetConfig, ds: Dataset) -> List[Subset]:
    root = os.path.abspath(root)
    subsets = []
    top = _read_folder(root, root, os.path.basename(root.rstrip(os.sep)) or root, 1, None, is_reg, config, ds,
                       nested_allowed=True)
    if top.items:
        subsets.append(top)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        m = _REPEATS_RE.match(name)
        repeats, class_tokens = (int(m.group(1)), m.group(2)) if m else (1, None)
        if repeats < 1:
            ds.skipped.append((path, "repeats 0 in folder name: folder not used (kohya skips it too)"))
            continue
        sub = _read_folder(root, path, name, repeats, class_tokens, is_reg, config, ds, nested_allowed=False)
        if sub.items:
            subsets.append(sub)
        else:
            ds.skipped.append((path, "no images"))
    return subsets


def _read_folder(root, folder, name, repeats, class_tokens, is_reg, config, ds, nested_allowed) -> Subset:
    subset = Subset(name=name, path=folder, repeats=repeats, is_reg=is_reg, class_tokens=class_tokens)
    cap_exts = tuple(e.lower() for e in config.caption_extensions)
    entries = sorted(os.listdir(folder))
    by_lower: Dict[str, str] = {}
    for fname in entries:
        by_lower.setdefault(fname.lower(), fname)
    image_stems = set()
    for fname in entries:
        path = os.path.join(folder, fname)
        if fname.startswith("."):
            continue
        if os.path.isdir(path):
            if not nested_allowed:
                ds.skipped.append((path, "nested folder: only one level of sub-folders is read"))
            continue
        stem, ext = os.path.splitext(fname)
        if ext.lower() in IMAGE_EXTENSIONS:
            image_stems.add(stem)
            subset.items.append(_make_item(root, path, subset, config, by_lower))
        elif ext.lower() not in cap_exts:
            ds.ignored_files.append(path)
    for fname in entries:
        stem, ext = os.path.splitext(fname)
        if ext.lower() in cap_exts and stem not in image_stems and not fname.startswith("."):
            ds.orphan_captions.append(os.path.join(folder, fname))
    return subset


def _make_item(root: str, path: str, subset: Subset, config: DatasetConfig, by_lower: Dict[str, str]) -> ImageItem:
    item = ImageItem(path=path, rel_path=os.path.relpath(path, root), subset=subset.name, repeats=subset.repeats,
                     is_reg=subset.is_reg, caption="")
    text, cap_path, issue = read_caption(path, config.caption_extensions, by_lower)
    item.caption_path, item.caption_issue = cap_path, issue
    fallback = config.class_caption if subset.is_reg else config.default_caption
    if text:
        item.caption, item.caption_source = text, "file"
    elif fallback:
        item.caption, item.caption_source = fallback, "default"
    elif config.caption_from_folder and subset.class_tokens:
        item.caption, item.caption_source = subset.class_tokens, "folder"
    if not subset.is_reg and config.trigger_word and config.prepend_trigger \
            and not has_trigger(item.caption, config.trigger_word):
        item.caption = add_trigger(item.caption, config.trigger_word)
        item.trigger_added = True
    why = not_a_file(path)
    if why:
        item.size_error = why
        return item
    try:
        item.size = read_image_size(path)
    except Exception as e:  # header unreadable: the dataset check reports it
        item.size_error = f"{type(e).__name__}: {e}"
    return item


def read_caption(image_path: str, extensions: Sequence[str], folder_names: Optional[Dict[str, str]] = None
                 ) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(caption or None, caption file or None, issue or None) for the image's caption file.

    folder_names: {lower-case name: real name} of the image's folder, so `img.TXT` is found on case-sensitive
    file systems too (what users who prepared data on Windows expect)."""
    folder, fname = os.path.split(image_path)
    stem = os.path.splitext(fname)[0]
    for ext in extensions:
        if folder_names is not None:
            real = folder_names.get((stem + ext).lower())
            cap_path = os.path.join(folder, real) if real is not None else None
        else:
            cap_path = os.path.join(folder, stem + ext)
        if cap_path is None or not os.path.isfile(cap_path):
            continue
        try:
            with open(cap_path, "r", encoding="utf-8-sig") as f:
                lines = [ln.strip() for ln in f.read().splitlines()]
        except (UnicodeDecodeError, OSError) as e:
            return None, cap_path, f"unreadable: {type(e).__name__}: {e}"
        lines = [ln for ln in lines if ln]
        if not lines:
            return None, cap_path, "empty"
        return lines[0], cap_path, ("multiline" if len(lines) > 1 else None)
    return None, None, None


def has_trigger(caption: str, trigger: str) -> bool:
    """True when `trigger` occurs in the caption as a whole word (case-insensitive)."""
    if not trigger:
        return True
    return re.search(r"(?<!\w)" + re.escape(trigger.strip()) + r"(?!\w)", caption, re.IGNORECASE) is not None


def add_trigger(caption: str, trigger: str) -> str:
    return f"{trigger.strip()}, {caption}" if caption.strip() else trigger.strip()


def balanced_reg_repeats(num_train: int, reg_repeats: Sequence[int]) -> List[int]:
    """Effective repeats of each class image so that class samples per epoch match training samples.

    Same rule as kohya (train_util.py DreamBoothDataset): walk the class images in order registering each with
    its folder repeats until the training count is reached (images past that point get 0: unused), then keep
    adding one repeat per image round-robin until the count is reached."""
    out = [0] * len(reg_repeats)
    if not reg_repeats or num_train <= 0:
        return out
    n = 0
    first = True
    while n < num_train:
        for i, r in enumerate(reg_repeats):
            if first:
                out[i] = r
                n += r
            else:
                out[i] += 1
                n += 1
            if n >= num_train:
                break
        first = False
    return out


def file_sha256(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def read_image_size(path: str) -> Tuple[int, int]:
    """(width, height) as the image will be used (EXIF orientation applied), reading only the header."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


class BadImage(Exception):
    """An image that cannot train: `path` and `reason` in words."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def load_image(path: str, background: Tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The image as RGB, EXIF orientation applied, transparency composited onto `background` (the colour under
    transparent pixels is undefined, so dropping alpha would train on garbage). A truncated or damaged file
    raises BadImage, whatever Pillow's process-wide LOAD_TRUNCATED_IMAGES says (image_check)."""
    why = incomplete(path)
    if why:
        raise BadImage(path, why)
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, background + (255,))
            return Image.alpha_composite(bg, im).convert("RGB")
        return im.convert("RGB")
