"""The ExternalProcessor gRPC service: one stream per HTTP request, one processor per stream.

Each stream's caller is authenticated once, from the transport, before any message is read
(extproc/identity.py). A stream without an acceptable identity, or whose caller asks for a
config outside its scope (extproc/authz.py), ends with PERMISSION_DENIED: Envoy fails the
request closed (a 5xx to the client, no provider sees it). Each refusal is counted in
``holysheep_unauthorized_calls_total{reason}`` and logged with the identity or the peer, never
with anything the request carried.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from extproc import metrics
from extproc.authz import Denied
from extproc.errors import InternalError
from extproc.identity import Identify, authenticated_caller, caller_from_node_metadata
from extproc.processor import Processor, RequestProcessor
from extproc.spiffe import IdentityError
from protos import messages as m

log = logging.getLogger(__name__)

EOF = grpc.aio.EOF
ProcessingResponse = m.ProcessingResponse


class ExternalProcessorService(pbg.ExternalProcessorServicer):
    def __init__(self, plane: Any) -> None:
        # `plane` is the DataPlane (server.py); typed loosely to keep this module import-light.
        self.plane = plane
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self.in_flight += 1
        self.idle.clear()
        proc: Processor | None = None
        try:
            try:
                identity = self.plane.authenticate(context)
            except IdentityError as exc:
                await _refuse(context, exc.reason, str(exc), f"peer {context.peer()}")
            plane = self.plane
            runtime = plane.runtime
            identify: Identify
            if identity is None:
                identify = caller_from_node_metadata
            elif runtime is not None:
                identify = runtime.identify_for(identity)
            else:
                identify = authenticated_caller(identity, ())
            proc = RequestProcessor(runtime, plane.upstream, plane.spawn, identify, plane.root_namespace)
            read, write = context.read, context.write
            while True:
                req = await read()
                if req is EOF:
                    return
                phase = req.WhichOneof("request")
                try:
                    # The phases in the order Envoy sends them; trailers are never asked for
                    # (the filter's mode skips them) and are let through.
                    if phase == "request_headers":
                        answer = proc.request_headers(req)
                    elif phase == "request_body":
                        answer = proc.request_body(req)
                    elif phase == "response_headers":
                        answer = proc.response_headers(req)
                    elif phase == "response_body":
                        answer = proc.response_body(req)
                    else:
                        answer = m.CONTINUE_REQUEST_TRAILERS if phase == "request_trailers" else \
                            m.CONTINUE_RESPONSE_TRAILERS
                    # Only a phase that needs I/O returns an awaitable: the hot path awaits nothing.
                    resp: m.ProcessingResponse = (
                        answer if type(answer) is ProcessingResponse else await answer
                    )
                except (Denied, IdentityError) as exc:
                    who = str(identity) if identity else f"peer {context.peer()}"
                    await _refuse(context, exc.reason, str(exc), who)
                except Exception:
                    # A bug must cost one request a clean 500, never the stream or the server.
                    log.exception("ext_proc processing failed")
                    resp = proc.reject(InternalError())
                if phase == "response_body":
                    try:
                        await write(resp)
                    finally:
                        # Once the ack is handed to gRPC, so it never delays the client; and
                        # also when Envoy closes the stream right after the last ack.
                        try:
                            proc.after_response_body(req)
                        except Exception:
                            log.exception("response accounting failed")
                    if req.response_body.end_of_stream or resp.HasField("immediate_response"):
                        return  # see below
                    continue
                if phase == "response_headers":
                    try:
                        await write(resp)
                    finally:
                        # The passed-on success's breaker and counts, after the answer that the
                        # client's first byte waits for (and when Envoy resets right after it).
                        try:
                            proc.after_response_headers()
                        except Exception:
                            log.exception("response accounting failed")
                else:
                    await write(resp)
                if _ends_exchange(phase, req, resp):
                    # Envoy sends nothing after this answer, so close the stream now instead of
                    # parking a read that Envoy's reset would cancel: grpc.aio leaks the batch
                    # of every cancelled read (grpc/grpc#43360, ~80 B per request), and an OK
                    # close is what Envoy treats as "processing complete" anyway.
                    return
        except asyncio.CancelledError:
            raise
        finally:
            if proc is not None:
                try:
                    proc.stream_ended()
                except Exception:
                    log.exception("response accounting failed")
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()


async def _refuse(context: grpc.aio.ServicerContext, reason: str, message: str, who: str) -> NoReturn:
    """End the stream with PERMISSION_DENIED (raises, as ``context.abort`` does)."""
    metrics.UNAUTHORIZED.labels(reason).inc()
    log.warning("refused an ext_proc stream from %s: %s", who, message, extra={"reason": reason})
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"unauthorized: {reason}")
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _ends_exchange(phase: str | None, req: m.ProcessingRequest, resp: m.ProcessingResponse) -> bool:
    """Whether `resp`, the answer to a message of `phase` other than a response body, is the
    last answer Envoy waits for on this stream."""
    if resp.HasField("immediate_response"):
        return True
    if phase == "response_headers":
        # The filter's static mode sends no response body or trailers; only an override that
        # asks for the body (a successful AI answer, for usage and the cache) keeps it open.
        wants_body = resp.HasField("mode_override") and resp.mode_override.response_body_mode != m.ProcessingMode.NONE
        return req.response_headers.end_of_stream or not wants_body
    return False
