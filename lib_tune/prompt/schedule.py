"""Step-dependent weights (loractl syntax) and step bounds (LBW's start=/stop=).

A weight in a tag is either a number (`0.8`) or a list of keyframes `weight@position` separated by ',' or ';'
(loractl also accepts '~' for '@'), e.g. `0@0,1@0.5`. Between keyframes the weight is interpolated linearly;
before the first and after the last keyframe it stays at that keyframe's weight.

Position rule (decided here, compatible with loractl's `calculate_weight`):
  * `P%` is always a fraction of the pass (P/100), and a schedule with any `%` position reads its other
    positions as absolute steps (`0@1,1@50%`: step 1, then half way), which is how to mix the two.
  * Without `%` the positions are read together, as loractl does: if every one of them is <= 1 they are all
    fractions of the pass, otherwise they are all absolute step numbers. So `0@0,1@1` ramps over the whole pass,
    `0@5,1@6` switches on at step 6, and `1@0,0.5@3,1@6` is in steps. Integers get no special treatment here
    (unlike start=/stop= below): `1` in `0@0,1@1` is the end of the pass, as in loractl.
  * Steps are 0-based sampling-step indices (the webui's `CFGDenoiserParams.sampling_step`). A fraction f sits at
    step f * (total_steps - 1), so 0 is the first step and 1 the last one (where loractl's curve also ends).
  * Keyframes are ordered by resolved position (stable, so equal positions keep their written order); at a
    position with several keyframes the last written one applies from that step on (a jump).

Step bounds (`start=`, `stop=`) follow LBW, whose values are step numbers: an integer (`start=5`) is an absolute
step, a number with a decimal point in [0, 1] (`stop=0.5`, `stop=1.0`) or a percentage (`stop=50%`) is a fraction
of the pass, a decimal above 1 is an absolute step. A fraction f of a bound sits at f * total_steps, so
`stop=1.0` never stops and `stop=0.5` with 20 steps runs steps 0..9. The adapter is active where
start <= step < stop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .errors import TagError
from .tokens import fmt_number, parse_number

_KEYFRAME_SEP = re.compile(r"[,;]")
_AT = re.compile(r"[@~]")
_INTEGER = re.compile(r"\+?\d+")


@dataclass(frozen=True)
class Keyframe:
    """One `weight@position`. `position` is the number as written (50 for `50%`); `fraction` says how the
    schedule-level rule resolved it."""
    weight: float
    position: float
    fraction: bool
    percent: bool = False

    def step_position(self, total_steps: int) -> float:
        """Where this keyframe sits, as a (possibly fractional) 0-based step index."""
        if not self.fraction:
            return self.position
        f = self.position / 100.0 if self.percent else self.position
        return f * max(total_steps - 1, 0)

    def to_text(self) -> str:
        pos = fmt_number(self.position) + ("%" if self.percent else "")
        return f"{fmt_number(self.weight)}@{pos}"


@dataclass(frozen=True)
class Schedule:
    """A weight for one part of the model (te or unet) over the sampling steps of one pass."""
    keyframes: Tuple[Keyframe, ...] = ()
    constant: Optional[float] = None

    @classmethod
    def of(cls, value: float) -> "Schedule":
        return cls(constant=float(value))

    @classmethod
    def parse(cls, text: str, what: str = "weight") -> "Schedule":
        """Read a number or a keyframe list; TagError naming `what` and the bad token otherwise."""
        text = str(text).strip()
        if not text:
            raise TagError(f"{what} is empty")
        if not _AT.search(text) and not _KEYFRAME_SEP.search(text):
            return cls.of(parse_number(text, what))
        parts = [p.strip() for p in _KEYFRAME_SEP.split(text)]
        parts = [p for p in parts if p]  # tolerate a trailing or doubled separator
        if not parts:
            raise TagError(f"{what} {text!r} has no keyframes")
        raw: List[Tuple[float, float, bool]] = []
        for part in parts:
            pieces = _AT.split(part)
            if len(pieces) != 2:
                raise TagError(f"{what} {text!r}: keyframe {part!r} is not weight@position")
            weight = parse_number(pieces[0], f"{what} {text!r}: keyframe weight")
            pos_text = pieces[1].strip()
            percent = pos_text.endswith("%")
            if percent:
                pos_text = pos_text[:-1]
            pos = parse_number(pos_text, f"{what} {text!r}: keyframe position")
            if pos < 0:
                raise TagError(f"{what} {text!r}: keyframe position {pieces[1].strip()!r} is negative")
            raw.append((weight, pos, percent))
        any_percent = any(percent for _, _, percent in raw)
        fractions = not any_percent and all(pos <= 1 for _, pos, _ in raw)
        frames = tuple(Keyframe(w, pos, percent or fractions, percent) for w, pos, percent in raw)
        return cls(keyframes=frames)

    @property
    def is_constant(self) -> bool:
        """True when the weight is the same at every step (then the adapter can be merged once)."""
        if self.constant is not None:
            return True
        first = self.keyframes[0].weight
        return all(k.weight == first for k in self.keyframes)

    @property
    def value(self) -> float:
        """The weight of a constant schedule; ValueError for one that changes over the steps."""
        if self.constant is not None:
            return self.constant
        if not self.is_constant:
            raise ValueError(f"schedule {self.to_text()!r} is not constant")
        return self.keyframes[0].weight

    def weight_at(self, step: float, total_steps: int) -> float:
        """Weight at 0-based sampling step `step` of a pass of `total_steps` steps."""
        if self.constant is not None:
            return self.constant
        points = sorted(((k.step_position(total_steps), k.weight) for k in self.keyframes), key=lambda p: p[0])
        if step < points[0][0]:
            return points[0][1]
        if step >= points[-1][0]:
            return points[-1][1]
        for (a, wa), (b, wb) in zip(points, points[1:]):
            if a <= step < b:
                return wa + (wb - wa) * (step - a) / (b - a)
        return points[-1][1]  # unreachable: the checks above cover every step

    def curve(self, total_steps: int) -> List[float]:
        """The weight at each step of a pass (for plots and diagnostics)."""
        return [self.weight_at(i, total_steps) for i in range(total_steps)]

    def to_text(self) -> str:
        """Text that parses back to an equal schedule (infotext, canonical tags)."""
        if self.constant is not None:
            return fmt_number(self.constant)
        return ",".join(k.to_text() for k in self.keyframes)

    def __str__(self) -> str:
        return self.to_text()


@dataclass(frozen=True)
class StepBound:
    """`start=` / `stop=`: an absolute step or a fraction of the pass (see the module docstring)."""
    value: float
    fraction: bool
    percent: bool = False

    @classmethod
    def parse(cls, text: str, what: str) -> "StepBound":
        text = str(text).strip()
        percent = text.endswith("%")
        number = text[:-1].strip() if percent else text
        value = parse_number(number, what)
        if value < 0:
            raise TagError(f"{what} {text!r} is negative")
        if percent:
            return cls(value, True, True)
        fraction = not _INTEGER.fullmatch(number) and value <= 1  # '1' is step 1, '1.0' is the whole pass
        return cls(value, fraction)

    def at(self, total_steps: int) -> float:
        """The bound as a (possibly fractional) step index for a pass of `total_steps` steps."""
        if not self.fraction:
            return self.value
        f = self.value / 100.0 if self.percent else self.value
        return f * total_steps

    def to_text(self) -> str:
        if self.percent:
            return fmt_number(self.value) + "%"
        text = fmt_number(self.value)
        if self.fraction and "." not in text:
            text += ".0"  # keep the decimal point that makes 0/1 a fraction
        return text

    def __str__(self) -> str:
        return self.to_text()
