"""Open-loop load for the chaos and soak runs: a fixed request rate whatever the latency.

A closed-loop client (N connections, send on reply) slows down when the mesh slows down and so
hides exactly what chaos testing looks for: a 2 s hang at 200 req/s must mean 400 requests in
flight, not 1 client waiting. Each request is scheduled at t0 + i/rate and recorded with its
send time, completion time, status, the answering provider (x-holysheep-provider) and whether
the cache answered (x-holysheep-cache), so the chaos run can attribute every request to a fault
phase and match it against what the mock providers received (x-chaos-id header).

Bounded in count (max_requests), in time (max_duration, per-request timeout, drain timeout) and
in concurrency (max_inflight: a request due while the cap is reached is recorded as dropped,
never queued, so the schedule stays open-loop).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from bench.loadgen import percentile

OK = "ok"


@dataclass(slots=True)
class Result:
    seq: int
    t_send: float  # wall clock (time.time()), comparable with the mocks' RecordedRequest.time
    t_done: float
    status: int  # 0: no HTTP answer
    provider: str  # x-holysheep-provider, "" if absent
    cache: str  # x-holysheep-cache ("fallback", "hit") or ""
    error: str  # "" for a usable 2xx answer; else "http-<status>", "timeout", "bad-body" or an exception name
    model: str

    @property
    def failed(self) -> bool:
        return self.error != ""

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_send) * 1000


@dataclass
class OpenLoopLoad:
    url: str  # the Envoy listener, e.g. http://127.0.0.1:PORT
    rate: float  # requests per second
    max_inflight: int = 2000
    request_timeout: float = 15.0
    distinct_prompts: int = 500
    max_requests: int = 1_000_000
    # Model per request: the config phase switches part of the load to a new alias once loaded.
    model_for: Callable[[int], str] = field(default=lambda _seq: "chaos-model")
    results: list[Result] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)  # schedule times of requests never sent
    inflight: int = 0
    sent: int = 0

    async def run(self, stop: asyncio.Event, max_duration: float) -> None:
        """Send until `stop` is set, max_duration elapses or max_requests are sent; then wait
        (bounded) for the requests in flight."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=self.max_inflight, limit_per_host=self.max_inflight)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            t0 = loop.time()
            i = 0
            while i < self.max_requests and not stop.is_set():
                due = t0 + i / self.rate
                if due - t0 >= max_duration:
                    break
                delay = due - loop.time()
                if delay > 0:
                    # Sleeping on the event, not asyncio.sleep, so stop() ends the run at once.
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                if self.inflight >= self.max_inflight:
                    self.dropped.append(time.time())
                else:
                    task = loop.create_task(self._one(session, i))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.wait(set(tasks), timeout=self.request_timeout + 5)
            for task in list(tasks):
                task.cancel()

    async def _one(self, session: aiohttp.ClientSession, seq: int) -> None:
        model = self.model_for(seq)
        body = json.dumps({
            "model": model,
            "messages": [{"role": "user", "content": f"chaos prompt {seq % self.distinct_prompts}"}],
        }).encode()
        headers = {"content-type": "application/json", "x-chaos-id": str(seq)}
        self.inflight += 1
        self.sent += 1
        t_send = time.time()
        status, provider, cache, error = 0, "", "", ""
        try:
            async with session.post(self.url + "/v1/chat/completions", data=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
                provider = resp.headers.get("x-holysheep-provider", "")
                cache = resp.headers.get("x-holysheep-cache", "")
                if not 200 <= status < 300:
                    error = f"http-{status}"
                elif not _is_completion(raw):
                    error = "bad-body"  # a 200 the SDK could not parse is a failure too
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = type(exc).__name__
        finally:
            self.inflight -= 1
        self.results.append(Result(seq, t_send, time.time(), status, provider, cache, error, model))


def _is_completion(raw: bytes) -> bool:
    try:
        parsed = json.loads(raw)
    except ValueError:
        return False
    return isinstance(parsed, dict) and bool(parsed.get("choices"))


def summarize(results: list[Result]) -> dict[str, object]:
    """Counts and latency percentiles of a slice of results."""
    failures = Counter(r.error for r in results if r.failed)
    providers = Counter(("cache:" + r.cache) if r.cache else (r.provider or "-") for r in results if not r.failed)
    lat = sorted(r.latency_ms for r in results)
    return {
        "sent": len(results),
        "ok": len(results) - sum(failures.values()),
        "failures": sum(failures.values()),
        "failures_by_kind": dict(sorted(failures.items())),
        "answered_by": dict(sorted(providers.items())),
        "p50_ms": round(percentile(lat, 50), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": lat[-1] if lat else 0.0,
    }
