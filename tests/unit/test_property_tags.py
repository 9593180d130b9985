"""Property tests of the tag grammar (lib_tune.prompt.tags): no text makes it raise anything but TagError.

Arbitrary text, and text built from the grammar's own pieces (names, numbers, schedules, named arguments, block
weights, step ranges) with their usual mistakes, go through find_tags / parse_tag / parse_params exactly as the
webui hands them over. What parses must be usable: finite weights at every step, and a canonical tag that parses
back to the same request. Seeded (derandomize) so CI sees the same examples every run.
"""
from __future__ import annotations

import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lib_tune.prompt import TagError, find_tags, parse_params, parse_tag  # noqa: E402
from lib_tune.prompt.blocks import PRESETS  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
EXAMPLES = 1500


def _check_request(req) -> None:
    """A parsed request is usable: finite weights at every step of a few pass lengths, and it round-trips."""
    for total in (1, 2, 20, 151):
        for step in (0, total // 2, total - 1, total - 0.5):
            for hires in (False, True):
                te, unet = req.weights_at(step, total, hires=hires)
                assert math.isfinite(te) and math.isfinite(unet), (req.raw, step, total, te, unet)
        req.active_at(0, total)
    again = parse_tag(req.to_tag())
    assert again == req, (req.raw, req.to_tag())


def _parse_or_tag_error(text: str) -> None:
    try:
        req = parse_tag(text)
    except TagError as e:
        assert str(e)  # a message for the user
        return
    _check_request(req)


# ---- arbitrary text ----------------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, **SETTINGS)
@given(st.text(max_size=200))
def test_any_text_is_a_tag_or_a_tag_error(text):
    _parse_or_tag_error(text)
    _parse_or_tag_error(f"<tune:{text}>")


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(st.text(max_size=300))
def test_find_tags_never_raises_and_every_found_tag_parses_or_is_a_tag_error(prompt):
    for network, items, span in find_tags(prompt, networks=("tune", "lora")):
        assert prompt[span[0]:span[1]].startswith(f"<{network}:")
        try:
            req = parse_params(items, network=network)
        except TagError:
            continue
        _check_request(req)


@settings(max_examples=750, **SETTINGS)
@given(st.lists(st.one_of(st.text(max_size=30), st.none(), st.integers(), st.floats()), max_size=8),
       st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4))
def test_parse_params_takes_any_items_and_named_overrides(items, named):
    try:
        req = parse_params(items, named)
    except TagError:
        return
    assert req.name == req.name.strip() and req.name


# ---- text built from the grammar's pieces ----------------------------------------------------------------------
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10 ** 6, max_value=10 ** 6).map(str),
    st.sampled_from(["0", "1", "-1", ".5", "5.", "1e-3", "1e309", "-1e309", "1e308", "-1e308", "nan", "inf", "-inf",
                     "1_000", "0x10", "+1", "--1", "1e", "e1", "", " ", "1 ", "1,5", "½", "١", "9" * 400,
                     "9" * 5000, "1" + "0" * 4400, "0." + "0" * 400 + "1"]),
)
POSITIONS = st.one_of(NUMBERS, NUMBERS.map(lambda n: n + "%"), st.sampled_from(["50%", "%", "100%%", "-5%"]))
KEYFRAMES = st.tuples(NUMBERS, st.sampled_from(["@", "~", "@@", ""]), POSITIONS).map("".join)
SCHEDULES = st.one_of(NUMBERS, st.lists(KEYFRAMES, min_size=1, max_size=5).flatmap(
    lambda ks: st.sampled_from([",", ";", ",,", ", "]).map(lambda sep: sep.join(ks))))
NAMES = st.one_of(
    st.sampled_from(["cat", "sub/dir/name", "with space", "  padded  ", "", " ", "..", "../up", "a/../b", "/abs",
                     "\\\\server\\share", "C:\\x", "c:rel", "x\x00y", "tab\tname", "名前", "emoji\U0001F600",
                     "a=b", "-dash", "name.safetensors", ". .", "\u202eevil"]),
    st.text(max_size=12))
LBW = st.one_of(
    st.sampled_from(sorted(PRESETS) + ["R", "U", "X", "ins", "NOPE", "ALL0.5", "1,0", ""]),
    st.integers(min_value=0, max_value=62).flatmap(
        lambda n: st.lists(NUMBERS, min_size=n, max_size=n).map(",".join)),
    st.lists(st.sampled_from(["1", "0", "0.5", "R", "U", "X", "a"]), min_size=12, max_size=26).map(" ".join))
BOUNDS = st.one_of(NUMBERS, POSITIONS, st.sampled_from(["0.5", "1.0", "1", "50%", "5", "10"]))
STEP_RANGES = st.one_of(st.tuples(BOUNDS, BOUNDS).map("-".join), st.sampled_from(["5-10", "-", "5-", "-10", "1-2-3",
                                                                                  "0.2-0.8", "10-5"]))
KEYS = st.sampled_from(["te", "unet", "dyn", "lbw", "w", "start", "stop", "step", "hr", "hrte", "hrunet", "TE",
                        " unet ", "lbwe", "x", "", "=", "te=te"])


def _named(key_value):
    key, value = key_value
    return f"{key}={value}"


NAMED = st.one_of(
    st.tuples(st.sampled_from(["te", "unet", "hr", "hrte", "hrunet"]), SCHEDULES).map(_named),
    st.tuples(st.just("dyn"), st.one_of(NUMBERS, st.integers(min_value=-5, max_value=10 ** 30).map(str))).map(_named),
    st.tuples(st.sampled_from(["lbw", "w"]), LBW).map(_named),
    st.tuples(st.sampled_from(["start", "stop"]), BOUNDS).map(_named),
    st.tuples(st.just("step"), STEP_RANGES).map(_named),
    st.tuples(KEYS, st.text(max_size=10)).map(_named),
)
POSITIONAL = st.one_of(SCHEDULES, LBW, NUMBERS)


@st.composite
def grammar_tags(draw):
    network = draw(st.sampled_from(["tune", "lora", "lyco", "tune"]))
    parts = [draw(NAMES)] + draw(st.lists(POSITIONAL, max_size=4)) + draw(st.lists(NAMED, max_size=5))
    if draw(st.booleans()):
        parts = draw(st.permutations(parts))
    return f"<{network}:{':'.join(parts)}>"


@settings(max_examples=500, **SETTINGS)
@given(grammar_tags())
@example("<tune:a:-1.7e308@0,1.7e308@1>")  # interpolating between huge weights overflowed to NaN
@example("<tune:a:1:1:" + "9" * 5000 + ">")  # int() refuses 4300+ digits
@example("<tune:a:hr=1e308@0,-1e308@50%>")
def test_tags_built_from_grammar_pieces_parse_or_raise_tag_error(tag):
    _parse_or_tag_error(tag)


@settings(max_examples=200, **SETTINGS)
@given(st.lists(grammar_tags(), min_size=1, max_size=4), st.lists(st.text(max_size=20), min_size=1, max_size=5))
def test_prompts_with_several_tags(tags, filler):
    prompt = "".join(f + t for f, t in zip(filler, tags))
    for network, items, _ in find_tags(prompt, networks=("tune", "lora", "lyco")):
        try:
            req = parse_params(items, network=network)
        except TagError:
            continue
        _check_request(req)
