"""Property tests of the job config parser (TrainConfig.from_dict): no JSON-able body raises anything but ConfigError.

Bodies are arbitrary JSON objects, and mutations of a valid config (fields set to JSON values of every type, to
edge numbers, to hostile names and paths, required fields dropped, stages of any shape). What is accepted must be
safe to use: output_name a plain, portable file name, folders without NUL bytes or '..' components, and the
config re-parses from its own to_dict. Seeded (derandomize) so CI sees the same examples every run.
"""
from __future__ import annotations

import json
import math
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lib_tune.train.config import PATH_FIELDS, TEXT_FIELDS, ConfigError, TrainConfig  # noqa: E402
from lib_tune.train.config_checks import WINDOWS_RESERVED  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
FIELDS = tuple(f for f in TrainConfig.__dataclass_fields__)
BASE = dict(dataset="/data/me", method="lora", steps=1000, output_name="me", trigger="ohwx")

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from([0, 1, -1, 2 ** 63, 10 ** 400, 0.0, -0.0, 1e308, 5e-324, float("nan"), float("inf"), "", " ",
                     "lora", "ti", "attn", "adamw", "cosine", "fp16", "class_images", "true", "1e3"]))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)

BAD_NAMES = ["..", ".", "../x", "a/b", "a\\b", "/abs", "C:\\x", "C:x", "x\x00y", "CON", "con", "Con.safetensors",
             "NUL.txt", "aux", "COM1", "com9.x", "LPT1", "lpt9", "PRN ", "CON .txt", "a" * 201, "\u00e9" * 101,
             "tab\tname", "new\nline", "star*", "q?", "<x>", "a|b", '"q"', "x\x7f", " ", ""]
GOOD_NAMES = ["me", "my lora v2", "COM10", "CONSOLE", "con-artist", "LPT", "nul1", "a.b.c", "..x", "x..", "\u00e9t\u00e9",
              "\U0001F600", "-dash", "[style]", "#1", "100%"]
PATHS = ["/data/me", "data/me", "/", ".", "./x", "/a/../b", "../b", "a/..", "a\\..\\b", "/x\x00y", "", " ", "~/x",
         "C:\\data", "\\\\server\\share", "/data/ .. /x", "/data/..x", "/data/x..", "\U0001F600"]


def _check(body) -> None:
    try:
        cfg = TrainConfig.from_dict(body)
    except ConfigError as e:
        assert isinstance(e.field, str) and str(e)
        unknown = [k for k in body if k not in FIELDS] if isinstance(body, dict) else []
        assert e.field in FIELDS or e.field == "body" or e.field.startswith("stages[") or e.field in unknown, e.field
        return
    _accepted(cfg)


def _accepted(cfg: TrainConfig) -> None:
    name = cfg.output_name
    assert name.strip() and not re.search(r"[\\/\x00]", name) and name.strip() not in (".", "..")
    assert name.split(".")[0].rstrip(" ").upper() not in WINDOWS_RESERVED
    for f in PATH_FIELDS:
        value = getattr(cfg, f)
        if value is not None:
            assert isinstance(value, str) and "\0" not in value
            assert ".." not in [p.strip() for p in re.split(r"[\\/]", value)]
    for f in TEXT_FIELDS:
        assert isinstance(getattr(cfg, f), str) and "\0" not in getattr(cfg, f)
    for f in ("unet_lr", "te_lr", "emb_lr", "network_alpha", "warmup_ratio", "noise_offset"):
        assert math.isfinite(getattr(cfg, f)), f
    cfg.validate()
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# ---- arbitrary JSON objects ----------------------------------------------------------------------------------------
@settings(max_examples=600, **SETTINGS)
@given(st.one_of(JSON, st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=8)))
@example(["lora"])
@example({"steps": 10 ** 5000})
@example({"stages": [[[[[[[[[[[[[1]]]]]]]]]]]]]})
def test_any_json_body_is_a_config_or_a_config_error(body):
    _check(body)


# ---- mutations of a valid config -----------------------------------------------------------------------------------
def _value_for(field: str):
    specific = {
        "output_name": st.sampled_from(BAD_NAMES + GOOD_NAMES) | st.text(max_size=30),
        "trigger": st.sampled_from(BAD_NAMES + GOOD_NAMES + ["ohwx"]) | st.text(max_size=10),
        "method": st.sampled_from(["lora", "locon", "loha", "lokr", "dora", "ti", "pivotal", "dreambooth", "LoRA",
                                   "lycoris"]),
        "preset": st.sampled_from(["character", "style", "object", "ti", "pivotal", "anime", None]),
        "steps": st.one_of(st.integers(min_value=-3, max_value=20_000_000), st.sampled_from([0, 1, 10 ** 30])),
        "stages": st.one_of(JSON, st.lists(st.fixed_dictionaries(
            {"targets": st.sampled_from(["attn", "full", "te", "mid_proj", "nope", ["lora_unet_*"], [], [""], 5]),
             "steps": st.integers(min_value=-1, max_value=600) | JSON},
            optional={"name": st.sampled_from(["s1", "", "a\x00b", None, 3]) | st.text(max_size=8),
                      "network_dim": st.integers(min_value=-1, max_value=2000) | JSON,
                      "network_alpha": JSON_SCALARS, "unet_lr": JSON_SCALARS, "te_lr": JSON_SCALARS}),
            max_size=3)),
    }
    if field in specific:
        return specific[field]
    if field in PATH_FIELDS:
        return st.sampled_from(PATHS) | st.text(max_size=20) | st.none()
    return JSON_SCALARS | JSON


@st.composite
def mutated(draw):
    body = dict(BASE)
    if draw(st.booleans()):
        body.update(draw(st.sampled_from([{}, {"method": "ti", "output_name": "ohwx"}, {"method": "pivotal"},
                                          {"preset": "style"}, {"method": "dreambooth"},
                                          {"method": "locon", "conv_dim": 4},
                                          {"validation_count": 2, "validation_every": 10}])))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            body.pop(field, None)
        else:
            body[field] = draw(_value_for(field))
    return body


@settings(max_examples=800, **SETTINGS)
@given(mutated())
@example(dict(BASE, unet_lr=10 ** 400))  # float() of a huge JSON integer overflowed
@example(dict(BASE, output_name="CON.safetensors"))
@example(dict(BASE, output_dir="/models/../etc"))
@example(dict(BASE, dataset="/data/x\x00y"))
@example(dict(BASE, class_prompt=None, default_caption=None))
@example(dict(BASE, default_caption=["not", "text"]))
def test_mutations_of_a_valid_config_are_a_config_or_a_config_error(body):
    _check(body)


@settings(max_examples=300, **SETTINGS)
@given(st.sampled_from(BAD_NAMES), st.sampled_from(["output_name"]))
def test_hostile_output_names_are_refused_naming_the_field(name, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(dict(BASE, **{field: name}))
    assert e.value.field == field


@settings(max_examples=200, **SETTINGS)
@given(st.sampled_from(GOOD_NAMES))
def test_ordinary_odd_names_are_accepted(name):
    cfg = TrainConfig.from_dict(dict(BASE, output_name=name))
    assert cfg.output_name == name


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("value,ok", [("/data/x", True), ("relative/x", True), ("/data/../x", False),
                                      ("..", False), ("x\x00", False), ("C:\\a\\..\\b", False), ("/a/..b", True)])
def test_folders_absolute_or_relative_but_no_nul_or_dotdot(field, value, ok):
    body = dict(BASE, **{field: value})
    if field == "class_dir":
        body["prior"] = "class_images"
    if ok:
        assert getattr(TrainConfig.from_dict(body), field) == value
    else:
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict(body)
        assert e.value.field == field
