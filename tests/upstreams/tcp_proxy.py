"""A loopback TCP proxy that logs what a client sends and can refuse it: the far side's view.

Put in front of Redis, it shows exactly when the ext_proc contacted Redis (every accepted
connection and every chunk the client sent, with its wall-clock time), which is how a test
observes a back-off without reading the ext_proc's own bookkeeping. ``refuse()`` closes every
open connection and closes each new one at once, so the client's next command fails;
``allow()`` passes traffic through again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

__all__ = ["Contact", "TcpProxy"]


@dataclass(frozen=True, slots=True)
class Contact:
    time: float  # wall clock, as the mock providers record it
    conn: int
    kind: str  # "connect" (accepted and passed on), "refused" (accepted and closed), "data"
    data: bytes = b""


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.contacts: list[Contact] = []
        self.refusing = False
        self._lock = threading.Lock()
        self._conns = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _log(self, conn: int, kind: str, data: bytes = b"") -> None:
        with self._lock:
            self.contacts.append(Contact(time.time(), conn, kind, data))

    def since(self, t: float) -> list[Contact]:
        with self._lock:
            return [c for c in self.contacts if c.time >= t]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn = self._conns
        if self.refusing:
            self._log(conn, "refused")
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._log(conn, "refused")
            writer.close()
            return
        self._log(conn, "connect")
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bool) -> None:
            try:
                while chunk := await src.read(65536):
                    if log:
                        self._log(conn, "data", chunk)
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers -= {writer, up_writer}

    def _close_all(self) -> None:
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def refuse(self) -> None:
        """Close every connection now and every new one as it arrives."""
        assert self._loop is not None
        self.refusing = True
        asyncio.run_coroutine_threadsafe(self._in_loop(self._close_all), self._loop).result(5)

    def allow(self) -> None:
        self.refusing = False

    @staticmethod
    async def _in_loop(fn: object) -> None:
        assert callable(fn)
        fn()

    def start(self) -> TcpProxy:
        started = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("tcp proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            self._close_all()
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = None
