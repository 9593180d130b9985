"""Text-encoder outputs cached across steps: only when nothing on the text side trains and captions are fixed, with
losses bit-identical to encoding every step."""
import pytest
import torch

from lib_tune.train.text_cache import TextCache
from tests.unit.test_train_loop import make


def test_cache_hits_evicts_and_passes_through():
    calls = []

    def encode(captions, size_cond):
        calls.append(tuple(captions))
        return {"crossattn": torch.full((len(captions), 4, 8), float(len(calls))), "vector": torch.zeros(1, 2)}

    cache = TextCache(encode, enabled=True, max_bytes=2 * (4 * 8 + 2) * 4)
    a = cache(["a"], None)
    assert cache(["a"], None) is a and calls == [("a",)] and (cache.hits, cache.misses) == (1, 1)
    cache(["b"], [(64, 64, 0, 0, 64, 64)])
    cache(["b"], [(64, 64, 0, 0, 32, 32)])  # another size conditioning: another entry; "a" is evicted
    assert len(calls) == 3 and len(cache.entries) == 2
    cache(["a"], None)
    assert len(calls) == 4
    off = TextCache(encode, enabled=False)
    off(["a"], None), off(["a"], None)
    assert len(calls) == 6 and not off.entries


def _count_encodes(trainer):
    n = [0]
    original = trainer.model.encode_text

    def counting(*a, **k):
        n[0] += 1
        return original(*a, **k)
    trainer.model.encode_text = counting
    return n


@pytest.mark.parametrize("cached", [True, False])
def test_training_with_the_cache_equals_training_without(tmp_path, cached):
    _, ref = make(tmp_path / "ref", steps=8, cache_text_outputs=False)
    n_ref = _count_encodes(ref)
    want = ref.run().losses
    _, tr = make(tmp_path / "run", steps=8, cache_text_outputs=cached)
    n = _count_encodes(tr)
    got = tr.run().losses
    assert got == want  # bit-identical, not just close
    assert n_ref[0] == 8
    if cached:
        assert tr.text.enabled and n[0] < 8 and tr.text.hits == 8 - n[0]
    else:
        assert n[0] == 8


@pytest.mark.parametrize("over", [dict(train_text_encoder=True, te_lr=1e-3), dict(shuffle_caption=True),
                                  dict(caption_dropout=0.5)])
def test_no_cache_when_text_trains_or_captions_change(tmp_path, over):
    _, tr = make(tmp_path, steps=3, **over)
    assert not tr.text.enabled
