"""Bad upstreams and bad input through a real Envoy: a clean answer, nothing hangs, nothing dies.

Complements ``test_e2e_dataplane.py::test_bad_input_gets_openai_error`` (malformed JSON, missing
``model``, ``model: 42``, invalid UTF-8 in a value, a 100k-deep top-level array, a 9 MiB body);
here are the cases it does not have: a 10 MiB body, deep nesting inside a valid object (and a
moderately deep one that must pass), invalid UTF-8 and lone surrogates in the model itself, the
other non-string models, non-object top levels, and the upstream faults.

What is right for a bad upstream, decided here:

* **Cut mid-event** (headers and part of the body sent, then the connection closed): the status
  and the first bytes are already the client's, so no error *answer* is possible any more. The
  right result is a stream the client can tell is broken -- Envoy resets it (no terminating
  chunk), which every HTTP client reports as an error -- within the timeout, and the truncated
  answer is never cached (a later fallback must not replay half an answer). Which of two
  outcomes a cut gets depends on when Envoy sees it, so each is tested on its own, with nothing
  left to a race: ``cut-stream`` waits until the test's client has the headers before it cuts
  (the broken-stream outcome); ``cut-early`` sends headers, half the body and the close in one
  TCP segment, so Envoy sees the reset while the response headers are still with the ext_proc,
  nothing has reached the client yet, and Envoy answers its own ``502``. The connection
  manager's ``local_reply_config`` (``protos/filter_config.py``) turns that reply into an
  OpenAI-style ``server_error`` whose ``code`` is Envoy's response-code details; the ext_proc's
  own immediate responses are local replies too and are left alone (their details start
  ``holysheep_``).
* **Garbage with a 200** (non-streaming, and to a ``stream: true`` request): a clean
  pass-through. The provider answered 2xx; response bodies are streamed through the ext_proc, so
  by the time the body could be judged the status is gone, and buffering every answer to judge it
  would hold back every stream (issue 5). The client's SDK sees what the provider sent, exactly as
  without the mesh. The mesh must not make it worse: the garbage is not cached (a later fallback
  answers 503, not garbage) and counts no tokens.
* **Stall mid-stream**: Envoy's route timeout (the provider's ``timeout``, 1 s here) ends the
  stream; the client sees the first event, then the stream terminated, well before its own limit.

Timing: once headers went to the client, Envoy closes the client connection after a reset with
its ``delayed_close_timeout`` (default 1 s). "Nothing hangs" is checked as "the stream was ended
by the mesh, not by the client's own limit" (no ``ReadTimeout``), never as a timing window.

After every test the ext_proc process must still be alive and answer the next request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from extproc.dev.mock_provider import GARBAGE_BODY, MockProvider
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

TIMEOUT_S = 1.0  # the providers' `timeout` below
CLIENT_LIMIT = httpx.Timeout(TIMEOUT_S + 7.0)  # "nothing hangs": far below the mock's 20 s stall
KEYS = {"ok": "sk-uf-ok-7c41a0", "flaky": "sk-uf-flaky-2e9b83"}

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: faults, namespace: default}
spec:
  timeout: 1s
  maxRetries: 0
  circuitBreaker: {enabled: true, failureThreshold: 1000, resetTimeout: 60s}
  providers:
    - {name: ok, baseUrl: "{ok}", auth: {env: UF_OK_KEY}}
    - {name: flaky, baseUrl: "{flaky}", auth: {env: UF_FLAKY_KEY}}
  routes:
    - {models: [ok-model, "ok-*"], backends: [{provider: ok}]}
    - {models: [flaky-model], backends: [{provider: flaky}]}
  cache: {mode: Fallback}
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    mocks = {name: MockProvider(name, expect_key=key, hang_s=20) for name, key in KEYS.items()}
    env = {f"UF_{n.upper()}_KEY": k for n, k in KEYS.items()}
    with running(Stack(TEMPLATE, mocks, env=env)) as s:
        yield s


@pytest.fixture(autouse=True)
def still_serving(stack: Stack) -> Iterator[None]:
    """After each test: faults recovered, the ext_proc alive, and the next request answered."""
    yield
    stack.mocks["flaky"].recover_sync()
    assert stack.extproc.proc is not None and stack.extproc.proc.poll() is None, "the ext_proc died"
    resp = stack.chat("ok-model", content="after")
    assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] == "ok", resp.text[:300]


def _body(model: Any = "flaky-model", stream: bool = False, content: str = "hi") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return body


def _read(stack: Stack, body: dict[str, Any], after_headers: Callable[[], None] = lambda: None,
          ) -> tuple[int, dict[str, str], bytes, str | None, float]:
    """POST and read the whole answer: status, headers, bytes received, the read error, seconds.
    ``after_headers`` runs once the response headers are here, before the body is read."""
    started = time.monotonic()
    received: list[bytes] = []
    error: str | None = None
    with stack.client.stream("POST", "/v1/chat/completions", json=body, timeout=CLIENT_LIMIT) as resp:
        after_headers()
        try:
            for chunk in resp.iter_raw():
                received.append(chunk)
        except httpx.TransportError as exc:  # RemoteProtocolError: incomplete chunked/length body
            error = type(exc).__name__
        return resp.status_code, dict(resp.headers), b"".join(received), error, time.monotonic() - started


def _assert_openai_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"] and error["type"], error


def _assert_not_cached(stack: Stack, body: dict[str, Any]) -> None:
    """The same request with the provider down: no fallback answer, so nothing was stored."""
    stack.mocks["flaky"].set_fault_sync("500")
    resp = stack.client.post("/v1/chat/completions", json=body, timeout=CLIENT_LIMIT)
    _assert_openai_error(resp, 503, "no_provider_available")
    assert "x-holysheep-cache" not in resp.headers


# --- upstream faults --------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["sse", "content-length"])
def test_response_cut_mid_event_ends_the_stream_and_is_not_cached(stack: Stack, stream: bool) -> None:
    """The cut comes after the client has the headers (the mock waits for the test's gate)."""
    flaky = stack.mocks["flaky"]
    gate = threading.Event()
    flaky.cut_gate = gate
    flaky.set_fault_sync("cut-stream")
    body = _body(stream=stream, content=f"cut {stream}")
    try:
        status, headers, data, error, _ = _read(stack, body, after_headers=gate.set)
    finally:
        gate.set()
        flaky.cut_gate = None
    assert gate.is_set()
    assert status == 200 and headers["x-holysheep-provider"] == "flaky"
    assert error is not None, f"a truncated answer looked complete: {data[-200:]!r}"
    assert error != "ReadTimeout", "the broken stream was not ended: the client's own limit fired"
    # Whatever arrived is the provider's own events (chunks the ext_proc had not yet acked when
    # the upstream reset are dropped with the stream, so it may be nothing), never a made-up end.
    assert not data or data.startswith(b"data: {" if stream else b"{"), data
    assert b"[DONE]" not in data
    _assert_not_cached(stack, body)


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "content-length"])
def test_upstream_gone_while_the_ext_proc_holds_the_headers_gets_envoys_502_openai_style(
        stack: Stack, stream: bool) -> None:
    """cut-early: headers, half the body and the close in one TCP segment (the mock corks them),
    so Envoy sees the reset before the ext_proc can answer the headers: always Envoy's own 502,
    mapped to an OpenAI-style error by the local_reply_config (see the module docstring)."""
    flaky = stack.mocks["flaky"]
    before = len(flaky.requests)
    flaky.set_fault_sync("cut-early")
    body = _body(stream=stream, content=f"early {stream}")
    resp = stack.client.post("/v1/chat/completions", json=body, timeout=CLIENT_LIMIT)
    assert [r.mode for r in list(flaky.requests)[before:]] == ["cut-early"]  # the provider saw it once
    _assert_openai_error(resp, 502, resp.json()["error"]["code"])
    error = resp.json()["error"]
    assert error["type"] == "server_error" and "reset before headers" in error["message"], error
    # Envoy had the provider's headers (its response had started) but the client had nothing.
    assert error["code"].startswith("upstream_reset_after_response_started"), error
    assert "x-holysheep-provider" not in resp.headers
    _assert_not_cached(stack, body)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-requested"])
def test_garbage_with_200_passes_through_unchanged_and_uncached(stack: Stack, stream: bool) -> None:
    stack.mocks["flaky"].set_fault_sync("garbage")
    tokens_before = _tokens(stack, "flaky")
    body = _body(stream=stream, content=f"garbage {stream}")
    resp = stack.client.post("/v1/chat/completions", json=body, timeout=CLIENT_LIMIT)
    assert resp.status_code == 200 and resp.content == GARBAGE_BODY
    assert resp.headers["x-holysheep-provider"] == "flaky"
    assert _tokens(stack, "flaky") == tokens_before
    _assert_not_cached(stack, body)


def test_stalled_stream_is_ended_by_the_timeout(stack: Stack) -> None:
    stack.mocks["flaky"].set_fault_sync("stall-stream")
    status, _, data, error, seconds = _read(stack, _body(stream=True, content="stall"))
    assert status == 200 and data.startswith(b"data: {"), data
    assert data.count(b"\n\n") == 1, data  # the first event, then nothing
    assert error is not None, "a stalled stream ended as if complete"
    # Ended by Envoy's route timeout, not by the client's own limit (the mock stalls for 20 s),
    # and no earlier than that timeout.
    assert error != "ReadTimeout", "the stall was not ended by the route timeout"
    assert seconds >= TIMEOUT_S - 0.05, seconds


def _tokens(stack: Stack, provider: str) -> float:
    total = 0.0
    for line in stack.extproc.metrics().splitlines():
        if line.startswith("holysheep_tokens_total{") and f'provider="{provider}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- bad input not covered by test_e2e_dataplane.py ---------------------------------------------

DEEP = 100_000
NESTED_OK = 200  # well inside what the JSON parser accepts: must reach the provider unchanged


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"model": "ok-model", "pad": "' + b"x" * (10 << 20) + b'"}', 413, "request_too_large"),
    (b'{"model": "ok-model", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, "invalid_json"),
    (b'{"model": "ok-model", "x": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}", 400, "invalid_json"),
    (b'{"model": "ok-\xff\xfe"}', 400, "invalid_json"),
    (b'{"model": "ok-\xc0\xaf"}', 400, "invalid_json"),  # overlong encoding
    (b'{"model": "ok-\xed\xa0\x80"}', 400, "invalid_json"),  # a surrogate, raw (CESU-8)
    (b'{"model": "ok-\\ud800"}', 400, "invalid_json"),  # a lone surrogate escape: no metric label
    (b'{"model": "ok-model"', 400, "invalid_json"),  # truncated
    (b'"ok-model"', 400, "invalid_json"),
    (b'[{"model": "ok-model"}]', 400, "invalid_json"),
    (b"null", 400, "invalid_json"),
    (b"", 400, "model_required"),
    (b"{}", 400, "model_required"),
    (b'{"model": null}', 400, "model_required"),
    (b'{"model": ""}', 400, "model_required"),
    (b'{"model": true}', 400, "model_required"),
    (b'{"model": ["ok-model"]}', 400, "model_required"),
    (b'{"model": {"id": "ok-model"}}', 400, "model_required"),
], ids=["10MiB", "deep-array-in-object", "deep-object", "utf8-ff", "utf8-overlong", "utf8-cesu",
        "lone-surrogate-model", "truncated", "top-string", "top-array", "top-null", "empty",
        "no-model", "model-null", "model-empty", "model-bool", "model-list", "model-object"])
def test_bad_input_gets_openai_error(stack: Stack, body: bytes, status: int, code: str) -> None:
    before = stack.mocks["ok"].total
    resp = stack.client.post("/v1/chat/completions", content=body, timeout=CLIENT_LIMIT,
                             headers={"content-type": "application/json"})
    _assert_openai_error(resp, status, code)
    assert stack.mocks["ok"].total == before, "a rejected request reached the provider"


@pytest.mark.parametrize("body", [
    b'{"model": "ok-model", "x": ' + b"[" * NESTED_OK + b"]" * NESTED_OK + b"}",
    b'{"model": "ok-model", "messages": [{"role": "user", "content": "\\ud800 \\udfff broken emoji"}]}',
    '{"model": "ok-model", "messages": [{"role": "user", "content": "caf\u00e9 \u6a21\u578b"}]}'.encode(),
], ids=["nested-200", "lone-surrogate-in-content", "utf8-content"])
def test_odd_but_valid_input_passes_through_unchanged(stack: Stack, body: bytes) -> None:
    mock = stack.mocks["ok"]
    resp = stack.client.post("/v1/chat/completions", content=body, timeout=CLIENT_LIMIT,
                             headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["x-holysheep-provider"] == "ok"
    seen = mock.last_request
    assert seen is not None and seen.body == body, "the body was not passed through byte for byte"
    assert json.loads(resp.content)["object"] == "chat.completion"
