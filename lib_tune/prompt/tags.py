"""The `<tune:...>` tag grammar: one tolerant parser for the built-in Lora, loractl and LBW syntaxes.

The webui (modules/extra_networks.py, v1.10.1) finds `<(\\w+):([^>]+)>`, splits the text after the network name
at every ':' into `items` (no stripping, so ':' can never be part of a value and '>' never part of a tag), and
marks each item that splits into exactly two parts at '=' as named (`named[key] = value`, keys unstripped); the
others are positional, the first positional being the adapter's name. Values such as `0@0,1@0.5` or
`lbw=1,0,0,...` contain ',' and '@' but no ':', so they arrive whole.

Accepted (positional first, then named, named wins):
  <tune:name>                       weight = default_weight (1.0 unless the caller passes another)
  <tune:name:0.8>                   te = unet = 0.8
  <tune:name:0.8:0.5>               te 0.8, unet 0.5 (the built-in order)
  <tune:name:0.8:0.5:16>            ... dyn (DyLoRA rank) 16
  <tune:name:1:1,0,0,...> / :1:INS  LBW's old form: a vector or preset in the unet slot (then unet = te)
  te= unet= dyn= lbw= (alias w=)    as the built-in / LBW
  start= stop= step=a-b             LBW step bounds (see schedule.py for steps vs fractions)
  hr= hrte= hrunet=                 loractl's hires-pass weights (hr sets both; defaults: te / unet)
Every weight may be a loractl schedule (`0@0,1@0.5`, see schedule.py); weights beyond +-10000 (MAX_WEIGHT) are
refused, as is a `dyn=` of more than 9 digits. Unknown named arguments are kept in `extra` (not an error: the
caller may warn) and written back into canonical tags.

Names: surrounding blanks are stripped, everything else (inner spaces, sub/dir/name, backslashes) passes through
unchanged; '..' path segments and absolute paths are refused (the name is later resolved against model
folders). A tag that cannot be understood raises TagError quoting the tag, and nothing else escapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .blocks import BlockWeights, looks_like_block_weights, parse_block_weights
from .errors import TagError
from .schedule import Schedule, StepBound
from .tokens import fmt_number, is_number, parse_count

__all__ = ["AdapterRequest", "TagError", "parse_params", "parse_tag", "find_tags"]

_DRIVE = re.compile(r"[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TAG_PATTERN = re.compile(r"<(\w+):([^>]+)>")  # the webui's re_extra_net
#: the largest weight (either sign) a tag may give; real ones stay within a few units
MAX_WEIGHT = 10_000.0
#: digits of the longest `dyn=` accepted (a rank); longer numbers are refused before they are converted
MAX_COUNT_DIGITS = 9
#: named arguments this grammar reads; `w` is LBW's alias of `lbw`
_KNOWN = ("te", "unet", "dyn", "lbw", "w", "start", "stop", "step", "hr", "hrte", "hrunet")


@dataclass(frozen=True)
class AdapterRequest:
    """What one tag asks for. Weights are Schedules (a constant is a one-value schedule). Frozen and hashable, so
    the engine can compare the requests of two generations to decide what to rebuild."""
    name: str
    te: Schedule
    unet: Schedule
    hr_te: Schedule
    hr_unet: Schedule
    dyn: Optional[int] = None
    lbw: Optional[BlockWeights] = None
    start: Optional[StepBound] = None
    stop: Optional[StepBound] = None
    #: the tag's text after `<network:`, as typed (for messages and to show what the user wrote); not part of
    #: equality, so `<tune:a:1>` and `<tune:a:1.0>` are the same request
    raw: str = field(default="", compare=False)
    network: str = "tune"
    #: named arguments this grammar does not know (e.g. LBW's `lbwe=`), kept so the caller can warn; left out of
    #: the hash (a dict), kept in equality
    extra: Dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def lbw_preset(self) -> Optional[str]:
        return self.lbw.preset if self.lbw is not None else None

    @property
    def is_static(self) -> bool:
        """True when no weight changes within a pass (no schedule, no start/stop): the adapter can be merged once.
        (The hires pass may still use other constant weights.)"""
        return (self.te.is_constant and self.unet.is_constant and self.hr_te.is_constant
                and self.hr_unet.is_constant and self.start is None and self.stop is None)

    def active_at(self, step: float, total_steps: int) -> bool:
        """start <= step < stop in the first pass."""
        if self.start is not None and step < self.start.at(total_steps):
            return False
        if self.stop is not None and step >= self.stop.at(total_steps):
            return False
        return True

    def weights_at(self, step: float, total_steps: int, hires: bool = False) -> Tuple[float, float]:
        """(te, unet) multipliers at 0-based `step` of a pass of `total_steps` steps.

        start/stop gate only the first pass (they are LBW's, which has no hires handling); the hires pass is
        controlled by hr=/hrte=/hrunet=, which default to the te/unet weights."""
        if hires:
            return self.hr_te.weight_at(step, total_steps), self.hr_unet.weight_at(step, total_steps)
        if not self.active_at(step, total_steps):
            return 0.0, 0.0
        return self.te.weight_at(step, total_steps), self.unet.weight_at(step, total_steps)

    def args_text(self) -> str:
        """Canonical arguments after the name: explicit weights (no dependence on a default), parses back to an
        equal request (used by infotext)."""
        te, unet = self.te.to_text(), self.unet.to_text()
        parts: List[str] = [te] if unet == te else [te, unet]
        if self.dyn is not None:
            parts.append(f"dyn={self.dyn}")
        if self.lbw is not None:
            parts.append(f"lbw={self.lbw.to_text()}")
        if self.start is not None:
            parts.append(f"start={self.start.to_text()}")
        if self.stop is not None:
            parts.append(f"stop={self.stop.to_text()}")
        hr_te, hr_unet = self.hr_te.to_text(), self.hr_unet.to_text()
        if hr_te != te and hr_unet != unet and hr_te == hr_unet:
            parts.append(f"hr={hr_te}")
        else:
            if hr_te != te:
                parts.append(f"hrte={hr_te}")
            if hr_unet != unet:
                parts.append(f"hrunet={hr_unet}")
        parts.extend(f"{k}={v}" for k, v in self.extra.items())
        return ":".join(parts)

    def to_tag(self, network: Optional[str] = None) -> str:
        return f"<{network or self.network}:{self.name}:{self.args_text()}>"


def check_name(name: str) -> str:
    """Strip surrounding blanks and refuse empty, absolute or '..' names (TagError). Returns the name."""
    name = name.strip()
    if not name:
        raise TagError("no adapter name")
    if _CONTROL.search(name):
        raise TagError(f"name {name!r} contains control characters")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise TagError(f"name {name!r} is an absolute path; use a name relative to the adapter folders")
    if any(seg.strip() == ".." for seg in re.split(r"[/\\]", name)):
        raise TagError(f"name {name!r} leaves the adapter folders ('..' is not allowed)")
    return name


def _check_range(schedule: Schedule, what: str) -> None:
    """Weights beyond +-MAX_WEIGHT are typing mistakes, and between two huge keyframes the interpolation overflows
    to inf/NaN (a black image): TagError."""
    values = [schedule.constant] if schedule.constant is not None else [k.weight for k in schedule.keyframes]
    for v in values:
        if abs(v) > MAX_WEIGHT:
            raise TagError(f"{what} {fmt_number(v)} is out of range (at most {fmt_number(MAX_WEIGHT)} either way)")


def split_items(items: Sequence[object]) -> Tuple[List[str], Dict[str, str]]:
    """positional / named exactly as ExtraNetworkParams splits them, with keys lower-cased and blanks stripped."""
    positional: List[str] = []
    named: Dict[str, str] = {}
    for item in items:
        text = "" if item is None else str(item)
        parts = text.split("=", 2)
        if len(parts) == 2:
            named[parts[0].strip().lower()] = parts[1].strip()
        else:
            positional.append(text)
    return positional, named


def _parse(positional: List[str], named: Dict[str, str], default_weight: float,
           presets: Optional[Mapping[str, Sequence[float]]]) -> dict:
    if not positional:
        raise TagError("no adapter name")
    if len(positional) > 4:
        raise TagError(f"too many arguments ({len(positional)}); expected at most name:te:unet:dyn")
    name = check_name(positional[0])
    pos = [p.strip() for p in positional[1:]] + [""] * (4 - len(positional))
    te_pos, unet_pos, dyn_pos = pos[0], pos[1], pos[2]

    for key in _KNOWN:
        if key in named and not named[key]:
            raise TagError(f"{key}= has no value")

    te = Schedule.parse(te_pos, "weight") if te_pos else Schedule.of(default_weight)
    if "te" in named:
        te = Schedule.parse(named["te"], "te weight")

    lbw_text = named.get("lbw", named.get("w"))
    unet: Optional[Schedule] = None
    if unet_pos:
        if "@" in unet_pos or "~" in unet_pos or is_number(unet_pos):
            unet = Schedule.parse(unet_pos, "unet weight")
        elif looks_like_block_weights(unet_pos, presets):
            if lbw_text is None:  # LBW's old positional form; a named lbw= wins
                try:
                    parse_block_weights(unet_pos, presets)
                except TagError as e:
                    raise TagError(f"unet weight {unet_pos!r} is neither a number nor block weights ({e})") from None
                lbw_text = unet_pos
        else:
            raise TagError(f"unet weight {unet_pos!r} is not a number, a schedule or a block-weight preset")
    if "unet" in named:
        unet = Schedule.parse(named["unet"], "unet weight")
    if unet is None:
        unet = te

    hr = Schedule.parse(named["hr"], "hr weight") if "hr" in named else None
    hr_te = Schedule.parse(named["hrte"], "hrte weight") if "hrte" in named else (te if hr is None else hr)
    hr_unet = Schedule.parse(named["hrunet"], "hrunet weight") if "hrunet" in named else (unet if hr is None else hr)

    dyn_text = named.get("dyn", dyn_pos)
    if dyn_text and len(dyn_text.strip()) > MAX_COUNT_DIGITS:  # before int(): Python refuses 4300+ digit numbers
        raise TagError(f"dyn {dyn_text.strip()[:20]!r}... is too large (a rank has at most "
                       f"{MAX_COUNT_DIGITS} digits)")
    dyn = parse_count(dyn_text, "dyn") if dyn_text else None

    lbw = parse_block_weights(lbw_text, presets) if lbw_text is not None else None

    start_text, stop_text = named.get("start"), named.get("stop")
    if "step" in named:
        if start_text is not None or stop_text is not None:
            raise TagError("use either step=a-b or start=/stop=, not both")
        step = named["step"]
        if step.count("-") != 1:
            raise TagError(f"step {step!r} is not a range like 5-10")
        start_text, stop_text = (s.strip() or None for s in step.split("-"))
    start = StepBound.parse(start_text, "start") if start_text is not None else None
    stop = StepBound.parse(stop_text, "stop") if stop_text is not None else None
    if start is not None and stop is not None and start.fraction == stop.fraction and start.percent == stop.percent \
            and start.value >= stop.value:
        raise TagError(f"start {start} is not before stop {stop}")

    for what, schedule in (("te weight", te), ("unet weight", unet), ("hrte weight", hr_te),
                           ("hrunet weight", hr_unet)):
        _check_range(schedule, what)

    extra = {k: v for k, v in named.items() if k not in _KNOWN}
    return dict(name=name, te=te, unet=unet, hr_te=hr_te, hr_unet=hr_unet, dyn=dyn, lbw=lbw, start=start,
                stop=stop, extra=extra)


def parse_params(items: Sequence[object], named: Optional[Mapping[str, str]] = None, *, network: str = "tune",
                 default_weight: float = 1.0,
                 presets: Optional[Mapping[str, Sequence[float]]] = None) -> AdapterRequest:
    """Read one tag's arguments (an ExtraNetworkParams' `items`, and optionally its `named`).

    Positional and named arguments are re-derived from `items` the way the webui does; entries of `named`
    (e.g. overrides from an API request) take precedence. `presets` adds LBW presets (name -> values) to the
    built-in ones. Raises TagError("<network:...>: what is wrong") for a tag that cannot be used."""
    items = list(items)
    raw = ":".join("" if i is None else str(i) for i in items)
    try:
        positional, derived = split_items(items)
        for k, v in (named or {}).items():
            derived[str(k).strip().lower()] = str(v).strip()
        fields = _parse(positional, derived, float(default_weight), presets)
    except TagError as e:
        raise TagError(f"<{network}:{raw}>: {e}") from None
    return AdapterRequest(raw=raw, network=network, **fields)


def parse_tag(tag: str, **kwargs) -> AdapterRequest:
    """Parse one whole tag text `<network:...>` (tests, infotext, API); TagError if it is not one tag."""
    m = TAG_PATTERN.fullmatch(tag.strip())
    if m is None:
        raise TagError(f"{tag!r} is not a tag like <tune:name:weight>")
    kwargs.setdefault("network", m.group(1))
    return parse_params(m.group(2).split(":"), **kwargs)


def find_tags(prompt: str, networks: Sequence[str] = ("tune",)) -> List[Tuple[str, List[str], Tuple[int, int]]]:
    """(network, items, span) of every tag of the given networks in `prompt`, split as the webui splits them."""
    wanted = set(networks)
    return [(m.group(1), m.group(2).split(":"), m.span())
            for m in TAG_PATTERN.finditer(prompt) if m.group(1) in wanted]
