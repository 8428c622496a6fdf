"""JSON on the hot path: the standard library's answers, found by orjson where it gives the same.

A request's body is parsed once, and an answer's once for its usage; json.loads costs several
Python calls around its C scanner (encoding detection, decoder objects), orjson one C call, a
sixth of the time on a chat completion. The standard library stays the definition of what is
valid and what it means:

- what orjson refuses (NaN and Infinity, a byte-order mark, UTF-16/32 text, lone surrogate
  escapes, numbers past a double, deep nesting) goes to ``json.loads``, which accepts it or
  raises the error clients see;
- an integer of 19 or more digits, which orjson turns into a float past 64 bits, never reaches
  orjson: any run of 19 digits in the body sends it to ``json.loads`` (looked for only when the
  body has 19 digits at all, a count that costs a tenth of the search).

``Parsed.strict`` says orjson read it. Only then does ``canonical`` (the cache key's form) and
``dumps`` use orjson: its output is then a faithful encoding of the value (finite floats, 64-bit
integers, valid Unicode), and canonical texts from the two libraries never collide, since they
carry a different first byte.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_INTEGER = re.compile(rb"[0-9]{19}")
_DIGITS = b"0123456789"
_SORTED = orjson.OPT_SORT_KEYS


def loads_strict(data: bytes) -> tuple[Any, bool]:
    """``json.loads(data)`` and whether orjson produced it. Raises as json.loads does."""
    if len(data) - len(data.translate(None, _DIGITS)) < 19 or _LONG_INTEGER.search(data) is None:
        try:
            return orjson.loads(data), True
        except orjson.JSONDecodeError:
            pass
    return json.loads(data), False


def loads(data: bytes) -> Any:
    """``json.loads(data)``, by orjson where it gives the same value."""
    return loads_strict(data)[0]


def loads_for_reading(data: bytes) -> Any:
    """A value to read fields from (an answer's usage), not to re-encode: orjson's, with its
    floats for integers past 64 bits (no token count is that large), else json.loads'."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def canonical(value: Any, strict: bool) -> bytes:
    """A canonical UTF-8 text of a parsed JSON value (sorted keys, no spaces), injective over
    values; ``strict``: the value came from ``loads_strict`` by orjson."""
    if strict:
        return b"o" + orjson.dumps(value, option=_SORTED)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: JSON may carry lone surrogate escapes ("\ud800"), which strict UTF-8 cannot
    # encode; the text must still be injective and must never raise.
    return b"j" + text.encode("utf-8", "surrogatepass")


def dumps(value: Any, strict: bool) -> bytes:
    """A compact JSON body for a parsed value (``strict`` as for ``canonical``)."""
    if strict:
        return orjson.dumps(value)
    return json.dumps(value, separators=(",", ":")).encode()
