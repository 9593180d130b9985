"""Caption augmentation: kohya semantics (keep-first-N, shuffle, caption/tag dropout) and seeded determinism."""
import os
import subprocess
import sys

from lib_tune.train.captions import CaptionAugment, augment_caption, derive_rng, split_tags

CAP = "sks, 1girl, red hair, smile, outdoors, tree, blue sky, looking at viewer"
TAGS = split_tags(CAP)


def test_inactive_returns_caption_unchanged():
    raw = "sks,  odd   spacing ,kept"
    assert augment_caption(raw, CaptionAugment(), derive_rng(1)) == raw
    assert not CaptionAugment().active and CaptionAugment(shuffle=True).active


def test_shuffle_keeps_first_tokens_and_all_tags():
    aug = CaptionAugment(shuffle=True, keep_tokens=2)
    orders = set()
    for step in range(50):
        out = split_tags(augment_caption(CAP, aug, derive_rng(7, step)))
        assert out[:2] == TAGS[:2]
        assert sorted(out) == sorted(TAGS)
        orders.add(tuple(out))
    assert len(orders) > 10  # it does shuffle


def test_same_seed_same_caption_different_seed_differs():
    aug = CaptionAugment(shuffle=True, keep_tokens=1, tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    a = [augment_caption(CAP, aug, derive_rng(42, s, 3)) for s in range(30)]
    b = [augment_caption(CAP, aug, derive_rng(42, s, 3)) for s in range(30)]
    c = [augment_caption(CAP, aug, derive_rng(43, s, 3)) for s in range(30)]
    assert a == b
    assert a != c


def test_caption_dropout():
    assert all(augment_caption(CAP, CaptionAugment(caption_dropout_rate=1.0), derive_rng(s)) == "" for s in range(20))
    aug = CaptionAugment(caption_dropout_rate=0.25)
    outs = [augment_caption(CAP, aug, derive_rng(5, s)) for s in range(2000)]
    dropped = sum(o == "" for o in outs)
    assert 400 < dropped < 600
    assert all(o in ("", CAP) for o in outs)  # no shuffle/tag dropout: untouched otherwise


def test_tag_dropout_never_drops_kept_tokens():
    aug = CaptionAugment(tag_dropout_rate=1.0, keep_tokens=1)
    assert augment_caption(CAP, aug, derive_rng(0)) == "sks"
    aug = CaptionAugment(tag_dropout_rate=0.5, keep_tokens=1)
    lens = []
    for s in range(300):
        out = split_tags(augment_caption(CAP, aug, derive_rng(9, s)))
        assert out[0] == "sks"
        assert [t for t in TAGS if t in out] == out  # order kept without shuffle
        lens.append(len(out) - 1)
    mean = sum(lens) / len(lens)
    assert 2.8 < mean < 4.2  # 7 droppable tags at p=0.5


def test_derive_rng_independent_of_hash_seed():
    code = ("from lib_tune.train.captions import derive_rng;"
            "print(derive_rng(123, 'epoch', 4).random())")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = set()
    for hs in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hs, PYTHONPATH=root)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert outs == {str(derive_rng(123, "epoch", 4).random())}
