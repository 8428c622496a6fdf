"""Server-sent events: incremental assembly of a streamed answer, for usage and the cache.

The assembler only ever sees bytes after they were passed on to the client, so it is off the
hot path. Feeding the same bytes in any chunk split yields the same events.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from extproc import jsoncodec


class SSEAssembler:
    def __init__(self) -> None:
        self._pending = b""
        self.events: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        data = (self._pending + chunk).replace(b"\r\n", b"\n")
        # A lone trailing CR may be the first half of a CRLF split across chunks.
        if data.endswith(b"\r"):
            data, self._pending = data[:-1], b"\r"
        else:
            self._pending = b""
        *complete, rest = data.split(b"\n\n")
        for block in complete:
            payload = _event_data(block)
            if payload is not None:
                self.events.append(payload)
        self._pending = rest + self._pending

    @property
    def complete(self) -> bool:
        """True when nothing is left half-received (a cut stream is not cached)."""
        return not self._pending.strip()

    def json_events(self) -> Iterator[Any]:
        for payload in self.events:
            if payload == b"[DONE]":
                continue
            try:
                yield jsoncodec.loads(payload)
            except ValueError:
                continue

    def json_events_with(self, key: bytes) -> Iterator[Any]:
        """``json_events`` that can hold ``key`` as an object key: those whose text has it, or
        has an escape (a key may be spelled with ``\\u`` escapes). The others are not decoded."""
        for payload in self.events:
            if key in payload or b"\\u" in payload:
                try:
                    yield jsoncodec.loads(payload)
                except ValueError:
                    continue


def _event_data(block: bytes) -> bytes | None:
    lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
