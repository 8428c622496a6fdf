"""A mock OpenAI-compatible (and Anthropic /v1/messages) LLM provider for demos, e2e tests and benchmarks.

One `MockProvider` is one upstream. It answers the OpenAI endpoints the mesh routes (chat
completions, completions, embeddings, responses, models) and Anthropic's messages endpoint, each
plain or streamed, with bodies the official SDKs parse. The reply text names the provider
("hello from <name>") so a test can tell which upstream answered a request that went through Envoy.

It checks the credential the mesh injected, and records every request (headers, body, credential)
so tests can prove what reached the upstream and what did not (e.g. the client's own key). Faults
are switchable at runtime, in-process (`await mock.set_fault(...)`) or over HTTP (`/_mock/...`),
because the interesting mesh behaviour -- retries, failover, health checks, stream timeouts --
only shows up when an upstream misbehaves.

It is also the benchmark's upstream, so the per-request path is kept cheap: one JSON parse, one
JSON dump, no access log, and a bounded request log.

CLI:  python -m extproc.dev.mock_provider --port P --name NAME --expect-key KEY [--fail MODE] ...
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["AUTH_TYPES", "MODES", "MockProvider", "RecordedRequest", "main"]

# Same names as the HolySheepConfig spec's auth.type, so a test can build a mock from a ProviderSpec.
AUTH_TYPES = ("Bearer", "XApiKey", "ApiKey", "Header")

MODES = (
    "ok",
    "500",
    "502",
    "503",
    "504",
    "429",
    "hang",
    "refuse",
    "garbage",
    "cut-stream",
    "cut-early",
    "slow-stream",
    "stall-stream",
    # every event (the usage and [DONE] included), then the body held open until the client
    # goes (or hang_s): a client that stops at [DONE] ends the stream before its end of body
    "linger-stream",
    "health-fail",
)
# Modes that also fail the health endpoint, so Envoy's active health checks notice the outage.
_HEALTH_FAILING = frozenset({"500", "502", "503", "504", "hang", "refuse", "health-fail"})
_ERROR_STATUS = {"500": 500, "502": 502, "503": 503, "504": 504}

GARBAGE_BODY = b"\x00\xff<html>this is not json {{{ garbage\r\n"
DEFAULT_HANG_S = 3600.0

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RecordedRequest:
    """One request as the upstream saw it; `status` stays None for requests that never got one."""

    seq: int
    time: float  # wall clock, so a test in another process can compare it with its own clock
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    model: str | None
    credential: str | None  # value of the configured auth header, "Bearer " stripped
    stream: bool
    mode: str  # fault mode in force when the request arrived
    status: int | None = None
    chunk_times: list[float] = field(default_factory=list)  # wall-clock send time of each SSE event

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body.decode("utf-8", "replace"),
            "model": self.model,
            "credential": self.credential,
            "stream": self.stream,
            "mode": self.mode,
            "status": self.status,
            "chunk_times": self.chunk_times,
        }


class MockProvider:
    """A controllable fake LLM upstream. All public attributes may be changed while it runs.

    `mode` may be assigned directly for every mode except "refuse", which has to close the socket
    and so needs `await set_fault("refuse")` (or HTTP / the *_sync helpers).
    """

    def __init__(
        self,
        name: str = "mock",
        *,
        expect_key: str | None = None,
        auth_type: str = "Bearer",
        auth_header: str | None = None,
        prefix: str = "/v1",
        latency_ms: float = 0.0,
        mode: str = "ok",
        chunk_delay_ms: float = 200.0,
        retry_after: int = 1,
        hang_s: float = DEFAULT_HANG_S,
        reply: str | None = None,
        models: Iterable[str] = ("mock-model",),
        models_require_auth: bool = True,
        embedding_dims: int = 8,
        max_log: int = 10_000,
    ) -> None:
        if auth_type not in AUTH_TYPES:
            raise ValueError(f"auth_type must be one of {AUTH_TYPES}, not {auth_type!r}")
        if auth_type == "Header" and not auth_header:
            raise ValueError("auth_type 'Header' needs auth_header")
        _check_mode(mode)
        self.name = name
        self.expect_key = expect_key  # None: accept any credential (still recorded)
        self.auth_type = auth_type
        self.auth_header = auth_header
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.latency_ms = latency_ms
        self.mode = mode
        self.fault_count: int | None = None  # when set, the fault applies to that many requests only
        # cut-stream waits for this, when set, before it cuts: a test sets it once its client has
        # the response headers, so the cut comes after them (no race with the ext_proc).
        self.cut_gate: threading.Event | None = None
        self.chunk_delay_ms = chunk_delay_ms
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.reply = reply
        self.models = list(models)
        # As a real provider's, /models wants the key: the data plane's health checks send it
        # (extproc/health.py), and a check that did not would fail. False opens it, for a probe
        # that carries no credential.
        self.models_require_auth = models_require_auth
        self.embedding_dims = embedding_dims
        self.requests: deque[RecordedRequest] = deque(maxlen=max_log)
        self.total = 0
        self.by_path: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.auth_failures = 0
        self.host = "127.0.0.1"
        self.port = 0
        self.control_port: int | None = None
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._control_runner: web.AppRunner | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """URL an OpenAI SDK `base_url` (or a ProviderSpec baseUrl) should point at."""
        return f"http://{self.host}:{self.port}{self.prefix}"

    @property
    def auth_header_name(self) -> str:
        return {"Bearer": "authorization", "XApiKey": "x-api-key", "ApiKey": "api-key"}.get(
            self.auth_type, (self.auth_header or "").lower()
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0, control_port: int | None = None) -> int:
        """Listen on host:port (0 picks a free port) and return the bound port.

        control_port, if given (0 picks one), serves only /_mock/* and survives "refuse" mode.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.host = host
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._add_control_routes(app)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # No access log: it costs more than the handler itself under benchmark load.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen(port)
        if control_port is not None:
            capp = web.Application()
            self._add_control_routes(capp)
            self._control_runner = web.AppRunner(capp, access_log=None, shutdown_timeout=1.0)
            await self._control_runner.setup()
            site = web.TCPSite(self._control_runner, host, control_port, reuse_address=True)
            await site.start()
            self.control_port = self._control_runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stop listening, end hung requests and close every connection."""
        self._release_waiters()
        await self._unlisten()
        for runner in (self._runner, self._control_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._control_runner = None

    async def _listen(self, port: int) -> None:
        # Our own listener rather than a TCPSite: "refuse" must close it while keeping the app,
        # and "recover" must reopen the very same port.
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._runner.server, self.host, port, reuse_address=True, backlog=1024
        )
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _unlisten(self, spare: object = None) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        # Pooled keep-alive connections would otherwise keep working while "refused".
        # `spare` is the connection carrying an HTTP "refuse" command, closed after its reply.
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                if conn is not spare:
                    conn.force_close()
        await asyncio.sleep(0)

    def _release_waiters(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    # ---- fault control -----------------------------------------------------------------------

    async def set_fault(
        self,
        mode: str,
        *,
        count: int | None = None,
        latency_ms: float | None = None,
        chunk_delay_ms: float | None = None,
        retry_after: int | None = None,
        _spare: object = None,
    ) -> None:
        """Switch fault mode. count=N limits the fault to the next N API requests (/models excluded)."""
        _check_mode(mode)
        was_refusing = self.mode == "refuse"
        self.mode = mode
        self.fault_count = count if mode != "ok" else None
        if latency_ms is not None:
            self.latency_ms = latency_ms
        if chunk_delay_ms is not None:
            self.chunk_delay_ms = chunk_delay_ms
        if retry_after is not None:
            self.retry_after = retry_after
        if mode == "refuse" and not was_refusing and self._listener is not None:
            self._release_waiters()
            await self._unlisten(_spare)
        elif mode != "refuse" and self._listener is None and self._runner is not None:
            await self._listen(self.port)

    async def recover(self) -> None:
        """Back to "ok" (listening again after "refuse"); latency is a setting, not a fault, so it stays."""
        await self.set_fault("ok")

    def reset(self) -> None:
        """Clear the request log and counters."""
        self.requests.clear()
        self.total = 0
        self.by_path.clear()
        self.by_status.clear()
        self.auth_failures = 0

    def stats(self, limit: int | None = 100) -> dict[str, Any]:
        reqs = list(self.requests)
        if limit is not None:
            reqs = reqs[-limit:] if limit > 0 else []
        return {
            "name": self.name,
            "port": self.port,
            "control_port": self.control_port,
            "mode": self.mode,
            "fault_count": self.fault_count,
            "latency_ms": self.latency_ms,
            "chunk_delay_ms": self.chunk_delay_ms,
            "total": self.total,
            "by_path": dict(self.by_path),
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "auth_failures": self.auth_failures,
            "credentials": [r.credential for r in reqs],
            "requests": [r.to_json() for r in reqs],
        }

    @property
    def last_request(self) -> RecordedRequest | None:
        return self.requests[-1] if self.requests else None

    def count(self, path_suffix: str) -> int:
        """Requests seen whose path ends with path_suffix, e.g. count("/chat/completions")."""
        return sum(n for p, n in self.by_path.items() if p.endswith(path_suffix))

    # ---- running on a background thread, for synchronous tests ---------------------------------

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0, control_port: int | None = None) -> int:
        """Run on a private event loop in a daemon thread; returns the bound port."""
        started = threading.Event()
        result: list[Any] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                result.append(loop.run_until_complete(self.start(host, port, control_port)))
            except BaseException as e:
                result.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"mock-provider-{self.name}", daemon=True)
        self._thread.start()
        started.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        return int(result[0])

    def _call_sync(self, coro_fn: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
        assert self._loop is not None, "not started"

        async def wrapped() -> Any:
            return await coro_fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout)

    def set_fault_sync(self, mode: str, **options: Any) -> None:
        """set_fault() for a provider started with start_in_thread()."""
        self._call_sync(lambda: self.set_fault(mode, **options))

    def recover_sync(self) -> None:
        self._call_sync(self.recover)

    def stop_in_thread(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop = self._loop
        self._call_sync(self.stop)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = None

    # ---- HTTP control ------------------------------------------------------------------------

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_get("/_mock/stats", self._ctl_stats)
        app.router.add_post("/_mock/fault", self._ctl_fault)
        app.router.add_post("/_mock/recover", self._ctl_recover)
        app.router.add_post("/_mock/reset", self._ctl_reset)
        app.router.add_post("/_mock/config", self._ctl_config)

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "100"))
        return web.json_response(self.stats(limit if limit >= 0 else None))

    async def _ctl_fault(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
            await self.set_fault(
                str(spec["mode"]),
                count=spec.get("count"),
                latency_ms=spec.get("latency_ms"),
                chunk_delay_ms=spec.get("chunk_delay_ms"),
                retry_after=spec.get("retry_after"),
                _spare=request.protocol,
            )
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        resp = web.json_response({"mode": self.mode, "fault_count": self.fault_count})
        if self.mode == "refuse":
            resp.force_close()
        return resp

    async def _ctl_recover(self, request: web.Request) -> web.Response:
        await self.recover()
        return web.json_response({"mode": self.mode})

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _ctl_config(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
            for key in ("latency_ms", "chunk_delay_ms", "retry_after", "hang_s", "reply", "expect_key"):
                if key in spec:
                    setattr(self, key, spec[key])
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({k: getattr(self, k) for k in ("latency_ms", "chunk_delay_ms", "reply")})

    # ---- the provider API --------------------------------------------------------------------

    def _record(
        self, request: web.Request, body: bytes, parsed: Any, credential: str | None
    ) -> RecordedRequest:
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            lk = k.lower()
            headers[lk] = f"{headers[lk]}, {v}" if lk in headers else v
        is_dict = isinstance(parsed, dict)
        self._seq += 1
        rec = RecordedRequest(
            seq=self._seq,
            time=time.time(),
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=headers,
            body=body,
            model=parsed.get("model") if is_dict else None,
            credential=credential,
            stream=bool(parsed.get("stream")) if is_dict else False,
            mode=self.mode,
        )
        self.requests.append(rec)
        self.total += 1
        self.by_path[request.path] += 1
        return rec

    def _credential(self, request: web.Request) -> str | None:
        value = request.headers.get(self.auth_header_name)
        if value is not None and self.auth_type == "Bearer":
            scheme, _, token = value.partition(" ")
            value = token.strip() if scheme.lower() == "bearer" else value
        return value

    def _take_fault(self, is_health: bool) -> str:
        """The mode to apply to this request, consuming one use of a count-limited fault."""
        mode = self.mode
        if mode == "ok":
            return mode
        if is_health:
            return mode if mode in _HEALTH_FAILING else "ok"
        if mode == "health-fail":
            return "ok"
        if self.fault_count is not None:
            self.fault_count -= 1
            if self.fault_count <= 0:
                self.mode, self.fault_count = "ok", None
        return mode

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if self.prefix and not (path == self.prefix or path.startswith(self.prefix + "/")):
            return self._error(404, f"no route {path}", "not_found_error", anthropic=False)
        route = path[len(self.prefix) :]
        anthropic = route == "/messages"
        body = await request.read()
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        credential = self._credential(request)
        rec = self._record(request, body, parsed, credential)
        resp = await self._respond(request, route, parsed, credential, rec, anthropic)
        if rec.mode == "cut-stream" and route != "/models" and resp.status == 200 and not resp.prepared:
            resp = await _cut_body(request, resp, self._cut_gate_passed)
        elif rec.mode == "cut-early" and route != "/models" and resp.status == 200 and not resp.prepared:
            body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b""
            resp = _cut_early(request, body, resp.content_type)
        rec.status = resp.status
        self.by_status[resp.status] += 1
        return resp

    async def _respond(
        self,
        request: web.Request,
        route: str,
        parsed: Any,
        credential: str | None,
        rec: RecordedRequest,
        anthropic: bool,
    ) -> web.StreamResponse:
        is_health = route == "/models" and request.method == "GET"
        mode = self._take_fault(is_health)
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)

        # Server-side failures come before the key check, as a broken upstream would not get that far.
        if mode in _ERROR_STATUS or (mode == "health-fail" and is_health):
            status = _ERROR_STATUS.get(mode, 503)
            return self._error(status, f"mock {self.name}: injected {status}", "server_error", anthropic)
        if mode == "429":
            resp = self._error(429, f"mock {self.name}: rate limited", "rate_limit_exceeded", anthropic)
            resp.headers["Retry-After"] = str(self.retry_after)
            return resp
        if mode in ("hang", "refuse"):
            # "refuse" here means the request raced the listener closing; treat it as a hang.
            await self._hang(request)
            return self._error(503, f"mock {self.name}: hang released", "server_error", anthropic)
        if mode == "garbage":
            return web.Response(status=200, body=GARBAGE_BODY, content_type="application/json")

        if (
            self.expect_key is not None
            and (not is_health or self.models_require_auth)
            and credential != self.expect_key
        ):
            self.auth_failures += 1
            what = "missing" if credential is None else "incorrect"
            return self._error(
                401,
                f"mock {self.name}: {what} API key",
                "invalid_request_error",
                anthropic,
                "invalid_api_key",
            )

        if is_health:
            return _json(
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": self.name} for m in self.models
                    ],
                }
            )
        if request.method != "POST":
            return self._error(405, f"{request.method} not allowed", "invalid_request_error", anthropic)
        if not isinstance(parsed, dict):
            return self._error(400, "body must be a JSON object", "invalid_request_error", anthropic)

        model = str(parsed.get("model") or "mock-model")
        stream = bool(parsed.get("stream"))
        if route == "/chat/completions":
            prompt = _prompt_tokens(_message_text(parsed.get("messages")))
            if stream:
                include_usage = bool((parsed.get("stream_options") or {}).get("include_usage"))
                return await self._stream(request, rec, mode, self._chat_events(model, prompt, include_usage))
            return _json(self._chat(model, prompt))
        if route == "/completions":
            prompt = _prompt_tokens(_text_of(parsed.get("prompt")))
            if stream:
                return await self._stream(request, rec, mode, self._completion_events(model, prompt))
            return _json(self._completion(model, prompt))
        if route == "/messages":
            prompt = _prompt_tokens(_message_text(parsed.get("messages")) + _text_of(parsed.get("system")))
            if stream:
                return await self._stream(request, rec, mode, self._anthropic_events(model, prompt))
            return _json(self._anthropic(model, prompt))
        if route == "/responses":
            prompt = _prompt_tokens(_text_of(parsed.get("input")) + _text_of(parsed.get("instructions")))
            if stream:
                return await self._stream(request, rec, mode, self._responses_events(model, prompt))
            return _json(self._response_obj(model, prompt, "completed"))
        if route == "/embeddings":
            return _json(self._embeddings(model, parsed))
        return self._error(
            404, f"mock {self.name}: unknown endpoint {request.path}", "not_found_error", anthropic
        )

    async def _cut_gate_passed(self) -> None:
        gate = self.cut_gate
        deadline = time.monotonic() + self.hang_s
        while gate is not None and not gate.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def _hang(self, request: web.Request) -> None:
        # Poll for client disconnect as aiohttp doesn't cancel handlers on it; otherwise every
        # timed-out request in a chaos run would pin a task for hang_s.
        wake = self._wake
        deadline = time.monotonic() + self.hang_s
        while time.monotonic() < deadline and not wake.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(0.5, max(0.0, deadline - time.monotonic())))

    async def _stream(
        self, request: web.Request, rec: RecordedRequest, mode: str, events: list[bytes]
    ) -> web.StreamResponse:
        if mode == "cut-early":
            return _cut_early(request, b"".join(events), "text/event-stream")
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        times = rec.chunk_times
        for i, event in enumerate(events):
            if mode == "cut-stream" and i == 2:
                # Half an event then a closed connection: the client sees a truncated stream,
                # neither a clean end nor a status it could retry on.
                await resp.write(event[: len(event) // 2])
                times.append(time.time())
                await self._cut_gate_passed()
                _abort(request)
                return resp
            if i and mode == "slow-stream":
                await asyncio.sleep(self.chunk_delay_ms / 1000)
            if i == 1 and mode == "stall-stream":
                await self._hang(request)
                _abort(request)
                return resp
            await resp.write(event)
            times.append(time.time())
        if mode == "linger-stream":
            await self._hang(request)
            _abort(request)
            return resp
        await resp.write_eof()
        return resp

    # ---- response bodies ---------------------------------------------------------------------

    def _reply_text(self) -> str:
        return self.reply if self.reply is not None else f"hello from {self.name}"

    def _pieces(self) -> list[str]:
        words = self._reply_text().split(" ")
        return [words[0]] + [" " + w for w in words[1:]]

    def _usage(self, prompt: int) -> dict[str, int]:
        completion = len(self._pieces())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat(self, model: str, prompt: int) -> dict[str, Any]:
        return {
            "id": _id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self._reply_text(), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(prompt),
        }

    def _chat_events(self, model: str, prompt: int, include_usage: bool) -> list[bytes]:
        base = {"id": _id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time())}
        base["model"] = model

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice], **extra})

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": p}, None) for p in self._pieces()]
        usage = self._usage(prompt)
        if include_usage:
            # As OpenAI does: a last chunk with no choices, only usage.
            events.append(chunk({}, "stop"))
            events.append(_sse({**base, "choices": [], "usage": usage}))
        else:
            # Usage always present so the mesh's token metrics work even for clients that did
            # not ask; riding on the finish chunk keeps choices[0] valid for naive clients.
            events.append(chunk({}, "stop", usage=usage))
        events.append(b"data: [DONE]\n\n")
        return events

    def _completion(self, model: str, prompt: int) -> dict[str, Any]:
        return {
            "id": _id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"text": self._reply_text(), "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": self._usage(prompt),
        }

    def _completion_events(self, model: str, prompt: int) -> list[bytes]:
        base = {"id": _id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model}
        pieces = self._pieces()
        events = [
            _sse({**base, "choices": [{"text": p, "index": 0, "logprobs": None, "finish_reason": None}]})
            for p in pieces
        ]
        last = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
        events.append(_sse({**base, "choices": [last], "usage": self._usage(prompt)}))
        events.append(b"data: [DONE]\n\n")
        return events

    def _anthropic(self, model: str, prompt: int) -> dict[str, Any]:
        return {
            "id": _id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": self._reply_text()}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": len(self._pieces())},
        }

    def _anthropic_events(self, model: str, prompt: int) -> list[bytes]:
        msg = self._anthropic(model, prompt)
        out_tokens = msg["usage"]["output_tokens"]
        msg.update(content=[], stop_reason=None, usage={"input_tokens": prompt, "output_tokens": 1})
        events = [
            _sse({"type": "message_start", "message": msg}, "message_start"),
            _sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            ),
        ]
        for p in self._pieces():
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
            events.append(_sse(delta, "content_block_delta"))
        events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        events.append(
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"input_tokens": prompt, "output_tokens": out_tokens},
                },
                "message_delta",
            )
        )
        events.append(_sse({"type": "message_stop"}, "message_stop"))
        return events

    def _response_obj(
        self, model: str, prompt: int, status: str, rid: str = "", mid: str = ""
    ) -> dict[str, Any]:
        done = status == "completed"
        completion = len(self._pieces())
        output = [
            {
                "type": "message",
                "id": mid or _id("msg_"),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": self._reply_text(), "annotations": []}],
            }
        ]
        return {
            "id": rid or _id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": model,
            "output": output if done else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
            if done
            else None,
        }

    def _responses_events(self, model: str, prompt: int) -> list[bytes]:
        rid, mid = _id("resp_"), _id("msg_")
        seq = 0

        def ev(kind: str, **payload: Any) -> bytes:
            nonlocal seq
            seq += 1
            return _sse({"type": kind, "sequence_number": seq - 1, **payload}, kind)

        events = [ev("response.created", response=self._response_obj(model, prompt, "in_progress", rid, mid))]
        for p in self._pieces():
            events.append(
                ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=p)
            )
        events.append(
            ev("response.completed", response=self._response_obj(model, prompt, "completed", rid, mid))
        )
        return events

    def _embeddings(self, model: str, parsed: dict[str, Any]) -> dict[str, Any]:
        raw = parsed.get("input")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        dims = int(parsed.get("dimensions") or self.embedding_dims)
        as_b64 = parsed.get("encoding_format") == "base64"
        data = []
        for i in range(len(inputs)):
            vec = [round(0.01 * (i + 1) + 0.001 * d, 6) for d in range(dims)]
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        prompt = _prompt_tokens(_text_of(raw))
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }

    def _error(
        self, status: int, message: str, etype: str, anthropic: bool, code: str | None = None
    ) -> web.Response:
        if anthropic:
            atype = {401: "authentication_error", 429: "rate_limit_error", 404: "not_found_error"}.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
            body: dict[str, Any] = {"type": "error", "error": {"type": atype, "message": message}}
        else:
            body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
        return _json(body, status)


# ---- helpers ---------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r}; expected one of {', '.join(MODES)}")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def _sse(obj: Any, event: str | None = None) -> bytes:
    data = f"data: {json.dumps(obj)}\n\n"
    return (f"event: {event}\n" + data if event else data).encode()


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _abort(request: web.Request) -> None:
    # close(), not abort(): the partial event already written must reach the client first.
    transport = request.transport
    if transport is not None:
        transport.close()


async def _cut_body(
    request: web.Request, full: web.StreamResponse, gate: Callable[[], Awaitable[None]]
) -> web.StreamResponse:
    """The non-streaming face of cut-stream: the full Content-Length promised, half the body sent."""
    body = full.body if isinstance(full, web.Response) and isinstance(full.body, bytes) else b""
    resp = web.StreamResponse(status=200, headers={"Content-Type": full.content_type})
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    await gate()
    _abort(request)
    return resp


def _cut_early(request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
    """cut-early: the response headers, half the body and the close in ONE TCP segment.

    TCP_CORK holds the bytes in the kernel until the close, which sends them with the FIN, so
    Envoy reads headers and end of stream in one go: the upstream is gone while the ext_proc
    still holds the response headers, and Envoy answers its own 502 (a response already on its
    way to the client could not become one). The returned response is never sent: the handler's
    caller finds the transport closed.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return web.StreamResponse(status=200)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    transport.write(head.encode() + body[: len(body) // 2])
    transport.close()
    return web.StreamResponse(status=200)


def _text_of(value: Any) -> str:
    """Concatenated text of a prompt/content value in any of the shapes the APIs accept."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"]
        return _text_of(value.get("content"))
    return ""


def _message_text(messages: Any) -> str:
    return _text_of(messages) if isinstance(messages, list) else ""


def _prompt_tokens(text: str) -> int:
    # ~4 characters per token: deterministic and cheap, which is all the metrics tests need.
    return max(1, (len(text) + 3) // 4)


# ---- CLI -------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m extproc.dev.mock_provider", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the READY line)")
    p.add_argument(
        "--control-port", type=int, default=None, help="separate /_mock/* port that survives refuse"
    )
    p.add_argument("--name", default="mock")
    p.add_argument("--expect-key", default=None, help="credential to require; omitted: accept any")
    p.add_argument("--auth-type", default="Bearer", choices=AUTH_TYPES)
    p.add_argument("--auth-header", default=None, help="header name for --auth-type Header")
    p.add_argument("--prefix", default="/v1")
    p.add_argument("--fail", default="ok", choices=MODES, help="initial fault mode")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--chunk-delay-ms", type=float, default=200.0, help="delay between events in slow-stream")
    p.add_argument("--reply", default=None, help='reply text (default "hello from NAME")')
    p.add_argument("--models", default="mock-model", help="comma-separated ids for GET /models")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    mock = MockProvider(
        args.name,
        expect_key=args.expect_key,
        auth_type=args.auth_type,
        auth_header=args.auth_header,
        prefix=args.prefix,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        reply=args.reply,
        models=[m for m in args.models.split(",") if m],
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await mock.start(args.host, args.port, args.control_port)
    if args.fail != "ok":
        await mock.set_fault(args.fail)
    # One parseable line, so a launcher that asked for port 0 can learn the port.
    ctl = f" control_port={mock.control_port}" if mock.control_port is not None else ""
    print(f"READY name={mock.name} port={mock.port}{ctl} url={mock.base_url}", flush=True)
    await done.wait()
    await mock.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
