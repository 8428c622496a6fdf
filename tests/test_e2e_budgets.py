"""Budgets end to end (issue 13): real Envoys, each presenting a workload certificate from the
stack's throwaway CA (the identity a sidecar of that workload has), two ext_procs sharing a real
Redis, mock providers counting what reached them.

The config lives in Istio's root namespace, so every team's namespace is in its scope and only
the budgets tell the teams apart. Each scenario has its own identities (its own Envoy) and its
own budget, so the scenarios do not share a counter. A budget's window is aligned to the epoch:
a scenario that could straddle the turn of its window waits for the turn first (``fresh_window``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis as redis_client
from prometheus_client.parser import text_string_to_metric_families

from extproc.budget_store import MemoryBudgetStore
from extproc.budgets import BudgetEngine
from extproc.cache import KEY_PREFIX
from extproc.dev.certs import write_atomic
from extproc.dev.envoy_bootstrap import CA_SECRET, WORKLOAD_SECRET, BootstrapOptions, UpstreamTLS, build_bootstrap
from extproc.dev.mock_provider import MockProvider
from extproc.dev.mtls import EXTPROC_ID
from extproc.dev.processes import Envoy, RedisServer, free_port, wait_until
from protos.spec import HolySheepConfig, load_text
from tests.budget_helpers import fresh_window
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

KEYS = {"upstream": "sk-budget-upstream-5531", "backup": "sk-budget-backup-5532", "burst": "sk-budget-burst-5533"}
TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: llm, namespace: istio-system}
spec:
  timeout: 5s
  maxRetries: 1
  circuitBreaker: {enabled: false}
  providers:
    - {name: upstream, baseUrl: "{upstream}", auth: {env: E2E_UPSTREAM_KEY}}
    - {name: backup, baseUrl: "{backup}", auth: {env: E2E_BACKUP_KEY}}
    - {name: burst, baseUrl: "{burst}", auth: {env: E2E_BURST_KEY}}
  routes:
    - {models: ["burst-*"], backends: [{provider: burst}]}
    - {models: ["*"], backends: [{provider: upstream}, {provider: backup, priority: 1}]}
  cache: {mode: Fallback, redisUrl: "REDIS"}
  pricing:
    - {model: "*", inputPerMillion: 1000, outputPerMillion: 1000}
  budgets:
    - {name: team-a-hourly, namespaces: [team-a], serviceAccounts: [app], window: 1h, requests: 5}
    - {name: team-a-batch, namespaces: [team-a], serviceAccounts: ["batch-*"], per: Namespace, window: 1h,
       requests: 4}
    - {name: team-c-tokens, namespaces: [team-c], window: 1h, tokens: 40}
    - {name: team-d-burst, namespaces: [team-d], per: Shared, window: 1h, requests: 60}
    - {name: team-e-hourly, namespaces: [team-e], window: 1h, requests: 100}
    - {name: team-f-dollars, namespaces: [team-f], window: 24h, costUsd: 0.01}
"""
SCOPE = "istio-system/llm"
HOUR = 3600


def _sds(path: Path, secret: dict[str, Any]) -> None:
    resource = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", **secret}
    write_atomic(str(path), json.dumps({"resources": [resource]}).encode())


@dataclass
class Workload:
    """One more Envoy in front of the stack's ext_procs, presenting a certificate the stack's CA
    issued for ``namespace/service_account``. ``node_metadata`` is what its sidecar claims about
    itself (attributes the ext_proc receives): a forgery when it names another workload."""

    stack: Stack
    namespace: str
    service_account: str
    node_metadata: dict[str, str] = field(default_factory=dict)
    envoy: Envoy | None = None
    client: httpx.Client | None = None

    def start(self) -> Workload:
        pki = self.stack.pki
        assert pki is not None, "the stack runs mTLS"
        home = self.stack.workdir / f"workload-{self.namespace}-{self.service_account}"
        home.mkdir(exist_ok=True)
        issued = pki.ca.workload(self.namespace, self.service_account)
        issued.write(str(home / "cert.pem"), str(home / "key.pem"))
        write_atomic(str(home / "ca.pem"), b"".join(ca.cert_pem for ca in pki.trusted))
        _sds(home / "certificate.json", {"name": WORKLOAD_SECRET, "tls_certificate": {
            "certificate_chain": {"filename": str(home / "cert.pem")},
            "private_key": {"filename": str(home / "key.pem")}}})
        _sds(home / "validation.json", {"name": CA_SECRET, "validation_context": {
            "trusted_ca": {"filename": str(home / "ca.pem")}}})
        port, admin = free_port(), free_port()
        boot = build_bootstrap(load_text(self.stack.render()), BootstrapOptions(
            listen_port=port, admin_port=admin,
            extproc_addresses=[("127.0.0.1", ep.grpc_port) for ep in self.stack.extprocs],
            node_metadata=self.node_metadata,
            extproc_tls=UpstreamTLS(str(home / "certificate.json"), str(home / "validation.json"), EXTPROC_ID),
        ))
        self.envoy = Envoy(boot, home, port, admin)
        self.envoy.start()
        self.client = self.stack.new_client(f"{self.namespace}/{self.service_account}", base_url=f"http://127.0.0.1:{port}")
        return self

    @property
    def url(self) -> str:
        assert self.envoy is not None
        return f"http://127.0.0.1:{self.envoy.listen_port}"

    def chat(self, content: str = "hi", model: str = "gpt-4o-mini", headers: dict[str, str] | None = None,
             **extra: Any) -> httpx.Response:
        assert self.client is not None
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return self.client.post("/v1/chat/completions", json=body, headers=headers or {})

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.envoy is not None:
            self.envoy.stop()


def _metric(stack: Stack, name: str, how: str = "sum", **labels: str) -> float:
    """``name`` over every ext_proc's /metrics: summed (counters) or the highest (gauges)."""
    values = []
    for ep in stack.extprocs:
        total = 0.0
        for family in text_string_to_metric_families(ep.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        values.append(total)
    return sum(values) if how == "sum" else max(values)


def _parsed(template: str) -> HolySheepConfig:
    return load_text(re.sub(r"\{\w+\}", "http://127.0.0.1:1/v1", template).replace("REDIS", "redis://127.0.0.1:1"))[0]


def _counter(redis: RedisServer, budget: str, subject: str, window: int = HOUR) -> dict[str, str]:
    """A budget counter as Redis holds it (keyed as extproc/budgets.py keys it)."""
    spec = next(b for b in _parsed(TEMPLATE).budgets if b.name == budget)
    engine = BudgetEngine(SCOPE, [spec], MemoryBudgetStore())
    namespace, _, service_account = subject.partition("/")
    key = engine.counter(budget, namespace, service_account or "any", time.time()).key
    raw = redis_client.Redis.from_url(redis.url).hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def stack(redis: RedisServer) -> Iterator[Stack]:
    """Two ext_procs sharing Redis; the stack's own Envoy is team-a/app, and claims in its node
    metadata to be team-b/app (a forgery the ext_proc must ignore)."""
    mocks = {name: MockProvider(name, expect_key=key) for name, key in KEYS.items()}
    template = TEMPLATE.replace("REDIS", redis.url)
    s = Stack(template, mocks, env={f"E2E_{n.upper()}_KEY": k for n, k in KEYS.items()}, extproc_count=2,
              workload="team-a/app", node_metadata={"NAMESPACE": "team-b", "WORKLOAD_NAME": "app"})
    with running(s) as started:
        yield started


@pytest.fixture()
def workloads(stack: Stack) -> Iterator[Any]:
    started: list[Workload] = []

    def start(who: str, **metadata: str) -> Workload:
        namespace, _, service_account = who.partition("/")
        w = Workload(stack, namespace, service_account, dict(metadata)).start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def _openai_error(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"] == "application/json"
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


FORGED_HEADERS = {
    # What a caller might write to pass for team-a/app: none of it is an identity.
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/holysheep-system/sa/holysheep-extproc;"
                               "URI=spiffe://cluster.local/ns/team-a/sa/app",
    "x-holysheep-tenant": "team-a",
    "x-holysheep-workload": "team-a/app",
}


def test_a_five_request_hourly_budget_and_identities_that_cannot_be_forged(
    stack: Stack, redis: RedisServer, workloads: Any,
) -> None:
    fresh_window(HOUR)
    upstream = stack.mocks["upstream"]
    # team-b/app, claiming to be team-a/app in its node metadata and its headers: it spends no
    # budget of team-a's (and has none of its own: no x-ratelimit headers).
    team_b = workloads("team-b/app", NAMESPACE="team-a", WORKLOAD_NAME="app")
    for i in range(3):
        resp = team_b.chat(f"b {i}", headers=FORGED_HEADERS)
        assert resp.status_code == 200, resp.text
        assert not any(h.startswith("x-ratelimit-") for h in resp.headers)
    assert _counter(redis, "team-a-hourly", "team-a/app") == {}

    # team-a/app (the stack's Envoy, claiming to be team-b/app): requests 1-5 are answered,
    # with OpenAI's headers counting down; 6-8 get the 429 and no provider sees them.
    before = upstream.total
    for i in range(5):
        resp = stack.chat("gpt-4o-mini", content=f"a {i}")
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-holysheep-provider"] == "upstream"
        assert resp.headers["x-ratelimit-limit-requests"] == "5"
        assert resp.headers["x-ratelimit-remaining-requests"] == str(4 - i)
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in resp.headers  # no token limit applies
    for i in range(5, 8):
        resp = stack.chat("gpt-4o-mini", content=f"a {i}")
        assert resp.status_code == 429, resp.text
        error = _openai_error(resp)
        assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
        retry_after = int(resp.headers["retry-after"])
        left = HOUR - time.time() % HOUR
        assert 1 <= retry_after <= left + 1
        assert error["message"].startswith("Budget 'team-a-hourly' is used up: its limit of 5 requests per 1h is "
                                           f"reached. It resets in {retry_after}s, at ")
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert upstream.total - before == 5
    assert _counter(redis, "team-a-hourly", "team-a/app")["r"] == "5"  # refused requests are not counted

    # Escaping its own budget: headers naming team-b change nothing either.
    escape = stack.chat("gpt-4o-mini", headers={**FORGED_HEADERS, "x-holysheep-tenant": "team-b",
                                                "x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/team-b/sa/app"})
    assert escape.status_code == 429 and _openai_error(escape)["code"] == "rate_limit_exceeded"

    # The official SDK, unmodified, raises its rate-limit error.
    sdk = openai.OpenAI(base_url=stack.url + "/v1", api_key="the-app-holds-no-key", max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "sdk"}])
    assert raised.value.status_code == 429 and raised.value.code == "rate_limit_exceeded"
    assert raised.value.response.headers["retry-after"].isdigit()
    assert upstream.total - before == 5

    # team-b is unaffected.
    assert team_b.chat("b again").status_code == 200
    assert _metric(stack, "holysheep_budget_used", "max", budget="team-a-hourly", unit="requests") == 5
    assert _metric(stack, "holysheep_budget_limit", "max", budget="team-a-hourly", unit="requests") == 5
    assert _metric(stack, "holysheep_budget_rejections_total", budget="team-a-hourly", unit="requests") == 5


def test_per_namespace_two_service_accounts_share_one_counter(stack: Stack, redis: RedisServer,
                                                              workloads: Any) -> None:
    fresh_window(HOUR)
    one, two = workloads("team-a/batch-1"), workloads("team-a/batch-2")
    answered = [w.chat(f"batch {i}") for i, w in enumerate((one, two, one, two))]
    assert [r.status_code for r in answered] == [200] * 4
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answered] == ["3", "2", "1", "0"]
    assert [w.chat("over").status_code for w in (one, two)] == [429, 429]
    assert _counter(redis, "team-a-batch", "team-a")["r"] == "4"


def test_every_answer_on_a_budgeted_route_carries_the_headers(stack: Stack, redis: RedisServer,
                                                              workloads: Any) -> None:
    """Through Envoy, by failover, from the fallback cache, and the data plane's own 503."""
    fresh_window(HOUR)
    team_e = workloads("team-e/app")
    upstream, backup = stack.mocks["upstream"], stack.mocks["backup"]
    stored = redis_client.Redis.from_url(redis.url)
    cached_before = len(stored.keys(KEY_PREFIX + "*"))
    first = team_e.chat("remember me")
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "99"
    wait_until(lambda: len(stored.keys(KEY_PREFIX + "*")) > cached_before, what="the answer in the cache")
    try:
        upstream.mode = "500"
        failover = team_e.chat("fail over")
        assert failover.status_code == 200 and failover.headers["x-holysheep-provider"] == "backup"
        assert failover.headers["x-ratelimit-remaining-requests"] == "98"
        backup.mode = "500"
        fallback = team_e.chat("remember me")
        assert fallback.status_code == 200 and fallback.headers["x-holysheep-cache"] == "fallback"
        assert fallback.headers["x-ratelimit-remaining-requests"] == "97"
        none = team_e.chat("never answered")
        assert none.status_code == 503 and _openai_error(none)["code"] == "no_provider_available"
        assert none.headers["x-ratelimit-remaining-requests"] == "96"
        for resp in (first, failover, fallback, none):
            assert resp.headers["x-ratelimit-limit-requests"] == "100"
            assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
    finally:
        upstream.mode = backup.mode = "ok"


def _usage(resp: httpx.Response) -> int:
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in resp.text.splitlines()
                  if line.startswith("data: {")]
        return int(next(e["usage"]["total_tokens"] for e in reversed(events) if e.get("usage")))
    return int(resp.json()["usage"]["total_tokens"])


def test_a_token_budget_the_crossing_request_completes_and_the_next_is_refused(
    stack: Stack, redis: RedisServer, workloads: Any,
) -> None:
    fresh_window(HOUR)
    team_c = workloads("team-c/app")
    spent: list[int] = []
    # The first answer streams: a stream's usage (its last event) counts too.
    first = team_c.chat("a streamed question", stream=True, stream_options={"include_usage": True})
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "40"
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"  # as of admission: nothing used yet
    spent.append(_usage(first))
    while sum(spent) < 40:
        # The usage is charged once the answer is settled, a moment after the client has it
        # (a Redis write off the hot path): the next request waits until Redis shows it.
        wait_until(lambda: int(_counter(redis, "team-c-tokens", "team-c/app").get("t", 0)) == sum(spent),
                   what="the usage in Redis")
        resp = team_c.chat(f"question {len(spent)} with a few more words in it")
        assert resp.status_code == 200, f"refused after {sum(spent)} of 40 tokens: {resp.text}"
        assert resp.headers["x-ratelimit-remaining-tokens"] == str(max(0, 40 - sum(spent)))
        spent.append(_usage(resp))
    assert len(spent) >= 2 and sum(spent[:-1]) < 40 <= sum(spent)  # the last one crossed, and completed
    wait_until(lambda: int(_counter(redis, "team-c-tokens", "team-c/app").get("t", 0)) == sum(spent),
               what="the crossing answer's usage in Redis")
    refused = team_c.chat("one more")
    assert refused.status_code == 429
    error = _openai_error(refused)
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert "limit of 40 tokens per 1h" in error["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # The counts are the usage the mock provider reported, in Redis and on /metrics.
    counter = _counter(redis, "team-c-tokens", "team-c/app")
    assert (int(counter["r"]), int(counter["t"])) == (len(spent), sum(spent))
    assert _metric(stack, "holysheep_budget_used", "max", budget="team-c-tokens", unit="tokens") == sum(spent)


def test_a_cost_budget_refuses_with_insufficient_quota(stack: Stack, workloads: Any) -> None:
    fresh_window(86400)
    team_f = workloads("team-f/app")
    spent = team_f.chat("an expensive question")  # 1000 USD per million tokens: 0.001 USD a token
    assert spent.status_code == 200 and not any(h.startswith("x-ratelimit-") for h in spent.headers)
    wait_until(lambda: team_f.chat("and another").status_code == 429, what="the cost budget used up")
    refused = team_f.chat("once more")
    error = _openai_error(refused)
    assert (refused.status_code, error["type"], error["code"]) == (429, "insufficient_quota", "insufficient_quota")
    assert "limit of 0.01 USD per 1d" in error["message"] and int(refused.headers["retry-after"]) >= 1
    sdk = openai.OpenAI(base_url=team_f.url + "/v1", api_key="the-app-holds-no-key", max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "sdk"}])
    assert raised.value.code == "insufficient_quota"


CONCURRENCY = 25
ATTEMPTS = 150


def test_two_ext_procs_sharing_redis_enforce_one_budget_exactly(stack: Stack, redis: RedisServer,
                                                                 workloads: Any) -> None:
    """150 requests, 25 at a time, over both ext_procs, for a Shared budget of 60: exactly 60
    are answered. Overshoot: 0 (every admission is one atomic script in Redis)."""
    fresh_window(HOUR)
    team_d = workloads("team-d/load")
    burst = stack.mocks["burst"]
    before = burst.total
    per_extproc = [_metric_on(ep, "holysheep_requests_total", provider="burst") for ep in stack.extprocs]

    async def load() -> list[int]:
        gate = asyncio.Semaphore(CONCURRENCY)
        async with stack.new_async_client("team-d/load", base_url=team_d.url) as client:
            async def one(i: int) -> int:
                async with gate:
                    body = {"model": "burst-model", "messages": [{"role": "user", "content": f"burst {i}"}]}
                    return (await client.post("/v1/chat/completions", json=body)).status_code
            return await asyncio.gather(*(one(i) for i in range(ATTEMPTS)))

    statuses = asyncio.run(load())
    assert (statuses.count(200), statuses.count(429)) == (60, ATTEMPTS - 60), sorted(set(statuses))
    assert burst.total - before == 60
    assert _counter(redis, "team-d-burst", "team-d")["r"] == "60"
    served = [_metric_on(ep, "holysheep_requests_total", provider="burst") - b
              for ep, b in zip(stack.extprocs, per_extproc, strict=True)]
    assert sum(served) == 60 and min(served) > 0, served  # both ext_procs admitted some


def _metric_on(ep: Any, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(ep.metrics()) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


OUTAGE_TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: outage, namespace: team-a}
spec:
  timeout: 5s
  maxRetries: 0
  circuitBreaker: {enabled: false}
  providers:
    - {name: upstream, baseUrl: "{upstream}", auth: {env: E2E_UPSTREAM_KEY}}
  cache: {mode: "Off", redisUrl: "REDIS"}
  budgets:
    - {name: team-a-outage, per: Shared, window: 1h, requests: 1000000}
"""
OUTAGE_CONCURRENCY = 4


def test_redis_killed_mid_traffic_fails_nothing_and_counting_resumes_in_redis() -> None:
    """Two ext_procs, one Redis, steady traffic 4 at a time: Redis is killed and comes back
    empty. No request fails; each ext_proc counts locally meanwhile (store errors counted) and
    hands its counts to Redis when it answers again, so Redis ends with every request counted,
    plus at most the requests in flight when it died (an admission Redis applied whose answer
    was lost is counted locally too)."""
    fresh_window(HOUR, needed=120)
    server = RedisServer()
    server.start()
    mock = MockProvider("upstream", expect_key=KEYS["upstream"])
    stack = Stack(OUTAGE_TEMPLATE.replace("REDIS", server.url), {"upstream": mock},
                  env={"E2E_UPSTREAM_KEY": KEYS["upstream"]}, extproc_count=2, workload="team-a/app")
    spec = _parsed(OUTAGE_TEMPLATE).budgets[0]
    key = BudgetEngine("team-a/outage", [spec], MemoryBudgetStore()).counter(spec.name, "team-a", "app",
                                                                              time.time()).key
    r = redis_client.Redis.from_url(server.url)

    def in_redis() -> int:
        try:
            return int(r.hget(key, "r") or 0)  # type: ignore[arg-type]
        except redis_client.RedisError:
            return -1

    statuses: list[int] = []

    async def traffic(count: int) -> None:
        gate = asyncio.Semaphore(OUTAGE_CONCURRENCY)
        async with stack.new_async_client("outage", timeout=30) as client:
            async def one(i: int) -> None:
                async with gate:
                    body = {"model": "m", "messages": [{"role": "user", "content": f"q {i}"}]}
                    statuses.append((await client.post("/v1/chat/completions", json=body)).status_code)
            await asyncio.gather(*(one(i) for i in range(count)))

    try:
        with running(stack):
            asyncio.run(traffic(40))
            assert in_redis() == 40
            errors_before = _metric(stack, "holysheep_budget_store_errors_total")

            async def kill_mid_traffic() -> None:
                async def kill_later() -> None:
                    while len(statuses) < 60:
                        await asyncio.sleep(0.005)
                    server.kill()
                await asyncio.gather(traffic(60), kill_later())

            asyncio.run(kill_mid_traffic())  # 20 answered before the kill, the rest during the outage
            assert _metric(stack, "holysheep_budget_store_errors_total") > errors_before
            server.start()  # empty, on the same port
            assert in_redis() == 0
            # After its back-off each ext_proc's next admission hands its local counts over, and
            # from then on counts in Redis: batches of 10 add exactly 10 (a replica still counting
            # locally would add fewer, one handing over more), twice in a row.
            streak = [0, in_redis()]

            def counting_in_redis() -> bool:
                asyncio.run(traffic(10))
                now = in_redis()
                streak[:] = [streak[0] + 1 if now == streak[1] + 10 else 0, now]
                return streak[0] >= 2

            wait_until(counting_in_redis, timeout=20, interval=0, what="both ext_procs counting in Redis again")
            total = len(statuses)
            assert statuses == [200] * total  # no failed request
            assert mock.total == total  # and every one reached the provider once
            counted = in_redis()
            assert total <= counted <= total + OUTAGE_CONCURRENCY, (total, counted)
    finally:
        server.kill()
