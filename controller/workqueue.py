"""A coalescing work queue in the spirit of client-go's: a key is queued at most once, and a
key re-added while a worker holds it is processed again after that worker is done."""

from __future__ import annotations

import threading
from collections import deque


class WorkQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._timers: set[threading.Timer] = set()
        self._shutdown = False

    def add(self, key: str) -> None:
        with self._cond:
            if self._shutdown or key in self._dirty:
                return
            self._dirty.add(key)
            if key not in self._processing:
                self._queue.append(key)
                self._cond.notify()

    def add_after(self, key: str, delay: float) -> None:
        def fire() -> None:
            with self._cond:
                self._timers.discard(timer)
            self.add(key)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._cond:
            if self._shutdown:
                return
            self._timers.add(timer)
        timer.start()

    def get(self, timeout: float | None = None) -> str | None:
        """Next key, or None on shutdown/timeout. Call done(key) when finished."""
        with self._cond:
            if not self._queue and not self._shutdown:
                self._cond.wait(timeout)
            if self._shutdown or not self._queue:
                return None
            key = self._queue.popleft()
            self._dirty.discard(key)
            self._processing.add(key)
            return key

    def done(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            for t in self._timers:
                t.cancel()
            self._timers.clear()
            self._cond.notify_all()
