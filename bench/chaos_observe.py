"""What the chaos run watches: ext_proc /metrics, Envoy's view of the ext_proc hosts, /proc.

Every observation is stamped with the wall-clock time the poll was sent and the time its answer
arrived, because the chaos report's time-to-detect and "requests while open" are defined
against those two instants (see bench/README.md, "Chaos and soak").
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass

import aiohttp

from bench.procstat import rss_mb, tree

# The series the chaos phases need, as (name, label) -> key. Anything else in /metrics is skipped.
_SERIES = re.compile(
    r'^(holysheep_circuit_state\{provider="primary"\}'
    r'|holysheep_cache_events_total\{event="(?:error|store|fallback)"\}'
    r'|holysheep_provider_healthy\{provider="primary"\}'
    r'|holysheep_cache_entries'
    r'|holysheep_config_reloads_total\{result="(?:ok|invalid)"\}'
    r'|holysheep_requests_total\{[^}]*\}'
    r'|holysheep_client_errors_total\{[^}]*\}) (\S+)$',
    re.MULTILINE,
)


def parse_metrics(text: str) -> dict[str, float]:
    """The watched series; holysheep_requests_total and client_errors are summed over labels."""
    out: dict[str, float] = {}
    for name, value in _SERIES.findall(text):
        if name.startswith("holysheep_requests_total"):
            key = "requests_total"
        elif name.startswith("holysheep_client_errors_total"):
            key = "client_errors_total"
        else:
            key = name
        out[key] = out.get(key, 0.0) + float(value)
    return out


CIRCUIT = 'holysheep_circuit_state{provider="primary"}'
CACHE_ERRORS = 'holysheep_cache_events_total{event="error"}'
CACHE_STORES = 'holysheep_cache_events_total{event="store"}'
RELOAD_OK = 'holysheep_config_reloads_total{result="ok"}'
RELOAD_INVALID = 'holysheep_config_reloads_total{result="invalid"}'
HEALTHY = 'holysheep_provider_healthy{provider="primary"}'
CACHE_ENTRIES = "holysheep_cache_entries"


@dataclass(slots=True)
class Poll:
    ep: int  # index of the ext_proc
    t_sent: float
    t_recv: float
    values: dict[str, float] | None  # None: the ext_proc did not answer (killed, restarting)


class MetricsWatcher:
    """Polls every ext_proc's /metrics every `interval` seconds and keeps every answer."""

    def __init__(self, admins: list[str], interval: float) -> None:
        self.admins = admins
        self.interval = interval
        self.polls: list[Poll] = []
        self.latest: list[Poll | None] = [None] * len(admins)
        self._changed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=max(0.5, self.interval * 10))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                await asyncio.gather(*(self._poll(session, i, url) for i, url in enumerate(self.admins)))
                self._changed.set()
                self._changed = asyncio.Event()
                try:
                    await asyncio.wait_for(stop.wait(), self.interval)
                except TimeoutError:
                    pass

    async def _poll(self, session: aiohttp.ClientSession, i: int, admin: str) -> None:
        t_sent = time.time()
        values: dict[str, float] | None
        try:
            async with session.get(admin + "/metrics") as resp:
                values = parse_metrics(await resp.text()) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            values = None
        poll = Poll(i, t_sent, time.time(), values)
        self.polls.append(poll)
        self.latest[i] = poll

    async def next_round(self) -> None:
        """Wait for the next completed round of polls (bounded by a few intervals)."""
        try:
            await asyncio.wait_for(self._changed.wait(), self.interval * 20 + 2)
        except TimeoutError:
            pass

    def value(self, ep: int, key: str) -> float | None:
        poll = self.latest[ep]
        if poll is None or poll.values is None:
            return None
        return poll.values.get(key)

    def total(self, key: str) -> float:
        """Sum of a series over the ext_procs that answered their last poll."""
        return sum(v for i in range(len(self.admins)) if (v := self.value(i, key)) is not None)

    def since(self, t: float) -> list[Poll]:
        return [p for p in self.polls if p.t_sent >= t]


async def until(predicate: object, timeout: float, watcher: MetricsWatcher | None = None,
                interval: float = 0.05) -> float | None:
    """Wall time at which predicate() first held, or None after `timeout` seconds.

    With a watcher, predicate is re-checked after every poll round (its answers are what the
    predicate reads); without, every `interval` seconds. Async predicates are awaited.
    """
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.time()
        if watcher is not None:
            await watcher.next_round()
        else:
            await asyncio.sleep(interval)
    return None


async def envoy_host_health(session: aiohttp.ClientSession, admin_port: int, cluster: str) -> dict[int, str]:
    """{port: health_flags} of every host of an Envoy cluster, from the admin /clusters page."""
    out: dict[int, str] = {}
    try:
        async with session.get(f"http://127.0.0.1:{admin_port}/clusters") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return out
    prefix = cluster + "::"
    for line in text.splitlines():
        if not line.startswith(prefix) or "::health_flags::" not in line:
            continue
        _, host, _, flags = line.split("::", 3)
        out[int(host.rsplit(":", 1)[1])] = flags
    return out


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass  # the process just exited
    return total


def process_tree_usage(root: int) -> tuple[float, int, int]:
    """(RSS MB, open fds, processes) of a process and all its children (workers)."""
    pids = tree(root)
    return rss_mb(pids), fd_count(pids), len(pids)
