"""Every reader of lib_tune.formats against the hostile corpus (tests/fixtures/hostile.py).

The rule: each reader answers each item with a clean load or an AdapterFormatError naming the file: never another
exception, a hang, a run pickle payload, a file written or a large allocation. The corpus is written once per
test session, the bad files next to the good ones, and every test is parametrized by category.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import resource
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch

from lib_tune.formats import AdapterFormatError, load_adapter, load_embedding
from lib_tune.formats.container import read_container, read_header, read_safetensors
from lib_tune.formats.safe_torch import safe_load
from tests.fixtures import hostile

READERS = {"load_adapter": load_adapter, "load_embedding": load_embedding, "read_container": read_container,
           "read_header": read_header, "read_safetensors": read_safetensors, "safe_load": safe_load}
CATEGORIES = hostile.ADAPTER_CATEGORIES + (hostile.FS_CATEGORY,)
HANG_S = 20


class _Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no reader's `except Exception` can turn a hang into a refusal."""


@contextlib.contextmanager
def _deadline(seconds: int):
    def on_alarm(signum, frame):
        raise _Hang()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _outcome(reader, path: Path):
    """("ok", result) | ("refused", message) | ("hang", "") | ("raw", "Type: message")."""
    try:
        with _deadline(HANG_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", reader(str(path))
    except AdapterFormatError as e:
        return "refused", str(e)
    except _Hang:
        return "hang", ""
    except BaseException as e:  # noqa: B036 - anything else breaks the rule, and is reported, not raised
        return "raw", f"{type(e).__name__}: {str(e)[:300]}"


def _listing(folder: Path):
    """Every entry under folder (links not followed) with its size and mtime."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Lora")
    items = hostile.write_bad_adapters(folder) + hostile.write_fs_oddities(folder)
    good = hostile.write_good_adapters(folder)
    yield folder, items, good
    for item in items:  # let the temporary folder be removed by a non-root user too
        if item.path.is_file() and not item.path.is_symlink():
            os.chmod(item.path, 0o644)


def _by_category(items, category):
    return [i for i in items if i.category == category]


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_reader_answers_every_item(corpus, category, record_property):
    folder, items, good = corpus
    chosen = _by_category(items, category)
    assert chosen
    before = _listing(folder)
    failures, counts = [], collections.Counter()
    for item in chosen:
        for rname, reader in READERS.items():
            kind, detail = _outcome(reader, item.path)
            counts[kind] += 1
            if kind in ("raw", "hang"):
                failures.append(f"{rname}({item.id}) [{item.description}]: {kind} {detail}")
            elif kind == "refused" and item.path.name not in detail:
                failures.append(f"{rname}({item.id}): the message does not name the file: {detail}")
    record_property("items", len(chosen))
    record_property("outcomes", dict(counts))
    print(f"{category}: {len(chosen)} items x {len(READERS)} readers: {dict(counts)}")
    assert not failures, f"{len(failures)} broken answers:\n" + "\n".join(failures[:40])
    assert not hostile.marker_path(folder).exists(), "a pickle payload ran"
    assert _listing(folder) == before, "a reader wrote, removed or touched a file"


@pytest.mark.parametrize("category", CATEGORIES)
def test_good_files_next_to_the_bad_still_load(corpus, category):
    folder, items, good = corpus
    for item in _by_category(items, category):  # the bad files are read first, in the same process
        for reader in READERS.values():
            _outcome(reader, item.path)
    for path in good:
        af = load_adapter(str(path))
        assert af.modules and not af.unplaced, path.name
        assert af.architecture == "sd1", path.name
        assert all(bool(torch.isfinite(t).all()) for m in af.modules.values() for t in m.parameters())


def test_container_damage_to_safetensors_is_refused_by_the_header_check(corpus):
    """Every damaged safetensors container fails read_header already, and so every reader, before safetensors is
    called; the message says what is wrong."""
    _, items, _ = corpus
    damaged = [i for i in _by_category(items, "container") if i.path.suffix == ".safetensors"]
    assert len(damaged) >= 60
    for item in damaged:
        kind, detail = _outcome(read_header, item.path)
        assert kind == "refused", (item.id, item.description, kind, detail)
        for reader in (load_adapter, load_embedding, read_safetensors):
            assert _outcome(reader, item.path)[0] == "refused", (item.id, reader.__name__)


def test_damaged_pickled_containers_are_refused(corpus):
    _, items, _ = corpus
    for item in _by_category(items, "container"):
        if item.path.suffix in (".pt", ".ckpt") and "deflate" not in item.description:
            kind, detail = _outcome(safe_load, item.path)
            assert kind == "refused", (item.id, item.description, kind, detail)


def test_lying_storage_sizes_are_refused_before_torch_reads_them(corpus):
    """torch 2.1 builds a storage of whatever size the pickle claims over a record of any size."""
    _, items, _ = corpus
    lying = [i for i in items if "-storage-claim" in i.path.name]
    assert len(lying) == 3
    for item in lying:
        kind, detail = _outcome(safe_load, item.path)
        assert kind == "refused" and "claim" in detail, (item.id, detail)


@pytest.mark.parametrize("name", ["c-nan-up", "c-inf-down", "c-neginf-down", "c-nan-alpha", "c-inf-alpha",
                                  "c-nan-fp16", "c-nan-second-module", "c-bundle-nan"])
def test_nan_and_inf_weights_are_refused_naming_the_key(corpus, name):
    folder, _, _ = corpus
    path = folder / f"{name}.safetensors"
    with pytest.raises(AdapterFormatError, match=r"NaN or infinite") as e:
        load_adapter(str(path))
    assert path.name in str(e.value)
    assert "lora_" in str(e.value) or "bundle" in str(e.value) or "alpha" in str(e.value)


def test_nan_embedding_is_refused(corpus):
    folder, _, _ = corpus
    with pytest.raises(AdapterFormatError, match="NaN or infinite"):
        load_embedding(str(folder / "ti-nan.safetensors"))


@pytest.mark.parametrize("name,why", [
    ("c-rank-zero", "empty tensor"), ("c-int-weights", "floating-point"), ("c-bool-weights", "floating-point"),
    ("c-zero-dim", "at least 2-D"), ("c-rank-mismatch", "do not chain"), ("c-up-only", "no network type"),
    ("c-unknown-keys", "unknown key layout"), ("c-no-tensors", "no tensors"),
])
def test_content_damage_is_refused_with_the_reason(corpus, name, why):
    folder, _, _ = corpus
    with pytest.raises(AdapterFormatError, match=why):
        load_adapter(str(folder / f"{name}.safetensors"))


@pytest.mark.parametrize("name,note", [
    ("c-alpha-vector", "alpha must be one number"), ("c-half-pair-next-to-good", "no network type"),
    ("c-int-alpha", None), ("c-float8", None), ("c-bf16", None), ("c-sdxl-width-for-sd1", None),
])
def test_odd_content_loads_with_notes(corpus, name, note):
    folder, _, _ = corpus
    af = load_adapter(str(folder / f"{name}.safetensors"))
    assert af.modules
    if note:
        assert any(note in n for n in af.notes), af.notes
    for m in af.modules.values():
        assert all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in m.parameters())
    if name == "c-sdxl-width-for-sd1":
        assert af.architecture == "sdxl"


def test_pickle_payloads_never_run(corpus):
    folder, items, _ = corpus
    payloads = [i for i in _by_category(items, "pickle") if i.path.name.startswith(("p-raw-", "p-zip-", "p-legacy-o"))]
    assert len(payloads) >= 8
    for item in payloads:
        for reader in READERS.values():
            assert _outcome(reader, item.path)[0] == "refused", (item.id, reader.__name__)
    assert not hostile.marker_path(folder).exists()


def test_legacy_torch_pickles_still_load(corpus):
    folder, _, _ = corpus
    assert load_adapter(str(folder / "p-legacy-lora.pt")).modules
    assert load_embedding(str(folder / "p-legacy-ti.pt")).n_vectors == 2


def test_odd_names_load(corpus):
    """Unicode, punctuation and long names are just names; the mode-000 file reads for root only."""
    _, items, _ = corpus
    named = [i for i in _by_category(items, hostile.FS_CATEGORY) if i.description.startswith("a valid LoRA named")]
    assert len(named) >= 15
    for item in named:
        kind, detail = _outcome(load_adapter, item.path)
        assert kind == "ok" and detail.modules, (item.id, detail)
    mode000 = next(i for i in items if i.path.name == "mode000.safetensors")
    kind, _ = _outcome(load_adapter, mode000.path)
    assert kind == ("ok" if os.geteuid() == 0 else "refused")


def test_memory_stays_bounded(corpus):
    """No header or pickle makes a reader allocate what it claims (peak RSS grows by less than 400 MB)."""
    _, items, _ = corpus
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for item in items:
        for reader in READERS.values():
            _outcome(reader, item.path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 400, grown_mb


def test_read_header_agrees_with_safetensors(corpus):
    from safetensors import safe_open
    _, _, good = corpus
    for path in good:
        if path.suffix != ".safetensors":
            continue
        h = read_header(str(path))
        with safe_open(str(path), framework="pt") as f:
            assert h.metadata == f.metadata()
            assert set(h.tensors) == set(f.keys())
            for key in f.keys():
                assert h.tensors[key][1] == tuple(f.get_slice(key).get_shape())
        assert h.size == path.stat().st_size
        assert h.data_start + max(end for _, _, (_, end) in h.tensors.values()) == h.size


def test_addnet_hash_of_damaged_safetensors(corpus):
    """The webui-style hash never raises on a regular file, whatever its header length says."""
    from lib_tune.formats.write import addnet_hash
    _, items, _ = corpus
    for item in items:
        if item.path.suffix == ".safetensors" and item.path.is_file() and os.access(item.path, os.R_OK) \
                and not item.path.is_symlink():
            assert len(addnet_hash(str(item.path))) == 64, item.id


# ---- the corpus itself ---------------------------------------------------------------------------------------------
def test_adapter_corpus_is_large_distinct_and_deterministic(tmp_path):
    def digests(items):
        return [hashlib.sha256(i.path.suffix.encode() + i.path.read_bytes()).hexdigest() for i in items]

    a = hostile.write_bad_adapters(tmp_path / "a")
    assert len(a) >= 60 and {i.category for i in a} == set(hostile.ADAPTER_CATEGORIES)
    first = digests(a)
    assert len(set(first)) == len(first), "two items of the corpus have the same extension and bytes"
    shutil.rmtree(tmp_path / "a")  # the same folder again (payloads name their marker file by its path)
    assert digests(hostile.write_bad_adapters(tmp_path / "a")) == first
    assert all(i.path.stat().st_size < 300_000 for i in a)
    fs = hostile.write_fs_oddities(tmp_path / "fs")
    assert len(fs) >= 30 and len({i.path for i in fs}) == len(fs)


def test_image_corpus_covers_every_category(tmp_path):
    from PIL import Image
    items = hostile.write_bad_images(tmp_path / "bad")
    assert len(items) >= 40
    counts = collections.Counter(i.category for i in items)
    assert set(counts) == set(hostile.IMAGE_CATEGORIES), counts
    assert not any(i.decodable for i in items if i.category in ("zero_size", "wrong_content", "huge"))
    regular = [i for i in items if i.category != "unreadable"]
    digests = [hashlib.sha256(i.path.suffix.encode() + i.path.read_bytes()).hexdigest() for i in regular]
    assert len(set(digests)) == len(digests), "two images of the corpus have the same extension and bytes"
    for item in items:  # what PIL decodes is caught by verify() or by its size
        if item.decodable and item.category in ("truncated", "corrupt"):
            with pytest.raises(Exception), Image.open(item.path) as im:
                im.verify()
        elif item.decodable and item.category == "degenerate":
            with Image.open(item.path) as im:
                assert min(im.size) <= 2, item.id
    for path in hostile.write_good_images(tmp_path / "good", 5) + hostile.write_odd_images(tmp_path / "odd"):
        with Image.open(path) as im:
            im.load()
            assert min(im.size) >= 48 and im.convert("RGB").size == im.size
    for item in items:  # let a non-root user remove the folder
        if item.path.is_file() and not item.path.is_symlink():
            os.chmod(item.path, 0o644)
