"""The dataset check: everything that can be known about a dataset before training, without training.

Run before Start (and on demand from the UI): it opens every image fully (truncated files only fail when decoded),
reads every caption, hashes every file, assigns buckets and derives the step count, then reports per-file
problems with a severity: "error" (the run must not start: unreadable image, no usable bucket, no images),
"warning" (it would train, probably not as intended: missing/empty caption, duplicates, trigger word missing,
tiny image) or "info" (worth knowing: caption taken from the instance prompt, trigger prepended).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from PIL import Image

from .buckets import BucketConfig, apply_transform, assign_bucket, derive_schedule, plan_buckets, plan_transform
from .dataset import BadImage, Dataset, DatasetConfig, discover, has_trigger, load_image
from .image_check import incomplete, not_a_file

ERROR, WARNING, INFO = "error", "warning", "info"
_NORMAL_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "La", "PA"}
#: the shortest side an image may have (one latent pixel)
MIN_SIDE = 8
#: what happens to an image that cannot train: "skip" leaves it out with a warning, "fail" stops the run
BAD_IMAGE_POLICIES = ("skip", "fail")
#: problem codes that mean "this image cannot train" (left out under on_bad_image="skip")
BAD_IMAGE_CODES = ("corrupt_image", "truncated_image", "image_too_large", "too_small", "bucket_decode_failed",
                   "caption_unreadable")


@dataclass
class DatasetCheckConfig:
    dataset: DatasetConfig
    buckets: BucketConfig = field(default_factory=BucketConfig)
    batch_size: int = 1
    epochs: Optional[int] = 10
    max_train_steps: Optional[int] = None
    gradient_accumulation_steps: int = 1
    #: "skip" (default): unusable images are left out of training with a warning; "fail": they stop the run
    on_bad_image: str = "skip"


@dataclass
class Problem:
    severity: str
    #: stable identifier for the UI / tests, e.g. "corrupt_image"
    code: str
    message: str
    path: Optional[str] = None


@dataclass
class Report:
    problems: List[Problem] = field(default_factory=list)
    num_images: int = 0
    num_images_with_repeats: int = 0
    num_class_images: int = 0
    #: class samples per epoch after balancing to the training count
    num_class_images_balanced: int = 0
    #: {"WxH": samples per epoch} over the images that can train (class images included)
    bucket_histogram: Dict[str, int] = field(default_factory=dict)
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    epochs: int = 0
    total_steps: int = 0
    #: paths that cannot train (errors); the trainer passes them to Dataset.entries(exclude=...)
    excluded: List[str] = field(default_factory=list)
    #: images left out of training under on_bad_image="skip" (each also has a warning in `problems`)
    skipped_images: List[str] = field(default_factory=list)
    dataset: Optional[Dataset] = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)

    def by_severity(self, severity: str) -> List[Problem]:
        return [p for p in self.problems if p.severity == severity]

    def codes(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for p in self.problems:
            out[p.code] = out.get(p.code, 0) + 1
        return out

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "num_images", "num_images_with_repeats", "num_class_images", "num_class_images_balanced",
            "bucket_histogram", "batches_per_epoch", "steps_per_epoch", "epochs", "total_steps", "excluded")}
        d["bucket_histogram"] = dict(self.bucket_histogram)
        d["excluded"] = list(self.excluded)
        d["skipped_images"] = list(self.skipped_images)
        d["ok"] = self.ok
        d["problems"] = [asdict(p) for p in self.problems]
        return d

    def to_text(self) -> str:
        lines = [
            f"{'OK' if self.ok else 'NOT READY'}: {len(self.by_severity(ERROR))} error(s), "
            f"{len(self.by_severity(WARNING))} warning(s)",
            f"images: {self.num_images} ({self.num_images_with_repeats} with repeats)",
        ]
        if self.skipped_images:
            lines.append(f"left out: {len(self.skipped_images)} image(s) that cannot train (warnings below; "
                         f"on_bad_image=\"fail\" stops the run instead)")
        if self.num_class_images:
            lines.append(f"class images: {self.num_class_images} "
                         f"({self.num_class_images_balanced} per epoch, balanced to the training images)")
        lines.append(f"steps: {self.batches_per_epoch} batches/epoch, {self.steps_per_epoch} steps/epoch, "
                     f"{self.epochs} epoch(s), {self.total_steps} steps in total")
        if self.bucket_histogram:
            lines.append("buckets: " + ", ".join(f"{k}: {v}" for k, v in self.bucket_histogram.items()))
        shown: Dict[str, int] = {}
        for p in sorted(self.problems, key=lambda p: ({ERROR: 0, WARNING: 1}.get(p.severity, 2), p.code)):
            if p.severity == INFO:  # infos repeat per file (e.g. instance prompt used): show a few per code
                shown[p.code] = shown.get(p.code, 0) + 1
                if shown[p.code] > 3:
                    continue
            where = f" [{p.path}]" if p.path else ""
            lines.append(f"{p.severity.upper()} {p.code}: {p.message}{where}")
        for code, n in shown.items():
            if n > 3:
                lines.append(f"INFO {code}: ... and {n - 3} more")
        return "\n".join(lines)


def check_image(path: str) -> List[Problem]:
    """Check one image's container (image_check: per call, never through Pillow's process-wide switch) and
    verify it; problems found (empty when it is fine). check_at_bucket then decodes it as training will."""
    out: List[Problem] = []
    why = not_a_file(path)
    if why:
        return [Problem(ERROR, "corrupt_image", why, path)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            why = incomplete(path)
            if why:
                return [Problem(ERROR, "truncated_image", why, path)]
            with Image.open(path) as im:
                im.verify()  # structural checks (PNG CRCs, ...)
            with Image.open(path) as im:
                mode, frames = im.mode, getattr(im, "n_frames", 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return [Problem(ERROR, "image_too_large", f"image too large to load safely: {e}", path)]
    except BadImage as e:
        return [Problem(ERROR, "truncated_image", e.reason, path)]
    except Exception as e:
        return [Problem(ERROR, "corrupt_image", f"cannot read image ({type(e).__name__}: {e})", path)]
    if mode not in _NORMAL_MODES:
        out.append(Problem(WARNING, "unusual_mode", f"image mode {mode} will be converted to RGB", path))
    if frames > 1:
        out.append(Problem(WARNING, "animated", f"{frames} frames: only the first is used", path))
    return out


def check_at_bucket(path: str, size, assignment) -> Optional[Problem]:
    """The image cut to its bucket exactly as training cuts it; a Problem when that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = apply_transform(load_image(path), plan_transform(size, assignment))
        if tuple(img.size) != tuple(assignment.bucket):
            return Problem(ERROR, "bucket_decode_failed",
                           f"decodes to {img.size[0]}x{img.size[1]}, not its bucket "
                           f"{assignment.bucket[0]}x{assignment.bucket[1]}", path)
    except Exception as e:
        return Problem(ERROR, "bucket_decode_failed",
                       f"cannot be decoded at its bucket size ({type(e).__name__}: {e})", path)
    return None


def check_dataset(config: DatasetCheckConfig) -> Report:
    report = Report()
    dcfg, bcfg = config.dataset, config.buckets
    P = report.problems

    if not dcfg.train_dir or not os.path.isdir(dcfg.train_dir):
        P.append(Problem(ERROR, "missing_folder", "dataset folder does not exist", dcfg.train_dir or None))
    if dcfg.class_dir and not os.path.isdir(dcfg.class_dir):
        P.append(Problem(ERROR, "missing_folder", "class images folder does not exist", dcfg.class_dir))
    ds = discover(dcfg)
    report.dataset = ds

    for path, why in ds.skipped:
        P.append(Problem(WARNING if why != "no images" else INFO, "skipped_folder", why, path))
    for path in ds.ignored_files:
        P.append(Problem(INFO, "ignored_file", "not an image or caption file (supported: png, jpg, jpeg, webp, "
                                               "bmp)", path))
    for path in ds.orphan_captions:
        P.append(Problem(WARNING, "orphan_caption", "caption file without an image of the same name", path))

    excluded = set()
    for it in ds.items:
        problems = check_image(it.path)
        if it.size is None and not problems:
            problems = [Problem(ERROR, "corrupt_image", f"cannot read image size ({it.size_error})", it.path)]
        if any(p.severity == ERROR for p in problems):
            excluded.add(it.path)
        P.extend(problems)
        if it.path in excluded:
            continue
        w, h = it.size
        if min(w, h) < MIN_SIDE:
            P.append(Problem(ERROR, "too_small", f"{w}x{h}: too small to train (a side under {MIN_SIDE} px is less "
                                                 f"than one latent pixel)", it.path))
            excluded.add(it.path)
            continue
        try:
            a = assign_bucket(it.size, bcfg)
        except ValueError as e:
            P.append(Problem(ERROR, "too_small", str(e), it.path))
            excluded.add(it.path)
            continue
        bad = check_at_bucket(it.path, it.size, a)
        if bad is not None:
            P.append(bad)
            excluded.add(it.path)
            continue
        if min(w, h) < bcfg.min_size:
            P.append(Problem(WARNING, "small_image",
                             f"{w}x{h} is smaller than the bucket minimum {bcfg.min_size}"
                             + ("" if bcfg.no_upscale else f" (upscaled to {a.resized[0]}x{a.resized[1]})"),
                             it.path))
        if _caption_problems(it, dcfg, P):
            excluded.add(it.path)

    if config.on_bad_image not in BAD_IMAGE_POLICIES:
        P.append(Problem(ERROR, "bad_option", f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, "
                                              f"not {config.on_bad_image!r}"))
    elif config.on_bad_image == "skip":
        for p in P:
            if p.severity == ERROR and p.code in BAD_IMAGE_CODES:
                p.severity = WARNING
                p.message += " - left out of training"
        report.skipped_images = sorted(excluded)
    _duplicate_problems(ds, excluded, P)
    _trigger_summary(ds, dcfg, P)

    train = [it for it in ds.train_items if it.path not in excluded]
    if not train:
        bad = len([it for it in ds.train_items if it.path in excluded])
        P.append(Problem(ERROR, "no_images", f"no usable training images ({bad} found, none usable: see the "
                                             f"problems above)" if bad else "no training images found "
                                             "(supported: png, jpg, jpeg, webp, bmp)", dcfg.train_dir or None))
    report.excluded = sorted(excluded)
    report.num_images = len(train)
    report.num_images_with_repeats = sum(it.repeats for it in train)
    report.num_class_images = len([it for it in ds.reg_items if it.path not in excluded])
    if dcfg.class_dir and report.num_class_images == 0 and os.path.isdir(dcfg.class_dir):
        P.append(Problem(ERROR, "no_class_images", "class images folder has no usable images", dcfg.class_dir))

    entries = ds.entries(exclude=excluded)
    report.num_class_images_balanced = sum(r for it, r in entries if it.is_reg)
    unused = report.num_class_images - len([1 for it, _ in entries if it.is_reg])
    if unused > 0:
        P.append(Problem(INFO, "class_images_unused",
                         f"{unused} class image(s) are not used: more class samples than training samples"))
    if entries:
        plan = plan_buckets([it.size for it, _ in entries], [r for _, r in entries], bcfg)
        report.bucket_histogram = plan.histogram()
        report.batches_per_epoch = plan.batches_per_epoch(max(1, config.batch_size))
        if config.epochs is None and config.max_train_steps is None:
            P.append(Problem(ERROR, "no_length", "set epochs or max steps"))
        else:
            s = derive_schedule(report.batches_per_epoch, config.epochs, config.max_train_steps,
                                max(1, config.gradient_accumulation_steps))
            report.steps_per_epoch, report.epochs, report.total_steps = s.steps_per_epoch, s.epochs, s.total_steps
            if s.total_steps == 0:
                P.append(Problem(ERROR, "no_steps", "the settings give 0 training steps"))
    if config.batch_size < 1:
        P.append(Problem(ERROR, "bad_batch_size", "batch size must be at least 1"))
    return report


def _caption_problems(it, dcfg: DatasetConfig, P: List[Problem]) -> bool:
    """Adds the caption's problems; True when the caption file cannot be read (the image cannot train as
    captioned)."""
    issue = it.caption_issue or ""
    if it.caption_source == "default":
        fallback = f"uses the {'class' if it.is_reg else 'instance'} prompt \"{it.caption}\""
    elif it.caption_source == "folder":
        fallback = f"uses the folder name \"{it.caption}\""
    elif it.caption.strip():
        fallback = f"trains with just \"{it.caption}\" (the trigger word)"
    else:
        fallback = "trains with an empty caption"
    if issue.startswith("unreadable"):
        P.append(Problem(ERROR, "caption_unreadable", f"caption file {issue} (save it as UTF-8)", it.caption_path))
        return True
    elif issue == "empty":
        P.append(Problem(WARNING, "empty_caption", f"caption file is empty: {fallback}", it.caption_path))
    elif issue == "multiline":
        P.append(Problem(WARNING, "multiline_caption", "caption file has several lines: only the first is used",
                         it.caption_path))
    elif it.caption_path is None:
        if it.caption_source == "none":
            P.append(Problem(WARNING, "missing_caption", f"no caption file and no default caption: {fallback}",
                             it.path))
        elif it.caption_source in ("default", "folder"):
            P.append(Problem(INFO, "caption_fallback", f"no caption file: {fallback}", it.path))
    return False


def _duplicate_problems(ds: Dataset, excluded, P: List[Problem]) -> None:
    groups: Dict[str, List] = {}
    for it in ds.items:
        if it.path in excluded:
            continue
        groups.setdefault(it.content_hash, []).append(it)
    for group in groups.values():
        if len(group) < 2:
            continue
        kinds = {it.is_reg for it in group}
        names = ", ".join(it.path for it in group)
        if kinds == {True, False}:
            msg = f"same image among training and class images: {names}"
        else:
            msg = f"{len(group)} identical files (each trains separately, multiplying its weight): {names}"
        for it in group[1:]:
            P.append(Problem(WARNING, "duplicate_image", msg, it.path))


def _trigger_summary(ds: Dataset, dcfg: DatasetConfig, P: List[Problem]) -> None:
    trig = dcfg.trigger_word.strip()
    if not trig:
        return
    for it in ds.train_items:
        if it.trigger_added:
            P.append(Problem(INFO, "trigger_added", f"trigger word \"{trig}\" was missing and is prepended", it.path))
        elif not has_trigger(it.caption, trig):
            P.append(Problem(WARNING, "trigger_missing", f"caption lacks the trigger word \"{trig}\"", it.path))
    for it in ds.reg_items:
        if has_trigger(it.caption, trig):
            P.append(Problem(WARNING, "trigger_in_class_caption",
                             f"class image caption contains the trigger word \"{trig}\": the prior loss would "
                             f"teach it to the class", it.path))
