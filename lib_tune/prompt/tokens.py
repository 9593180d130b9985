"""Strict number tokens for the tag grammar.

Python's float() accepts 'nan', 'inf', '1_000' and surrounding blanks, and raises a message that does not say
which tag was wrong (the stock parser's "could not convert string to float" is complaint 8 of the runtime
anchors). Every number in a tag goes through here: the token is matched against a plain decimal pattern first,
so float() only ever sees text it is known to accept."""
from __future__ import annotations

import math
import re

from .errors import TagError

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INT = re.compile(r"\d+")


def is_number(token: str) -> bool:
    """True when `token` (already stripped) is a plain decimal number such as 1, -0.5, .5 or 1e-2."""
    return bool(_NUMBER.fullmatch(token)) and math.isfinite(float(token))


def parse_number(token: str, what: str) -> float:
    """The value of a decimal token; TagError "<what> 'token' is not a number" otherwise."""
    token = token.strip()
    if not token:
        raise TagError(f"{what} is empty")
    if not is_number(token):
        raise TagError(f"{what} {token!r} is not a number")
    return float(token)


def parse_count(token: str, what: str) -> int:
    """A positive integer (e.g. `dyn=`); TagError otherwise."""
    token = token.strip()
    if not _INT.fullmatch(token) or int(token) <= 0:
        raise TagError(f"{what} {token!r} is not a positive whole number")
    return int(token)


def fmt_number(x: float) -> str:
    """Shortest text that reads back as exactly `x`: 1.0 -> '1', 0.5 -> '0.5', 1e-07 -> '1e-07'."""
    x = float(x)
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)
