"""Caption augmentation: tag shuffling with the first N tags kept, whole-caption dropout, per-tag dropout.

Semantics follow kohya sd-scripts (train_util.py BaseDataset.process_caption): caption dropout is decided first
and empties the whole caption; otherwise, when shuffling or tag dropout is on, the caption is split on the
separator, the first `keep_tokens` tags stay in front unshuffled and are never dropped, the rest are shuffled and
then each dropped with `tag_dropout_rate`, and the tags are joined with ", ". With both off the caption is
returned unchanged.

Randomness never comes from global state: every call takes a `random.Random`, and `derive_rng` builds one from
(seed, epoch, step, sample, ...) so the caption a sample gets at a given step is the same after a resume, in any
process, in any order of evaluation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class CaptionAugment:
    shuffle: bool = False
    #: leading tags kept in place (and never dropped); typically 1 to keep the trigger word first
    keep_tokens: int = 0
    #: probability that the whole caption becomes "" (trains the unconditional prediction)
    caption_dropout_rate: float = 0.0
    #: probability that each non-kept tag is removed
    tag_dropout_rate: float = 0.0
    separator: str = ","

    @property
    def active(self) -> bool:
        return self.shuffle or self.caption_dropout_rate > 0 or self.tag_dropout_rate > 0


def derive_rng(*parts) -> random.Random:
    """A Random seeded from the parts (ints/strings). str seeds go through sha512 in CPython's random.seed
    (version 2), so the stream does not depend on PYTHONHASHSEED, the platform or the process."""
    return random.Random(":".join(str(p) for p in parts))


def split_tags(caption: str, separator: str = ",") -> List[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def augment_caption(caption: str, aug: CaptionAugment, rng: random.Random) -> str:
    """The caption one sample trains with at one step. Draws from rng in a fixed order: one draw for caption
    dropout (only when its rate > 0), then the shuffle, then one draw per droppable tag."""
    if aug.caption_dropout_rate > 0 and rng.random() < aug.caption_dropout_rate:
        return ""
    if not (aug.shuffle or aug.tag_dropout_rate > 0):
        return caption
    tags = split_tags(caption, aug.separator)
    keep = max(0, aug.keep_tokens)
    fixed, flex = tags[:keep], tags[keep:]
    if aug.shuffle:
        rng.shuffle(flex)
    if aug.tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= aug.tag_dropout_rate]
    return ", ".join(fixed + flex)
