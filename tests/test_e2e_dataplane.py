"""The data plane end to end: HTTP through a real Envoy 1.40 to our ext_proc and mock providers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import wait_until
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

KEYS = {
    "basic": "sk-basic-0001", "rewrite": "xk-rewrite-0002", "p500": "sk-p500-0003", "p429": "sk-p429-0004",
    "prefuse": "sk-prefuse-0005", "phang": "sk-phang-0006", "sec": "sk-sec-0007", "brk": "sk-brk-0008",
    "brk2": "sk-brk2-0009", "hc": "sk-hc-0010", "hc2": "sk-hc2-0011", "str": "sk-str-0012",
}

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: e2e, namespace: default}
spec:
  timeout: 5s
  maxRetries: 2
  circuitBreaker: {enabled: true, failureThreshold: 1000, resetTimeout: 60s}
  providers:
    - {name: basic, baseUrl: "{basic}", auth: {type: Bearer, secretName: basic-creds, key: api-key}}
    - {name: rewrite, baseUrl: "{rewrite}", auth: {type: XApiKey, env: E2E_REWRITE_KEY}}
    - {name: p500, baseUrl: "{p500}", auth: {env: E2E_P500_KEY}}
    - {name: p429, baseUrl: "{p429}", auth: {env: E2E_P429_KEY}}
    - {name: prefuse, baseUrl: "{prefuse}", auth: {env: E2E_PREFUSE_KEY}}
    - {name: phang, baseUrl: "{phang}", auth: {env: E2E_PHANG_KEY}, timeout: 1s}
    - {name: sec, baseUrl: "{sec}", auth: {env: E2E_SEC_KEY}}
    - {name: str, baseUrl: "{str}", auth: {env: E2E_STR_KEY}}
  routes:
    - {models: [basic-model], backends: [{provider: basic}]}
    - models: ["gpt-*"]
      backends: [{provider: rewrite, model: provider-side-model}]
    - {models: [fo-500], backends: [{provider: p500}, {provider: sec, priority: 1}]}
    - {models: [fo-429], backends: [{provider: p429}, {provider: sec, priority: 1}]}
    - {models: [fo-refuse], backends: [{provider: prefuse}, {provider: sec, priority: 1}]}
    - {models: [fo-timeout], backends: [{provider: phang}, {provider: sec, priority: 1}]}
    - {models: [stream-model], backends: [{provider: str}, {provider: sec, priority: 1}]}
  cache: {mode: Fallback}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: breaker, namespace: default}
spec:
  timeout: 2s
  maxRetries: 1
  circuitBreaker: {enabled: true, failureThreshold: 2, resetTimeout: 2s}
  providers:
    - {name: brk, baseUrl: "{brk}", auth: {env: E2E_BRK_KEY}}
    - {name: brk2, baseUrl: "{brk2}", auth: {env: E2E_BRK2_KEY}}
  routes:
    - {models: [cb-model], backends: [{provider: brk}, {provider: brk2, priority: 1}]}
  cache: {mode: "Off"}
---
# Health checks in their own document: a failing /models must not race the breaker tests above.
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: health, namespace: default}
spec:
  timeout: 2s
  maxRetries: 1
  circuitBreaker: {enabled: true, failureThreshold: 2, resetTimeout: 2s}
  healthCheck: {interval: 300ms, endpoint: /models}
  providers:
    - {name: hc, baseUrl: "{hc}", auth: {env: E2E_HC_KEY}}
    - {name: hc2, baseUrl: "{hc2}", auth: {env: E2E_HC2_KEY}}
  routes:
    - {models: [hc-model], backends: [{provider: hc}, {provider: hc2, priority: 1}]}
  cache: {mode: "Off"}
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    mocks = {
        name: MockProvider(name, expect_key=key, auth_type="XApiKey" if name == "rewrite" else "Bearer",
                           prefix="/alt/v1" if name == "rewrite" else "/v1", hang_s=30)
        for name, key in KEYS.items()
    }
    env = {f"E2E_{n.upper()}_KEY": k for n, k in KEYS.items() if n != "basic"}
    passthrough_mock = MockProvider("plain", prefix="/v1")
    passthrough_port = passthrough_mock.start_in_thread()
    s = Stack(TEMPLATE, mocks, env=env, secrets={("basic-creds", "api-key"): KEYS["basic"]},
              passthrough=[("plain.internal", passthrough_port)])
    s.plain = passthrough_mock  # type: ignore[attr-defined]
    with running(s):
        yield s
    passthrough_mock.stop_in_thread()


def test_key_injected_and_client_credentials_stripped(stack: Stack) -> None:
    mock = stack.mocks["basic"]
    mock.reset()
    resp = stack.chat("basic-model", headers={
        "Authorization": "Bearer client-own-key", "X-Api-Key": "client-x", "API-KEY": "client-api",
    })
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-holysheep-provider"] == "basic"
    seen = mock.last_request
    assert seen is not None and seen.credential == KEYS["basic"]
    assert seen.headers["authorization"] == f"Bearer {KEYS['basic']}"
    assert "x-api-key" not in seen.headers and "api-key" not in seen.headers
    assert "client" not in str(seen.headers)
    assert KEYS["basic"] not in resp.text and KEYS["basic"] not in str(resp.headers)


def test_model_routing_rewrites_host_path_and_model(stack: Stack) -> None:
    mock = stack.mocks["rewrite"]
    mock.reset()
    others_before = {n: m.count("/chat/completions") for n, m in stack.mocks.items() if n != "rewrite"}
    resp = stack.chat("gpt-4o-mini", headers={"authorization": "Bearer client-own-key"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-holysheep-provider"] == "rewrite"
    seen = mock.last_request
    assert seen is not None
    assert seen.path == "/alt/v1/chat/completions"
    assert seen.model == "provider-side-model"
    assert seen.headers["x-api-key"] == KEYS["rewrite"]
    assert "authorization" not in seen.headers
    assert seen.headers["host"] == f"127.0.0.1:{mock.port}"
    assert [r.model for r in mock.requests] == ["provider-side-model"]  # exactly one request, rewritten
    # No other provider saw it (their own request logs).
    assert {n: m.count("/chat/completions") for n, m in stack.mocks.items() if n != "rewrite"} == others_before


@pytest.mark.parametrize(("model", "primary", "fault"), [
    ("fo-500", "p500", "500"),
    ("fo-429", "p429", "429"),
    ("fo-refuse", "prefuse", "refuse"),
    ("fo-timeout", "phang", "hang"),
])
def test_failover_within_one_request(stack: Stack, model: str, primary: str, fault: str) -> None:
    sec = stack.mocks["sec"]
    stack.mocks[primary].set_fault_sync(fault)
    try:
        before = sec.count("/chat/completions")
        started = time.monotonic()
        resp = stack.chat(model)
        elapsed = time.monotonic() - started
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-holysheep-provider"] == "sec"
        assert "hello from sec" in resp.json()["choices"][0]["message"]["content"]
        assert sec.count("/chat/completions") == before + 1
        assert sec.last_request is not None and sec.last_request.credential == KEYS["sec"]
        if fault == "hang":
            # The primary's own timeout (1 s), not the spec's (5 s), then the secondary.
            assert 1.0 - 0.05 <= elapsed < 4.0, elapsed
    finally:
        stack.mocks[primary].recover_sync()


def test_streaming_passes_chunk_by_chunk(stack: Stack) -> None:
    mock = stack.mocks["str"]
    mock.mode = "slow-stream"
    mock.chunk_delay_ms = 300
    try:
        body = {"model": "stream-model", "messages": [{"role": "user", "content": "s"}], "stream": True}
        arrivals: list[float] = []
        chunks: list[bytes] = []
        with stack.client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-holysheep-provider"] == "str"
            for chunk in resp.iter_raw():
                arrivals.append(time.time())
                chunks.append(chunk)
        seen = mock.last_request
        assert seen is not None and len(seen.chunk_times) >= 3
        # The first chunk reached the client before the mock even sent its last one.
        assert arrivals[0] < seen.chunk_times[-1]
        assert b"data: [DONE]" in b"".join(chunks)
    finally:
        mock.mode = "ok"


def test_streaming_failover_before_first_byte(stack: Stack) -> None:
    stack.mocks["str"].set_fault_sync("500")
    try:
        body = {"model": "stream-model", "messages": [{"role": "user", "content": "s"}], "stream": True}
        resp = stack.client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200
        assert resp.headers["x-holysheep-provider"] == "sec"
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert b"hello" in resp.content and resp.content.rstrip().endswith(b"data: [DONE]")
    finally:
        stack.mocks["str"].recover_sync()


def test_circuit_opens_sends_nothing_while_open_then_closes(stack: Stack) -> None:
    brk = stack.mocks["brk"]
    brk.mode = "500"
    brk.reset()
    try:
        for _ in range(2):  # failureThreshold: 2
            assert stack.chat("cb-model").headers["x-holysheep-provider"] == "brk2"
        assert brk.count("/chat/completions") == 2
        wait_until(lambda: 'holysheep_circuit_state{provider="brk"} 1.0' in stack.extproc.metrics(), what="open")
        for _ in range(5):
            resp = stack.chat("cb-model")
            assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] == "brk2"
        assert brk.count("/chat/completions") == 2, "an open circuit must receive no requests"
        opened_after = brk.requests[-1].time  # the circuit opened once the ext_proc saw this fail
        brk.mode = "ok"
        # resetTimeout (2 s), then one half-open trial succeeds and closes the circuit.
        wait_until(lambda: stack.chat("cb-model").headers["x-holysheep-provider"] == "brk", timeout=10,
                   interval=0.02, what="the half-open trial closes the circuit")
        trial = brk.requests[2]
        assert trial.time - opened_after >= 2.0 - 0.01, "a request reached the circuit before resetTimeout"
        assert 'holysheep_circuit_state{provider="brk"} 0.0' in stack.extproc.metrics()
        for _ in range(3):
            assert stack.chat("cb-model").headers["x-holysheep-provider"] == "brk"
    finally:
        brk.mode = "ok"


def test_every_circuit_open_answers_503_without_calling_anyone(stack: Stack) -> None:
    brk, brk2 = stack.mocks["brk"], stack.mocks["brk2"]
    brk.mode = brk2.mode = "500"
    try:
        wait_until(lambda: stack.chat("cb-model").status_code == 503 and
                   'holysheep_circuit_state{provider="brk2"} 1.0' in stack.extproc.metrics(), what="both open")
        calls = brk.total + brk2.total
        resp = stack.chat("cb-model")
        assert resp.status_code == 503
        error = resp.json()["error"]
        assert error["code"] == "no_provider_available" and "brk" in error["message"]
        assert brk.total + brk2.total == calls, "an open circuit must receive no requests"
    finally:
        brk.mode = brk2.mode = "ok"
    # resetTimeout (2 s): the half-open trials close both again.
    wait_until(lambda: stack.chat("cb-model").headers.get("x-holysheep-provider") == "brk", timeout=10,
               what="recovered")


def test_failing_health_check_takes_provider_out(stack: Stack) -> None:
    hc = stack.mocks["hc"]
    assert hc.models_require_auth  # its /models answers 401 without the right key, as a provider's does
    hc.mode = "health-fail"  # only /models fails: requests would still succeed if sent
    hc.reset()
    try:
        wait_until(lambda: 'holysheep_provider_healthy{provider="hc"} 0.0' in stack.extproc.metrics(),
                   what="hc unhealthy")
        for _ in range(3):
            assert stack.chat("hc-model").headers["x-holysheep-provider"] == "hc2"
        assert hc.count("/chat/completions") == 0
        assert hc.count("/models") >= 1
    finally:
        hc.mode = "ok"
    wait_until(lambda: 'holysheep_provider_healthy{provider="hc"} 1.0' in stack.extproc.metrics(), what="hc back")
    assert stack.chat("hc-model").headers["x-holysheep-provider"] == "hc"
    # Every probe carried the provider's key (the provider's own log), and the passing ones
    # passed because of it: the mock answers /models 401 without it.
    probes = [r for r in hc.requests if r.path.endswith("/models")]
    assert probes and {r.credential for r in probes} == {KEYS["hc"]}, {r.credential for r in probes}
    assert any(r.status == 200 for r in probes) and hc.auth_failures == 0


def test_memory_cache_fallback_when_every_backend_fails(stack: Stack) -> None:
    ok = stack.chat("fo-500", content="cache me")
    assert ok.status_code == 200
    wait_until(lambda: 'holysheep_cache_events_total{event="store"}' in stack.extproc.metrics(), what="store")
    for name in ("p500", "sec"):
        stack.mocks[name].mode = "500"
    try:
        resp = stack.chat("fo-500", content="cache me")
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-holysheep-cache"] == "fallback"
        assert resp.json() == ok.json()
        miss = stack.chat("fo-500", content="never seen")
        assert miss.status_code == 503
        err = miss.json()["error"]
        assert err["code"] == "no_provider_available" and "p500" in err["message"] and "sec" in err["message"]
    finally:
        for name in ("p500", "sec"):
            stack.mocks[name].mode = "ok"


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"this is not json", 400, "invalid_json"),
    (b'{"messages": []}', 400, "model_required"),
    (b'{"model": 42}', 400, "model_required"),
    (b'{"model": "no-such-model"}', 404, "model_not_found"),
    (b'{"model": "basic-model", "x": "\xff\xfe"}', 400, "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    (b'{"model": "basic-model", "pad": "' + b"x" * (9 << 20) + b'"}', 413, "request_too_large"),
])
def test_bad_input_gets_openai_error(stack: Stack, body: bytes, status: int, code: str) -> None:
    resp = stack.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert stack.extproc.proc is not None and stack.extproc.proc.poll() is None


def test_non_ai_route_is_untouched(stack: Stack) -> None:
    plain: MockProvider = stack.plain  # type: ignore[attr-defined]
    before = stack.extproc.metrics().count("holysheep_requests_total")
    resp = stack.client.post("/v1/chat/completions", json={"model": "basic-model"},
                             headers={"host": "plain.internal", "authorization": "Bearer app-own-key"})
    assert resp.status_code == 200
    assert "x-holysheep-provider" not in resp.headers
    seen = plain.last_request
    assert seen is not None and seen.headers["authorization"] == "Bearer app-own-key"
    assert seen.headers["host"] == "plain.internal"
    assert stack.extproc.metrics().count("holysheep_requests_total") == before


def test_secret_rotation_without_restart(stack: Stack) -> None:
    mock = stack.mocks["basic"]
    pid = stack.extproc.proc.pid if stack.extproc.proc else None
    mock.expect_key = "sk-basic-rotated"
    try:
        stack.write_secret("basic-creds", "api-key", "sk-basic-rotated")
        wait_until(lambda: stack.chat("basic-model").status_code == 200, timeout=10, what="rotated key used")
        assert mock.last_request is not None and mock.last_request.credential == "sk-basic-rotated"
        assert stack.extproc.proc is not None and stack.extproc.proc.pid == pid
    finally:
        mock.expect_key = KEYS["basic"]
        stack.write_secret("basic-creds", "api-key", KEYS["basic"])
        wait_until(lambda: stack.chat("basic-model").status_code == 200, timeout=10, what="key restored")


def test_config_reload_and_bad_config_keeps_last_good(stack: Stack) -> None:
    try:
        stack.write_config(TEMPLATE.replace("[basic-model]", "[basic-model, renamed-model]"))
        wait_until(lambda: stack.chat("renamed-model").status_code == 200, timeout=10, what="reload")
        stack.write_config("apiVersion: holysheep.ai/v1\nkind: HolySheepConfig\nmetadata: {name: x}\n"
                           "spec: {baseUrl: \"http://127.0.0.1:9/v1\", timeout: soon}\n")
        wait_until(lambda: "spec.timeout" in stack.logs(), timeout=10, what="rejection logged")
        for _ in range(3):
            assert stack.chat("renamed-model").status_code == 200
        assert httpx.get(stack.extproc.admin + "/ready").status_code == 200
    finally:
        stack.write_config()
        wait_until(lambda: stack.chat("renamed-model").status_code == 404, timeout=10, what="restore")


def test_no_secret_in_logs_metrics_or_responses(stack: Stack) -> None:
    # Runs last in this module, after every scenario above, with the ext_proc at DEBUG. The
    # stack's leak guard (tests/harness.py) has checked after every test; this one makes sure it
    # knew every key, the rotated one included, and really saw logs, /metrics and responses.
    stack.chat("basic-model")
    assert {*KEYS.values(), "sk-basic-rotated"} <= stack.guard.keys
    stats = stack.check_leaks()
    assert stats.responses > 30 and stats.log_lines > 10 and stats.metrics_scrapes > 10
    assert stats.leaks_found == 0
    assert '"msg": "credential injected"' in stack.logs()  # our own DEBUG lines were written
