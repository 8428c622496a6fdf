"""The ext_proc gRPC stream lifecycle, driven directly over gRPC as Envoy would drive it.

The server closes a stream (status OK) right after the answer that ends the exchange, without
waiting for Envoy to half-close: a read left pending until Envoy resets the stream is what leaks
memory in grpc.aio (grpc/grpc#43360), and Envoy treats an OK close as "processing complete".
These tests keep the client's side of the stream open, so only the server can end it.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from extproc.dev.mock_provider import MockProvider
from protos import messages as m
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

KEY = "sk-stream-life-0001"
TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: grpc-stream, namespace: default}
spec:
  providers:
    - {name: only, baseUrl: "{only}", auth: {env: GRPC_STREAM_KEY}}
  routes:
    - {models: [m1], backends: [{provider: only}]}
  cache: {mode: "Off"}
"""
_END = object()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(TEMPLATE, {"only": MockProvider("only", expect_key=KEY)}, env={"GRPC_STREAM_KEY": KEY})
    with running(s):
        yield s


class Exchange:
    """One ext_proc stream whose client side stays open until the test ends it."""

    def __init__(self, stack: Stack) -> None:
        self.channel = stack.extproc_channel()  # mTLS with the stack's workload certificate, as its Envoy
        self.outbox: queue.Queue[object] = queue.Queue()
        stub = pbg.ExternalProcessorStub(self.channel)
        self.responses = stub.Process(self._requests(), timeout=10)

    def _requests(self) -> Iterator[pb.ProcessingRequest]:
        while (item := self.outbox.get(timeout=10)) is not _END:
            assert isinstance(item, pb.ProcessingRequest)
            yield item

    def send(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self.outbox.put(req)
        return next(self.responses)

    def server_closed(self) -> bool:
        """True once the server ended the stream with OK while our side was still open."""
        try:
            next(self.responses)
        except StopIteration:
            return self.responses.code() == grpc.StatusCode.OK
        return False

    def close(self) -> None:
        self.outbox.put(_END)
        self.channel.close()


@pytest.fixture
def exchange(stack: Stack) -> Iterator[Exchange]:
    ex = Exchange(stack)
    yield ex
    ex.close()


def _headers(pairs: dict[str, str], end_of_stream: bool) -> pb.HttpHeaders:
    header_map = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )
    return pb.HttpHeaders(headers=header_map, end_of_stream=end_of_stream)


def _request_headers(method: str, path: str, end_of_stream: bool) -> pb.ProcessingRequest:
    pairs = {":method": method, ":path": path, ":authority": "api.example", "content-type": "application/json"}
    return pb.ProcessingRequest(request_headers=_headers(pairs, end_of_stream))


def _body(payload: dict[str, object]) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(payload).encode(), end_of_stream=True))


def _response_headers(status: int) -> pb.ProcessingRequest:
    pairs = {":status": str(status), "content-type": "application/json"}
    return pb.ProcessingRequest(response_headers=_headers(pairs, end_of_stream=False))


def test_stream_ends_after_the_last_response_body_chunk(exchange: Exchange) -> None:
    assert exchange.send(_request_headers("POST", "/v1/chat/completions", False)).HasField("request_headers")
    routed = exchange.send(_body({"model": "m1", "messages": []}))
    set_headers = {h.header.key: h.header.raw_value for h in routed.request_body.response.header_mutation.set_headers}
    assert set_headers["authorization"] == f"Bearer {KEY}".encode()
    answered = exchange.send(_response_headers(200))
    # A successful AI answer asks for the body (usage, cache): the stream must stay open for it.
    assert answered.mode_override.response_body_mode == m.ProcessingMode.STREAMED
    usage = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    chunk = exchange.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=usage[:10], end_of_stream=False)))
    assert chunk.HasField("response_body")
    last = exchange.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=usage[10:], end_of_stream=True)))
    assert last.HasField("response_body")
    assert exchange.server_closed()


def test_stream_ends_after_an_immediate_response(exchange: Exchange) -> None:
    exchange.send(_request_headers("POST", "/v1/chat/completions", False))
    rejected = exchange.send(_body({"model": "no-such-model"}))
    assert rejected.immediate_response.status.code == 404
    assert exchange.server_closed()


def test_stream_ends_after_response_headers_when_no_body_is_wanted(exchange: Exchange) -> None:
    routed = exchange.send(_request_headers("GET", "/v1/models", True))
    assert routed.request_headers.response.header_mutation.set_headers
    answered = exchange.send(_response_headers(200))
    assert not answered.HasField("mode_override")
    assert exchange.server_closed()
