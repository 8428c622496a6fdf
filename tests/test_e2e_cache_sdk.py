"""Redis-backed cache, Redis dying mid-traffic, Always mode, the official OpenAI SDK, and drain."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from extproc.cache import KEY_PREFIX
from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import RedisServer, wait_until
from tests import metrics_text as m
from tests.harness import Stack, running
from tests.upstreams.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: cache, namespace: default}
spec:
  timeout: 2s
  maxRetries: 1
  circuitBreaker: {enabled: false}
  providers:
    - {name: one, baseUrl: "{one}", auth: {env: E2E_ONE_KEY}}
    - {name: two, baseUrl: "{two}", auth: {env: E2E_TWO_KEY}}
  routes:
    - {models: ["*"], backends: [{provider: one}, {provider: two, priority: 1}]}
  cache: {mode: MODE, redisUrl: "REDIS"}
"""
KEYS = {"one": "sk-one-cache-7781", "two": "sk-two-cache-7782"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()


def _stack(redis: RedisServer, mode: str) -> Stack:
    mocks = {n: MockProvider(n, expect_key=k) for n, k in KEYS.items()}
    template = TEMPLATE.replace("MODE", mode).replace("REDIS", redis.url)
    return Stack(template, mocks, env={f"E2E_{n.upper()}_KEY": k for n, k in KEYS.items()})


@pytest.fixture(scope="module")
def stack(redis: RedisServer) -> Iterator[Stack]:
    with running(_stack(redis, "Fallback")) as s:
        yield s


def _all_down(stack: Stack, mode: str) -> None:
    for mock in stack.mocks.values():
        mock.mode = mode


def test_fallback_served_from_redis_after_ext_proc_restart(stack: Stack, redis: RedisServer) -> None:
    ok = stack.chat("m1", content="persisted in redis")
    assert ok.status_code == 200
    import redis as redis_client

    r = redis_client.Redis.from_url(redis.url)
    wait_until(lambda: len(r.keys(KEY_PREFIX + "*")) >= 1, what="redis store")
    # A restarted ext_proc has an empty memory tier: the answer must come from Redis.
    stack.extproc.stop()
    stack.extproc.start()
    _all_down(stack, "500")
    try:
        resp = stack.chat("m1", content="persisted in redis")
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-holysheep-cache"] == "fallback"
        assert resp.json() == ok.json()
    finally:
        _all_down(stack, "ok")
    values = [r.get(k) or b"" for k in r.keys(KEY_PREFIX + "*")]  # bytes: no decode_responses
    stored = b"".join(v if isinstance(v, bytes) else v.encode() for v in values)
    assert all(k.encode() not in stored for k in KEYS.values())


def _cache_errors(stack: Stack) -> float:
    return m.value(stack.extproc.metrics(), "holysheep_cache_events_total", event="error")


def test_redis_killed_mid_traffic_loses_no_request(stack: Stack, redis: RedisServer) -> None:
    import redis as redis_client

    failures: list[str] = []
    sent = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal sent
        deadline = time.monotonic() + 30
        i = 0
        while not stop.is_set() and time.monotonic() < deadline and i < 3000:
            resp = stack.chat("m2", content=f"q{i % 20}")
            sent += 1
            if resp.status_code != 200:
                failures.append(f"{resp.status_code} {resp.text[:100]}")
            i += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_until(lambda: sent >= 40, timeout=15, what="every prompt answered twice")  # all 20 in memory
        errors = _cache_errors(stack)
        redis.kill()
        wait_until(lambda: _cache_errors(stack) > errors, timeout=10, what="the ext_proc sees Redis gone")
        # With every provider down and Redis dead, the memory tier still answers what it saw.
        _all_down(stack, "500")
        at_down = sent
        wait_until(lambda: sent >= at_down + 40, timeout=15, what="requests served with everything down")
        _all_down(stack, "ok")
        redis.start()
        r = redis_client.Redis.from_url(redis.url)
        wait_until(lambda: r.dbsize() > 0, timeout=10, what="answers stored in the restarted Redis")
    finally:
        stop.set()
        worker.join(30)
        _all_down(stack, "ok")
    assert failures == [], failures[:5]


def test_a_redis_error_switches_redis_off_for_two_seconds(redis: RedisServer) -> None:
    """After a Redis error the memory tier answers and Redis is not contacted for 2 s; then it is.

    The oracle is a TCP proxy in front of Redis that logs every connection and every byte the
    ext_proc sends (tests/upstreams/tcp_proxy.py), i.e. Redis's side of the wire.
    """
    backoff = 2.0  # ResponseCache.REDIS_BACKOFF, as the README states it
    proxy = TcpProxy(redis.port).start()
    try:
        stack = _stack(redis, "Fallback")
        stack.template = stack.template.replace(redis.url, proxy.url)
        with running(stack) as s:
            warm = s.chat("bk", content="warm")
            assert warm.status_code == 200
            wait_until(lambda: any(b"SET" in c.data for c in proxy.contacts), timeout=10, what="stored in redis")
            errors = _cache_errors(s)
            proxy.refuse()  # the pooled connections are closed now, new ones are refused
            t_refused = time.time()
            assert s.chat("bk", content="this store fails").status_code == 200  # its Redis SET fails
            wait_until(lambda: _cache_errors(s) > errors, timeout=10, what="the failed SET counted")
            # The ext_proc's error, and so its back-off, began after this (after any reconnect
            # attempt the proxy refused, too).
            t_error = max([t_refused] + [c.time for c in proxy.contacts if c.kind == "refused"])
            proxy.allow()
            t_allowed = time.time()
            # Within the back-off: stores, a fallback from memory and a miss, none touching Redis.
            assert s.chat("bk", content="stored in memory only").status_code == 200
            _all_down(s, "500")
            try:
                hit = s.chat("bk", content="warm")
                assert hit.status_code == 200 and hit.headers["x-holysheep-cache"] == "fallback"
                assert hit.json() == warm.json()
                assert s.chat("bk", content="never seen").status_code == 503  # memory miss, Redis skipped
            finally:
                _all_down(s, "ok")
            # Stores all through the window: any back-off shorter than 2 s would let one through.
            n = 0
            while time.time() < t_error + backoff - 0.1 and n < 200:
                assert s.chat("bk", content=f"inside the back-off {n}").status_code == 200
                n += 1
                time.sleep(0.02)
            t_checked = time.time()
            inside = [c for c in proxy.since(t_allowed) if c.time < t_error + backoff]
            assert inside == [], f"Redis contacted {inside[0].time - t_error:.3f}s after its error"
            # After the back-off, the next store reaches Redis again.
            time.sleep(max(0.0, t_error + backoff + 0.05 - time.time()))  # the claim is about time itself
            assert s.chat("bk", content="after the back-off").status_code == 200
            wait_until(lambda: any(b"SET" in c.data for c in proxy.since(t_checked)), timeout=10,
                       what="Redis contacted again after the back-off")
            assert min(c.time for c in proxy.since(t_allowed)) >= t_error + backoff
    finally:
        proxy.stop()


def test_always_mode_serves_hits_before_any_provider(redis: RedisServer) -> None:
    with running(_stack(redis, "Always")) as s:
        first = s.chat("m3", content="same question")
        assert first.status_code == 200 and "x-holysheep-cache" not in first.headers
        wait_until(lambda: 'holysheep_cache_events_total{event="store"}' in s.extproc.metrics(), what="store")
        calls = s.mocks["one"].count("/chat/completions")
        hit = s.chat("m3", content="same question")
        assert hit.headers["x-holysheep-cache"] == "hit"
        assert hit.json() == first.json()
        assert s.mocks["one"].count("/chat/completions") == calls
        # The scope is the caller's authenticated identity: a tenant header claiming another
        # scope changes nothing (tests/test_e2e_zero_trust.py: another identity is not served it).
        other = s.chat("m3", content="same question", headers={"x-holysheep-tenant": "team-b"})
        assert other.headers.get("x-holysheep-cache") == "hit"


def test_mesh_identity_scopes_cache_and_a_client_tenant_header_is_ignored(redis: RedisServer) -> None:
    stack = _stack(redis, "Always")
    # Envoy presents default/checkout's certificate; its node metadata names another namespace
    # (ignored: only the workload name is taken, as a label inside the certificate's namespace).
    stack.workload = "default/checkout"
    stack.node_metadata = {"NAMESPACE": "shop", "WORKLOAD_NAME": "checkout-v2"}
    with running(stack) as s:
        first = s.chat("m5", content="identity", headers={"x-holysheep-tenant": "team-a"})
        assert first.status_code == 200 and "x-holysheep-cache" not in first.headers
        wait_until(lambda: 'holysheep_cache_events_total{event="store"}' in s.extproc.metrics(), what="store")
        # The sidecar says who is calling; a different claimed tenant changes nothing.
        again = s.chat("m5", content="identity", headers={"x-holysheep-tenant": "team-b"})
        assert again.headers.get("x-holysheep-cache") == "hit"
        metrics = s.extproc.metrics()
        who = 'service_account="checkout",workload="checkout-v2",workload_namespace="default"'
        assert f'holysheep_workload_requests_total{{{who}}} 1.0' in metrics
        assert ('holysheep_workload_tokens_total{model="m5",service_account="checkout",type="output",'
                'workload="checkout-v2",workload_namespace="default"}') in metrics
        assert 'workload_namespace="shop"' not in metrics


def test_openai_sdk_through_dev_envoy(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="app-does-not-hold-the-real-key", max_retries=0)
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "hello from one"
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    streamed = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert "hello from one" in text
    emb = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(emb.data[0].embedding) > 0
    seen = stack.mocks["one"].last_request
    assert seen is not None and seen.credential == KEYS["one"]
    assert "app-does-not-hold" not in str(seen.headers)
    metrics = stack.extproc.metrics()
    assert 'holysheep_tokens_total{model="gpt-4o-mini",provider="one",type="output"}' in metrics


def test_sigterm_drains_streams_in_flight(stack: Stack) -> None:
    one = stack.mocks["one"]
    one.mode = "slow-stream"
    one.chunk_delay_ms = 250
    result: dict[str, Any] = {}

    def stream() -> None:
        body = {"model": "m4", "messages": [{"role": "user", "content": "drain"}], "stream": True}
        with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            result["status"] = resp.status_code
            result["body"] = b"".join(resp.iter_raw())

    try:
        t = threading.Thread(target=stream)
        t.start()
        wait_until(lambda: one.last_request is not None and one.last_request.stream
                   and len(one.last_request.chunk_times) >= 1, timeout=10, what="the stream under way")
        proc = stack.extproc.proc
        assert proc is not None
        import os

        os.killpg(proc.pid, signal.SIGTERM)
        wait_until(lambda: httpx.get(stack.extproc.admin + "/ready").status_code == 503, timeout=3,
                   what="not ready while draining")
        t.join(20)
        assert result.get("status") == 200
        assert bytes(result["body"]).rstrip().endswith(b"data: [DONE]")
        assert proc.wait(15) == 0
    finally:
        one.mode = "ok"
        stack.extproc.start()
