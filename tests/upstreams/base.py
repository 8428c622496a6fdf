"""What the validating test upstreams share: a loopback aiohttp server, a request log and faults.

A provider subclass implements ``handle`` (auth, validation, the answer). Requests the
validator refuses are answered as the real API would, *and* counted in ``rejected`` with the
reason, so a test can assert that a translated request was valid rather than infer it from an
error the SDK raised.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


class Invalid(Exception):
    """A request the API would refuse with a 400; the message names the field as the API does."""


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw bytes when it is not JSON
    status: int = 0
    error: str | None = None
    usage: dict[str, Any] | None = None  # the usage the mock answered with (what accounting must count)
    sent: list[float] = field(default_factory=list)  # when each stream event was written (time.time())


@dataclass
class Fault:
    """Answer the next ``count`` requests with this error (status, API error type, message)."""

    status: int
    kind: str
    message: str = "injected fault"
    count: int = 1
    mid_stream: bool = False  # streamed requests: start the stream, then send an error event


@dataclass
class LoopbackProvider:
    name: str = "mock"
    key: str = "sk-test-upstream"
    prefix: str = "/v1"
    reply: str | None = None
    tool_input: dict[str, Any] = field(default_factory=lambda: {"city": "Paris", "days": 3})
    requests: list[Recorded] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    port: int = 0
    stream_gap: float = 0.0  # seconds between stream events (0: as fast as the loop goes)
    _runner: web.AppRunner | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def rejected(self) -> list[Recorded]:
        return [r for r in self.requests if r.error is not None]

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    def reply_text(self) -> str:
        return self.reply if self.reply is not None else f"hello from {self.name}"

    def fail(self, status: int, kind: str, message: str = "injected fault", count: int = 1,
             mid_stream: bool = False) -> None:
        self.faults.append(Fault(status, kind, message, count, mid_stream))

    def take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        fault.count -= 1
        if fault.count <= 0:
            self.faults.pop(0)
        return fault

    async def start(self) -> int:
        app = web.Application(client_max_size=32 << 20)
        app.router.add_route("*", "/{tail:.*}", self._entry)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- on a thread of its own, as the e2e stack (extproc.dev.stack.Stack) runs its mocks ------

    @property
    def expect_key(self) -> str:
        """The credential the mock requires: a key the stack's leak guard looks for everywhere else."""
        return self.key

    def start_in_thread(self) -> int:
        """Serve on a private event loop in a daemon thread; returns the bound port."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failed.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"upstream-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            raise failed[0]
        return self.port

    def stop_in_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        self.port = 0

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        rec = Recorded(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        self.requests.append(rec)
        resp = await self.handle(request, rec)
        rec.status = resp.status
        return resp

    async def handle(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        raise NotImplementedError


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)


async def stream_response(request: web.Request, events: list[bytes],
                          cut: Callable[[int], Awaitable[bytes | None]] | None = None,
                          gap: float = 0.0, sent: list[float] | None = None) -> web.StreamResponse:
    """Send SSE events one write each (so a client sees them arrive separately), ``gap`` seconds
    apart; ``sent`` gets the time of each write."""
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i, event in enumerate(events):
        if cut is not None:
            replacement = await cut(i)
            if replacement is not None:
                await resp.write(replacement)
                break
        if i and gap:
            await asyncio.sleep(gap)
        await resp.write(event)
        if sent is not None:
            sent.append(time.time())
        await asyncio.sleep(0)
    await resp.write_eof()
    return resp


def tokens(text: str) -> int:
    """~4 characters a token: deterministic, which is all usage assertions need."""
    return max(1, (len(text) + 3) // 4)


def pieces(text: str) -> list[str]:
    """A reply split the way models stream it: word by word, spaces leading."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


def json_pieces(obj: Any, size: int = 7) -> list[str]:
    """A tool input's JSON text in fixed-size fragments, as partial_json / arguments deltas arrive."""
    text = json.dumps(obj, separators=(",", ":"))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]
