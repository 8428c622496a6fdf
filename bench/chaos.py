"""Chaos and soak through a real Envoy: ``python -m bench.chaos`` (see bench/README.md).

The stack is the one the e2e tests use (extproc/dev/stack.py): a real Envoy 1.40 whose ext_proc cluster has
TWO ext_proc processes, primary and secondary mock providers, and a real redis-server behind
cache mode Fallback. An open-loop load (bench/chaos_load.py) runs at a fixed rate while the
faults below happen one after another; every client request, every request the primary
received and every circuit-breaker transition (logged by each ext_proc with its wall-clock
time) is kept, and the report is computed from those afterwards.

Attribution: each ext_proc process gets its own primary key (same env var name, different
value), so the primary's recorded credential says which ext_proc routed a request there.
Whether a request "reached an open circuit" is judged from the primary's own request log and the
client's send/answer times alone, by replaying the breaker's documented semantics
(bench/chaos_oracle.py): the only requests excused are those sent before the circuit certainly
opened and the half-open trials. The ext_procs' logged transitions serve only the time-to-detect.

``--soak SECONDS``: the same stack, steady load, no fault; ext_proc RSS, open fds and cache size
are sampled every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.chaos_load import OpenLoopLoad, Result, summarize
from bench.chaos_observe import (
    CACHE_ENTRIES,
    CACHE_ERRORS,
    MetricsWatcher,
    envoy_host_health,
    process_tree_usage,
    until,
)
from bench.chaos_oracle import Arrival, judge
from extproc.dev.envoy_bootstrap import EXTPROC_CLUSTER
from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import MockProviderProcess, RedisServer
from extproc.dev.stack import Stack

MODEL = "chaos-model"
MODEL_V2 = "chaos-model-v2"

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: chaos, namespace: default}
spec:
  timeout: TIMEOUT
  maxRetries: 1
  circuitBreaker: {enabled: true, failureThreshold: THRESHOLD, resetTimeout: RESET}
  healthCheck: {interval: HEALTH, endpoint: /models}
  providers:
    - {name: primary, baseUrl: "{primary}", auth: {env: CHAOS_PRIMARY_KEY}}
    - {name: secondary, baseUrl: "{secondary}", auth: {env: CHAOS_SECONDARY_KEY}}
  routes:
    - {models: [chaos-model], backends: [{provider: primary}, {provider: secondary, priority: 1}]}
ROUTES_V2  cache: {mode: Fallback, redisUrl: "REDIS", maxEntries: MAXENTRIES}
"""
# The new valid config of the last phase: one more model alias, served by the secondary first.
ROUTES_V2 = ("    - {models: [chaos-model-v2], backends: [{provider: secondary, model: chaos-model}, "
             "{provider: primary, priority: 1}]}\n")
# Valid YAML, invalid spec: the ext_procs must reject it and keep the last good config.
INVALID = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: chaos, namespace: default}
spec:
  timeout: banana
  providers: []
"""


@dataclass
class ChaosSettings:
    rate: float = 200.0
    phase_seconds: float = 6.0
    timeout: float = 1.0  # provider timeout; the hang phase lasts at least 2x this
    reset_timeout: float = 2.0
    failure_threshold: int = 3
    health_interval: float = 1.0
    max_entries: int = 200  # memory tier bound, below distinct_prompts so eviction is exercised
    distinct_prompts: int = 500
    poll_interval: float = 0.2
    wait_timeout: float = 15.0  # bound on every detect/recover wait
    request_timeout: float = 15.0

    def config(self, redis_url: str, v2: bool = False) -> str:
        return (TEMPLATE.replace("TIMEOUT", _dur(self.timeout)).replace("THRESHOLD", str(self.failure_threshold))
                .replace("RESET", _dur(self.reset_timeout)).replace("HEALTH", _dur(self.health_interval))
                .replace("REDIS", redis_url).replace("MAXENTRIES", str(self.max_entries))
                .replace("ROUTES_V2", ROUTES_V2 if v2 else ""))


def _dur(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _key(ep: int) -> str:
    return f"sk-chaos-primary-ep{ep}"


SECONDARY_KEY = "sk-chaos-secondary"


@dataclass(slots=True)
class UpstreamRecord:
    """One request a mock provider received (from its /_mock/stats)."""

    seq: int
    time: float
    path: str
    credential: str | None
    chaos_id: str | None
    status: int | None


class MockProcess(MockProviderProcess):
    """A mock provider in its own process, plus what it received, fetched from its /_mock/stats.

    Its own interpreter, so the load generator's event loop and GIL never slow the upstream
    down (which would turn CPU contention into provider timeouts). ``placeholder`` is what the
    Stack renders into the config (name, port, prefix) and does not start.
    """

    def __init__(self, name: str, log_path: Path) -> None:
        super().__init__(name, log_path)
        self.placeholder = MockProvider(name)
        self.records: dict[int, UpstreamRecord] = {}
        self._seen_total = 0

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)
        self.placeholder.port = self.port

    def collect(self) -> None:
        """Fetch the requests received since the last call (the mock keeps the last 10,000)."""
        total = int(self.stats(limit=0)["total"])
        new = total - self._seen_total
        if new <= 0:
            return
        for r in self.stats(limit=new + 100)["requests"]:
            self.records[r["seq"]] = UpstreamRecord(r["seq"], r["time"], r["path"], r["credential"],
                                                    r["headers"].get("x-chaos-id"), r["status"])
        self._seen_total = total


class Rig:
    """Envoy + two ext_procs + primary/secondary mocks + redis-server (blocking calls)."""

    def __init__(self, settings: ChaosSettings, stack_class: type[Stack] = Stack) -> None:
        self.settings = settings
        self.redis = RedisServer()
        self.workdir = Path(tempfile.mkdtemp(prefix="holysheep-chaos-"))
        self.primary = MockProcess("primary", self.workdir / "mock-primary.log")
        self.secondary = MockProcess("secondary", self.workdir / "mock-secondary.log")
        self.stack = stack_class(
            settings.config(self.redis.url),
            {"primary": self.primary.placeholder, "secondary": self.secondary.placeholder},
            env={"CHAOS_PRIMARY_KEY": _key(0), "CHAOS_SECONDARY_KEY": SECONDARY_KEY}, extproc_count=2,
        )

    def start(self) -> None:
        self.primary.start()
        self.secondary.start()
        self.redis.start()
        self.stack.start()
        # Second ext_proc with its own primary key, so the primary can tell who routed a request.
        ep = self.stack.extprocs[1]
        ep.stop()
        ep.env = {**ep.env, "CHAOS_PRIMARY_KEY": _key(1)}
        ep.start()
        self.wait_envoy_hosts_healthy(20.0)

    def envoy_admin(self) -> int:
        assert self.stack.envoy is not None
        return self.stack.envoy.admin_port

    def wait_envoy_hosts_healthy(self, timeout: float) -> None:
        async def check() -> bool:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                health = await envoy_host_health(session, self.envoy_admin(), EXTPROC_CLUSTER)
            return len(health) == 2 and all(v == "healthy" for v in health.values())

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if asyncio.run(check()):
                return
            time.sleep(0.1)
        raise RuntimeError("envoy did not see both ext_procs healthy")

    def stop(self) -> None:
        try:
            self.stack.stop()
        finally:
            self.redis.kill()
            self.primary.stop()
            self.secondary.stop()


# ---- circuit timeline ------------------------------------------------------------------------


@dataclass
class Timeline:
    """The primary's availability in one ext_proc: (t, state name or None, healthy or None)."""

    events: list[tuple[float, str | None, bool | None]] = field(default_factory=list)

    def state_at(self, t: float) -> tuple[str, bool]:
        state, healthy = "CLOSED", True
        for te, s, h in self.events:
            if te > t:
                break
            if s is not None:
                state = s
            if h is not None:
                healthy = h
        return state, healthy

    def unavailable_at(self, t: float) -> bool:
        state, healthy = self.state_at(t)
        return state == "OPEN" or not healthy

    def unavailable_throughout(self, a: float, b: float) -> bool:
        if not self.unavailable_at(a):
            return False
        return all(self.unavailable_at(te) for te, _, _ in self.events if a < te <= b)

    def first_unavailable_from(self, t0: float, t1: float) -> float | None:
        if self.unavailable_at(t0):
            return t0
        for te, _, _ in self.events:
            if t0 < te <= t1 and self.unavailable_at(te):
                return te
        return None

    def first_opening_from(self, t0: float, t1: float) -> float | None:
        """First fresh opening in [t0, t1): the circuit going OPEN or the health check failing."""
        for te, st, h in self.events:
            if t0 <= te < t1 and (st == "OPEN" or h is False):
                return te
        return None

    def first_available_from(self, t0: float, t1: float) -> float | None:
        if not self.unavailable_at(t0):
            return t0
        for te, _, _ in self.events:
            if t0 < te <= t1 and not self.unavailable_at(te):
                return te
        return None


def read_timeline(log_path: Path, resets: list[float]) -> Timeline:
    """Transitions of the primary logged by one ext_proc (all its processes: a restart appends)."""
    events: list[tuple[float, str | None, bool | None]] = [(t, "CLOSED", True) for t in resets]
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if '"provider": "primary"' not in line or '"t":' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "circuit state changed":
            events.append((float(entry["t"]), str(entry["state"]), None))
        elif entry.get("msg") == "provider availability changed":
            events.append((float(entry["t"]), None, bool(entry["healthy"])))
    events.sort(key=lambda e: e[0])
    return Timeline(events)


# ---- the chaos run ----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    what: str
    t_start: float
    t_end: float = 0.0
    t_fault: float = 0.0  # when the fault took effect, if later than t_start (the SIGKILL)
    detect_s: float | None = None
    detect_what: str = ""
    recover_s: float | None = None
    recover_what: str = ""
    notes: list[str] = field(default_factory=list)


class ChaosRun:
    """``stack_class``: the tests pass theirs (tests.harness.Stack), which adds the leak guard."""

    def __init__(self, settings: ChaosSettings, stack_class: type[Stack] = Stack) -> None:
        self.s = settings
        self.rig = Rig(settings, stack_class)
        self.phases: list[Phase] = []
        self.v2 = False
        self.resets: dict[int, list[float]] = {0: [], 1: []}
        self.load = OpenLoopLoad("", settings.rate, request_timeout=settings.request_timeout,
                                 distinct_prompts=settings.distinct_prompts, model_for=self._model)
        self.watcher: MetricsWatcher | None = None

    def _model(self, seq: int) -> str:
        return MODEL_V2 if self.v2 and seq % 2 else MODEL

    async def _wait(self, predicate: Callable[[], Any]) -> float | None:
        return await until(predicate, self.s.wait_timeout, interval=0.05)

    async def _phase(self, name: str, what: str, action: Callable[[Phase], Awaitable[None]],
                     min_seconds: float | None = None) -> None:
        phase = Phase(name, what, time.time())
        self.phases.append(phase)
        print(f"  {time.strftime('%H:%M:%S')} {name}: {what}", flush=True)
        await action(phase)
        remaining = phase.t_start + (min_seconds or self.s.phase_seconds) - time.time()
        if remaining > 0:
            await asyncio.sleep(remaining)
        phase.t_end = time.time()
        await asyncio.to_thread(self.rig.primary.collect)

    async def _fault(self, mode: str) -> None:
        await asyncio.to_thread(self.rig.primary.fault, mode)

    async def run(self) -> dict[str, Any]:
        await asyncio.to_thread(self.rig.start)
        try:
            return await self._run()
        finally:
            await asyncio.to_thread(self.rig.stop)

    async def _run(self) -> dict[str, Any]:
        s, rig = self.s, self.rig
        eps = rig.stack.extprocs
        self.load.url = rig.stack.url
        self.watcher = watcher = MetricsWatcher([ep.admin for ep in eps], s.poll_interval)
        stop = asyncio.Event()
        budget = s.phase_seconds * 14 + 6 * s.wait_timeout
        load_task = asyncio.create_task(self.load.run(stop, budget))
        watch_task = asyncio.create_task(watcher.run(stop))
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        import redis.asyncio as aioredis

        redis_client = aioredis.from_url(rig.redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        t_run = time.time()
        try:
            async def noop(_: Phase) -> None:
                return None

            await self._phase("baseline", "no fault", noop)
            for mode, what in (("500", "primary answers 500"), ("429", "primary answers 429"),
                               ("hang", f"primary hangs past timeout ({s.timeout:g}s)"),
                               ("refuse", "primary refuses connections")):
                async def inject(_: Phase, mode: str = mode) -> None:
                    await self._fault(mode)

                await self._phase(f"primary-{mode}", what, inject,
                                  max(s.phase_seconds, 2 * s.timeout) if mode == "hang" else None)

            async def recover(phase: Phase) -> None:
                await self._fault("ok")

                def closed() -> bool:
                    return all(watcher.value(i, "holysheep_circuit_state{provider=\"primary\"}") == 0
                               and watcher.value(i, "holysheep_provider_healthy{provider=\"primary\"}") == 1
                               for i in range(len(eps)))

                if await self._wait(closed) is None:
                    phase.notes.append("circuit not closed in every ext_proc within the wait bound")

            await self._phase("primary-recover", "primary answers again", recover)

            async def redis_kill(phase: Phase) -> None:
                before = watcher.total(CACHE_ERRORS)
                await asyncio.to_thread(rig.redis.kill)
                t = await self._wait(lambda: watcher.total(CACHE_ERRORS) > before)
                if t is not None:
                    phase.detect_s, phase.detect_what = t - phase.t_start, "cache error metric rises"

            await self._phase("redis-kill", "redis-server SIGKILLed", redis_kill)

            async def redis_restart(phase: Phase) -> None:
                await asyncio.to_thread(rig.redis.start)

                async def stored() -> bool:
                    try:
                        return int(await redis_client.dbsize()) > 0
                    except Exception:
                        return False

                t = await self._wait(stored)
                if t is not None:
                    phase.recover_s, phase.recover_what = t - phase.t_start, "new answers stored in redis again"

            await self._phase("redis-restart", "redis-server restarted (empty)", redis_restart)

            async def hosts() -> dict[int, str]:
                return await envoy_host_health(session, rig.envoy_admin(), EXTPROC_CLUSTER)

            victim = eps[1]

            async def ep_kill(phase: Phase) -> None:
                await asyncio.to_thread(victim.stop, signal.SIGKILL)
                phase.t_fault = time.time()
                self.resets[1].append(phase.t_fault)

                async def ejected() -> bool:
                    return "healthy" not in (await hosts()).get(victim.grpc_port, "healthy")

                t = await self._wait(ejected)
                if t is not None:
                    phase.detect_s, phase.detect_what = t - phase.t_start, "envoy marks the host unhealthy"

            await self._phase("extproc-kill", "one of two ext_procs SIGKILLed", ep_kill)

            async def ep_restart(phase: Phase) -> None:
                await asyncio.to_thread(victim.start)

                async def back() -> bool:
                    return (await hosts()).get(victim.grpc_port) == "healthy"

                t = await self._wait(back)
                if t is not None:
                    phase.recover_s, phase.recover_what = t - phase.t_start, "envoy routes to it again"

            await self._phase("extproc-restart", "the killed ext_proc restarted", ep_restart)

            async def rewrite_config(text: str, result: str) -> float | None:
                """Write the config; the time every ext_proc's reload counter for `result` rose."""
                series = f'holysheep_config_reloads_total{{result="{result}"}}'
                before = [watcher.value(i, series) or 0.0 for i in range(len(eps))]
                await asyncio.to_thread(rig.stack.write_config, text)
                return await self._wait(lambda: all(
                    (watcher.value(i, series) or 0.0) > before[i] for i in range(len(eps))))

            async def bad_config(phase: Phase) -> None:
                t = await rewrite_config(INVALID, "invalid")
                if t is not None:
                    phase.detect_s, phase.detect_what = t - phase.t_start, "every ext_proc rejects it"

            await self._phase("config-invalid", "config rewritten to an invalid one", bad_config)

            async def new_config(phase: Phase) -> None:
                t = await rewrite_config(s.config(rig.redis.url, v2=True), "ok")
                if t is not None:
                    phase.recover_s, phase.recover_what = t - phase.t_start, "every ext_proc loads it"
                    self.v2 = True  # from now on every other request uses the new alias
                    # Observe the alias for a whole phase from here: on a loaded machine the reload
                    # alone can take the phase's length, and then no alias request fell inside it.
                    await asyncio.sleep(s.phase_seconds)
                else:
                    phase.notes.append("new config not loaded everywhere within the wait bound")

            await self._phase("config-new", "config rewritten to a new valid one (new model alias)", new_config)
        finally:
            stop.set()
            await asyncio.gather(load_task, watch_task, return_exceptions=True)
            await session.close()
            await redis_client.aclose()
            await asyncio.to_thread(rig.primary.collect)
        return self._report(t_run)

    def _report(self, t_run: float) -> dict[str, Any]:
        s, rig = self.s, self.rig
        results = sorted(self.load.results, key=lambda r: r.t_send)
        timelines = [read_timeline(ep.log_path or Path("/nonexistent"), self.resets[i])
                     for i, ep in enumerate(rig.stack.extprocs)]
        keys = {_key(i): i for i in range(len(timelines))}
        primary_reqs = sorted((r for r in rig.primary.records.values()
                               if not r.path.endswith("/models") and r.time >= t_run), key=lambda r: r.time)
        unknown_cred = sum(1 for r in primary_reqs if r.credential not in keys)
        by_id = {str(r.seq): r for r in results}
        judgements = []
        for i in range(len(timelines)):
            arrivals = []
            for r in primary_reqs:
                if r.credential == _key(i):
                    client = by_id.get(r.chaos_id or "")
                    arrivals.append(Arrival(r.time, r.status, client.t_send if client else float("inf"),
                                            client.t_done if client else float("inf"), r.chaos_id))
            judgements.append(judge(arrivals, s.failure_threshold, s.reset_timeout, s.timeout, self.resets[i]))
        rows: list[dict[str, Any]] = []
        for idx, ph in enumerate(self.phases):
            t_next = self.phases[idx + 1].t_start if idx + 1 < len(self.phases) else float("inf")
            # A request belongs to the phase in which it completed: a failure shows when it ends
            # (requests in flight on an ext_proc that is killed were sent before the kill).
            in_phase = [r for r in results if ph.t_start <= r.t_done < t_next]
            at_primary = [r for r in primary_reqs if ph.t_start <= r.time < t_next]
            to_open, in_flight, trials = ([(i, a) for i, j in enumerate(judgements) for a in getattr(j, kind)
                                           if ph.t_start <= a.time < t_next]
                                          for kind in ("to_open", "in_flight", "trials"))
            if ph.name.startswith("primary-") and ph.name != "primary-recover":
                # Detected when every ext_proc has opened the circuit (or failed the health
                # check) anew since the fault began; an ext_proc that kept it open throughout
                # (the previous fault's opening) counts as detected at once.
                firsts: list[float] = []
                for tl in timelines:
                    fresh = tl.first_opening_from(ph.t_start, t_next)
                    if fresh is not None:
                        firsts.append(fresh)
                    elif tl.unavailable_throughout(ph.t_start, t_next):
                        firsts.append(ph.t_start)
                        ph.notes.append("an ext_proc kept the circuit open from the previous fault")
                if len(firsts) == len(timelines):
                    ph.detect_s = max(firsts) - ph.t_start
                    ph.detect_what = "primary opened/unhealthy anew in every ext_proc"
            if ph.name == "primary-recover":
                avail = [tl.first_available_from(ph.t_start, t_next + 30) for tl in timelines]
                served = next((r.t_done for r in results if r.t_send >= ph.t_start and r.provider == "primary"
                               and not r.failed), None)
                if all(a is not None for a in avail) and served is not None:
                    ph.recover_s = max([*(a for a in avail if a is not None), served]) - ph.t_start
                    ph.recover_what = "primary available in every ext_proc and serving clients"
            summary = summarize(in_phase)
            t_fault = ph.t_fault or ph.t_start
            rows.append({
                **{k: v for k, v in asdict(ph).items() if k not in ("t_start", "t_end", "t_fault")},
                # failures of requests sent before the fault took effect (in flight when it hit)
                "failures_in_flight_at_fault": sum(1 for r in in_phase if r.failed and r.t_send < t_fault),
                "t_start": round(ph.t_start - t_run, 3), "t_end": round(ph.t_end - t_run, 3),
                **summary,
                "primary_requests": len(at_primary),
                "primary_requests_while_open": len(to_open),
                "primary_in_flight_at_opening": len(in_flight),
                "primary_half_open_trials": len(trials),
                "circuit_openings_seen": sum(1 for j in judgements for t in j.opened_at if ph.t_start <= t < t_next),
                "while_open_detail": [{"t": round(a.time - t_run, 4), "ep": i, "chaos_id": a.chaos_id,
                                       "status": a.status, "sent": round(a.t_send - t_run, 4)}
                                      for i, a in to_open[:20]],
                "failure_detail": [{"seq": r.seq, "t_send": round(r.t_send - t_run, 4), "error": r.error,
                                    "status": r.status, "latency_ms": round(r.latency_ms, 1)}
                                   for r in in_phase if r.failed][:20],
            })
        return {
            "kind": "chaos",
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_run)),
            "command": " ".join(["python -m bench.chaos", *sys.argv[1:]]),
            "settings": asdict(s),
            "environment": _environment(),
            "totals": {**summarize(results), "dropped": len(self.load.dropped),
                       "primary_requests_while_open": sum(r["primary_requests_while_open"] for r in rows),
                       "primary_requests_unattributed": unknown_cred},
            "phases": rows,
            "circuit_events": [[(round(t - t_run, 4), st, h) for t, st, h in tl.events if t >= t_run]
                               for tl in timelines],
        }


# ---- soak ------------------------------------------------------------------------------------


async def run_soak(settings: ChaosSettings, seconds: float, sample_every: float = 5.0,
                   stack_class: type[Stack] = Stack) -> dict[str, Any]:
    rig = Rig(settings, stack_class)
    await asyncio.to_thread(rig.start)
    try:
        return await _soak(rig, settings, seconds, sample_every)
    finally:
        await asyncio.to_thread(rig.stop)


async def _soak(rig: Rig, s: ChaosSettings, seconds: float, sample_every: float) -> dict[str, Any]:
    import redis.asyncio as aioredis

    eps = rig.stack.extprocs
    load = OpenLoopLoad(rig.stack.url, s.rate, request_timeout=s.request_timeout,
                        distinct_prompts=s.distinct_prompts)
    watcher = MetricsWatcher([ep.admin for ep in eps], max(1.0, sample_every / 2))
    stop = asyncio.Event()
    load_task = asyncio.create_task(load.run(stop, seconds))
    watch_task = asyncio.create_task(watcher.run(stop))
    redis_client = aioredis.from_url(rig.redis.url, socket_timeout=1, socket_connect_timeout=1)
    samples: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        for _ in range(int(seconds / sample_every) + 2):
            if load_task.done():
                break
            await asyncio.sleep(min(sample_every, max(0.0, t0 + seconds - time.time())) or 0.01)
            per_ep = []
            for ep in eps:
                assert ep.proc is not None
                rss, fds, procs = process_tree_usage(ep.proc.pid)
                per_ep.append({"rss_mb": round(rss, 2), "fds": fds, "procs": procs})
            try:
                dbsize = int(await redis_client.dbsize())
            except Exception:
                dbsize = -1
            entries = [watcher.value(i, CACHE_ENTRIES) for i in range(len(eps))]
            samples.append({
                "t": round(time.time() - t0, 2), "sent": load.sent, "inflight": load.inflight,
                "errors": sum(1 for r in load.results if r.failed), "extprocs": per_ep,
                "cache_entries": entries, "redis_keys": dbsize,
                "extproc_requests": [watcher.value(i, "requests_total") for i in range(len(eps))],
            })
            last = samples[-1]
            print(f"  t={last['t']:6.1f}s sent={last['sent']} errors={last['errors']} "
                  f"rss={[e['rss_mb'] for e in per_ep]} fds={[e['fds'] for e in per_ep]} "
                  f"cache={entries} redis={dbsize} served={last['extproc_requests']}", flush=True)
            if time.time() - t0 >= seconds:
                break
    finally:
        stop.set()
        await asyncio.gather(load_task, watch_task, return_exceptions=True)
        await redis_client.aclose()
    return soak_report(load.results, samples, s, seconds, len(load.dropped))


def soak_report(results: list[Result], samples: list[dict[str, Any]], s: ChaosSettings, seconds: float,
                dropped: int) -> dict[str, Any]:
    window = min(60.0, seconds / 3)
    first = [x for x in samples if x["t"] <= window + 0.5] or samples[:1]
    last = [x for x in samples if x["t"] >= samples[-1]["t"] - window] if samples else []

    def mean_rss(xs: list[dict[str, Any]]) -> float:
        return round(sum(sum(e["rss_mb"] for e in x["extprocs"]) for x in xs) / max(1, len(xs)), 2)

    fds = [sum(e["fds"] for e in x["extprocs"]) for x in samples]
    entries = [max((v or 0.0) for v in x["cache_entries"]) for x in samples]
    rss_first, rss_last = mean_rss(first), mean_rss(last)
    return {
        "kind": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join(["python -m bench.chaos", *sys.argv[1:]]),
        "settings": asdict(s),
        "seconds": seconds,
        "environment": _environment(),
        "totals": {**summarize(results), "dropped": dropped},
        "window_s": window,
        "rss_mb_first_window": rss_first,
        "rss_mb_last_window": rss_last,
        "rss_change_pct": round((rss_last - rss_first) / rss_first * 100, 2) if rss_first else None,
        "fds_first": fds[0] if fds else None,
        "fds_last": fds[-1] if fds else None,
        "fds_min": min(fds) if fds else None,
        "fds_max": max(fds) if fds else None,
        "cache_entries_max": max(entries) if entries else None,
        "cache_entries_bound": s.max_entries,
        "redis_keys_max": max((x["redis_keys"] for x in samples), default=None),
        "samples": samples,
    }


# ---- output ----------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def chaos_table(report: dict[str, Any]) -> str:
    head = (f"{'phase':<16} {'sent':>6} {'fail':>5} {'p99 ms':>8} {'detect s':>9} {'to open':>8} "
            f"{'recover s':>10}  answered by")
    lines = [head, "-" * len(head)]
    for r in report["phases"]:
        answered = ", ".join(f"{k} {v}" for k, v in r["answered_by"].items())
        fail = f"{r['failures']}" + (f" ({r['failures_in_flight_at_fault']} in flight)"
                                      if r["failures_in_flight_at_fault"] else "")
        lines.append(f"{r['name']:<16} {r['sent']:>6} {fail:>5} {r['p99_ms']:>8.1f} "
                     f"{_fmt(r['detect_s']):>9} {r['primary_requests_while_open']:>8} {_fmt(r['recover_s']):>10}"
                     f"  {answered}")
    t = report["totals"]
    lines.append(f"{'total':<16} {t['sent']:>6} {t['failures']:>5} {t['p99_ms']:>8.1f} {'':>9} "
                 f"{t['primary_requests_while_open']:>8}")
    return "\n".join(lines)


def soak_summary(rep: dict[str, Any]) -> str:
    t = rep["totals"]
    return (f"soak {rep['seconds']:g}s at {rep['settings']['rate']:g} req/s: sent {t['sent']}, errors {t['failures']}, "
            f"dropped {rep['totals']['dropped']}; ext_proc RSS (both) first {rep['window_s']:g}s "
            f"{rep['rss_mb_first_window']} MB -> last {rep['window_s']:g}s {rep['rss_mb_last_window']} MB "
            f"({rep['rss_change_pct']}%); fds first {rep['fds_first']} last {rep['fds_last']} "
            f"[{rep['fds_min']}-{rep['fds_max']}]; memory cache entries max {rep['cache_entries_max']} "
            f"(bound {rep['cache_entries_bound']}); redis keys max {rep['redis_keys_max']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop)")
    p.add_argument("--phase-seconds", type=float, default=6.0, help="load per fault phase (11 phases)")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="soak instead of chaos")
    p.add_argument("--sample-every", type=float, default=5.0, help="soak sampling interval")
    p.add_argument("--timeout", type=float, default=1.0, help="provider timeout in the config (s)")
    p.add_argument("--reset-timeout", type=float, default=2.0, help="circuit resetTimeout (s)")
    p.add_argument("--out", default=str(Path(__file__).with_name("results")), help="directory for the JSON")
    args = p.parse_args(argv)
    settings = ChaosSettings(rate=args.rate, phase_seconds=args.phase_seconds, timeout=args.timeout,
                             reset_timeout=args.reset_timeout)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.soak:
        rep = asyncio.run(run_soak(settings, args.soak, args.sample_every))
        path = out / f"chaos-soak-{stamp}.json"
        print(soak_summary(rep))
    else:
        rep = asyncio.run(ChaosRun(settings).run())
        path = out / f"chaos-{stamp}.json"
        print(chaos_table(rep))
    path.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
