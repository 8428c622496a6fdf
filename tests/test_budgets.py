"""Budgets (extproc/budgets.py) over the memory store (extproc/budget_store.py): matching, windows,
admission, usage, refusals, OpenAI's headers, reloads, the bounded table, the gauges, and
exactness across worker processes that share one table. The Redis store: test_budgets_redis.py.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from extproc.budget_store import CounterTable, Counts, Limits, MemoryBudgetStore
from extproc.budgets import Admission, BudgetEngine, format_reset, window_bounds
from protos.spec import BudgetSpec, ConfigError, parse_document
from tests.budget_helpers import Clock, memory_worker

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
HOUR = 3600
BASE = 472_223 * HOUR  # 2023-11-14T23:00:00Z, a window start for every window length dividing an hour
T0 = BASE + 10


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make(budgets: list[BudgetSpec], clock: Clock, table: CounterTable | None = None,
         scope: str = "team-a/llm") -> BudgetEngine:
    return BudgetEngine(scope, budgets, MemoryBudgetStore(table or CounterTable(None)), clock=clock)


def admit(engine: BudgetEngine, ns: str = "team-a", sa: str = "app") -> Admission:
    decision = run(engine.admit(ns, sa))
    assert decision is not None, f"no budget matched {ns}/{sa}"
    return decision


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_fixed_windows_are_aligned_to_the_epoch_and_roll_over() -> None:
    clock = Clock(T0)
    spec = BudgetSpec("hourly", HOUR, requests=3)
    engine = make([spec], clock)
    for i in range(3):
        decision = admit(engine)
        assert decision.admitted and decision.figures[0].used == Counts(i + 1, 0, 0.0)
    refused = admit(engine)
    assert refused.refusal is not None
    assert (refused.refusal.budget, refused.refusal.unit, refused.refusal.code) == (
        "hourly", "requests", "rate_limit_exceeded")
    assert refused.refusal.reset == HOUR - 10 and refused.refusal.retry_after == HOUR - 10
    assert refused.figures[0].used.requests == 3, "a refused request is not counted"

    clock.now = BASE + HOUR - 0.25
    late = admit(engine)
    assert late.refusal is not None and late.refusal.retry_after == 1  # rounded up, whole seconds
    clock.now = BASE + HOUR
    fresh = admit(engine)
    assert fresh.admitted and fresh.figures[0].used.requests == 1
    assert engine.counter(spec.name, "team-a", "app", clock.now).key.endswith(f":{BASE + HOUR}")

    assert window_bounds(BASE + HOUR - 0.001, HOUR) == (BASE, BASE + HOUR)
    assert window_bounds(T0, 86400)[0] % 86400 == 0  # a day is a UTC day
    assert window_bounds(T0, 60) == (BASE, BASE + 60)


def test_counters_per_service_account_namespace_and_shared() -> None:
    clock = Clock(T0)
    per_sa = make([BudgetSpec("per-sa", HOUR, per="ServiceAccount", namespaces=("team-*",), requests=2)], clock)
    assert [admit(per_sa).admitted for _ in range(3)] == [True, True, False]
    assert [admit(per_sa, sa="other").admitted for _ in range(3)] == [True, True, False]

    per_ns = make([BudgetSpec("per-ns", HOUR, per="Namespace", namespaces=("team-*",), requests=2)], clock)
    assert admit(per_ns, sa="app").admitted and admit(per_ns, sa="other").admitted
    refused = admit(per_ns, sa="third")
    assert refused.refusal is not None and refused.refusal.budget == "per-ns"
    assert admit(per_ns, ns="team-b").admitted  # its own namespace's counter

    shared = make([BudgetSpec("shared", HOUR, per="Shared", requests=2)], clock)
    assert admit(shared, "team-a", "app").admitted and admit(shared, "team-b", "web").admitted
    assert not admit(shared, "team-c", "batch").admitted

    globs = make([BudgetSpec("web", HOUR, namespaces=("team-a",), service_accounts=("app", "web-*"), requests=1)],
                 clock)
    assert run(globs.admit("team-a", "db")) is None
    assert run(globs.admit("team-b", "app")) is None
    assert run(globs.admit("team-a-x", "app")) is None  # a glob matches the whole name
    assert admit(globs, sa="web-1").admitted and globs.matching("team-a", "web-2")[0].name == "web"


def test_a_refused_request_is_counted_in_no_budget() -> None:
    clock = Clock(T0)
    narrow = BudgetSpec("app-hourly", HOUR, service_accounts=("app",), requests=2)
    wide = BudgetSpec("team-a-hourly", HOUR, per="Namespace", requests=5)
    engine = make([narrow, wide], clock)
    answers = [admit(engine) for _ in range(5)]
    assert [a.admitted for a in answers] == [True, True, False, False, False]
    assert all(a.refusal.budget == "app-hourly" for a in answers[2:] if a.refusal)
    # the app's refused retries did not spend the namespace's budget: 3 left for its teammates
    assert [admit(engine, sa="other").admitted for _ in range(4)] == [True, True, True, False]
    last = admit(engine, sa="other")
    assert last.refusal is not None and last.refusal.budget == "team-a-hourly"
    assert {f.budget.name: f.used.requests for f in last.figures} == {"team-a-hourly": 5}


def test_the_refusal_names_the_budget_that_resets_last() -> None:
    clock = Clock(T0)
    engine = make([BudgetSpec("per-minute", 60, requests=1), BudgetSpec("per-hour", HOUR, requests=1)], clock)
    assert admit(engine).admitted
    refused = admit(engine).refusal
    assert refused is not None and (refused.budget, refused.retry_after) == ("per-hour", HOUR - 10)

    roomy = make([BudgetSpec("per-minute", 60, requests=1), BudgetSpec("per-hour", HOUR, requests=5)], clock)
    assert admit(roomy).admitted
    refused = admit(roomy).refusal
    assert refused is not None and (refused.budget, refused.retry_after) == ("per-minute", 50)


def test_the_request_crossing_a_token_limit_completes_and_the_next_is_refused() -> None:
    clock = Clock(T0)
    engine = make([BudgetSpec("tokens", HOUR, tokens=100)], clock)
    first = admit(engine)
    engine.record_usage(first, 60, 0.0)
    second = admit(engine)
    assert second.admitted and second.figures[0].used.tokens == 60
    assert dict(second.headers())["x-ratelimit-remaining-tokens"] == "40"
    engine.record_usage(second, 60, 0.0)  # 120: this one crossed the limit, and it was answered
    third = admit(engine)
    assert third.refusal is not None
    assert (third.refusal.unit, third.refusal.code, third.refusal.limit) == ("tokens", "rate_limit_exceeded", 100)
    assert third.figures[0].used == Counts(2, 120, 0.0)
    engine.record_usage(third, 500, 0.0)  # a refused request has no usage to count
    clock.now = BASE + HOUR
    turned = admit(engine)
    assert turned.admitted and turned.figures[0].used == Counts(1, 0, 0.0)


def test_a_cost_budget_refuses_with_insufficient_quota() -> None:
    clock = Clock(T0)
    engine = make([BudgetSpec("team-a-daily", 86400, cost_usd=0.5)], clock)
    for _ in range(2):
        engine.record_usage(admit(engine), 1200, 0.3)
    refused = admit(engine)
    assert refused.refusal is not None
    assert (refused.refusal.unit, refused.refusal.code) == ("usd", "insufficient_quota")
    assert math.isclose(refused.figures[0].used.cost_usd, 0.6)
    retry = 86400 - (T0 % 86400)
    assert refused.refusal.retry_after == retry
    assert refused.refusal.message == (
        f"Budget 'team-a-daily' is used up: its limit of 0.5 USD per 1d is reached. It resets in {retry}s, "
        "at 2023-11-15T00:00:00Z.")
    assert refused.headers() == []  # cost has no OpenAI header, and no other budget applies


def test_headers_describe_the_tightest_budget_of_each_unit() -> None:
    clock = Clock(T0)
    minute = BudgetSpec("minute", 60, requests=10)
    hour = BudgetSpec("hour", HOUR, requests=20, tokens=1000)
    engine = make([minute, hour, BudgetSpec("dollars", HOUR, cost_usd=1)], clock)
    first = admit(engine)
    # minute: 9 of 10 left (0.9); hour: 19 of 20 (0.95) -> the minute budget's requests
    assert first.headers() == [
        ("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "9"),
        ("x-ratelimit-reset-requests", "50s"),
        ("x-ratelimit-limit-tokens", "1000"), ("x-ratelimit-remaining-tokens", "1000"),
        ("x-ratelimit-reset-tokens", "59m50s"),
    ]
    for _ in range(8):
        engine.record_usage(admit(engine), 100, 0.0)
    clock.now = BASE + 70  # a new minute: 9 of 10 left there, but the hour has 11 of 20
    answer = admit(engine)
    assert dict(answer.headers()) == {
        "x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "58m50s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "200",
        "x-ratelimit-reset-tokens": "58m50s",
    }
    tokens_only = make([BudgetSpec("t", HOUR, tokens=5)], clock)
    assert [k for k, _ in admit(tokens_only).headers()] == [
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]
    one = make([BudgetSpec("one", 60, requests=1)], clock)
    admit(one)
    assert dict(admit(one).headers())["x-ratelimit-remaining-requests"] == "0"  # a refusal carries them too


@pytest.mark.parametrize(("seconds", "text"), [
    (0.017, "17ms"), (0.0001, "1ms"), (0.9999, "1s"), (1, "1s"), (1.2, "2s"), (59.5, "1m0s"), (360, "6m0s"),
    (3599.2, "1h0m0s"), (90061, "25h1m1s"),
])
def test_reset_in_openai_format(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_a_reload_keeps_the_counts_of_budgets_that_still_exist() -> None:
    clock, table = Clock(T0), CounterTable(None)
    first = make([BudgetSpec("team", HOUR, requests=5), BudgetSpec("other", HOUR, requests=5)], clock, table)
    for _ in range(3):
        assert admit(first).admitted
    # a new limit, "other" removed: the count of "team" goes on under the new limit
    second = make([BudgetSpec("team", HOUR, requests=4)], clock, table)
    assert [admit(second).admitted for _ in range(2)] == [True, False]
    assert [f.budget.name for f in admit(second).figures] == ["team"]
    third = make([BudgetSpec("team", HOUR, requests=10), BudgetSpec("other", HOUR, requests=5)], clock, table)
    assert {f.budget.name: f.used.requests for f in admit(third).figures} == {"team": 5, "other": 4}
    # another window length is another counter: an hour's count says nothing about a day's
    fourth = make([BudgetSpec("team", 86400, requests=10)], clock, table)
    assert admit(fourth).figures[0].used.requests == 1
    # another config with a budget of the same name has its own counters
    elsewhere = make([BudgetSpec("team", HOUR, requests=10)], clock, table, scope="team-b/llm")
    assert admit(elsewhere).figures[0].used.requests == 1


def test_the_table_is_bounded_and_reuses_the_slots_of_ended_windows() -> None:
    clock = Clock(T0)
    table = CounterTable(None, slots=1)  # every key has the same 32 slots to live in
    engine = make([BudgetSpec("per-sa", 60, requests=1)], clock, table)
    for i in range(32):
        assert admit(engine, sa=f"sa-{i}").admitted
        assert not admit(engine, sa=f"sa-{i}").admitted
    errors = sample("holysheep_budget_store_errors_total")
    assert admit(engine, sa="sa-32").admitted and admit(engine, sa="sa-32").admitted  # uncounted, not failed
    assert sample("holysheep_budget_store_errors_total") == errors + 2
    clock.now = BASE + 60  # the 32 counters' window ended: their slots are free
    assert admit(engine, sa="sa-32").admitted and not admit(engine, sa="sa-32").admitted
    assert sample("holysheep_budget_store_errors_total") == errors + 2


def test_gauges_show_each_budgets_most_used_counter() -> None:
    clock = Clock(T0)
    engine = make([BudgetSpec("gauge-sa", HOUR, requests=10, tokens=1000), BudgetSpec("gauge-usd", HOUR,
                                                                                      cost_usd=2.5)], clock)
    for _ in range(3):
        engine.record_usage(admit(engine), 100, 0.25)
    engine.record_usage(admit(engine, sa="other"), 50, 0.5)
    rejected = sample("holysheep_budget_rejections_total", budget="gauge-sa", unit="tokens")
    refusing = make([BudgetSpec("gauge-sa", HOUR, tokens=300)], clock, engine.store.table())
    assert admit(refusing).refusal is not None
    assert sample("holysheep_budget_rejections_total", budget="gauge-sa", unit="tokens") == rejected + 1
    engine.export_metrics()
    assert sample("holysheep_budget_used", budget="gauge-sa", unit="requests") == 3  # the app, not the other
    assert sample("holysheep_budget_used", budget="gauge-sa", unit="tokens") == 300
    assert sample("holysheep_budget_limit", budget="gauge-sa", unit="tokens") == 1000
    assert REGISTRY.get_sample_value("holysheep_budget_used", {"budget": "gauge-sa", "unit": "usd"}) is None
    assert math.isclose(sample("holysheep_budget_used", budget="gauge-usd", unit="usd"), 0.75)  # app: 3 x 0.25
    clock.now = BASE + HOUR
    engine.export_metrics()  # a new window: nothing used yet
    assert sample("holysheep_budget_used", budget="gauge-sa", unit="requests") == 0


def test_invalid_budgets_are_refused() -> None:
    """The spec's parser refuses what the engine cannot count (tests/test_crd.py: the messages);
    the engine itself refuses two budgets of one name."""
    doc: dict[str, Any] = {"apiVersion": "holysheep.ai/v1", "kind": "HolySheepConfig",
                           "metadata": {"name": "llm", "namespace": "team-a"},
                           "spec": {"baseUrl": "https://api.example.com/v1"}}
    for bad in ({"per": "Team"}, {"window": "0s"}, {"window": "61500ms"}, {"requests": -1}, {"costUsd": -0.5},
                {"tokens": 1.5}, {"requests": None}):
        doc["spec"]["budgets"] = [{"name": "b", "window": "1m", "requests": 1, **bad}]
        with pytest.raises(ConfigError, match=r"spec\.budgets\[0\]"):
            parse_document(doc)
    with pytest.raises(ValueError, match="unique"):
        make([BudgetSpec("b", 60, requests=1), BudgetSpec("b", 3600, requests=1)], Clock(T0))


def test_limits_exceeded_units() -> None:
    limits = Limits(requests=2, tokens=10, cost_usd=1.0)
    assert limits.exceeded(Counts(1, 9, 0.99)) == ()
    assert limits.exceeded(Counts(2, 10, 1.0)) == ("usd", "tokens", "requests")
    assert Limits(requests=0).exceeded(Counts()) == ("requests",)


def test_the_memory_store_is_exact_across_worker_processes(tmp_path: Path) -> None:
    """Three interpreters map one table, as one replica's workers do, and race for one budget."""
    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "budgets-v1")
    spec = BudgetSpec("exact", HOUR, per="Shared", requests=3000)
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=memory_worker, args=(path, spec, T0, 2500, barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(admitted) == 3000, admitted
    engine = make([spec], Clock(T0), CounterTable(path), scope="exact")
    ref = engine.counter(spec.name, "team-a", "app", T0)
    assert CounterTable(path).read([ref], T0) == [Counts(3000, 0, 0.0)]


EXPORT_IN_A_WORKER = """
import asyncio, sys
from extproc.budget_store import CounterTable, MemoryBudgetStore
from extproc.budgets import BudgetEngine
from protos.spec import BudgetSpec, ConfigError, parse_document
now = float(sys.argv[2])
engine = BudgetEngine("mp", [BudgetSpec("mp-budget", 3600, per="Shared", requests=100)],
                      MemoryBudgetStore(CounterTable(sys.argv[1])), clock=lambda: now)
for _ in range(int(sys.argv[3])):
    asyncio.run(engine.admit("team-a", "app"))
engine.export_metrics()
"""


def test_in_multiprocess_mode_the_gauge_is_the_replicas_figure_not_a_sum(tmp_path: Path) -> None:
    """Workers (separate interpreters, prometheus-client's multiprocess mode, one shared table)
    each export the gauge: /metrics shows the latest figure once, and a turned window shows 0."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    table = str(tmp_path / "budgets-v1")

    def worker(now: float, admissions: int) -> None:
        subprocess.run([sys.executable, "-c", EXPORT_IN_A_WORKER, table, str(now), str(admissions)], check=True,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, cwd=REPO, timeout=60)

    def used() -> float | None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        return registry.get_sample_value("holysheep_budget_used", {"budget": "mp-budget", "unit": "requests"})

    worker(T0, 3)
    worker(T0, 4)
    assert used() == 7  # not 3 + 7
    worker(BASE + HOUR, 0)
    assert used() == 0  # not the last window's peak
