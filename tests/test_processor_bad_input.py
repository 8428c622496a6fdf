"""Regressions found by the atheris harness (tests/fuzz/fuzz_request_body.py), in-process.

Each test drives a real ``RequestProcessor`` with real ext_proc protobufs, as
``extproc/service.py`` does (a phase's answer awaited only when it is an awaitable), and pins
one input the fuzzer found mishandled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import REGISTRY, generate_latest

from extproc import metrics
from extproc.cache import cache_key
from extproc.credentials import CredentialStore
from extproc.processor import Answer, RequestProcessor
from extproc.runtime import Runtime
from extproc.upstream import UpstreamClient, UpstreamResult
from protos.spec import load_text

CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: regress, namespace: default}
spec:
  circuitBreaker: {enabled: true, failureThreshold: 1, resetTimeout: 3600s}
  providers:
    - {name: only, baseUrl: "https://only.invalid/v1", auth: {type: Bearer, secretName: only, key: api-key}}
  routes:
    - {models: ["local-*", gpt-4o-mini], backends: [{provider: only}]}
  cache: {mode: Fallback}
"""


class NoNetwork(UpstreamClient):
    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                      timeout: float) -> UpstreamResult:
        raise AssertionError("no network on the request path")


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "api-key").write_text("sk-regress-only-0001")
    return Runtime(load_text(CONFIG), CredentialStore(str(tmp_path)))


def _headers(path: bytes, end_of_stream: bool = False, method: bytes | None = None) -> pb.ProcessingRequest:
    method = method or (b"GET" if end_of_stream else b"POST")
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":method", raw_value=method),
        base_pb2.HeaderValue(key=":path", raw_value=path),
        base_pb2.HeaderValue(key=":authority", raw_value=b"only.invalid"),
    ]), end_of_stream=end_of_stream))


async def _awaited(answer: Awaitable[pb.ProcessingResponse]) -> pb.ProcessingResponse:
    return await answer


def _resolved(answer: Answer) -> pb.ProcessingResponse:
    """A phase's answer as service.py gets it: ready, or awaited."""
    return answer if isinstance(answer, pb.ProcessingResponse) else asyncio.run(_awaited(answer))


def _run(runtime: Runtime, path: bytes, body: bytes) -> pb.ProcessingResponse:
    proc = RequestProcessor(runtime, NoNetwork(), lambda coro: coro.close())
    proc.request_headers(_headers(path))
    return _resolved(proc.request_body(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))))


def _set_headers(common: pb.CommonResponse) -> dict[str, bytes]:
    return {o.header.key: o.header.raw_value for o in common.header_mutation.set_headers}


def test_non_ascii_query_bytes_reach_the_provider_unchanged(runtime: Runtime) -> None:
    # Was: the latin-1-decoded path re-encoded as UTF-8, so b"\xff" became b"\xc3\xbf".
    query = b"?q=caf\xc3\xa9&raw=\xff"
    resp = _run(runtime, b"/v1/chat/completions" + query, b'{"model": "gpt-4o-mini"}')
    assert _set_headers(resp.request_body.response)[":path"] == b"/v1/chat/completions" + query

    proc = RequestProcessor(runtime, NoNetwork(), lambda coro: coro.close())
    bodyless = proc.request_headers(_headers(b"/v1/models?x=\xff", end_of_stream=True))
    assert _set_headers(bodyless.request_headers.response)[":path"] == b"/v1/models?x=\xff"


def test_lone_surrogate_escape_in_the_body_is_not_a_500(runtime: Runtime) -> None:
    # Was: cache_key() raised UnicodeEncodeError on "\ud800" (valid JSON, not valid Unicode), and
    # the fallback lookup with every circuit open became a 500 instead of a 503.
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800 \\udfff"}]}'
    assert _run(runtime, b"/v1/chat/completions", body).WhichOneof("response") == "request_body"
    for provider in runtime.providers.values():
        provider.breaker.record_failure()
    resp = _run(runtime, b"/v1/chat/completions", body)
    assert resp.immediate_response.status.code == 503, resp
    assert json.loads(resp.immediate_response.body)["error"]["code"] == "no_provider_available"
    # The key stays injective: different lone surrogates, different keys.
    assert cache_key("", "/chat/completions", {"a": "\ud800"}) != cache_key("", "/chat/completions", {"a": "\udc00"})


def test_a_body_nested_a_thousand_deep_is_not_a_500(runtime: Runtime) -> None:
    # Was (tests/fuzz): orjson reads 1024 levels, but its sorted writer stops at 254 and the
    # standard library's encoder recursed past the interpreter's limit from the fallback
    # lookup's frame: a RecursionError, so a 500 instead of a 503.
    body = b'{"model": "gpt-4o-mini", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert _run(runtime, b"/v1/chat/completions", body).WhichOneof("response") == "request_body"
    for provider in runtime.providers.values():
        provider.breaker.record_failure()

    def from_deeper_frames(n: int) -> pb.ProcessingResponse:
        return from_deeper_frames(n - 1) if n else _run(runtime, b"/v1/chat/completions", body)

    resp = from_deeper_frames(100)
    assert resp.immediate_response.status.code == 503, resp
    assert json.loads(resp.immediate_response.body)["error"]["code"] == "no_provider_available"


def test_lone_surrogate_model_is_rejected_and_metrics_still_render(runtime: Runtime) -> None:
    # Was: "local-\ud800" matched the glob route and became a metric label, after which every
    # /metrics scrape raised UnicodeEncodeError.
    resp = _run(runtime, b"/v1/chat/completions", b'{"model": "local-\\ud800"}')
    assert resp.immediate_response.status.code == 400, resp
    assert json.loads(resp.immediate_response.body)["error"]["code"] == "invalid_json"
    generate_latest(REGISTRY)


def test_bodyless_post_to_an_ai_endpoint_is_model_required(runtime: Runtime) -> None:
    # Was (through Envoy): no body phase follows a bodyless POST, so the request fell through to
    # the catch-all route's 404 unknown_endpoint instead of 400 model_required.
    proc = RequestProcessor(runtime, NoNetwork(), lambda coro: coro.close())
    resp = proc.request_headers(_headers(b"/v1/chat/completions", end_of_stream=True, method=b"POST"))
    assert resp.immediate_response.status.code == 400, resp
    assert json.loads(resp.immediate_response.body)["error"]["code"] == "model_required"
    proc = RequestProcessor(runtime, NoNetwork(), lambda coro: coro.close())
    routed = proc.request_headers(_headers(b"/v1/models", end_of_stream=True, method=b"POST"))
    assert routed.WhichOneof("response") == "request_headers"


def test_client_chosen_model_names_cannot_grow_metric_series_without_bound(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: a glob route passed the client's model name into every model label, so a client could
    # mint any number of series. Past the cap, names are counted under the route's pattern.
    monkeypatch.setattr(metrics, "MAX_MODEL_LABELS", 3)
    monkeypatch.setattr(metrics, "_model_labels", set())
    ok = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
    ])))
    names = [f"local-cardinality-{i}" for i in range(8)]
    for name in names:
        proc = RequestProcessor(runtime, NoNetwork(), lambda coro: coro.close())
        proc.request_headers(_headers(b"/v1/chat/completions"))
        routed = proc.request_body(pb.ProcessingRequest(request_body=pb.HttpBody(
            body=json.dumps({"model": name}).encode(), end_of_stream=True)))
        # A backend is available and the cache is Fallback: answered at once, no coroutine.
        assert isinstance(routed, pb.ProcessingResponse) and routed.WhichOneof("response") == "request_body"
        answered = proc.response_headers(ok)
        assert isinstance(answered, pb.ProcessingResponse) and answered.HasField("response_headers")
        proc.after_response_headers()  # as service.py does once the answer is written: the counts
    text = generate_latest(REGISTRY).decode()
    labelled = [n for n in names if f'model="{n}"' in text]
    assert labelled == names[:3]
    assert 'holysheep_requests_total{model="local-*",provider="only",status="200"} 5.0' in text
