"""A loopback relay that serves a client's API from a provider of the other API family.

It does, over plain HTTP, what the data plane does on a translated route (phase 2 of issue 16
wires the same calls into extproc/processor.py): ``translator_for`` on the endpoint, the request
translated with the provider's options, the provider's credential in its own header, the answer
or error translated back, and a stream translated chunk by chunk as it arrives, each translated
piece written at once. It lets the unmodified SDKs talk to the validating mocks through the real
translators, with the SDKs' own SSE decoders reading what the translators produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from extproc.translate import ANTHROPIC, DEFAULT_OPTIONS, BackendOptions, translator_for


@dataclass
class Relay:
    upstream_url: str  # the provider's base URL, e.g. http://127.0.0.1:1234/v1
    upstream_api: str  # OPENAI or ANTHROPIC
    upstream_key: str
    options: BackendOptions = DEFAULT_OPTIONS
    port: int = 0
    writes: list[int] = field(default_factory=list)  # sizes of the stream writes to the client
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self.port

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        suffix = "/" + request.match_info["tail"]
        translator = translator_for(suffix, self.upstream_api)
        assert translator is not None, "the relay only serves translated routes"
        payload = json.loads(await request.read())
        try:
            backend = translator.request(payload, payload["model"], self.options)
        except Exception as exc:  # a ClientError: answered as the data plane would
            status = getattr(exc, "status", 500)
            return web.Response(status=status, body=getattr(exc, "body", b"{}"), content_type="application/json")
        headers = {"content-type": "application/json", **dict(backend.headers)}
        if self.upstream_api == ANTHROPIC:
            headers["x-api-key"] = self.upstream_key
        else:
            headers["authorization"] = f"Bearer {self.upstream_key}"
        url = self.upstream_url + backend.suffix
        async with self._session.post(url, data=backend.body, headers=headers) as upstream:
            if not backend.stream or upstream.status != 200:
                answer = translator.response(upstream.status, await upstream.read())
                return web.Response(status=answer.status, body=answer.body, content_type=answer.content_type)
            stream = translator.stream(backend)
            resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                out = stream.feed(chunk)
                if out:
                    self.writes.append(len(out))
                    await resp.write(out)
            tail = stream.end()
            if tail:
                await resp.write(tail)
            await resp.write_eof()
            return resp
