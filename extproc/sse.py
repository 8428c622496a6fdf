"""Server-sent events: incremental assembly of a streamed answer, for usage and the cache.

The assembler only ever sees bytes after they were passed on to the client, so it is off the
hot path. Feeding the same bytes in any chunk split yields the same events.
"""

from __future__ import annotations

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


def events_with(body: bytes, key: bytes) -> tuple[list[Any], bool]:
    """A whole stream's answer read at once, as ``SSEAssembler`` would read it fed in any chunks:
    the JSON of the complete events that can hold ``key`` as an object key (whose text has it,
    or has an escape, since a key may be spelled with ``\\u`` escapes), and whether the stream
    ended complete. The other events are neither split into lines nor decoded: a streamed
    answer's usage is one event of many."""
    data = body.replace(b"\r\n", b"\n")
    *blocks, rest = data.split(b"\n\n")
    found: list[Any] = []
    if key in data or b"\\u" in data:
        for block in blocks:
            if key in block or b"\\u" in block:
                payload = _event_data(block)
                if payload is not None and payload != b"[DONE]":
                    try:
                        found.append(jsoncodec.loads_for_reading(payload))
                    except ValueError:
                        continue
    return found, not rest.strip()


def _event_data(block: bytes) -> bytes | None:
    lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
