"""Infotext fields `Tune` / `Tune hashes` (lib_tune.prompt.infotext): format, parse, paste restore."""
import json
import re

import pytest

from lib_tune.prompt import HASHES_FIELD, TUNE_FIELD, InfotextError, TagError, format_adapters, format_hashes, \
    parse_adapters, parse_hashes, parse_tag, restore_prompt
from lib_tune.prompt.infotext import format_pairs, parse_pairs

# modules/infotext_utils.py (webui v1.10.1) L16, L56-70 and the loop at L269: how the webui writes a field
# value into the infotext and reads it back. Copied so the round trip below goes through the webui's own quoting.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def webui_quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def webui_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def webui_fields(line):
    res = {}
    for k, v in RE_PARAM.findall(line):
        if v and v[0] == '"' and v[-1] == '"':
            v = webui_unquote(v)
        res[k] = v
    return res


TAGS = [
    "<tune:name:0.8>",
    "<tune:my lora:0.5:0.25>",
    "<tune:sub/dir/char v2:0@0,1@0.5:lbw=INS:start=5:stop=0.5:hr=1>",
    "<tune:a, b (c):te=0.3:unet=0@0,0.5@50%:dyn=16:hrunet=0.2>",
    '<tune:quote " and \\ back:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1>',
    "<tune:x:0.5:step=0.2-0.8:lbwe=ATTNON>",
]


def test_simple_value():
    assert format_adapters([parse_tag("<tune:name:0.8>")]) == "name: 0.8"
    assert format_adapters([parse_tag("<tune:name:0.8:0.5>")]) == "name: 0.8:0.5"
    assert format_adapters([parse_tag("<tune:name>")]) == "name: 1"  # explicit, not the local default
    assert format_adapters([parse_tag("<tune:s:0@0,1@1>")]) == 's: "0@0,1@1"'
    assert format_adapters([parse_tag("<tune:a, b:1>")]) == '"a, b": 1'


def test_round_trip_through_the_webui_infotext_line():
    requests = [parse_tag(t) for t in TAGS]
    hashes = {r.name: f"{i:012x}" for i, r in enumerate(requests)}
    line = (f"Steps: 20, Sampler: Euler a, {TUNE_FIELD}: {webui_quote(format_adapters(requests))}, "
            f"{HASHES_FIELD}: {webui_quote(format_hashes(hashes))}, Version: v1.10.1")
    fields = webui_fields(line)
    assert fields["Steps"] == "20" and fields["Version"] == "v1.10.1"
    back = parse_adapters(fields[TUNE_FIELD])
    assert [r.to_tag() for r in back] == [r.to_tag() for r in requests]
    for a, b in zip(back, requests):
        assert (a.name, a.te, a.unet, a.hr_te, a.hr_unet, a.dyn, a.lbw, a.start, a.stop, a.extra) == \
               (b.name, b.te, b.unet, b.hr_te, b.hr_unet, b.dyn, b.lbw, b.start, b.stop, b.extra)
    assert parse_hashes(fields[HASHES_FIELD]) == hashes


@pytest.mark.parametrize("pairs", [
    [],
    [("a", "1")],
    [("with space", "0.5:0.5"), ("x", "1")],
    [("comma, name", "1"), ("colon: name", "2"), ('quote "q"', "3"), ("back\\slash", "4")],
    [(" padded ", " v "), ("", "")],
    [("ünïcödé 名前", "0@0,1@1")],
])
def test_pairs_round_trip(pairs):
    assert parse_pairs(format_pairs(pairs)) == pairs


def test_parse_builtin_style_hashes_and_tolerance():
    assert parse_hashes("a: 0123456789ab, b c: ba9876543210") == {"a": "0123456789ab", "b c": "ba9876543210"}
    assert parse_hashes("  a:1 ,b:2,  ") == {"a": "1", "b": "2"}
    assert parse_hashes("") == {}
    assert parse_pairs("s: 0@0, 1@0.5 ,t: 1") == [("s", "0@0, 1@0.5"), ("t", "1")]
    assert parse_pairs('s: 0@0,"q": 1') == [("s", "0@0"), ("q", "1")]


@pytest.mark.parametrize("text,fragment", [
    ("a 1", "expected ':'"),
    ('"unterminated: 1', "bad quoted text"),
    ('"a" 1', "expected ':'"),
    ('a: "v" x', "expected ','"),
])
def test_malformed_pairs(text, fragment):
    with pytest.raises(InfotextError, match=re.escape(fragment)):
        parse_pairs(text)


def test_parse_adapters_strict_and_lenient():
    text = 'good: 0.5, bad: abc, "../evil": 1, also: 0@0,1@1'  # a bare (hand-written) schedule is tolerated
    with pytest.raises(TagError, match="weight 'abc' is not a number"):
        parse_adapters(text)
    errors = []
    got = parse_adapters(text, errors=errors)
    assert [(r.name, r.te.to_text()) for r in got] == [("good", "0.5"), ("also", "0@0,1@1")]
    assert len(errors) == 2 and "'..' is not allowed" in errors[1]


def test_restore_appends_missing_tags_only():
    tune = format_adapters([parse_tag("<tune:a:0.5>"), parse_tag("<tune:b c:0@0,1@1:lbw=INS>")])
    assert restore_prompt("a cat <tune:a:0.7>", tune) == "a cat <tune:a:0.7> <tune:b c:0@0,1@1:lbw=INS>"
    assert restore_prompt("", tune) == "<tune:a:0.5> <tune:b c:0@0,1@1:lbw=INS>"
    full = "x <tune:a:0.5> <tune: b c :1>"
    assert restore_prompt(full, tune) == full
    assert restore_prompt("x", None) == "x"


def test_restore_renames_by_hash_like_the_builtin():
    local = {"0123456789ab": "renamed/a2"}
    tune = format_adapters([parse_tag("<tune:a:0.5>"), parse_tag("<tune:gone:1>")])
    hashes = format_hashes({"a": "0123456789ab", "gone": "ffffffffffff"})
    out = restore_prompt("cat <tune:a:0.5:lbw=INS> <lora:a:1>", tune, hashes, local.get)
    assert out == "cat <tune:renamed/a2:0.5:lbw=INS> <lora:a:1> <tune:gone:1>"
    # a missing adapter with a known hash is appended under its local name
    assert restore_prompt("cat", tune, hashes, local.get) == "cat <tune:renamed/a2:0.5> <tune:gone:1>"


def test_restore_other_networks_and_bad_entries():
    errors = []
    out = restore_prompt("p <lyco:a:1>", "a: 0.5, b: zz", networks=("tune", "lyco"), errors=errors)
    assert out == "p <lyco:a:1>"
    assert errors == ["<tune:b:zz>: weight 'zz' is not a number"]
