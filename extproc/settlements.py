"""Work that follows an answer, run in batches: each answer's usage, cost and cache copy.

Why batches: the same work costs several times more once per request than many times in a row.
Between two messages of a stream, Envoy, the upstream and gRPC run on the same cores and evict
the interpreter's data and our code from the CPU caches. So the settle of one answer (its usage
read, the cache key and store, the metrics) took 50-75 us live against about 8 us in a loop,
and about 12 us inside a batch (``python -m bench.phases``; README, "Performance"). Run back to
back, every settle after the first of a batch finds them warm.

What runs here is what no answer waits for. A settle is queued when its answer's last ack has
been handed to gRPC and runs exactly once:
- at most DELAY after the first pending one, on the event loop (a delay of extproc/wakeups.py,
  not a timer of the loop's own);
- at once when MAX_PENDING settles or MAX_PENDING_BYTES of answers are pending;
- before anything reads what a settle writes: a lookup in a cache that batches
  (``Ledger.lookup``; not an Always-mode one, whose settles run at once), a render of /metrics
  or an in-process scrape (``metrics.flush`` runs ``flush`` first), a config reload that
  retires caches, and the drain before shutdown (server.py), while the caches and the loop are
  still there.
Without a running loop (a synchronous caller, a test) a settle runs at once.

What the next request may need stays out of here and runs at once (``Ledger.settle_later``):
a budgeted route's settle, which charges the budget before the next request is admitted, and
an Always-mode cache's, whose next identical request must find the answer.
"""

from __future__ import annotations

import logging
from asyncio import _get_running_loop
from collections.abc import Callable
from typing import Any

from extproc import metrics, wakeups

log = logging.getLogger(__name__)

DELAY = 0.05  # s: at 200 requests/s per process, batches of 10
MAX_PENDING = 256
MAX_PENDING_BYTES = 8 << 20  # the answers the pending settles hold

_pending: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
_pending_bytes = 0
_timer: wakeups.Wakeup | None = None  # its .loop is the loop the batch runs on


def later(size: int, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` in the next batch; ``size``: the bytes it keeps alive until then."""
    global _pending_bytes, _timer
    loop = _get_running_loop()
    if loop is None:
        _run(fn, args)
        return
    _pending.append((fn, args))
    _pending_bytes += size
    if len(_pending) >= MAX_PENDING or _pending_bytes >= MAX_PENDING_BYTES:
        flush()
    elif _timer is None or _timer.loop is not loop:
        if _timer is not None:
            _timer.cancel()  # scheduled on a loop that has stopped since (tests run several)
        _timer = wakeups.call_later(DELAY, flush, loop)  # no timer on the loop (extproc/wakeups.py)


def flush() -> None:
    """Run every pending settle now, in the order they were queued (idempotent)."""
    global _pending_bytes, _timer
    if _timer is not None:
        _timer.cancel()
        _timer = None
    if not _pending:
        return
    batch = _pending[:]
    _pending.clear()
    _pending_bytes = 0
    for fn, args in batch:
        _run(fn, args)


def pending() -> int:
    return len(_pending)


def _run(fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:
        # A bug in one settle must cost that request's accounting, never the others' or a stream.
        log.exception("response accounting failed")


metrics.before_flush(flush)
