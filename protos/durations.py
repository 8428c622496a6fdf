"""Go/Kubernetes duration strings (``30s``, ``1m30s``, ``24h``), as Istio and the CRD use them."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
# Anchored form used by the CRD schema too, so the API server and the parser agree.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(h|m|s|ms|us|µs|ns))+$"
_WHOLE = re.compile(DURATION_PATTERN)


def parse_duration(text: str) -> float:
    """Return seconds. Raises ValueError with a message fit for a config error."""
    if not isinstance(text, str) or not _WHOLE.match(text):
        raise ValueError(f"{text!r} is not a duration like '30s', '1m' or '24h'")
    return sum(float(num) * _UNIT_SECONDS[unit] for num, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """Shortest exact Go-style rendering; Istio's CEL rule wants at least 1ms."""
    ms = round(seconds * 1000)
    if ms % 1000:
        return f"{ms}ms"
    return f"{ms // 1000}s"


def proto_duration(seconds: float) -> str:
    """Envoy's protobuf-JSON Duration: seconds with an ``s`` suffix and up to 3 decimals (``0.5s``).

    Envoy's JSON parser rejects Go-style units (``500ms``): a bootstrap or EnvoyFilter value with
    a sub-second (or fractional) timeout rendered by format_duration failed to load.
    """
    ms = round(seconds * 1000)
    whole, frac = divmod(ms, 1000)
    return f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s" if frac else f"{whole}s"
