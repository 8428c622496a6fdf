"""SIGTERM, seen from the ext_proc's own ports: not ready at once, serving for the delay, then a drain.

Driven over gRPC and HTTP straight at one ``holysheep-mesh extproc`` process (``--drain-delay-
seconds 2 --drain-seconds 3``), the way Envoy and the kubelet see it:

- at the signal /ready turns 503 ("shutting down") and the gRPC health service answers
  NOT_SERVING for the server and for the ext_proc service, while /health stays 200;
- during the delay a stream opened after the signal is served end to end;
- then the port stops accepting, a stream opened before the signal and still in flight is
  answered to its end, and the process exits as soon as it is done, not at the deadline;
- a stream still open at the drain deadline is cancelled and the process exits then.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import http_get, wait_until
from extproc.server import EXT_PROC_SERVICE
from tests.harness import Stack, running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

KEY = "sk-drain-phases-7731"
DELAY, DRAIN = 2.0, 3.0
TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: drain, namespace: default}
spec:
  providers:
    - {name: only, baseUrl: "{only}", auth: {env: DRAIN_KEY}}
  routes:
    - {models: [m1], backends: [{provider: only}]}
"""
_END = object()
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(TEMPLATE, {"only": MockProvider("only", expect_key=KEY)}, env={"DRAIN_KEY": KEY},
              drain_delay_seconds=DELAY, drain_seconds=DRAIN)
    with running(s):
        yield s


class Exchange:
    """One ext_proc stream on its own connection, whose client side stays open until closed."""

    def __init__(self, stack: Stack) -> None:
        self.channel = stack.extproc_channel()
        self.outbox: queue.Queue[object] = queue.Queue()
        self.responses = pbg.ExternalProcessorStub(self.channel).Process(self._requests(), timeout=30)

    def _requests(self) -> Iterator[pb.ProcessingRequest]:
        while (item := self.outbox.get(timeout=30)) is not _END:
            assert isinstance(item, pb.ProcessingRequest)
            yield item

    def send(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self.outbox.put(req)
        return next(self.responses)

    def close(self) -> None:
        self.outbox.put(_END)
        self.channel.close()


def _request_headers() -> pb.ProcessingRequest:
    pairs = {":method": "POST", ":path": "/v1/chat/completions", ":authority": "api.example",
             "content-type": "application/json"}
    header_map = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                             for k, v in pairs.items()])
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map, end_of_stream=False))


def _body() -> pb.ProcessingRequest:
    body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "drain"}]}).encode()
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def _routed(resp: pb.ProcessingResponse) -> bool:
    """The request-body answer of a routed request: the provider's credential is set."""
    mutations = resp.request_body.response.header_mutation.set_headers
    return any(h.header.key == "authorization" and h.header.raw_value == f"Bearer {KEY}".encode()
               for h in mutations)


def _health(stack: Stack) -> dict[str, int]:
    with stack.extproc_channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {service: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                for service in ("", EXT_PROC_SERVICE)}


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _sigterm(stack: Stack) -> tuple[float, int]:
    proc = stack.extproc.proc
    assert proc is not None and proc.poll() is None
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    return t0, proc.pid


def test_sigterm_not_ready_at_once_then_serves_the_delay_then_drains(stack: Stack) -> None:
    ep = stack.extproc
    assert _health(stack) == {"": SERVING, EXT_PROC_SERVICE: SERVING}
    assert http_get(ep.admin + "/ready")[0] == 200
    held = Exchange(stack)  # a request in flight across the whole termination
    try:
        assert held.send(_request_headers()).HasField("request_headers")
        t0, _ = _sigterm(stack)
        # At once: not ready for the kubelet, NOT_SERVING for Envoy's health check; still alive.
        wait_until(lambda: http_get(ep.admin + "/ready")[0] == 503, timeout=1.0, what="/ready 503")
        body = http_get(ep.admin + "/ready")[1]
        assert json.loads(body) == {"status": "not ready", "reason": "shutting down"}
        assert _health(stack) == {"": NOT_SERVING, EXT_PROC_SERVICE: NOT_SERVING}
        assert http_get(ep.admin + "/health")[0] == 200
        # During the delay a stream that opens now (a new connection too) is served end to end.
        late = Exchange(stack)
        try:
            assert late.send(_request_headers()).HasField("request_headers")
            assert _routed(late.send(_body()))
        finally:
            late.close()
        assert time.monotonic() - t0 < DELAY, "the checks above must run within the delay"
        assert ep.proc is not None and ep.proc.poll() is None
        # Then it stops accepting, while the stream in flight keeps the process draining...
        wait_until(lambda: not _accepts(ep.grpc_port), timeout=DELAY + 2, what="the gRPC port closed")
        stopped = time.monotonic() - t0
        assert stopped >= DELAY - 0.1, stopped
        assert ep.proc.poll() is None
        # ...and is answered to its end; the process goes right after, well before the deadline.
        assert _routed(held.send(_body()))
    finally:
        held.close()
    assert ep.proc.wait(DRAIN) == 0
    assert time.monotonic() - t0 < DELAY + DRAIN
    ep.start()


def test_a_stream_still_open_at_the_drain_deadline_is_cancelled(stack: Stack) -> None:
    ep = stack.extproc
    held = Exchange(stack)
    try:
        assert held.send(_request_headers()).HasField("request_headers")
        t0, _ = _sigterm(stack)
        assert ep.proc is not None
        assert ep.proc.wait(DELAY + DRAIN + 5) == 0
        elapsed = time.monotonic() - t0
        assert DELAY + DRAIN - 0.2 <= elapsed < DELAY + DRAIN + 3, elapsed
        with pytest.raises(grpc.RpcError) as info:
            held.send(_body())
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        held.close()
    assert ep.log_path is not None
    assert "drain deadline reached: cancelling 1 stream(s) still in flight" in ep.log_path.read_text()
    ep.start()
