"""The <tune:...> tag grammar (lib_tune.prompt.tags): good tags, bad tags with their messages, several tags."""
import re

import pytest

from lib_tune.prompt import TagError, find_tags, parse_params, parse_tag
from lib_tune.prompt.blocks import PRESETS

# modules/extra_networks.py (webui v1.10.1): re_extra_net and ExtraNetworkParams' split, copied so that these
# unit tests feed parse_params exactly what the webui hands an extra network, without importing the webui.
RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


def webui_params(prompt):
    """network name -> list of (items, named) as modules.extra_networks.parse_prompt builds them."""
    res = {}
    for m in RE_EXTRA_NET.finditer(prompt):
        items = m.group(2).split(":")
        named = {}
        for item in items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
        res.setdefault(m.group(1), []).append((items, named))
    return res


def parse(tag, **kw):
    ((items, named),) = webui_params(tag)["tune"]
    return parse_params(items, named, **kw)


def summary(r):
    return dict(name=r.name, te=r.te.to_text(), unet=r.unet.to_text(), hrte=r.hr_te.to_text(),
                hrunet=r.hr_unet.to_text(), dyn=r.dyn, lbw=None if r.lbw is None else r.lbw.to_text(),
                start=None if r.start is None else r.start.to_text(),
                stop=None if r.stop is None else r.stop.to_text())


V17 = ",".join(str(i) for i in range(17))
V12 = " ".join(str(i) for i in range(12))
V26 = ",".join(["1"] * 13 + ["0"] * 13)

GOOD = [
    # tag, expected fields (others: defaults)
    ("<tune:name>", {}),
    ("<tune:name:0.8>", dict(te="0.8", unet="0.8", hrte="0.8", hrunet="0.8")),
    ("<tune:name:0.8:0.5>", dict(te="0.8", unet="0.5", hrte="0.8", hrunet="0.5")),
    ("<tune:name:-1>", dict(te="-1", unet="-1", hrte="-1", hrunet="-1")),
    ("<tune:name:.5>", dict(te="0.5", unet="0.5", hrte="0.5", hrunet="0.5")),
    ("<tune:name:te=0.3:unet=0.6>", dict(te="0.3", unet="0.6", hrte="0.3", hrunet="0.6")),
    ("<tune:name:0.8:te=0.2>", dict(te="0.2", unet="0.2", hrte="0.2", hrunet="0.2")),  # named wins, unet follows
    ("<tune:name:unet=0.4>", dict(unet="0.4", hrunet="0.4")),
    ("<tune:name:1:0.5:16>", dict(unet="0.5", hrunet="0.5", dyn=16)),
    ("<tune:name:dyn=8>", dict(dyn=8)),
    ("<tune:name::0.5>", dict(unet="0.5", hrunet="0.5")),  # empty te slot = default
    ("<tune:name:0@0,1@0.5>", dict(te="0@0,1@0.5", unet="0@0,1@0.5", hrte="0@0,1@0.5", hrunet="0@0,1@0.5")),
    ("<tune:name:0~0;1~0.5>", dict(te="0@0,1@0.5", unet="0@0,1@0.5", hrte="0@0,1@0.5", hrunet="0@0,1@0.5")),
    ("<tune:name:1:0@5,1@6>", dict(unet="0@5,1@6", hrunet="0@5,1@6")),
    ("<tune:name:te=1:unet=0@0,1@1>", dict(unet="0@0,1@1", hrunet="0@0,1@1")),
    ("<tune:name:0.5:hr=1.0>", dict(te="0.5", unet="0.5")),
    ("<tune:name:hr=0.6:hrte=0.5>", dict(hrte="0.5", hrunet="0.6")),
    ("<tune:name:unet=0.5@0,1@1:hrte=0.5>", dict(unet="0.5@0,1@1", hrunet="0.5@0,1@1", hrte="0.5")),
    ("<tune:name:0@0,1@1:hr=1@0,0@1>", dict(te="0@0,1@1", unet="0@0,1@1", hrte="1@0,0@1", hrunet="1@0,0@1")),
    ("<tune:name:start=5>", dict(start="5")),
    ("<tune:name:stop=0.5>", dict(stop="0.5")),
    ("<tune:name:stop=1.0>", dict(stop="1.0")),
    ("<tune:name:stop=50%>", dict(stop="50%")),
    ("<tune:name:start=2:stop=0.5>", dict(start="2", stop="0.5")),
    ("<tune:name:step=5-10>", dict(start="5", stop="10")),
    ("<tune:name:step=-10>", dict(stop="10")),
    ("<tune:name:step=0.2-0.8>", dict(start="0.2", stop="0.8")),
    ("<tune:name:lbw=INS>", dict(lbw="INS")),
    ("<tune:name:lbw=ins>", dict(lbw="INS")),  # case-insensitive preset lookup
    ("<tune:name:lbw=ALL0.5>", dict(lbw="ALL0.5")),
    ("<tune:name:lbw=IN02>", dict(lbw="IN02")),
    ("<tune:name:w=OUTD>", dict(lbw="OUTD")),
    (f"<tune:name:lbw={V17}>", dict(lbw=V17)),
    (f"<tune:name:0.7:lbw={V12}>", dict(te="0.7", unet="0.7", hrte="0.7", hrunet="0.7", lbw=V12.replace(" ", ","))),
    (f"<tune:name:lbw={V26}>", dict(lbw=V26)),
    (f"<tune:name:1:{V17}>", dict(lbw=V17)),  # LBW's old positional form: vector in the unet slot
    ("<tune:name:0.6:MIDD>", dict(te="0.6", unet="0.6", hrte="0.6", hrunet="0.6", lbw="MIDD")),
    ("<tune:my lora:0.5>", dict(name="my lora", te="0.5", unet="0.5", hrte="0.5", hrunet="0.5")),
    ("<tune:sub/dir/name>", dict(name="sub/dir/name")),
    ("<tune:sub\\dir\\name v2.1>", dict(name="sub\\dir\\name v2.1")),
    ("<tune: spaced name :0.5>", dict(name="spaced name", te="0.5", unet="0.5", hrte="0.5", hrunet="0.5")),
    ("<tune:a, b (c)>", dict(name="a, b (c)")),
    ("<tune:x..y/.hidden>", dict(name="x..y/.hidden")),
    ("<tune:name:TE=0.5: unet = 0.25 >", dict(te="0.5", unet="0.25", hrte="0.5", hrunet="0.25")),
]
DEFAULTS = dict(te="1", unet="1", hrte="1", hrunet="1", dyn=None, lbw=None, start=None, stop=None)


@pytest.mark.parametrize("tag,expected", GOOD, ids=[t for t, _ in GOOD])
def test_good_tags(tag, expected):
    r = parse(tag)
    want = {**DEFAULTS, "name": "name", **expected}
    assert summary(r) == want
    assert r.raw == tag[len("<tune:"):-1]
    assert r.network == "tune"


@pytest.mark.parametrize("tag", [t for t, _ in GOOD])
def test_canonical_tag_round_trips(tag):
    """to_tag() writes explicit, canonical arguments that parse back to the same request."""
    r = parse(tag)
    again = parse_tag(r.to_tag())
    assert again.to_tag() == r.to_tag()
    assert summary(again) == summary(r)
    for step in (0, 3, 9, 19):
        for hires in (False, True):
            assert again.weights_at(step, 20, hires) == r.weights_at(step, 20, hires)


BAD = [
    # tag, fragment of the message
    ("<tune:name:abc>", "weight 'abc' is not a number"),
    ("<tune:name:te=abc>", "te weight 'abc' is not a number"),
    ("<tune:name:unet=1x>", "unet weight '1x' is not a number"),
    ("<tune:name:1:zzz>", "unet weight 'zzz' is not a number, a schedule or a block-weight preset"),
    ("<tune:name:1:1,2>", "neither a number nor block weights"),
    ("<tune:name:nan>", "weight 'nan' is not a number"),
    ("<tune:name:inf>", "weight 'inf' is not a number"),
    ("<tune:name:1_0>", "weight '1_0' is not a number"),
    ("<tune:name:te=>", "te= has no value"),
    ("<tune:name:0@0,1>", "keyframe '1' is not weight@position"),
    ("<tune:name:0@x>", "keyframe position 'x' is not a number"),
    ("<tune:name:a@0,1@1>", "keyframe weight 'a' is not a number"),
    ("<tune:name:0@-1,1@1>", "is negative"),
    ("<tune:name:1@2@3>", "keyframe '1@2@3' is not weight@position"),
    ("<tune:name:hr=x>", "hr weight 'x' is not a number"),
    ("<tune:name:hrunet=0@0,y@1>", "keyframe weight 'y'"),
    ("<tune:name:dyn=0>", "dyn '0' is not a positive whole number"),
    ("<tune:name:dyn=1.5>", "dyn '1.5' is not a positive whole number"),
    ("<tune:name:1:1:x>", "dyn 'x' is not a positive whole number"),
    ("<tune:name:1:1:1:1>", "too many arguments"),
    ("<tune:name:lbw=1,0>", "lbw has 2 values"),
    ("<tune:name:lbw=FOO>", "lbw preset 'FOO' is unknown"),
    ("<tune:name:lbw=" + ",".join(["R"] * 17) + ">", "(R, U, X) are not supported"),
    ("<tune:name:lbw=" + ",".join(["1"] * 16 + ["a"]) + ">", "lbw value 'a' is not a number"),
    ("<tune:name:lbw=" + ",".join(["1"] * 61) + ">", "FLUX"),
    ("<tune:name:start=abc>", "start 'abc' is not a number"),
    ("<tune:name:stop=-2>", "stop"),
    ("<tune:name:start=10:stop=5>", "start 10 is not before stop 5"),
    ("<tune:name:start=0.5:stop=0.2>", "is not before stop"),
    ("<tune:name:step=5>", "step '5' is not a range"),
    ("<tune:name:step=1-2:start=1>", "either step=a-b or start=/stop="),
    ("<tune:../x>", "'..' is not allowed"),
    ("<tune:sub/../../x>", "'..' is not allowed"),
    ("<tune:..\\x>", "'..' is not allowed"),
    ("<tune:/etc/passwd>", "absolute path"),
    ("<tune:\\\\server\\share\\x>", "absolute path"),
    ("<tune: >", "no adapter name"),
    ("<tune:te=1>", "no adapter name"),
]


@pytest.mark.parametrize("tag,fragment", BAD, ids=[t[:40] for t, _ in BAD])
def test_bad_tags(tag, fragment):
    with pytest.raises(TagError) as info:
        parse(tag)
    msg = str(info.value)
    assert fragment in msg
    assert msg.startswith(tag + ": ")  # the message quotes the tag
    assert isinstance(info.value, ValueError)


def test_abc_weight_message_exactly():
    with pytest.raises(TagError, match=r"^<tune:name:abc>: weight 'abc' is not a number$"):
        parse_params(["name", "abc"])


def test_default_weight_is_configurable():
    r = parse("<tune:name>", default_weight=0.7)
    assert (r.te.value, r.unet.value, r.hr_te.value, r.hr_unet.value) == (0.7, 0.7, 0.7, 0.7)
    assert parse("<tune:name:0.2>", default_weight=0.7).te.value == 0.2
    assert parse_tag(r.to_tag()).te.value == 0.7  # canonical tags do not depend on the default


def test_items_need_not_be_strings_and_named_overrides():
    """The built-in's sd_lora path appends ExtraNetworkParams(items=[name, float]); API overrides come as a dict."""
    assert parse_params(["name", 0.8]).te.value == 0.8
    r = parse_params(["name", "0.5"], {"unet": "0.1"})
    assert (r.te.value, r.unet.value) == (0.5, 0.1)


def test_unknown_named_arguments_are_kept_not_fatal():
    r = parse("<tune:name:0.5:lbwe=ATTNON:foo=bar>")
    assert r.extra == {"lbwe": "ATTNON", "foo": "bar"}
    assert r.to_tag() == "<tune:name:0.5:lbwe=ATTNON:foo=bar>"


def test_named_lbw_wins_over_positional_vector():
    r = parse(f"<tune:name:1:{V17}:lbw=OUTS>")
    assert r.lbw_preset == "OUTS"
    assert r.lbw.values == PRESETS["OUTS"]


def test_user_presets():
    mine = {"MINE": [0.5] * 12, "ALL": [0.0] * 17}
    r = parse("<tune:name:lbw=MINE>", presets=mine)
    assert r.lbw.values == (0.5,) * 12 and r.lbw_preset == "MINE"
    assert r.lbw.to_text() == ",".join(["0.5"] * 12)  # user presets are written out as numbers
    assert parse("<tune:name:lbw=ALL>", presets=mine).lbw.values == (0.0,) * 17  # user presets win
    with pytest.raises(TagError):
        parse("<tune:name:lbw=MINE>")


def test_weights_at_with_start_stop_and_hires():
    r = parse("<tune:name:0.8:start=5:stop=0.5:hr=0.3>")
    got = [r.weights_at(s, 20) for s in range(20)]
    assert got[4] == (0.0, 0.0) and got[5] == (0.8, 0.8) and got[9] == (0.8, 0.8) and got[10] == (0.0, 0.0)
    assert r.weights_at(0, 10, hires=True) == (0.3, 0.3)  # start/stop gate only the first pass
    assert not r.is_static
    assert parse("<tune:name:0.8:0.4:hr=1>").is_static
    assert not parse("<tune:name:0@0,1@1>").is_static


def test_schedule_weights_te_unet_separately():
    r = parse("<tune:name:te=1:unet=0@0,1@1>")
    assert r.weights_at(0, 11) == (1.0, 0.0)
    assert r.weights_at(5, 11) == (1.0, 0.5)
    assert r.weights_at(10, 11) == (1.0, 1.0)


def test_several_tags_in_one_prompt():
    prompt = ("a cat <tune:style one:0.5>, <lora:builtin:1> <tune:sub/char:0@0,1@0.5:lbw=INS> "
              "<tune:../bad> <tune:detail:abc> <tune:plain>")
    parsed = webui_params(prompt)
    assert [items[0] for items, _ in parsed["tune"]] == ["style one", "sub/char", "../bad", "detail", "plain"]
    ok, errors = [], []
    for items, named in parsed["tune"]:
        try:
            ok.append(parse_params(items, named))
        except TagError as e:
            errors.append(str(e))
    assert [r.name for r in ok] == ["style one", "sub/char", "plain"]
    assert ok[1].lbw_preset == "INS" and ok[1].te.to_text() == "0@0,1@0.5"
    assert errors == ["<tune:../bad>: name '../bad' leaves the adapter folders ('..' is not allowed)",
                      "<tune:detail:abc>: weight 'abc' is not a number"]
    found = find_tags(prompt, ("tune", "lora"))
    assert [(n, items[0]) for n, items, _ in found][:2] == [("tune", "style one"), ("lora", "builtin")]
    start, end = found[0][2]
    assert prompt[start:end] == "<tune:style one:0.5>"


def test_lora_and_lyco_networks_share_the_grammar():
    r = parse_tag("<lora:name:0.5:lbw=OUTALL>")
    assert r.network == "lora" and r.to_tag() == "<lora:name:0.5:lbw=OUTALL>"
    assert parse_tag("<lyco:name:1:0.5>").unet.value == 0.5
    with pytest.raises(TagError, match=r"^<lyco:name:x>: "):
        parse_tag("<lyco:name:x>")


def test_requests_compare_by_meaning_and_hash():
    a, b = parse_tag("<tune:a:1>"), parse_tag("<tune:a:1.0:te=1>")
    assert a == b and hash(a) == hash(b) and a.raw != b.raw
    assert a != parse_tag("<tune:a:1:hr=0.5>")
    assert len({a, b, parse_tag("<tune:a:0.5>"), parse_tag("<tune:a:1:lbwe=X>")}) == 3


def test_parse_tag_rejects_non_tags():
    with pytest.raises(TagError, match="is not a tag"):
        parse_tag("tune:name:1")
