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

``loads_strict`` also says whether orjson read it: then orjson's encoders are faithful to the
value (finite floats, 64-bit integers, valid Unicode) without a check. ``canonical`` (the cache
key's form) depends on the value alone, so equal requests share a key however they were read.
"""

from __future__ import annotations

import json
import re
import sys
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


def loads_for_reading(data: bytes) -> Any:
    """A value to read fields from (an answer's usage), not to re-encode: orjson's, with its
    floats for integers past 64 bits (no token count is that large), else json.loads'."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def canonical(value: Any, strict: bool = False) -> bytes:
    """A canonical UTF-8 text of a parsed JSON value (sorted keys, no spaces): a function of the
    value alone, whichever library read it, and injective over values. orjson's when it encodes
    the value faithfully (``strict``: it read it, so it does), else the standard library's; the
    two forms start with different bytes, so they never collide."""
    if strict or _finite(value):
        try:
            return b"o" + orjson.dumps(value, option=_SORTED)
        except orjson.JSONEncodeError:  # an integer past 64 bits, a lone surrogate: not faithful
            pass
    text = _stdlib_dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: JSON may carry lone surrogate escapes ("\ud800"), which strict UTF-8 cannot
    # encode; the text must still be injective and must never raise.
    return b"j" + text.encode("utf-8", "surrogatepass")


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value`` (orjson would write them as null)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if item != item or item in (_INF, -_INF):
                return False
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


_INF = float("inf")


def dumps(value: Any, strict: bool) -> bytes:
    """A compact JSON body for a parsed value (``strict`` as for ``canonical``)."""
    if strict:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
            pass
    return _stdlib_dumps(value, separators=(",", ":")).encode()


# What the encoder may need beyond the interpreter's limit: a parsed value is at most 1024 levels
# deep (orjson's limit; json.loads stops near the interpreter's own, 1000).
_ENCODE_HEADROOM = 2000


def _stdlib_dumps(value: Any, **options: Any) -> str:
    """json.dumps of a parsed value, however deep. orjson reads 1024 levels without recursing,
    but its sorted writer stops at 254, and the standard library's encoder recurses once per
    level, from a frame deeper than the parse's (a Fallback lookup's cache key, inside the
    failover coroutine). So a value 1000 levels deep raised RecursionError there: a 500 for a
    valid request (found by tests/fuzz). Retried with the limit raised by what such a value
    needs."""
    try:
        return json.dumps(value, **options)
    except RecursionError:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + _ENCODE_HEADROOM)
        try:
            return json.dumps(value, **options)
        finally:
            sys.setrecursionlimit(limit)
