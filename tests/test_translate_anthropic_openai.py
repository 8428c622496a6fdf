"""Anthropic Messages -> an OpenAI chat-completions backend: each mapping, checked against the
validating OpenAI mock's rules and parsed back with the anthropic SDK's own models."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion
from pydantic import TypeAdapter

from extproc.api import ANTHROPIC as ANTHROPIC_SCHEMA
from extproc.errors import ClientError, UntranslatableField
from extproc.translate import ANTHROPIC, OPENAI, AnthropicToOpenAI, BackendOptions, translator_for
from tests.upstreams.base import Invalid
from tests.upstreams.mock_openai import completion, stream_events, validate_chat_request

T = AnthropicToOpenAI()
PNG = "iVBORw0KGgo="
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def translate(payload: dict[str, Any], **opts: Any) -> dict[str, Any]:
    req = T.request(payload, "gpt-test", BackendOptions(**opts))
    body = json.loads(req.body)
    validate_chat_request(body)  # whatever we send must be a valid chat-completions request
    return body


def msgs(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-test", "max_tokens": 100,
            "messages": list(messages) or [{"role": "user", "content": "hi"}], **extra}


def test_translator_choice() -> None:
    assert isinstance(translator_for("/messages", OPENAI), AnthropicToOpenAI)
    assert translator_for("/messages", ANTHROPIC) is None


def test_request_basics() -> None:
    req = T.request(msgs(system="be brief", temperature=0.3, top_p=0.8, stop_sequences=["END"],
                         metadata={"user_id": "u-7"}), "gpt-test")
    assert req.suffix == "/chat/completions" and req.headers == () and not req.stream
    body = json.loads(req.body)
    validate_chat_request(body)
    assert body == {"model": "gpt-test", "max_tokens": 100, "temperature": 0.3, "top_p": 0.8, "stop": ["END"],
                    "user": "u-7", "messages": [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "hi"}]}
    assert translate(msgs(), openai_max_tokens_field="max_completion_tokens")["max_completion_tokens"] == 100
    body = translate(msgs(system=[{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                                  {"type": "text", "text": "b"}]))
    assert body["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}


def test_stream_always_asks_for_usage() -> None:
    req = T.request(msgs(stream=True), "gpt-test")
    body = json.loads(req.body)
    validate_chat_request(body)
    assert req.stream and body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_content_blocks_images_and_documents() -> None:
    body = translate(msgs({"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
         "title": "spec.pdf"},
    ]}))
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "spec.pdf"}},
    ]


def test_tool_use_and_results_become_tool_calls_and_tool_messages() -> None:
    body = translate(msgs(
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}],
             "is_error": False},
            {"type": "text", "text": "thanks"}]},
        tools=[{"name": "weather", "description": "Weather now", "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"}},
               {"name": "time", "input_schema": {"type": "object", "properties": {}}, "strict": True}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    ))
    assert body["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
    ]
    assert body["tools"] == [
        {"type": "function", "function": {"name": "weather", "description": "Weather now",
                                          "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}},
                                          "strict": True}},
    ]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
])
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    body = translate(msgs(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice=choice))
    assert body["tool_choice"] == expected and "parallel_tool_calls" not in body


def test_output_config() -> None:
    schema = {"type": "object", "properties": {}, "additionalProperties": False}
    body = translate(msgs(output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"}))
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": schema,
                                                                               "strict": True}}
    assert body["reasoning_effort"] == "low"


@pytest.mark.parametrize(("extra", "field"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
    ({"top_k": 5}, "top_k"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"container": "c1"}, "container"),
    ({"metadata": {"user_id": "u", "tier": "x"}}, "metadata.tier"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}, "input_examples": [{}]}]},
     "tools[0].input_examples"),
    ({"output_config": {"task_budget": 5}}, "output_config.task_budget"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]},
     "messages[0].content[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "citations": [{"type": "x"}]}]}]},
     "messages[0].content[0].citations"),
    ({"messages": [{"role": "user", "content": [{"type": "search_result", "source": "s"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "text", "media_type": "text/plain", "data": "x"}}]}]}, "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source"),
    ({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]}]},
     "messages[0].content[0].type"),
])
def test_untranslatable_fields_are_a_400_naming_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(UntranslatableField) as err:
        T.request(msgs(**extra), "gpt-test")
    assert err.value.status == 400 and err.value.param == field
    assert "OpenAI" in err.value.message and field in err.value.message


def test_a_failed_tool_result_keeps_its_text_marked_as_an_error() -> None:
    # Agent SDKs send is_error after any failed tool; OpenAI tool messages have no such flag, so
    # the failure is said in the text the model reads, once.
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                                             {"type": "tool_use", "id": "t2", "name": "f", "input": {}},
                                             {"type": "tool_use", "id": "t3", "name": "f", "input": {}},
                                             {"type": "tool_use", "id": "t4", "name": "f", "input": {}}]}
    results = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": "file not found", "is_error": True},
        {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "timeout"}],
         "is_error": True},
        {"type": "tool_result", "tool_use_id": "t3", "is_error": True},
        {"type": "tool_result", "tool_use_id": "t4", "content": "Error: exit status 2", "is_error": True}]}
    body = translate(msgs({"role": "user", "content": "go"}, call, results))
    tools = [m for m in body["messages"] if m["role"] == "tool"]
    assert [t["content"] for t in tools] == [
        "Error: file not found", [{"type": "text", "text": "Error: timeout"}], "Error", "Error: exit status 2"]
    assert all(set(t) == {"role", "tool_call_id", "content"} for t in tools)
    with pytest.raises(ClientError) as err:
        T.request(msgs({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "x", "is_error": "yes"}]}), "gpt-test")
    assert err.value.param == "messages[0].content[0].is_error"


@pytest.mark.parametrize("extra", [
    {"thinking": {"type": "disabled"}}, {"service_tier": "standard_only"}, {"cache_control": {"type": "ephemeral"}},
])
def test_hints_are_accepted(extra: dict[str, Any]) -> None:
    assert set(translate(msgs(**extra))) == {"model", "max_tokens", "messages"}


@pytest.mark.parametrize("extra", [
    {"messages": []}, {"messages": [{"role": "system", "content": "x"}]}, {"max_tokens": "many"},
    {"tool_choice": {"type": "tool"}}, {"stop_sequences": "END"},
    {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}]}]},
])
def test_malformed_requests_are_a_400(extra: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as err:
        T.request(msgs(**extra), "gpt-test")
    assert err.value.status == 400 and not isinstance(err.value, UntranslatableField)


def test_the_openai_validator_catches_what_a_naive_translation_would_send() -> None:
    # The mock is only useful if it refuses the classic mistakes.
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    bad = [
        {**base, "max_tokens_to_sample": 5},
        {**base, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {**base, "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": "{}"}}]}, {"role": "user", "content": "x"}]},
        {**base, "messages": [{"role": "tool", "tool_call_id": "c", "content": "x"}]},
        {**base, "tool_choice": "auto"},
        {**base, "stream_options": {"include_usage": True}},
        {**base, "messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}]},
    ]
    for body in bad:
        with pytest.raises(Invalid):
            validate_chat_request(body)
    validate_chat_request(base)


# --- answers ------------------------------------------------------------------------------------


def cc(content: str | None, calls: list[dict[str, Any]] = (), finish: str | None = None,  # type: ignore[assignment]
       cached: int | None = None) -> dict[str, Any]:
    body = completion("gpt-test", content, list(calls), 40, 9, finish, cached)
    ChatCompletion.model_validate(body)  # a real OpenAI answer, by the SDK's own model
    return body


CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}


def test_answer_text_tool_use_and_usage() -> None:
    out = T.response(200, json.dumps(cc("Checking.", [CALL], cached=15)).encode())
    msg = Message.model_validate_json(out.body)
    assert out.status == 200 and msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason == "tool_use" and msg.stop_sequence is None
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].text == "Checking."  # type: ignore[union-attr]
    tool = msg.content[1]
    assert (tool.id, tool.name, tool.input) == ("call_1", "weather", {"city": "Paris"})  # type: ignore[union-attr]
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (25, 15, 9)
    assert out.usage == ANTHROPIC_SCHEMA.usage(json.loads(out.body))


@pytest.mark.parametrize(("finish", "stop"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal"),
])
def test_stop_reasons(finish: str, stop: str) -> None:
    out = T.response(200, json.dumps(cc("x", finish=finish)).encode())
    assert Message.model_validate_json(out.body).stop_reason == stop


def test_answer_with_bad_tool_arguments_is_a_502_in_anthropic_shape() -> None:
    bad = cc(None, [{**CALL, "function": {"name": "f", "arguments": "[1, 2]"}}])
    out = T.response(200, json.dumps(bad).encode())
    assert out.status == 502 and json.loads(out.body)["error"]["type"] == "api_error"


@pytest.mark.parametrize(("status", "code", "kind"), [
    (400, None, "invalid_request_error"), (401, "invalid_api_key", "authentication_error"),
    (403, None, "permission_error"), (404, "model_not_found", "not_found_error"),
    (429, "rate_limit_exceeded", "rate_limit_error"), (429, "insufficient_quota", "billing_error"),
    (500, None, "api_error"), (503, None, "overloaded_error"), (504, None, "timeout_error"),
])
def test_errors_in_anthropic_shape_with_the_status(status: int, code: str | None, kind: str) -> None:
    body = json.dumps({"error": {"message": "nope", "type": "x", "param": None, "code": code}}).encode()
    out = T.response(status, body)
    assert out.status == status
    assert json.loads(out.body) == {"type": "error", "error": {"type": kind, "message": "nope"}}


# --- streams ------------------------------------------------------------------------------------


def events_of(raw: bytes) -> list[tuple[str, Any]]:
    """(event name, data) pairs, checking Anthropic's framing: every event is named."""
    out = []
    assert raw.endswith(b"\n\n")
    for block in raw.decode().split("\n\n")[:-1]:
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        out.append((name, data))
    return out


def accumulate(raw: bytes) -> Message:
    snapshot = None
    bufs: dict[int, bytes] = {}
    for _, data in events_of(raw):
        snapshot = accumulate_event(event=EVENTS.validate_python(data), current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return snapshot


def blocks(msg: Message) -> list[dict[str, Any]]:
    return [{k: v for k, v in b.model_dump().items() if k != "parsed_output"} for b in msg.content]


def run_stream(events: list[bytes]) -> tuple[bytes, Any]:
    st = T.stream(T.request(msgs(stream=True), "gpt-test"))
    out = b"".join(st.feed(e) for e in events) + st.end()
    return out, st


def test_stream_accumulates_to_the_non_streamed_answer() -> None:
    second = {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": '{"tz": "CET"}'}}
    answer = cc("Let me look that up.", [CALL, second], cached=4)
    raw, st = run_stream(stream_events(answer, include_usage=True))
    assert st.complete and st.usage is not None and (st.usage.input_tokens, st.usage.output_tokens) == (36, 9)
    names = [n for n, _ in events_of(raw)]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 3
    streamed = accumulate(raw)
    whole = Message.model_validate_json(T.response(200, json.dumps(answer).encode()).body)
    assert blocks(streamed) == blocks(whole) and streamed.stop_reason == whole.stop_reason == "tool_use"
    assert streamed.usage.input_tokens == whole.usage.input_tokens == 36
    assert streamed.usage.output_tokens == 9 and streamed.usage.cache_read_input_tokens == 4


def test_stream_from_a_provider_without_usage_or_done_still_ends() -> None:
    events = stream_events(cc("hi there"), include_usage=False)[:-1]  # no usage chunk, no [DONE]
    raw, st = run_stream(events)
    assert st.complete and events_of(raw)[-1][0] == "message_stop"
    assert accumulate(raw).content[0].text == "hi there"  # type: ignore[union-attr]


def test_stream_error_chunk_becomes_an_error_event() -> None:
    events = stream_events(cc("a b c"), include_usage=True)[:3]
    events.append(b'data: {"error": {"message": "boom", "type": "server_error", "code": null}}\n\n')
    raw, st = run_stream(events)
    assert st.failed and not st.complete
    name, data = events_of(raw)[-1]
    assert name == "error" and data["error"] == {"type": "api_error", "message": "boom"}


def test_a_lone_surrogate_escape_is_sent_escaped_not_a_crash() -> None:
    # Found by the request-body fuzzer: "\ud800" is valid JSON but not UTF-8; the translated body
    # keeps it escaped, as the client sent it (and as an untranslated body is sent).
    body = T.request(msgs({"role": "user", "content": "caf\u00e9 \ud800"}), "gpt-test").body
    assert b"\\ud800" in body and json.loads(body)["messages"][0]["content"] == "caf\u00e9 \ud800"
    body = translator_for("/chat/completions", ANTHROPIC).request(  # type: ignore[union-attr]
        {"model": "m", "messages": [{"role": "user", "content": "\udfff"}]}, "claude-test").body
    assert json.loads(body)["messages"][0]["content"] == "\udfff"
