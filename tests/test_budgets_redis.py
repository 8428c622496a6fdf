"""Budgets over Redis (extproc/budget_store.py RedisBudgetStore), against a real redis-server:
one round trip per admission, exact across replicas (separate processes), usage from responses,
reloads, the window's expiry, and an outage: no request fails, each replica counts locally from
what it last saw, holysheep_budget_store_errors_total counts it, and Redis gets the counts back.

Windows here start in the future (the next full hour): Redis expires counters on its own clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import REGISTRY

from extproc.budget_store import REDIS_GRACE, CounterTable, Counts, RedisBudgetStore
from extproc.budgets import Admission, BudgetEngine
from extproc.dev.processes import RedisServer
from protos.spec import BudgetSpec
from tests.budget_helpers import Clock, Partition, redis_replica

HOUR = 3600
BASE = (int(time.time()) // HOUR + 1) * HOUR
T0 = BASE + 10


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.kill()


def scope() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"  # each test its own counters on the shared server


def errors() -> float:
    return REGISTRY.get_sample_value("holysheep_budget_store_errors_total") or 0.0


def counter(client: redis.Redis, engine: BudgetEngine, spec: BudgetSpec, now: float, ns: str = "team-a",
            sa: str = "app") -> dict[str, str]:
    """The counter's figures (r, t, c) as Redis holds them; its bookkeeping (g, b*) left out."""
    raw = client.hgetall(engine.counter(spec.name, ns, sa, now).key)
    return {k.decode(): v.decode() for k, v in raw.items() if k in (b"r", b"t", b"c")}  # type: ignore[union-attr]


async def admit(engine: BudgetEngine, ns: str = "team-a", sa: str = "app") -> Admission:
    decision = await engine.admit(ns, sa)
    assert decision is not None
    return decision


def test_one_round_trip_per_admission_and_the_windows_expiry(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    spec = BudgetSpec("rt", HOUR, requests=50)
    clock = Clock(T0)

    async def scenario() -> None:
        engine = BudgetEngine(scope(), [spec, BudgetSpec("rt-ns", 60, per="Namespace", requests=50)],
                              RedisBudgetStore(server.url, CounterTable(None)), clock)
        await admit(engine)  # the first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA)
        before = client.info("commandstats")
        for _ in range(20):
            assert (await admit(engine)).admitted
        after = client.info("commandstats")
        calls = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after}
        assert calls.pop("cmdstat_info") == 1
        # The client sent 20 EVALSHA and nothing else; Redis counts the script's own commands too
        # (two budgets: two keys read, incremented and given their expiry per request).
        assert {k: v for k, v in calls.items() if v} == {
            "cmdstat_evalsha": 20, "cmdstat_hmget": 40, "cmdstat_hincrby": 40, "cmdstat_pexpireat": 40}
        assert counter(client, engine, spec, clock.now) == {"r": "21"}
        ttl = client.pttl(engine.counter(spec.name, "team-a", "app", clock.now).key) / 1000
        assert abs(ttl - (BASE + HOUR + REDIS_GRACE - time.time())) < 5  # the window's end, on Redis's clock
        await engine.store.close()

    asyncio.run(scenario())
    client.close()


def test_redis_is_exact_across_replicas(server: RedisServer) -> None:
    """Two replicas (processes, each with its own local table) race with every admission in flight."""
    ctx = multiprocessing.get_context("spawn")
    spec = BudgetSpec("exact", HOUR, per="Shared", requests=500)
    where = scope()
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=redis_replica, args=(server.url, where, spec, T0, 400, barrier, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(admitted) == 500, admitted
    client = redis.Redis.from_url(server.url)
    engine = BudgetEngine(where, [spec], RedisBudgetStore(server.url, CounterTable(None)))
    assert counter(client, engine, spec, T0) == {"r": "500"}
    client.close()


def test_token_usage_is_shared_and_the_crossing_request_completes(server: RedisServer) -> None:
    spec = BudgetSpec("tokens", HOUR, tokens=100, cost_usd=10)
    clock, where = Clock(T0), scope()
    client = redis.Redis.from_url(server.url)

    async def scenario() -> None:
        one = BudgetEngine(where, [spec], RedisBudgetStore(server.url, CounterTable(None)), clock)
        two = BudgetEngine(where, [spec], RedisBudgetStore(server.url, CounterTable(None)), clock)  # another replica
        first = await admit(one)
        one.record_usage(first, 60, 0.01)
        await one.store.drain()
        second = await admit(two)
        assert second.admitted and second.figures[0].used.tokens == 60
        two.record_usage(second, 60, 0.02)
        await two.store.drain()
        refused = await admit(one)
        assert refused.refusal is not None and refused.refusal.unit == "tokens"
        assert refused.figures[0].used.tokens == 120
        assert counter(client, one, spec, clock.now) == {"r": "2", "t": "120", "c": "0.03"}
        # the replica's mirror follows what Redis said, usage writes included
        ref = one.counter(spec.name, "team-a", "app", clock.now)
        assert two.store.table().read([ref], clock.now)[0].tokens == 120
        clock.now = BASE + HOUR
        assert (await admit(two)).admitted
        for engine in (one, two):
            await engine.store.close()

    asyncio.run(scenario())
    client.close()


def test_a_reload_keeps_the_counts_in_redis(server: RedisServer) -> None:
    clock, where = Clock(T0), scope()

    async def scenario() -> None:
        first = BudgetEngine(where, [BudgetSpec("team", HOUR, requests=5)],
                             RedisBudgetStore(server.url, CounterTable(None)), clock)
        for _ in range(3):
            assert (await admit(first)).admitted
        await first.store.close()
        # a new config object, a new store (even a replica that just started): the counts are there
        second = BudgetEngine(where, [BudgetSpec("team", HOUR, requests=4)],
                              RedisBudgetStore(server.url, CounterTable(None)), clock)
        assert [(await admit(second)).admitted for _ in range(2)] == [True, False]
        await second.store.close()

    asyncio.run(scenario())


def test_redis_killed_mid_traffic_fails_nothing_and_counting_resumes_in_redis() -> None:
    srv = RedisServer()
    srv.start()
    spec = BudgetSpec("outage", HOUR, per="Shared", requests=10**6, tokens=10**9)
    clock, mono, where = Clock(T0), Clock(0.0), scope()
    store = RedisBudgetStore(srv.url, CounterTable(None), monotonic=mono)
    engine = BudgetEngine(where, [spec], store, clock)
    ref = engine.counter(spec.name, "team-a", "app", T0)
    done = 0

    async def client(n: int) -> None:
        nonlocal done
        for _ in range(n):
            decision = await admit(engine)
            assert decision.admitted
            engine.record_usage(decision, 10, 0.0)
            done += 1
            if done == 40:
                srv.kill()

    async def scenario() -> None:
        before = errors()
        await asyncio.gather(*(client(25) for _ in range(4)))  # 100 admissions, Redis gone after 40
        await store.drain()
        assert errors() > before
        local = store.table().read([ref], clock.now)[0]
        # at most the requests in flight when it died may be counted twice (towards the limit)
        assert 100 <= local.requests <= 104 and 1000 <= local.tokens <= 1040, local

        srv.start()  # back, empty, on the same port
        mono.now += store.REDIS_BACKOFF
        for _ in range(20):
            decision = await admit(engine)
            engine.record_usage(decision, 10, 0.0)
        await store.drain()
        probe = redis.Redis.from_url(srv.url)
        assert counter(probe, engine, spec, clock.now) == {
            "r": str(local.requests + 20), "t": str(local.tokens + 200)}
        probe.close()
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        srv.kill()


def test_during_an_outage_the_limit_holds_on_the_replicas_own_counts() -> None:
    srv = RedisServer()
    srv.start()
    spec = BudgetSpec("outage-limit", HOUR, per="Shared", requests=10)
    clock, mono, where = Clock(T0), Clock(0.0), scope()
    store = RedisBudgetStore(srv.url, CounterTable(None), monotonic=mono)
    engine = BudgetEngine(where, [spec], store, clock)

    async def scenario() -> None:
        for _ in range(6):
            assert (await admit(engine)).admitted
        srv.kill()
        before = errors()
        # counting goes on from the 6 Redis said, not from zero
        assert [(await admit(engine)).admitted for _ in range(5)] == [True, True, True, True, False]
        assert errors() == before + 1  # one failure, then the back-off: no timeout paid per request
        mono.now += store.REDIS_BACKOFF
        assert not (await admit(engine)).admitted
        assert errors() == before + 2  # tried again after the back-off, still down

        srv.start()  # empty: this replica's counts go back to Redis with the next request
        mono.now += store.REDIS_BACKOFF
        refused = await admit(engine)
        assert refused.refusal is not None and refused.figures[0].used.requests == 10
        assert errors() == before + 2
        probe = redis.Redis.from_url(srv.url)
        assert counter(probe, engine, spec, clock.now) == {"r": "10"}
        clock.now = BASE + HOUR
        assert (await admit(engine)).admitted
        assert counter(probe, engine, spec, clock.now) == {"r": "1"}
        probe.close()
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        srv.kill()


def test_the_mirror_never_counts_twice(server: RedisServer) -> None:
    """Floors are the replica's lower bound of the truth: with Redis healthy they change nothing."""
    spec = BudgetSpec("mirror", HOUR, requests=100, tokens=10**6)
    clock, where = Clock(T0), scope()
    client = redis.Redis.from_url(server.url)

    async def scenario() -> None:
        store = RedisBudgetStore(server.url, CounterTable(None))
        engine = BudgetEngine(where, [spec], store, clock)
        for _ in range(10):
            engine.record_usage(await admit(engine), 7, 0.0)  # usage writes race the next admission
        await store.drain()
        assert counter(client, engine, spec, clock.now) == {"r": "10", "t": "70"}
        ref = engine.counter(spec.name, "team-a", "app", T0)
        assert store.table().read([ref], clock.now) == [Counts(10, 70, 0.0)]
        await store.close()

    asyncio.run(scenario())
    client.close()


def test_after_a_partition_each_replicas_own_counts_are_added_to_redis(server: RedisServer) -> None:
    """Redis kept its data but two replicas could not reach it for a while: when they can again,
    each hands over what it counted alone, so Redis's count is exact again."""
    spec = BudgetSpec("partition", HOUR, per="Shared", requests=100)
    clock, where = Clock(T0), scope()
    client = redis.Redis.from_url(server.url)

    async def scenario() -> None:
        net = Partition(server.port)
        await net.start()
        monos = [Clock(0.0), Clock(0.0)]
        stores = [RedisBudgetStore(net.url, CounterTable(None), monotonic=m) for m in monos]
        a, b = (BudgetEngine(where, [spec], s, clock) for s in stores)
        for engine in (a, b):
            for _ in range(5):
                assert (await admit(engine)).admitted
        before = errors()
        net.cut()
        for engine, n in ((a, 7), (b, 4)):
            assert all([(await admit(engine)).admitted for _ in range(n)])
        assert errors() == before + 2  # one failure per replica, then its back-off
        assert counter(client, a, spec, clock.now) == {"r": "10"}  # Redis saw none of it
        # A counts on its own figures: the 5 Redis last told it (B's came later), plus its own
        assert (await admit(a)).figures[0].used.requests == 5 + 7 + 1
        net.heal()
        for m in monos:
            m.now += RedisBudgetStore.REDIS_BACKOFF
        assert (await admit(a)).figures[0].used.requests == 10 + 8 + 1
        assert (await admit(b)).figures[0].used.requests == 19 + 4 + 1
        assert counter(client, a, spec, clock.now) == {"r": "24"}  # every admitted request, once
        for s in stores:
            await s.close()
        await net.close()

    asyncio.run(scenario())
    client.close()


@pytest.mark.parametrize("first", [0, 1], ids=["lower-figure-first", "higher-figure-first"])
def test_a_redis_that_lost_a_counter_gets_it_back_whichever_replica_returns_first(first: int) -> None:
    """Redis restarts empty; two replicas saw different last figures (5 and 6) and each counted
    some requests alone (3 and 2). Whichever hands over first, the count is the highest figure
    once plus every replica's own counts, and a replica coming back later neither lowers it
    nor adds its floor again."""
    spec = BudgetSpec("lost", HOUR, per="Shared", requests=100, tokens=10**6)
    srv = RedisServer()
    srv.start()
    clock, where = Clock(T0), scope()

    async def scenario() -> None:
        monos = [Clock(0.0), Clock(0.0)]
        stores = [RedisBudgetStore(srv.url, CounterTable(None), monotonic=m) for m in monos]
        engines = [BudgetEngine(where, [spec], s, clock) for s in stores]
        for engine, n in zip(engines, (5, 1), strict=True):  # last figures seen: 5 and 6
            for _ in range(n):
                engine.record_usage(await admit(engine), 10, 0.0)
        for s in stores:
            await s.drain()
        srv.kill()
        for engine, n in zip(engines, (3, 2), strict=True):
            assert all([(await admit(engine)).admitted for _ in range(n)])  # counted alone
        srv.start()
        for m in monos:
            m.now += RedisBudgetStore.REDIS_BACKOFF
        order = engines if first == 0 else engines[::-1]
        for engine in order:
            await admit(engine)
        probe = redis.Redis.from_url(srv.url)
        # 6 before the restart, 3 + 2 alone, 2 since; tokens: the 60 before it
        assert counter(probe, engines[0], spec, clock.now) == {"r": str(6 + 3 + 2 + 2), "t": "60"}
        for engine in order:  # both now of the new incarnation: nothing is added again
            await admit(engine)
        assert counter(probe, engines[0], spec, clock.now) == {"r": str(6 + 3 + 2 + 4), "t": "60"}
        probe.close()
        for s in stores:
            await s.close()

    try:
        asyncio.run(scenario())
    finally:
        srv.kill()


def test_usage_goes_to_redis_with_the_next_admission_or_a_flush(server: RedisServer) -> None:
    """An answer's usage costs no round trip of its own: the counter's next admission on the
    replica carries it (so Redis checks the limit with it), else a flush shortly after."""
    spec = BudgetSpec("carry", HOUR, tokens=10**6)
    clock = Clock(T0)
    client = redis.Redis.from_url(server.url)

    async def scenario() -> None:
        store = RedisBudgetStore(server.url, CounterTable(None))
        engine = BudgetEngine(scope(), [spec], store, clock)
        first = await admit(engine)  # loads the script
        before = client.info("commandstats")
        engine.record_usage(first, 25, 0.0)
        second = await admit(engine)
        after = client.info("commandstats")
        calls = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after}
        calls.pop("cmdstat_info")
        assert {k: v for k, v in calls.items() if v} == {  # one EVALSHA: the usage went with it
            "cmdstat_evalsha": 1, "cmdstat_hmget": 1, "cmdstat_hincrby": 2, "cmdstat_pexpireat": 2}
        assert second.figures[0].used.tokens == 25
        engine.record_usage(second, 5, 0.0)  # no admission follows: the flush takes it
        deadline = time.monotonic() + 5
        while counter(client, engine, spec, clock.now).get("t") != "30" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert counter(client, engine, spec, clock.now) == {"r": "2", "t": "30"}
        assert store.table().read([engine.counter(spec.name, "team-a", "app", clock.now)], clock.now) == [
            Counts(2, 30, 0.0)]  # the mirror, nothing left to hand over
        await store.close()

    asyncio.run(scenario())
    client.close()
