"""extproc/settlements.py: the batch of work after the answers runs each item exactly once, in
order, and before anything reads what it writes.

The end-to-end side (a scrape right after the answers counts every one; an Always-mode repeat
right after the first answer is a hit; a budgeted route is charged before the next admission)
is in tests/test_e2e_settlements.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from extproc import metrics, settlements


@pytest.fixture(autouse=True)
def empty_batch() -> Iterator[None]:
    settlements.flush()
    yield
    settlements.flush()


def test_without_a_running_loop_an_item_runs_at_once() -> None:
    ran: list[int] = []
    settlements.later(0, ran.append, 1)
    assert ran == [1] and settlements.pending() == 0


def test_the_timer_runs_the_batch_once_in_order() -> None:
    ran: list[int] = []

    async def main() -> tuple[list[int], int]:
        for i in range(5):
            settlements.later(10, ran.append, i)
        queued = list(ran), settlements.pending()
        await asyncio.sleep(settlements.DELAY * 3)
        return queued  # type: ignore[return-value]

    queued, pending = asyncio.run(main())
    assert queued == [] and pending == 5  # nothing ran while the requests were being answered
    assert ran == [0, 1, 2, 3, 4]  # then each once, in the order queued
    assert settlements.pending() == 0


def test_a_full_batch_runs_at_once_by_count_and_by_bytes() -> None:
    ran: list[int] = []

    async def main() -> list[int]:
        seen = []
        for i in range(settlements.MAX_PENDING):
            settlements.later(0, ran.append, i)
        seen.append(len(ran))  # the MAX_PENDING-th item ran the batch
        settlements.later(settlements.MAX_PENDING_BYTES, ran.append, -1)  # one large answer
        seen.append(len(ran))
        return seen

    assert asyncio.run(main()) == [settlements.MAX_PENDING, settlements.MAX_PENDING + 1]
    assert ran[-1] == -1 and settlements.pending() == 0


def test_a_metrics_flush_runs_the_batch_first() -> None:
    """What a render of /metrics (server.py) and an in-process scrape (metrics._FlushFirst) call."""
    counter = metrics.CACHE_EVENTS.labels("store")

    async def main() -> tuple[float, float]:
        before = counter._value.get()
        settlements.later(0, metrics.CACHE_EVENTS.labels("store").inc)
        queued = counter._value.get()
        metrics.flush()
        return before, queued

    before, queued = asyncio.run(main())
    assert queued == before  # still batched
    assert counter._value.get() == before + 1  # flush ran it, and wrote its count


def test_a_failing_item_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise KeyError("a bug in one settle")

    async def main() -> None:
        settlements.later(0, ran.append, "before")
        settlements.later(0, broken)
        settlements.later(0, ran.append, "after")
        settlements.flush()

    with caplog.at_level(logging.ERROR, logger="extproc.settlements"):
        asyncio.run(main())
    assert ran == ["before", "after"]
    assert "response accounting failed" in caplog.text


def test_a_timer_of_a_stopped_loop_does_not_hold_the_next_loops_batch() -> None:
    """Each test (and each server start in one process) may run its own loop."""
    ran: list[int] = []

    async def queue_only() -> None:
        settlements.later(0, ran.append, 1)

    asyncio.run(queue_only())  # the loop ends with the item pending and its timer never run
    assert settlements.pending() == 1

    async def next_loop() -> None:
        settlements.later(0, ran.append, 2)
        await asyncio.sleep(settlements.DELAY * 3)

    asyncio.run(next_loop())
    assert ran == [1, 2]
