"""The one logging setup of both planes: JSON lines on stderr, one object per record.

Loggers are named after their module (`logging.getLogger(__name__)`: `extproc.breaker`,
`controller.reconcile`), so a package's level can be set on its own. Structured fields travel in
`extra`; a field may not reuse a LogRecord attribute (`name`, `msg`, `args`, `module`, ...):
`logging` raises KeyError for those in the caller, so name the field for what it is
(`object`, `config`, `secret`). Messages and fields carry names and reasons, never secrets.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

# Attributes of every LogRecord (plus the two that Formatter adds): not structured fields.
RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def utc_timestamp(t: float | None = None, digits: int = 0) -> str:
    """RFC 3339 in UTC with `digits` fractional digits, truncated (never rounded up a second).

    0 digits is a Kubernetes Time (status conditions, Events), 6 a MicroTime (Lease), 3 a log line.
    """
    t = time.time() if t is None else t
    whole = int(t)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    if digits:
        stamp += f".{int((t - whole) * 10**digits):0{digits}d}"
    return stamp + "Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": utc_timestamp(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in RESERVED:
                entry.setdefault(k, v)  # a field never overwrites the four every line has
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def handler(stream: IO[str] | None = None) -> logging.Handler:
    """The product's handler: JSON lines on `stream` (stderr by default)."""
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter())
    return h


def setup(level: str | int = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Make the product's handler the root logger's only one, at `level` ("INFO", "debug", 20)."""
    h = handler(stream)
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return h
