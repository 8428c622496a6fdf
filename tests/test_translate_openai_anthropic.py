"""OpenAI chat completions -> an Anthropic Messages backend: each mapping, checked against the
validating mock's Messages API rules and parsed back with the openai SDK's own models."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.types import Message
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.api import OPENAI as OPENAI_SCHEMA
from extproc.errors import ClientError, UntranslatableEndpoint, UntranslatableField
from extproc.sse import SSEAssembler
from extproc.translate import ANTHROPIC, OPENAI, BackendOptions, OpenAIToAnthropic, can_serve, translator_for
from tests.upstreams.mock_anthropic import message, stream_events, validate_messages_request

T = OpenAIToAnthropic()
PNG = "iVBORw0KGgo="  # base64 of the PNG signature


def translate(payload: dict[str, Any], **opts: Any) -> dict[str, Any]:
    req = T.request(payload, "claude-test", BackendOptions(**opts))
    body = json.loads(req.body)
    validate_messages_request(body)  # whatever we send must be a valid Messages request
    return body


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": list(messages) or [{"role": "user", "content": "hi"}], **extra}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def test_translator_choice_by_endpoint_and_provider_api() -> None:
    assert translator_for("/chat/completions", OPENAI) is None
    assert translator_for("/messages?beta=true", ANTHROPIC) is None
    assert isinstance(translator_for("/chat/completions", ANTHROPIC), OpenAIToAnthropic)
    with pytest.raises(UntranslatableEndpoint) as err:
        translator_for("/embeddings", ANTHROPIC)
    assert err.value.status == 400 and "/embeddings" in err.value.message
    assert not can_serve("/responses", ANTHROPIC) and can_serve("/chat/completions", ANTHROPIC)


def test_request_basics_path_headers_and_max_tokens() -> None:
    req = T.request(chat(max_tokens=77, temperature=0.5, top_p=0.9, stop="END", user="u-1"), "claude-test",
                    BackendOptions(anthropic_version="2023-06-01"))
    assert req.suffix == "/messages" and req.headers == (("anthropic-version", "2023-06-01"),)
    assert not req.stream and not req.include_usage
    body = json.loads(req.body)
    validate_messages_request(body)
    assert body == {"model": "claude-test", "max_tokens": 77, "temperature": 0.5, "top_p": 0.9,
                    "stop_sequences": ["END"], "metadata": {"user_id": "u-1"},
                    "messages": [{"role": "user", "content": "hi"}]}
    assert translate(chat(), default_max_tokens=321)["max_tokens"] == 321
    assert translate(chat(max_tokens=5, max_completion_tokens=9))["max_tokens"] == 9
    assert translate(chat(max_tokens=None, max_completion_tokens=9, logprobs=None))["max_tokens"] == 9
    assert translate(chat(stop=["a", "b"]))["stop_sequences"] == ["a", "b"]


def test_stream_flags() -> None:
    req = T.request(chat(stream=True, stream_options={"include_usage": True}), "m")
    assert req.stream and req.include_usage and json.loads(req.body)["stream"] is True
    assert not T.request(chat(stream=True), "m").include_usage
    assert not T.request(chat(stream=False, stream_options={"include_usage": True}), "m").include_usage


def test_system_and_developer_messages_are_hoisted_in_order() -> None:
    body = translate(chat({"role": "system", "content": "be brief"}, user("hi")))
    assert body["system"] == "be brief" and body["messages"] == [{"role": "user", "content": "hi"}]
    body = translate(chat({"role": "system", "content": "one"}, {"role": "developer", "content": [
        {"type": "text", "text": "two"}]}, user("hi"), {"role": "system", "content": "three"}))
    assert body["system"] == [{"type": "text", "text": t} for t in ("one", "two", "three")]


def test_content_parts_images_and_pdfs() -> None:
    body = translate(chat(user([
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
    ])))
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
         "title": "a.pdf"},
    ]


def test_tool_calls_and_results_become_blocks_with_alternating_roles() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}}]
    body = translate(chat(
        user("weather and time in Paris?"),
        {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        user("thanks"), user("and tomorrow?"),
        tools=[{"type": "function", "function": {"name": "weather", "description": "Weather now",
                                                 "parameters": {"type": "object", "properties": {}}}},
               {"type": "function", "function": {"name": "time", "strict": True}}],
    ))
    assert body["messages"] == [
        {"role": "user", "content": "weather and time in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
            {"type": "text", "text": "thanks"}, {"type": "text", "text": "and tomorrow?"}]},
    ]
    assert body["tools"] == [
        {"name": "weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {}}},
        {"name": "time", "input_schema": {"type": "object", "properties": {}}, "strict": True},
    ]


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
])
def test_tool_choice(choice: Any, parallel: bool | None, expected: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = translate(chat(tools=tools, tool_choice=choice, parallel_tool_calls=parallel))
    assert body["tool_choice"] == expected


def test_tool_choice_without_tools_is_dropped_only_when_it_means_nothing() -> None:
    assert "tool_choice" not in translate(chat(tool_choice="auto"))
    assert "tool_choice" not in translate(chat(tool_choice="none", parallel_tool_calls=False))


def test_structured_output_and_effort() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    body = translate(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True}}, reasoning_effort="high"))
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}, "effort": "high"}
    assert "output_config" not in translate(chat(response_format={"type": "text"}))


@pytest.mark.parametrize(("extra", "field"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1}, "presence_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"seed": 7}, "seed"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "description": "d",
                                                                 "schema": {}}}},
     "response_format.json_schema.description"),
    ({"reasoning_effort": "minimal"}, "reasoning_effort"),
    ({"temperature": 1.5}, "temperature"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"store": True}, "store"),
    ({"metadata": {"k": "v"}}, "metadata"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"some_vendor_flag": 1}, "some_vendor_flag"),
    ({"stream": True, "stream_options": {"chunk_size": 3}}, "stream_options.chunk_size"),
    ({"tools": [{"type": "custom", "custom": {"name": "c"}}]}, "tools[0].type"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/tiff;base64,AAAA"}}]}]}, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
     "messages[0].content[0].file.file_id"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}]}, "messages[0].tool_calls[0].function.arguments"),
])
def test_untranslatable_fields_are_a_400_naming_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(UntranslatableField) as err:
        T.request(chat(**extra), "claude-test")
    assert err.value.status == 400 and err.value.param == field
    body = json.loads(err.value.body)["error"]
    assert body["param"] == field and body["code"] == "unsupported_parameter" and field in body["message"]
    assert "Anthropic" in body["message"]


@pytest.mark.parametrize("extra", [
    {"n": 1}, {"logprobs": False}, {"frequency_penalty": 0}, {"presence_penalty": 0.0}, {"logit_bias": {}},
    {"store": False}, {"modalities": ["text"]}, {"service_tier": "auto"}, {"metadata": {}},
    {"prompt_cache_key": "k"}, {"seed": None}, {"stream": True, "stream_options": {"include_obfuscation": False}},
])
def test_no_op_defaults_and_hints_are_accepted(extra: dict[str, Any]) -> None:
    body = translate(chat(**extra))
    assert set(body) <= {"model", "max_tokens", "messages", "stream"}


@pytest.mark.parametrize("extra", [
    {"messages": []}, {"messages": "hi"}, {"max_tokens": 0}, {"temperature": "hot"}, {"stop": [1]},
    {"tool_choice": "sometimes"}, {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                                  "arguments": "{"}}]}]},
])
def test_malformed_requests_are_a_400(extra: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as err:
        T.request(chat(**extra), "claude-test")
    assert err.value.status == 400 and not isinstance(err.value, UntranslatableField)


# --- answers ------------------------------------------------------------------------------------


def answer(*content: dict[str, Any], stop: str | None = None, **usage: int) -> dict[str, Any]:
    msg = message("claude-test", list(content), 20, 7, stop)
    msg["usage"].update(usage)
    Message.model_validate(msg)  # a real Anthropic answer, by the SDK's own model
    return msg


def test_answer_text_tool_calls_and_usage() -> None:
    msg = answer({"type": "text", "text": "Checking."},
                 {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                 cache_read_input_tokens=30, cache_creation_input_tokens=5)
    out = T.response(200, json.dumps(msg).encode())
    assert out.status == 200 and out.content_type == "application/json"
    cc = ChatCompletion.model_validate_json(out.body)
    assert cc.object == "chat.completion" and cc.model == "claude-test"
    choice = cc.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_1" and call.function.name == "weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert cc.usage is not None and cc.usage.prompt_tokens == 55 and cc.usage.completion_tokens == 7
    assert cc.usage.total_tokens == 62 and cc.usage.prompt_tokens_details is not None
    assert cc.usage.prompt_tokens_details.cached_tokens == 30
    # the usage accounting records is what the mesh reads from the client's format
    assert out.usage == OPENAI_SCHEMA.usage(json.loads(out.body))


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("model_context_window_exceeded", "length"), ("pause_turn", "stop"),
])
def test_finish_reasons(stop: str, finish: str) -> None:
    out = T.response(200, json.dumps(answer({"type": "text", "text": "x"}, stop=stop)).encode())
    assert ChatCompletion.model_validate_json(out.body).choices[0].finish_reason == finish


def test_tool_only_answer_has_null_content() -> None:
    msg = answer({"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}})
    cc = ChatCompletion.model_validate_json(T.response(200, json.dumps(msg).encode()).body)
    assert cc.choices[0].message.content is None and cc.choices[0].message.tool_calls


@pytest.mark.parametrize(("status", "kind", "client_status", "client_type", "code"), [
    (400, "invalid_request_error", 400, "invalid_request_error", "invalid_request_error"),
    (401, "authentication_error", 401, "invalid_request_error", "invalid_api_key"),
    (403, "permission_error", 403, "invalid_request_error", "permission_denied"),
    (404, "not_found_error", 404, "invalid_request_error", "not_found"),
    (413, "request_too_large", 413, "invalid_request_error", "request_too_large"),
    (429, "rate_limit_error", 429, "requests", "rate_limit_exceeded"),
    (500, "api_error", 500, "server_error", "server_error"),
    (529, "overloaded_error", 503, "server_error", "overloaded"),
    (418, "brand_new_error", 418, "invalid_request_error", "invalid_request_error"),
])
def test_errors_keep_their_status_in_openai_shape(
    status: int, kind: str, client_status: int, client_type: str, code: str
) -> None:
    body = json.dumps({"type": "error", "error": {"type": kind, "message": "it went wrong"}}).encode()
    out = T.response(status, body)
    assert out.status == client_status and out.usage is None
    assert json.loads(out.body) == {"error": {"message": "it went wrong", "type": client_type, "param": None,
                                              "code": code}}


def test_error_bodies_that_are_not_anthropic_errors() -> None:
    out = T.response(502, b"<html>bad gateway</html>")
    assert out.status == 502 and json.loads(out.body)["error"]["type"] == "server_error"
    bad = T.response(200, b"{not json")
    assert bad.status == 502 and json.loads(bad.body)["error"]["code"] == "untranslatable_provider_response"
    assert T.response(200, b'{"content": 5}').status == 502


# --- streams ------------------------------------------------------------------------------------


def run_stream(events: list[bytes], include_usage: bool = True) -> tuple[bytes, Any]:
    st = T.stream(T.request(chat(stream=True, stream_options={"include_usage": include_usage}), "m"))
    out = b"".join(st.feed(e) for e in events) + st.end()
    return out, st


def chunks_of(raw: bytes) -> list[Any]:
    sse = SSEAssembler()
    sse.feed(raw)
    assert sse.complete and sse.events[-1] == b"[DONE]"
    return [json.loads(e) for e in sse.events[:-1]]


def test_stream_text_and_tool_calls_accumulate_to_the_non_streamed_answer() -> None:
    msg = answer({"type": "text", "text": "Let me check the weather."},
                 {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris", "days": 3}},
                 {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {"tz": "CET"}})
    raw, st = run_stream(stream_events(msg))
    assert st.complete and st.usage is not None and (st.usage.input_tokens, st.usage.output_tokens) == (20, 7)
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    chunks = chunks_of(raw)
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    streamed = state.get_final_completion()
    whole = ChatCompletion.model_validate_json(T.response(200, json.dumps(msg).encode()).body)
    assert streamed.choices[0].message.content == whole.choices[0].message.content
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"
    got = [(c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
           for c in streamed.choices[0].message.tool_calls or []]
    want = [(c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in whole.choices[0].message.tool_calls or []]
    assert got == want and len(got) == 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 27
    assert streamed.usage is not None and streamed.usage.prompt_tokens == 20


def test_stream_without_include_usage_has_no_usage_chunk_but_counts_usage() -> None:
    raw, st = run_stream(stream_events(answer({"type": "text", "text": "hi there"})), include_usage=False)
    assert all(c["choices"] for c in chunks_of(raw))
    assert st.usage is not None and st.usage.output_tokens == 7


def test_stream_error_event_becomes_an_openai_error_chunk() -> None:
    events = stream_events(answer({"type": "text", "text": "a b c"}))[:4]
    events.append(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n')
    raw, st = run_stream(events)
    assert not st.complete and st.failed
    sse = SSEAssembler()
    sse.feed(raw)
    last = json.loads(sse.events[-1])
    assert last["error"]["message"] == "busy" and last["error"]["code"] == "overloaded"
    assert b"[DONE]" not in raw


def test_cut_stream_is_not_complete_and_ends_without_done() -> None:
    events = stream_events(answer({"type": "text", "text": "a b c"}))
    raw, st = run_stream([*events[:4], events[4][:10]])
    assert not st.complete and b"[DONE]" not in raw and st.end() == b""


def test_garbage_in_a_stream_is_reported_once_then_nothing() -> None:
    st = T.stream(T.request(chat(stream=True), "m"))
    out = st.feed(b"data: {not json\n\n")
    assert st.failed and json.loads(out[len(b"data: "):])["error"]["code"] == "untranslatable_provider_response"
    assert st.feed(b'data: {"type":"message_stop"}\n\n') == b""
