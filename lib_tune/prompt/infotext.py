"""The generation-infotext fields for active adapters, and reading them back on paste.

Two fields, modelled on the built-in `Lora hashes` (extra_networks_lora.py L47-56, lora_script.py L77-97):
  Tune:        name: args, name2: args2      args = canonical tag arguments (AdapterRequest.args_text), so
                                             every weight is explicit and schedules/lbw/start/stop survive
  Tune hashes: name: 0123456789ab, ...       short hash per adapter, to find a renamed file on paste

Names and values are written bare when they can be, else as JSON strings: a name is quoted when it contains
',', ':', '"' or '\\' or has surrounding blanks; a value when it contains ',', '"' or '\\' (so schedules such as
`0@0,1@0.5` are quoted). Unlike the built-in, which deletes ':' and ',' from names, nothing is lost. These
functions produce the field *value*; the webui quotes the whole value again when writing the infotext
(infotext_utils.quote) and unquotes it when parsing, which JSON-in-JSON survives.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import InfotextError, TagError
from .tags import TAG_PATTERN, AdapterRequest, find_tags, parse_params, split_items

TUNE_FIELD = "Tune"
HASHES_FIELD = "Tune hashes"

_DECODER = json.JSONDecoder()


def _needs_quote(text: str, specials: str) -> bool:
    return not text or text != text.strip() or text[0] == '"' or any(c in text for c in specials)


def _field(text: str, specials: str) -> str:
    return json.dumps(text, ensure_ascii=False) if _needs_quote(text, specials) else text


_KEY_SPECIALS = ',:"\\'
_VALUE_SPECIALS = ',"\\'


def format_pairs(pairs: Iterable[Tuple[str, str]]) -> str:
    """`key: value, key: value` with the quoting rule of this module."""
    return ", ".join(f"{_field(k, _KEY_SPECIALS)}: {_field(v, _VALUE_SPECIALS)}" for k, v in pairs)


def _skip_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _read(text: str, i: int, stop: str) -> Tuple[str, int]:
    if text[i] == '"':
        try:
            value, end = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InfotextError(f"bad quoted text at {i} in {text!r}: {e.msg}") from None
        if not isinstance(value, str):
            raise InfotextError(f"bad quoted text at {i} in {text!r}")
        return value, end
    j = text.find(stop, i)
    j = len(text) if j < 0 else j
    if stop == ",":
        # A hand-written bare schedule (`a: 0@0,1@1`): a piece after ',' without ':' cannot start a new pair,
        # so it continues this value.
        while j < len(text):
            k = text.find(",", j + 1)
            k = len(text) if k < 0 else k
            piece = text[j + 1:k]
            if ":" in piece or piece.lstrip().startswith('"') or not piece.strip():
                break
            j = k
    return text[i:j].strip(), j


def parse_pairs(text: str) -> List[Tuple[str, str]]:
    """Inverse of format_pairs; InfotextError for text it cannot split."""
    pairs: List[Tuple[str, str]] = []
    i = _skip_blanks(text, 0)
    while i < len(text):
        key, i = _read(text, i, ":")
        i = _skip_blanks(text, i)
        if i >= len(text) or text[i] != ":":
            raise InfotextError(f"expected ':' after {key!r} in {text!r}")
        i = _skip_blanks(text, i + 1)
        value, i = _read(text, i, ",") if i < len(text) else ("", i)
        pairs.append((key, value))
        i = _skip_blanks(text, i)
        if i < len(text):
            if text[i] != ",":
                raise InfotextError(f"expected ',' after {value!r} in {text!r}")
            i = _skip_blanks(text, i + 1)
    return pairs


def format_adapters(requests: Iterable[AdapterRequest]) -> str:
    """Value of the `Tune` field for the adapters of a generation."""
    return format_pairs((r.name, r.args_text()) for r in requests)


def parse_adapters(text: str, *, network: str = "tune", presets: Optional[Mapping[str, Sequence[float]]] = None,
                   errors: Optional[List[str]] = None) -> List[AdapterRequest]:
    """Requests from a `Tune` field value. With `errors` given, entries that do not parse are reported there and
    skipped (paste should restore what it can); without it the first bad entry raises TagError/InfotextError."""
    out: List[AdapterRequest] = []
    for name, args in parse_pairs(text):
        try:
            out.append(parse_params([name, *args.split(":")], network=network, presets=presets))
        except TagError as e:
            if errors is None:
                raise
            errors.append(str(e))
    return out


def format_hashes(hashes: Mapping[str, str]) -> str:
    """Value of the `Tune hashes` field: name -> short hash."""
    return format_pairs(hashes.items())


def parse_hashes(text: str) -> Dict[str, str]:
    return dict(parse_pairs(text))


def _tag_name(args: str) -> str:
    positional, _ = split_items(args.split(":"))
    return positional[0].strip() if positional else ""


def restore_prompt(prompt: str, tune_text: Optional[str] = None, hashes_text: Optional[str] = None,
                   lookup_hash: Optional[Callable[[str], Optional[str]]] = None, network: str = "tune",
                   networks: Sequence[str] = (), errors: Optional[List[str]] = None) -> str:
    """The prompt to paste back, given the infotext's `Tune` / `Tune hashes` values.

    1. With `lookup_hash` (short hash -> the name of the local file with that hash, or None), tags whose name
       has a recorded hash are renamed to the local name, as the built-in does for `Lora hashes`.
    2. Adapters in the `Tune` field that have no tag in the prompt (e.g. added by a setting or an API override)
       are appended as canonical `<network:name:args>` tags. Tags already in the prompt are left as written.
    `networks` lists the tag names that count as ours (default: just `network`). Bad `Tune` entries are
    skipped and described in `errors` when given."""
    nets = tuple(networks) or (network,)
    rename: Dict[str, str] = {}
    if hashes_text and lookup_hash is not None:
        for name, short in parse_hashes(hashes_text).items():
            local = lookup_hash(short)
            if local and local != name:
                rename[name] = local

    def renamed(m):
        net, args = m.group(1), m.group(2)
        if net not in nets:
            return m.group(0)
        head, sep, rest = args.partition(":")
        local = rename.get(head.strip())
        return f"<{net}:{local}{sep}{rest}>" if local else m.group(0)

    if rename:
        prompt = TAG_PATTERN.sub(renamed, prompt)
    present = {_tag_name(":".join(items)) for _, items, _ in find_tags(prompt, nets)}
    added: List[str] = []
    if tune_text:
        for req in parse_adapters(tune_text, network=network, errors=[] if errors is None else errors):
            name = rename.get(req.name, req.name)
            if name in present:
                continue
            present.add(name)
            added.append(dataclasses.replace(req, name=name).to_tag(network))
    if not added:
        return prompt
    return (prompt.rstrip() + " " if prompt.strip() else "") + " ".join(added)
