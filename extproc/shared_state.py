"""Circuit state shared by the worker processes of one ext_proc: one mmapped float per provider.

Each slot holds the CLOCK_MONOTONIC time until which the provider's circuit is open (0: not
open). That clock is system-wide on Linux, so workers on one host compare it directly. A read is
an 8-byte load from a page every worker maps, which costs about as much as a dict lookup, so
the hot path takes no lock and makes no system call; an aligned 8-byte store is atomic on the
platforms we ship, so a reader sees either the old time or the new one.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct

STATE_DIR_ENV = "HOLYSHEEP_STATE_DIR"
_SLOT = struct.Struct("d")


class SharedSlot:
    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _SLOT.size:
                os.ftruncate(fd, _SLOT.size)  # zero-filled: "not open"
            self._map = mmap.mmap(fd, _SLOT.size)
        finally:
            os.close(fd)

    def get(self) -> float:
        value: float = _SLOT.unpack_from(self._map, 0)[0]
        return value

    def set(self, value: float) -> None:
        _SLOT.pack_into(self._map, 0, value)


def breaker_slot(provider: str) -> SharedSlot | None:
    """The provider's slot when running as one of several workers, else None (state is local)."""
    directory = os.environ.get(STATE_DIR_ENV)
    if not directory:
        return None
    digest = hashlib.sha256(provider.encode()).hexdigest()[:24]
    return SharedSlot(os.path.join(directory, f"breaker-{digest}"))
