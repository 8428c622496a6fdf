"""Helpers of the budget tests: a clock to set, a wait for a fresh window, a Redis partition,
and the bodies of the worker processes that share a store (run with multiprocessing's spawn:
fresh interpreters, like the ext_proc's workers and replicas).

The throwaway Redis is ``extproc.dev.processes.RedisServer``: its port is fixed at construction,
so ``start()`` after ``kill()`` restarts it empty on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from extproc.budget_store import CounterTable, MemoryBudgetStore, RedisBudgetStore
from extproc.budgets import BudgetEngine
from protos.spec import BudgetSpec


def fresh_window(window: int, needed: float = 30.0) -> None:
    """Wait for the window to turn when less than `needed` seconds of it are left, so a scenario
    that must stay in one window (real time, through Envoy) does not straddle its turn."""
    left = window - time.time() % window
    if left < needed:
        time.sleep(left + 0.05)


class Clock:
    """Wall clock (Unix seconds) or monotonic clock the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Partition:
    """A loopback TCP proxy in front of Redis that can cut the network (Redis keeps its data)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.up = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for w in self._writers:
            w.close()
        self._writers.clear()

    def heal(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def memory_worker(path: str, spec: BudgetSpec, now: float, attempts: int, barrier: Any, out: Any) -> None:
    """A worker of one replica: maps the replica's table at `path` and admits as fast as it can."""
    engine = BudgetEngine("exact", [spec], MemoryBudgetStore(CounterTable(path)), clock=lambda: now)

    async def run() -> int:
        admitted = 0
        for _ in range(attempts):
            decision = await engine.admit("team-a", "app")
            assert decision is not None
            admitted += decision.admitted
        return admitted

    barrier.wait()
    out.put(asyncio.run(run()))


def redis_replica(url: str, scope: str, spec: BudgetSpec, now: float, attempts: int, barrier: Any, out: Any) -> None:
    """A replica: its own private table, the shared Redis, `attempts` admissions all in flight."""

    async def run() -> int:
        store = RedisBudgetStore(url, CounterTable(None))
        engine = BudgetEngine(scope, [spec], store, clock=lambda: now)
        await store._redis.ping()  # connected before the race starts
        barrier.wait()
        decisions = await asyncio.gather(*(engine.admit("team-a", "app") for _ in range(attempts)))
        await store.close()
        return sum(d is not None and d.admitted for d in decisions)

    out.put(asyncio.run(run()))
