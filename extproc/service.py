"""The ExternalProcessor gRPC service: one stream per HTTP request, one processor per stream."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from extproc.errors import InternalError
from extproc.processor import RequestProcessor
from protos import messages as m

log = logging.getLogger(__name__)


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
        proc = RequestProcessor(self.plane.runtime, self.plane.upstream, self.plane.spawn)
        loop = asyncio.get_running_loop()
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                try:
                    resp = await self._handle(proc, req)
                except Exception:
                    # A bug must cost one request a clean 500, never the stream or the server.
                    log.exception("ext_proc processing failed")
                    resp = proc._error(InternalError())
                if req.HasField("response_body"):
                    # Scheduled before the write is awaited: it runs once the ack is handed to
                    # gRPC, and still runs if Envoy closes the stream right after the last ack.
                    loop.call_soon(_account, proc, req)
                await context.write(resp)
        except asyncio.CancelledError:
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    @staticmethod
    async def _handle(proc: RequestProcessor, req: m.ProcessingRequest) -> m.ProcessingResponse:
        phase = req.WhichOneof("request")
        if phase == "request_headers":
            return proc.on_request_headers(req)
        if phase == "request_body":
            resp = proc.on_request_body(req)
            return resp if resp is not None else await proc.resolve()
        if phase == "response_headers":
            resp = proc.on_response_headers(req)
            return resp if resp is not None else await proc.failover()
        if phase == "response_body":
            return m.CONTINUE_RESPONSE_BODY
        if phase == "request_trailers":
            return m.CONTINUE_REQUEST_TRAILERS
        return m.CONTINUE_RESPONSE_TRAILERS


def _account(proc: RequestProcessor, req: m.ProcessingRequest) -> None:
    try:
        proc.after_response_body(req)
    except Exception:
        log.exception("response accounting failed")
