"""Target (f), the floor: an ext_proc server that answers every message with an empty
"continue", in the same language and gRPC stack as ours, asking for the same phases
(including the STREAMED response body via mode_override), so it costs the gRPC round trips
and nothing else.

    python -m bench.floor --address 127.0.0.1:PORT [--workers N] [--tls-cert F --tls-key F --client-ca F]

With the TLS flags it serves mTLS requiring a client certificate, as ``holysheep-mesh extproc``
does with the same flags, so the floor pays the same transport as the data plane it is the
floor of (the dev stack's Envoy calls its ext_proc over mTLS).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

_MODE = processing_mode_pb2.ProcessingMode
REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
RESPONSE_HEADERS = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse(), mode_override=_MODE(response_body_mode=_MODE.STREAMED)
)
RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
_BY_PHASE = {
    "request_headers": REQUEST_HEADERS,
    "request_body": REQUEST_BODY,
    "response_headers": RESPONSE_HEADERS,
    "response_body": RESPONSE_BODY,
    "request_trailers": REQUEST_TRAILERS,
    "response_trailers": RESPONSE_TRAILERS,
}


# Like extproc/service.py, close the stream after the last answer instead of waiting for Envoy's
# reset (grpc.aio leaks ~100 B per cancelled read, grpc/grpc#43360); BENCH_FLOOR_EARLY=0 shows the
# naive loop.
EARLY = os.environ.get("BENCH_FLOOR_EARLY", "1") == "1"

# Experiments on the floor itself (bench/results/writes-20261204b.txt): BENCH_FLOOR_BUSY adds work
# before every answer, "spin:US" (a busy loop), "touch:N" (read N of 200k live dicts),
# "alloc:N" (build and drop N small dicts), or keeps one timer pending on the event loop,
# "timer:MS" (rescheduled every MS ms); BENCH_FLOOR_NOGC=1 switches the collector off.
BUSY, _, _AMOUNT = os.environ.get("BENCH_FLOOR_BUSY", "").partition(":")
BUSY_AMOUNT = int(_AMOUNT or 0)
_LIVE: list[dict[str, Any]] = [{"k": i, "v": [i]} for i in range(200_000)] if BUSY == "touch" else []
_BUSY_EACH = BUSY in ("spin", "touch", "alloc")  # decided once: the plain floor's loop pays one flag test
_next_live = 0
if os.environ.get("BENCH_FLOOR_NOGC") == "1":
    gc.disable()


def _busy() -> None:
    global _next_live
    if BUSY == "spin":
        end = time.perf_counter() + BUSY_AMOUNT / 1e6
        while time.perf_counter() < end:
            pass
    elif BUSY == "touch":
        start = _next_live
        total = 0
        for d in _LIVE[start:start + BUSY_AMOUNT]:
            total += d["v"][0]
        _next_live = (start + 7919 * BUSY_AMOUNT) % (len(_LIVE) - BUSY_AMOUNT)
    elif BUSY == "alloc":
        junk = [{"a": i, "b": (i, i)} for i in range(BUSY_AMOUNT)]
        del junk


class Floor(pbg.ExternalProcessorServicer):
    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            phase = req.WhichOneof("request")
            if _BUSY_EACH:
                _busy()
            await context.write(_BY_PHASE[phase])
            if EARLY and phase == "response_body" and req.response_body.end_of_stream:
                return


class SyncFloor(pbg.ExternalProcessorServicer):
    def Process(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        for req in request_iterator:
            yield _BY_PHASE[req.WhichOneof("request")]


def serve_sync(address: str, tls: tuple[str, str, str] | None = None) -> None:
    # Thread-per-stream grpcio server, to compare against grpc.aio on the same workload.
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=256), options=[("grpc.so_reuseport", 1)])
    pbg.add_ExternalProcessorServicer_to_server(SyncFloor(), server)
    port = server.add_secure_port(address, _credentials(*tls)) if tls else server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"cannot listen on {address}")
    server.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(0.5)


def _credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    return grpc.ssl_server_credentials([(read(key), read(cert))], root_certificates=read(client_ca),
                                       require_client_auth=True)


async def serve(address: str, tls: tuple[str, str, str] | None = None) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    pbg.add_ExternalProcessorServicer_to_server(Floor(), server)
    port = server.add_secure_port(address, _credentials(*tls)) if tls else server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if BUSY == "timer":
        def tick() -> None:
            loop.call_later(BUSY_AMOUNT / 1000, tick)

        tick()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor")
    p.add_argument("--address", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tls-cert", help="serve mTLS: the server certificate chain (PEM)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--client-ca", help="CA bundle a client certificate must chain to (PEM)")
    args = p.parse_args()
    given = [args.tls_cert, args.tls_key, args.client_ca]
    if any(given) and not all(given):
        p.error("--tls-cert, --tls-key and --client-ca go together")
    tls = (args.tls_cert, args.tls_key, args.client_ca) if all(given) else None
    tls_args = ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key, "--client-ca", args.client_ca] if tls else []
    if args.workers > 1 and not os.environ.get("BENCH_FLOOR_WORKER"):
        env = {**os.environ, "BENCH_FLOOR_WORKER": "1"}
        procs = [
            subprocess.Popen([sys.executable, "-m", "bench.floor", "--address", args.address, *tls_args], env=env)
            for _ in range(args.workers)
        ]

        def forward(signum: int, _: object) -> None:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        for proc in procs:
            proc.wait()
        return 0
    if os.environ.get("BENCH_FLOOR_IMPL") == "sync":
        serve_sync(args.address, tls)
    elif os.environ.get("BENCH_FLOOR_IMPL") == "uvloop":
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(serve(args.address, tls))
    else:
        asyncio.run(serve(args.address, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
