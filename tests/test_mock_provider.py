"""The mock provider is the upstream every e2e test and benchmark trusts, so its contract is pinned here."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest

from extproc.dev.mock_provider import MockProvider

KEY = "sk-upstream-secret"


def run(fn: Callable[[], Awaitable[None]]) -> None:
    # No pytest-asyncio in the test deps; a fresh loop per test keeps them independent.
    asyncio.run(asyncio.wait_for(fn(), 30))


@asynccontextmanager
async def provider(**kw: Any) -> AsyncIterator[tuple[MockProvider, aiohttp.ClientSession]]:
    control_port = kw.pop("control_port", None)
    mock = MockProvider(kw.pop("name", "alpha"), **kw)
    await mock.start(control_port=control_port)
    # force_close: a pooled connection would hide "refuse" behind a reset instead of a refusal.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        try:
            yield mock, session
        finally:
            await mock.stop()


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hi there"}],
        "stream": stream,
        **extra,
    }


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sse_data(raw: bytes) -> list[str]:
    events = raw.decode().split("\n\n")
    assert events[-1] == "", "stream must end on an event boundary"
    return [line[len("data: ") :] for e in events[:-1] for line in e.split("\n") if line.startswith("data: ")]


def test_key_check_and_recording() -> None:
    async def body() -> None:
        async with provider(expect_key=KEY) as (mock, s):
            url = f"{mock.base_url}/chat/completions"
            async with s.post(url, json=chat()) as r:
                assert r.status == 401
                err = (await r.json())["error"]
                assert err["code"] == "invalid_api_key" and "missing" in err["message"]
            async with s.post(url, json=chat(), headers=bearer("sk-client-own")) as r:
                assert r.status == 401
            async with s.post(url, json=chat(), headers={**bearer(), "X-Trace": "t1"}) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"] == "hello from alpha"
            assert [r.credential for r in mock.requests] == [None, "sk-client-own", KEY]
            last = mock.last_request
            assert last is not None
            assert last.headers["authorization"] == f"Bearer {KEY}" and last.headers["x-trace"] == "t1"
            assert json.loads(last.body)["messages"][0]["content"] == "hi there"
            assert (last.model, last.status, last.method) == ("gpt-test", 200, "POST")
            assert (
                mock.auth_failures == 2 and mock.by_status[401] == 2 and mock.count("/chat/completions") == 3
            )
            # /models wants the key too, as a real provider's does (the health checks send it).
            async with s.get(f"{mock.base_url}/models") as r:
                assert r.status == 401
            async with s.get(f"{mock.base_url}/models", headers=bearer()) as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "mock-model"

    run(body)


def test_other_auth_schemes_and_anthropic() -> None:
    async def body() -> None:
        async with provider(name="claude", expect_key=KEY, auth_type="XApiKey") as (mock, s):
            url = f"{mock.base_url}/messages"
            req = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hey"}]}
            async with s.post(url, json=req, headers=bearer()) as r:
                assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
            async with s.post(url, json=req, headers={"x-api-key": KEY}) as r:
                msg = await r.json()
                assert msg["content"][0]["text"] == "hello from claude" and msg["model"] == "claude-x"
                assert msg["usage"] == {"input_tokens": 1, "output_tokens": 3}
            async with s.post(url, json={**req, "stream": True}, headers={"x-api-key": KEY}) as r:
                raw = (await r.read()).decode()
            kinds = [line[len("event: ") :] for line in raw.split("\n") if line.startswith("event: ")]
            assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
            assert "[DONE]" not in raw
        async with provider(expect_key=KEY, auth_type="Header", auth_header="X-Custom-Key") as (mock, s):
            async with s.post(
                f"{mock.base_url}/chat/completions", json=chat(), headers={"x-custom-key": KEY}
            ) as r:
                assert r.status == 200
            assert mock.last_request is not None and mock.last_request.credential == KEY

    run(body)


def test_stream_format_always_carries_usage() -> None:
    async def body() -> None:
        async with provider() as (mock, s):
            url = f"{mock.base_url}/chat/completions"
            async with s.post(url, json=chat(stream=True)) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                data = sse_data(await r.read())
            assert data[-1] == "[DONE]"
            chunks = [json.loads(d) for d in data[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hello from alpha"
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
            assert all(c["model"] == "gpt-test" and c["object"] == "chat.completion.chunk" for c in chunks)

            opts = {"stream_options": {"include_usage": True}}
            async with s.post(url, json=chat(stream=True, **opts)) as r:
                last = json.loads(sse_data(await r.read())[-2])
            assert last["choices"] == [] and last["usage"]["total_tokens"] == 5
            assert len(mock.last_request.chunk_times) == 7  # type: ignore[union-attr]

    run(body)


def test_openai_sdk_parses_everything() -> None:
    mock = MockProvider("sdk", expect_key=KEY)
    mock.start_in_thread()
    try:
        client = openai.OpenAI(base_url=mock.base_url, api_key=KEY, max_retries=0, timeout=10)
        msgs: Any = [{"role": "user", "content": "hello"}]
        plain = client.chat.completions.create(model="m1", messages=msgs)
        assert plain.choices[0].message.content == "hello from sdk" and plain.model == "m1"
        assert plain.usage is not None and plain.usage.total_tokens == plain.usage.prompt_tokens + 3
        stream = client.chat.completions.create(model="m1", messages=msgs, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello from sdk"
        emb = client.embeddings.create(model="e1", input=["a", "b"])  # SDK asks for base64
        assert len(emb.data) == 2 and len(emb.data[1].embedding) == 8
        assert abs(emb.data[1].embedding[0] - 0.02) < 1e-6
        floats = client.embeddings.create(model="e1", input="a", encoding_format="float", dimensions=4)
        assert len(floats.data[0].embedding) == 4
        comp = client.completions.create(model="m1", prompt="x")
        assert comp.choices[0].text == "hello from sdk"
        resp = client.responses.create(model="m1", input="hi")
        assert resp.output_text == "hello from sdk" and resp.usage is not None
        wrong = openai.OpenAI(base_url=mock.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="m1", messages=msgs)
        with pytest.raises(openai.AuthenticationError):  # /models wants the key too
            wrong.models.list()
        assert [m.id for m in client.models.list()] == ["mock-model"]
    finally:
        mock.stop_in_thread()


def test_error_faults_and_health() -> None:
    async def body() -> None:
        async with provider() as (mock, s):
            url, models = f"{mock.base_url}/chat/completions", f"{mock.base_url}/models"
            await mock.set_fault("500")
            async with s.post(url, json=chat()) as r:
                assert r.status == 500 and (await r.json())["error"]["type"] == "server_error"
            async with s.get(models) as r:
                assert r.status == 500
            await mock.set_fault("429", retry_after=7)
            async with s.post(url, json=chat()) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "7"
            async with s.get(models) as r:
                assert r.status == 200
            mock.mode = "health-fail"
            async with s.get(models) as r:
                assert r.status == 503
            async with s.post(url, json=chat()) as r:
                assert r.status == 200
            await mock.set_fault("503", count=2)
            statuses = []
            for _ in range(3):
                async with s.post(url, json=chat()) as r:
                    statuses.append(r.status)
            assert statuses == [503, 503, 200] and mock.mode == "ok"
            mock.mode = "garbage"
            async with s.post(url, json=chat()) as r:
                assert r.status == 200
                with pytest.raises(ValueError):
                    json.loads(await r.read())

    run(body)


def test_hang_times_out_and_stop_is_prompt() -> None:
    async def body() -> None:
        async with provider(mode="hang") as (mock, s):
            with pytest.raises(asyncio.TimeoutError):
                await s.post(
                    f"{mock.base_url}/chat/completions", json=chat(), timeout=aiohttp.ClientTimeout(0.3)
                )
            task = asyncio.create_task(s.get(f"{mock.base_url}/models"))
            deadline = time.monotonic() + 5
            while not mock.count("/models") and time.monotonic() < deadline:  # until it hangs in the mock
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await mock.stop()
            assert time.monotonic() - t0 < 2
            with pytest.raises(aiohttp.ClientError):
                await task

    run(body)


def test_refuse_and_recover_keep_the_port() -> None:
    async def body() -> None:
        async with provider(control_port=0) as (mock, s):
            port, ctl = mock.port, f"http://127.0.0.1:{mock.control_port}/_mock"
            async with s.post(f"{ctl}/fault", json={"mode": "refuse"}) as r:
                assert (await r.json())["mode"] == "refuse"
            with pytest.raises(aiohttp.ClientConnectorError):
                await s.get(f"{mock.base_url}/models")
            async with s.post(f"{ctl}/recover") as r:
                assert r.status == 200
            assert mock.port == port
            async with s.get(f"{mock.base_url}/models") as r:
                assert r.status == 200
            # Programmatic path, and refusing over the main port itself still gets its reply out.
            await mock.set_fault("refuse")
            with pytest.raises(aiohttp.ClientConnectorError):
                await s.get(f"{mock.base_url}/models")
            await mock.recover()
            async with s.post(
                f"{mock.base_url.removesuffix('/v1')}/_mock/fault", json={"mode": "refuse"}
            ) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectorError):
                await s.get(f"{mock.base_url}/models")

    run(body)


def test_refuse_drops_pooled_connections() -> None:
    async def body() -> None:
        mock = MockProvider()
        await mock.start()
        async with aiohttp.ClientSession() as s:  # keep-alive pool on purpose
            async with s.get(f"{mock.base_url}/models") as r:
                assert r.status == 200
            await mock.set_fault("refuse")
            with pytest.raises(aiohttp.ClientError):
                await s.get(f"{mock.base_url}/models")
        await mock.stop()

    run(body)


def test_cut_stream() -> None:
    async def body() -> None:
        async with provider(mode="cut-stream") as (mock, s):
            raw = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.post(f"{mock.base_url}/chat/completions", json=chat(stream=True)) as r:
                    assert r.status == 200
                    async for piece in r.content.iter_any():
                        raw += piece
            assert raw.count(b"\n\n") == 2 and not raw.endswith(b"\n\n")
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.post(f"{mock.base_url}/chat/completions", json=chat()) as r:
                    await r.read()
            async with s.get(f"{mock.base_url}/models") as r:
                assert r.status == 200
            # stall-stream: headers and the first event, then silence (a stream idle timeout's case).
            mock.mode = "stall-stream"
            async with s.post(f"{mock.base_url}/chat/completions", json=chat(stream=True)) as r:
                first = await r.content.readuntil(b"\n\n")
                assert b'"role": "assistant"' in first
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(r.content.readuntil(b"\n\n"), 0.3)

    run(body)


def test_slow_stream_delivers_first_chunk_before_last_is_sent() -> None:
    async def body() -> None:
        async with provider() as (mock, s):
            await mock.set_fault("slow-stream", chunk_delay_ms=50)
            async with s.post(f"{mock.base_url}/chat/completions", json=chat(stream=True)) as r:
                await r.content.readuntil(b"\n\n")
                first_arrival = time.time()
                rest = await r.read()
            assert rest.endswith(b"data: [DONE]\n\n")
            times = mock.requests[-1].chunk_times
            assert len(times) == 6 and first_arrival < times[-1]
            assert times[-1] - times[0] >= 0.2

    run(body)


def test_http_control_stats_and_reset() -> None:
    async def body() -> None:
        async with provider(expect_key=KEY, latency_ms=30) as (mock, s):
            ctl = f"http://127.0.0.1:{mock.port}/_mock"
            t0 = time.monotonic()
            async with s.post(
                f"{mock.base_url}/embeddings", json={"model": "e", "input": "x"}, headers=bearer()
            ):
                pass
            assert time.monotonic() - t0 >= 0.03
            async with s.get(f"{ctl}/stats") as r:
                stats = await r.json()
            assert stats["total"] == 1 and stats["credentials"] == [KEY] and stats["name"] == "alpha"
            assert stats["requests"][0]["headers"]["authorization"] == f"Bearer {KEY}"
            assert stats["by_status"] == {"200": 1}
            async with s.post(f"{ctl}/fault", json={"mode": "bogus"}) as r:
                assert r.status == 400
            async with s.post(f"{ctl}/fault", json={"mode": "429", "latency_ms": 0}) as r:
                assert r.status == 200 and mock.mode == "429" and mock.latency_ms == 0
            async with s.post(f"{ctl}/reset") as r:
                assert r.status == 200
            assert mock.total == 0 and not mock.requests

    run(body)


def test_cli_runs_until_sigterm() -> None:
    args = ["--port", "0", "--name", "cli", "--expect-key", KEY, "--fail", "500", "--control-port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.dev.mock_provider", *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        assert fields["name"] == "cli"

        async def body() -> None:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{fields['url']}/chat/completions", json=chat(), headers=bearer()) as r:
                    assert r.status == 500
                ctl = f"http://127.0.0.1:{fields['control_port']}/_mock"
                async with s.post(f"{ctl}/recover"):
                    pass
                async with s.post(f"{fields['url']}/chat/completions", json=chat(), headers=bearer()) as r:
                    assert (await r.json())["choices"][0]["message"]["content"] == "hello from cli"

        run(body)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
