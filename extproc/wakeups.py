"""Delays kept off the event loop's timer heap: ``call_later`` and ``sleep`` whose waiting is done
by one helper thread, which hands each due callback to its loop with ``call_soon_threadsafe``.

Why: while any timer is pending, asyncio passes a finite timeout to every ``epoll_wait`` of the
loop, and the kernel arms and cancels a high-resolution timer on each one. On the VMs this was
measured on, that made each gRPC write of the ext_proc about 9 µs slower: gRPC's completion of a
write reaches the loop through such a wait. The do-nothing floor with one 1 s timer pending took
+6 to +18 µs per write in three alternating pairs (README, "Performance"). Our process always had
timers pending: the three 1 s file pollers and the 50 ms batches of extproc/settlements.py and
extproc/metrics.py. With these delays waited for here, the loop waits without a timeout whenever
it has nothing to do, and a due delay costs one wake-up through the loop's self-pipe.

Semantics are the loop's own: a callback runs on its loop's thread, never before its delay
(``time.monotonic``, the loop's clock), in deadline order, and not at all once cancelled or once
its loop is closed. One for a loop that is stopped but not closed waits in that loop's queue and
runs when the loop runs again, as ``call_soon_threadsafe`` has it. Any delay is accepted (a
config's health-check interval has no upper bound): the thread never waits longer than
MAX_WAIT at a time. After a fork the child starts a helper thread of its own; delays pending in
the parent at the fork are not the child's (asyncio does not carry a running loop across a fork
either).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

__all__ = ["Wakeup", "call_later", "sleep"]

log = logging.getLogger(__name__)

# The longest single wait of the helper thread (threading refuses waits past TIMEOUT_MAX, which
# would end the thread and with it every later delay); a longer delay is waited for in steps.
MAX_WAIT = 3600.0


class Wakeup:
    """A pending ``call_later``; ``cancel()`` from the loop's thread before it runs skips it."""

    __slots__ = ("_callback", "cancelled", "deadline", "loop")

    def __init__(self, deadline: float, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        self.deadline = deadline
        self.loop = loop
        self._callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._callback = _nothing  # what it holds goes now, not at its deadline

    def _fire(self) -> None:  # on the loop's thread
        if not self.cancelled:
            self.cancelled = True  # at most once
            self._callback()


class _Clock:
    """The helper thread and its deadline heap (one per process, started on first use)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Wakeup]] = []
        self._seq = itertools.count()  # ties keep the order of the calls
        self._thread: threading.Thread | None = None

    def add(self, wakeup: Wakeup) -> None:
        with self._cond:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="holysheep-wakeups", daemon=True)
                thread.start()  # when no thread can start, the caller hears of it and the next call retries
                self._thread = thread
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (wakeup.deadline, next(self._seq), wakeup))
            if earliest is None or wakeup.deadline < earliest:
                self._cond.notify()  # the thread waits for a later deadline, or for none

    def _run(self) -> None:
        with self._cond:
            while True:
                try:
                    self._next()
                except Exception:  # pragma: no cover - the thread must outlive any one delay
                    log.exception("handing a delay to its event loop failed")
                    self._cond.wait(0.1)  # a failure that repeats must not spin the thread

    def _next(self) -> None:
        """Wait for the earliest delay, or hand it to its loop if it is due (lock held)."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        if not heap:
            self._cond.wait()
            return
        wait = heap[0][0] - time.monotonic()
        if wait > 0:
            self._cond.wait(min(wait, MAX_WAIT))
            return
        wakeup = heapq.heappop(heap)[2]
        try:
            wakeup.loop.call_soon_threadsafe(wakeup._fire)
        except RuntimeError:
            pass  # its loop is closed: nothing would run the callback


def _nothing() -> None:
    pass


_clock = _Clock()


def _after_fork_in_child() -> None:
    # The helper thread does not survive a fork; a child starts its own on first use. (Workers
    # are separate interpreters, extproc/workers.py; this keeps a forking caller correct too.)
    global _clock
    _clock = _Clock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def call_later(delay: float, callback: Callable[[], object],
               loop: asyncio.AbstractEventLoop | None = None) -> Wakeup:
    """Run ``callback()`` on ``loop`` (the running one by default) ``delay`` seconds from now."""
    wakeup = Wakeup(time.monotonic() + max(0.0, delay), loop or asyncio.get_running_loop(), callback)
    _clock.add(wakeup)
    return wakeup


async def sleep(delay: float) -> None:
    """``asyncio.sleep(delay)`` without a timer on the loop; cancellable like it."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    wakeup = call_later(delay, wake, loop)
    try:
        await done
    finally:
        wakeup.cancel()
