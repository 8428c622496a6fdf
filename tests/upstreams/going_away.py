"""An ext_proc replica that is going away, on the wire: what Envoy's ext_proc stream meets then.

A bare HTTP/2 server (the ``h2`` library, on its own thread and event loop) that answers every
gRPC stream it is sent the way a replica that is stopping does, before any answer:

- ``refused-stream``: RST_STREAM(REFUSED_STREAM), as HTTP/2 does for a stream past a GOAWAY;
- ``reset``: the TCP connection dropped under the stream (a process that died, a proxy cut);
- ``unavailable``: a trailers-only gRPC UNAVAILABLE (14), what a sidecar in front of a stopped
  server answers;
- ``cancelled``: a trailers-only gRPC CANCELLED (1), what grpc.aio answers a stream that opens
  just as ``server.stop()`` starts.

The fifth case, ``connect-failure``, needs no server: a port nobody listens on. ``streams``
counts the streams each mode received, so a test can tell the fault really happened.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import Counter
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

MODES = ("refused-stream", "reset", "unavailable", "cancelled")
_GRPC_STATUS = {"unavailable": "14", "cancelled": "1"}


class _Replica(asyncio.Protocol):
    def __init__(self, mode: str, streams: Counter[str]) -> None:
        self.mode = mode
        self.streams = streams
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[self.mode] += 1
                if self.mode == "reset":
                    self.transport.abort()  # RST on the socket: every stream on it is gone
                    return
                self._answer(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.transport.write(self.conn.data_to_send())

    def _answer(self, stream_id: int) -> None:
        if self.mode == "refused-stream":
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers = [(":status", "200"), ("content-type", "application/grpc"),
                   ("grpc-status", _GRPC_STATUS[self.mode]), ("grpc-message", "replica going away")]
        self.conn.send_headers(stream_id, headers, end_stream=True)


class GoingAwayReplicas:
    """One loopback port per mode, served from a background thread until ``stop()``."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.streams: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="going-away-replicas", daemon=True)

    def start(self) -> GoingAwayReplicas:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        for mode in MODES:
            server = await self._loop.create_server(functools.partial(_Replica, mode, self.streams), "127.0.0.1", 0)
            self._servers.append(server)
            self.ports[mode] = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
                await server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
