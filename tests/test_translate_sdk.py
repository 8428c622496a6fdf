"""The unmodified SDKs against a provider of the other API family, through the translators.

openai SDK -> relay -> validating mock Anthropic, and anthropic SDK -> relay -> validating mock
OpenAI, over loopback: chat, streaming, tools and errors. The SDKs' own clients, SSE decoders and
response models read what the translators produce; the mocks refuse any request the real API
would (``rejected`` stays empty).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import openai
import pytest

from extproc.translate import ANTHROPIC, OPENAI
from tests.upstreams.base import LoopbackProvider
from tests.upstreams.mock_anthropic import MockAnthropic
from tests.upstreams.mock_openai import MockOpenAI
from tests.upstreams.relay import Relay

WEATHER: Any = {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


@asynccontextmanager
async def through(mock: LoopbackProvider, api: str) -> AsyncIterator[Relay]:
    await mock.start()
    relay = Relay(mock.base_url, api, mock.key)
    await relay.start()
    try:
        yield relay
        assert not mock.rejected, [r.error for r in mock.rejected]
    finally:
        await relay.stop()
        await mock.stop()


def oai(relay: Relay) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=relay.base_url, api_key="sk-client-not-used", max_retries=0)


def ant(relay: Relay) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=relay.base_url.removesuffix("/v1"), api_key="sk-client", max_retries=0)


# --- openai SDK -> Anthropic provider ------------------------------------------------------------


def test_openai_sdk_chat_against_anthropic() -> None:
    async def body() -> None:
        mock = MockAnthropic(reply="bonjour from claude")
        async with through(mock, ANTHROPIC) as relay:
            client = oai(relay)
            cc = await client.chat.completions.create(
                model="claude-test", max_tokens=50, temperature=0.2, stop=["STOP"],
                messages=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}])
            assert cc.choices[0].message.content == "bonjour from claude"
            assert cc.choices[0].finish_reason == "stop" and cc.usage is not None and cc.usage.completion_tokens == 3
            sent = mock.last.body
            assert mock.last.headers["anthropic-version"] == "2023-06-01"
            assert sent["system"] == "be kind" and sent["max_tokens"] == 50 and sent["stop_sequences"] == ["STOP"]
    run(body)


def test_openai_sdk_streaming_against_anthropic() -> None:
    async def body() -> None:
        mock = MockAnthropic(reply="one two three four")
        async with through(mock, ANTHROPIC) as relay:
            stream = await oai(relay).chat.completions.create(
                model="claude-test", messages=[{"role": "user", "content": "count"}], stream=True,
                stream_options={"include_usage": True})
            texts, usage, finish = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    texts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            assert "".join(texts) == "one two three four" and finish == "stop"
            assert usage is not None and usage.completion_tokens == 4 and usage.prompt_tokens >= 1
            assert len(relay.writes) > 4  # translated and written piece by piece, not at the end
    run(body)


def test_openai_sdk_tools_round_trip_against_anthropic() -> None:
    async def body() -> None:
        mock = MockAnthropic(reply="it is sunny")
        async with through(mock, ANTHROPIC) as relay:
            client = oai(relay)
            messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
            first = await client.chat.completions.create(model="claude-test", messages=messages, tools=[WEATHER],
                                                         tool_choice="required")
            call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
            assert first.choices[0].finish_reason == "tool_calls"
            assert call.function.name == "weather"  # type: ignore[union-attr]
            assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # type: ignore[union-attr]
            messages.append(first.choices[0].message.model_dump(exclude_none=True))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "22C"})
            second = await client.chat.completions.create(model="claude-test", messages=messages, tools=[WEATHER])
            assert second.choices[0].message.content == "it is sunny; tool said 22C"
            turns = mock.last.body["messages"]
            assert [t["role"] for t in turns] == ["user", "assistant", "user"]
            assert turns[2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id, "content": "22C"}
            # and streamed: the tool call arrives as deltas the SDK assembles
            stream = await client.chat.completions.create(model="claude-test", messages=messages[:1],
                                                          tools=[WEATHER], tool_choice="required", stream=True)
            args = ""
            async for chunk in stream:
                for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    args += tc.function.arguments or "" if tc.function else ""
            assert json.loads(args) == {"city": "Paris", "days": 3}
    run(body)


def test_openai_sdk_errors_from_anthropic() -> None:
    async def body() -> None:
        mock = MockAnthropic()
        async with through(mock, ANTHROPIC) as relay:
            client = oai(relay)
            msgs: Any = [{"role": "user", "content": "hi"}]
            mock.fail(429, "rate_limit_error", "slow down")
            with pytest.raises(openai.RateLimitError) as rate:
                await client.chat.completions.create(model="claude-test", messages=msgs)
            assert rate.value.status_code == 429 and "slow down" in rate.value.message
            mock.fail(529, "overloaded_error", "overloaded")
            with pytest.raises(openai.InternalServerError) as over:
                await client.chat.completions.create(model="claude-test", messages=msgs)
            assert over.value.status_code == 503
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(model="claude-test", messages=msgs, n=3)
            assert bad.value.code == "unsupported_parameter" and bad.value.param == "n"
            mock.fail(529, "overloaded_error", "overloaded mid-stream", mid_stream=True)
            stream = await client.chat.completions.create(model="claude-test", messages=msgs, stream=True)
            with pytest.raises(openai.APIError) as mid:
                async for _ in stream:
                    pass
            assert "overloaded mid-stream" in mid.value.message
    run(body)


# --- anthropic SDK -> OpenAI-compatible provider -------------------------------------------------


def test_anthropic_sdk_messages_against_openai() -> None:
    async def body() -> None:
        mock = MockOpenAI(reply="hello from gpt")
        async with through(mock, OPENAI) as relay:
            msg = await ant(relay).messages.create(model="gpt-test", max_tokens=64, system="be kind",
                                                   messages=[{"role": "user", "content": "hello"}])
            assert msg.content[0].text == "hello from gpt"  # type: ignore[union-attr]
            assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 3
            assert mock.last.body["messages"][0] == {"role": "system", "content": "be kind"}
            assert mock.last.headers["authorization"] == f"Bearer {mock.key}"
    run(body)


def test_anthropic_sdk_streaming_against_openai() -> None:
    async def body() -> None:
        mock = MockOpenAI(reply="alpha beta gamma delta")
        async with through(mock, OPENAI) as relay:
            async with ant(relay).messages.stream(model="gpt-test", max_tokens=64,
                                                  messages=[{"role": "user", "content": "go"}]) as stream:
                pieces = [t async for t in stream.text_stream]
                final = await stream.get_final_message()
            assert "".join(pieces) == "alpha beta gamma delta" and len(pieces) == 4
            assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4
            assert final.usage.input_tokens >= 1
            assert mock.last.body["stream_options"] == {"include_usage": True}
    run(body)


def test_anthropic_sdk_tools_against_openai() -> None:
    async def body() -> None:
        mock = MockOpenAI(reply="sunny it is")
        async with through(mock, OPENAI) as relay:
            client = ant(relay)
            tools: Any = [{"name": "weather", "description": "Weather in a city",
                           "input_schema": WEATHER["function"]["parameters"]}]
            messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
            first = await client.messages.create(model="gpt-test", max_tokens=64, messages=messages, tools=tools,
                                                 tool_choice={"type": "any"})
            assert first.stop_reason == "tool_use"
            use = first.content[0]
            assert use.type == "tool_use" and use.input == {"city": "Paris", "days": 3}
            messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
            messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                          "content": "22C"}]})
            second = await client.messages.create(model="gpt-test", max_tokens=64, messages=messages, tools=tools)
            assert second.content[0].text == "sunny it is; tool said 22C"  # type: ignore[union-attr]
            async with client.messages.stream(model="gpt-test", max_tokens=64, messages=messages[:1], tools=tools,
                                              tool_choice={"type": "tool", "name": "weather"}) as stream:
                final = await stream.get_final_message()
            assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris", "days": 3}
    run(body)


def test_anthropic_sdk_errors_from_openai() -> None:
    async def body() -> None:
        mock = MockOpenAI()
        async with through(mock, OPENAI) as relay:
            client = ant(relay)
            msgs: Any = [{"role": "user", "content": "hi"}]
            mock.fail(429, "requests", "slow down")
            with pytest.raises(anthropic.RateLimitError) as rate:
                await client.messages.create(model="gpt-test", max_tokens=8, messages=msgs)
            assert rate.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
            mock.fail(500, "server_error", "boom")
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model="gpt-test", max_tokens=8, messages=msgs)
            mock.fail(500, "server_error", "boom mid-stream", mid_stream=True)
            with pytest.raises(anthropic.APIStatusError) as mid:
                async with client.messages.stream(model="gpt-test", max_tokens=8, messages=msgs) as stream:
                    async for _ in stream:
                        pass
            assert "boom mid-stream" in str(mid.value)
    run(body)
