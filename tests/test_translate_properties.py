"""Property tests of the translators.

Requests: any valid request of one API translates to a valid request of the other (by the
validating mocks) with the same meaning, and back again to the same meaning. Meaning is a neutral
form both APIs map to: system texts, turns of user-side blocks (text, image, document, tool
result) and assistant-side blocks (text, tool call), sampling parameters, tools, tool choice.

Streams: any chunk split of a backend stream gives the same client stream; after every chunk the
client has received everything the backend events completed so far imply (streaming stays
streaming); and the client stream accumulates, by the SDK's own accumulator, to the translation
of the same answer not streamed.
"""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from extproc.sse import SSEAssembler
from extproc.translate import AnthropicToOpenAI, OpenAIToAnthropic
from tests.upstreams import mock_anthropic, mock_openai

O2A = OpenAIToAnthropic()
A2O = AnthropicToOpenAI()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)

texts = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=24).filter(str.strip)
names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_-]{0,15}", fullmatch=True)
scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10)
json_objects = st.dictionaries(st.text(max_size=8), scalars | st.lists(scalars, max_size=3), max_size=4)
unit = st.floats(0, 1, allow_nan=False)
b64 = st.binary(min_size=1, max_size=24).map(lambda b: base64.b64encode(b).decode())
media = st.sampled_from(sorted(mock_anthropic.IMAGE_TYPES))
https = names.map(lambda n: f"https://example.com/{n}.png")
schemas = st.fixed_dictionaries({"type": st.just("object")}, optional={
    "properties": st.dictionaries(names, st.just({"type": "string"}), max_size=2)})


# --- meaning: the neutral form both APIs map to -------------------------------------------------


def _texts(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    return [p["text"] for p in content if p["text"]]


def _merge(turns: list[tuple[str, list[Any]]], side: str, blocks: list[Any]) -> None:
    if turns and turns[-1][0] == side:
        turns[-1][1].extend(blocks)
    else:
        turns.append((side, list(blocks)))


def _params(tools: list[Any], choice: Any, parallel: bool, **params: Any) -> dict[str, Any]:
    if not tools:
        choice, parallel = None, True
    elif choice is None:
        choice = "auto"
    if choice == "none":
        parallel = True
    return {"tools": tools, "tool_choice": choice, "parallel": parallel,
            **{k: v for k, v in params.items() if v not in (None, [])}}


def meaning_openai(req: dict[str, Any]) -> dict[str, Any]:
    system: list[str] = []
    turns: list[tuple[str, list[Any]]] = []
    for m in req["messages"]:
        role = m["role"]
        if role in ("system", "developer"):
            system += _texts(m["content"])
        elif role == "tool":
            _merge(turns, "user", [("result", m["tool_call_id"], _texts(m["content"]))])
        elif role == "user":
            content = m["content"]
            blocks: list[Any] = []
            parts: list[Any] = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for p in parts:
                if p["type"] == "text":
                    blocks += [("text", t) for t in _texts([p])]
                elif p["type"] == "image_url":
                    blocks.append(("image", p["image_url"]["url"]))
                else:
                    blocks.append(("doc", p["file"]["file_data"].partition(",")[2], p["file"].get("filename")))
            _merge(turns, "user", blocks)
        else:
            blocks = [("text", t) for t in _texts(m.get("content"))]
            blocks += [("call", c["id"], c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"))
                       for c in m.get("tool_calls") or ()]
            _merge(turns, "assistant", blocks)
    tools = [(t["function"]["name"], t["function"].get("description"),
              t["function"].get("parameters") or {"type": "object", "properties": {}},
              t["function"].get("strict") is True) for t in req.get("tools") or ()]
    choice = req.get("tool_choice")
    if isinstance(choice, dict):
        choice = ("tool", choice["function"]["name"])
    stop = req.get("stop")
    fmt = req.get("response_format")
    return {"system": system, "turns": turns, **_params(
        tools, choice, req.get("parallel_tool_calls") is not False,
        max_tokens=req.get("max_completion_tokens") or req.get("max_tokens"), temperature=req.get("temperature"),
        top_p=req.get("top_p"), stop=[stop] if isinstance(stop, str) else stop, stream=req.get("stream") is True,
        user=req.get("user"), effort=req.get("reasoning_effort"),
        schema=fmt["json_schema"]["schema"] if isinstance(fmt, dict) and fmt["type"] == "json_schema" else None)}


def meaning_anthropic(req: dict[str, Any]) -> dict[str, Any]:
    system = _texts(req.get("system"))
    turns: list[tuple[str, list[Any]]] = []
    for m in req["messages"]:
        content = m["content"]
        blocks: list[Any] = []
        parts: list[Any] = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for b in parts:
            kind = b["type"]
            if kind == "text":
                blocks += [("text", t) for t in _texts([b])]
            elif kind == "image":
                src = b["source"]
                blocks.append(("image", src["url"] if src["type"] == "url"
                               else f"data:{src['media_type']};base64,{src['data']}"))
            elif kind == "document":
                blocks.append(("doc", b["source"]["data"], b.get("title")))
            elif kind == "tool_result":
                blocks.append(("result", b["tool_use_id"], _texts(b.get("content"))))
            else:
                blocks.append(("call", b["id"], b["name"], b["input"]))
        _merge(turns, m["role"], blocks)
    tools = [(t["name"], t.get("description"), t["input_schema"], t.get("strict") is True)
             for t in req.get("tools") or ()]
    choice = req.get("tool_choice")
    parallel = True
    if isinstance(choice, dict):
        parallel = choice.get("disable_parallel_tool_use") is not True
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(choice["type"]) or ("tool", choice["name"])
    config = req.get("output_config") or {}
    return {"system": system, "turns": turns, **_params(
        tools, choice, parallel, max_tokens=req.get("max_tokens"), temperature=req.get("temperature"),
        top_p=req.get("top_p"), stop=req.get("stop_sequences"), stream=req.get("stream") is True,
        user=(req.get("metadata") or {}).get("user_id"), effort=config.get("effort"),
        schema=(config.get("format") or {}).get("schema"))}


# --- valid requests of each API ------------------------------------------------------------------


@st.composite
def openai_requests(draw: st.DrawFn) -> dict[str, Any]:
    text_part = texts.map(lambda t: {"type": "text", "text": t})
    image = st.one_of(st.tuples(media, b64).map(lambda m: f"data:{m[0]};base64,{m[1]}"), https)
    user_part = st.one_of(text_part, image.map(lambda u: {"type": "image_url", "image_url": {"url": u}}),
                          st.tuples(b64, st.none() | names).map(lambda d: {"type": "file", "file": {
                              "file_data": f"data:application/pdf;base64,{d[0]}",
                              **({"filename": d[1]} if d[1] else {})}}))
    content = texts | st.lists(text_part, min_size=1, max_size=2)
    msgs: list[dict[str, Any]] = [{"role": draw(st.sampled_from(["system", "developer"])), "content": draw(content)}
                                  for _ in range(draw(st.integers(0, 2)))]
    tool_names = draw(st.lists(names, max_size=3, unique=True))
    ids = iter(range(1000))
    turns = draw(st.integers(1, 3))
    for t in range(turns):
        msgs.append({"role": "user", "content": draw(texts | st.lists(user_part, min_size=1, max_size=3))})
        if draw(st.booleans()):  # OpenAI allows two user turns in a row
            msgs.append({"role": "user", "content": draw(texts)})
        if t == turns - 1:
            break
        calls = [{"id": f"call_{next(ids)}", "type": "function",
                  "function": {"name": draw(st.sampled_from(tool_names)),
                               "arguments": json.dumps(draw(json_objects))}}
                 for _ in range(draw(st.integers(0, 2)) if tool_names else 0)]
        assistant: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | content) if calls
                                     else draw(content)}
        if calls:
            assistant["tool_calls"] = calls
        msgs.append(assistant)
        msgs += [{"role": "tool", "tool_call_id": c["id"], "content": draw(content)} for c in calls]
    req: dict[str, Any] = {"model": "gpt-test", "messages": msgs,
                           draw(st.sampled_from(["max_tokens", "max_completion_tokens"])): draw(st.integers(1, 9999))}
    for key, strategy in (("temperature", unit), ("top_p", unit), ("stream", st.booleans()), ("user", names),
                          ("stop", texts | st.lists(texts, min_size=1, max_size=4)),
                          ("reasoning_effort", st.sampled_from(["low", "medium", "high"])),
                          ("response_format", schemas.map(lambda s: {"type": "json_schema", "json_schema": {
                              "name": "out", "schema": s, "strict": True}}))):
        if draw(st.booleans()):
            req[key] = draw(strategy)
    if tool_names:
        req["tools"] = [{"type": "function", "function": {
            "name": n, **({"description": d} if (d := draw(st.none() | texts)) else {}),
            "parameters": draw(schemas), **({"strict": True} if draw(st.booleans()) else {})}} for n in tool_names]
        choice = draw(st.sampled_from(["auto", "none", "required", "named", None]))
        if choice == "named":
            req["tool_choice"] = {"type": "function", "function": {"name": draw(st.sampled_from(tool_names))}}
        elif choice is not None:
            req["tool_choice"] = choice
        if draw(st.booleans()):
            req["parallel_tool_calls"] = draw(st.booleans())
    return req


@st.composite
def anthropic_requests(draw: st.DrawFn) -> dict[str, Any]:
    text_block = texts.map(lambda t: {"type": "text", "text": t})
    cached = text_block.map(lambda b: {**b, "cache_control": {"type": "ephemeral"}})
    image = st.one_of(
        st.tuples(media, b64).map(lambda m: {"type": "base64", "media_type": m[0], "data": m[1]}),
        https.map(lambda u: {"type": "url", "url": u})).map(lambda s: {"type": "image", "source": s})
    doc = st.tuples(b64, st.none() | names).map(lambda d: {
        "type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": d[0]},
        **({"title": d[1]} if d[1] else {})})
    tool_names = draw(st.lists(names, max_size=3, unique=True))
    ids = iter(range(1000))
    msgs: list[dict[str, Any]] = []
    pending: list[str] = []
    turns = draw(st.integers(1, 3))
    for t in range(turns):
        results = [{"type": "tool_result", "tool_use_id": i,
                    **({"content": c} if (c := draw(st.none() | texts | st.lists(text_block, min_size=1,
                                                                                  max_size=2))) else {})}
                   for i in pending]
        rest = draw(st.lists(text_block | cached | image | doc, min_size=0 if results else 1, max_size=3))
        content: Any = results + rest
        if not results and draw(st.booleans()):
            content = draw(texts)
        msgs.append({"role": "user", "content": content})
        if t == turns - 1:
            break
        uses: list[dict[str, Any]] = [
            {"type": "tool_use", "id": f"toolu_{next(ids)}", "name": draw(st.sampled_from(tool_names)),
             "input": draw(json_objects)} for _ in range(draw(st.integers(0, 2)) if tool_names else 0)]
        said = draw(st.lists(text_block, min_size=0 if uses else 1, max_size=2))
        msgs.append({"role": "assistant", "content": said + uses if uses or len(said) > 1 or draw(st.booleans())
                     else said[0]["text"]})
        pending = [u["id"] for u in uses]
    req: dict[str, Any] = {"model": "claude-test", "max_tokens": draw(st.integers(1, 9999)), "messages": msgs}
    for key, strategy in (("temperature", unit), ("top_p", unit), ("stream", st.booleans()),
                          ("stop_sequences", st.lists(texts, max_size=4)),
                          ("metadata", names.map(lambda n: {"user_id": n})),
                          ("system", texts | st.lists(text_block | cached, min_size=1, max_size=2)),
                          ("output_config", st.fixed_dictionaries({}, optional={
                              "effort": st.sampled_from(["low", "medium", "high", "xhigh", "max"]),
                              "format": schemas.map(lambda s: {"type": "json_schema", "schema": s})}))):
        if draw(st.booleans()):
            req[key] = draw(strategy)
    if tool_names:
        req["tools"] = [{"name": n, **({"description": d} if (d := draw(st.none() | texts)) else {}),
                         "input_schema": draw(schemas), **({"strict": True} if draw(st.booleans()) else {})}
                        for n in tool_names]
        kind = draw(st.sampled_from(["auto", "any", "none", "tool", None]))
        if kind is not None:
            choice: dict[str, Any] = {"type": kind}
            if kind == "tool":
                choice["name"] = draw(st.sampled_from(tool_names))
            if kind != "none" and draw(st.booleans()):
                choice["disable_parallel_tool_use"] = draw(st.booleans())
            req["tool_choice"] = choice
    return req


@FAST
@given(openai_requests())
def test_openai_request_to_anthropic_and_back_keeps_its_meaning(req: dict[str, Any]) -> None:
    mock_openai.validate_chat_request(req)  # the generator makes only valid requests
    there = json.loads(O2A.request(req, "claude-test").body)
    mock_anthropic.validate_messages_request(there)
    assert meaning_anthropic(there) == meaning_openai(req)
    back = json.loads(A2O.request(there, "gpt-test").body)
    mock_openai.validate_chat_request(back)
    assert meaning_openai(back) == meaning_openai(req)


@FAST
@given(anthropic_requests())
def test_anthropic_request_to_openai_and_back_keeps_its_meaning(req: dict[str, Any]) -> None:
    mock_anthropic.validate_messages_request(req)
    there = json.loads(A2O.request(req, "gpt-test").body)
    mock_openai.validate_chat_request(there)
    assert meaning_openai(there) == meaning_anthropic(req)
    back = json.loads(O2A.request(there, "claude-test").body)
    mock_anthropic.validate_messages_request(back)
    assert meaning_anthropic(back) == meaning_anthropic(req)


# --- streams ------------------------------------------------------------------------------------


def split_text(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=4))))
    bounds = [0, *[c for c in cuts if c < len(text)], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if text[a:b]] or [text]


@st.composite
def anthropic_streams(draw: st.DrawFn) -> tuple[dict[str, Any], list[bytes]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": t} for t in draw(st.lists(texts, max_size=2))]
    content += [{"type": "tool_use", "id": f"toolu_{i}", "name": draw(names), "input": draw(json_objects)}
                for i in range(draw(st.integers(0 if content else 1, 2)))]
    stop = "tool_use" if content[-1]["type"] == "tool_use" else draw(st.sampled_from(
        ["end_turn", "max_tokens", "stop_sequence", "refusal"]))
    msg = mock_anthropic.message("claude-test", content, draw(st.integers(0, 5000)), draw(st.integers(1, 5000)),
                                 stop)
    msg["usage"]["cache_read_input_tokens"] = draw(st.integers(0, 100))
    pieces = [split_text(draw, b["text"]) for b in content if b["type"] == "text"]
    return msg, mock_anthropic.stream_events(msg, pieces, draw(st.integers(1, 12)))


@st.composite
def openai_streams(draw: st.DrawFn) -> tuple[dict[str, Any], list[bytes]]:
    text = draw(st.none() | texts)
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": draw(names),
                                                                 "arguments": json.dumps(draw(json_objects))}}
             for i in range(draw(st.integers(0 if text else 1, 2)))]
    finish = "tool_calls" if calls else draw(st.sampled_from(["stop", "length", "content_filter"]))
    answer = mock_openai.completion("gpt-test", text, calls, draw(st.integers(100, 5000)), draw(st.integers(1, 900)),
                                    finish, draw(st.none() | st.integers(0, 99)))
    pieces = split_text(draw, text) if text else None
    return answer, mock_openai.stream_events(answer, draw(st.booleans()), pieces, draw(st.integers(1, 12)))


def translate_stream(translator: Any, request: dict[str, Any], parts: list[bytes]) -> tuple[list[bytes], Any]:
    st_ = translator.stream(translator.request(request, "m"))
    return [st_.feed(p) for p in parts], st_


def cuts_of(draw_cuts: list[int], size: int) -> list[int]:
    return sorted({min(c, size) for c in draw_cuts})


def pieces_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def chunks(raw: bytes) -> list[Any]:
    """Client chunks, with the clock's ``created`` left out (two runs may straddle a second)."""
    sse = SSEAssembler()
    sse.feed(raw)
    return [e if e == b"[DONE]" else {k: v for k, v in json.loads(e).items() if k != "created"} for e in sse.events]


OPENAI_REQ = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
              "stream_options": {"include_usage": True}}
ANTHROPIC_REQ = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}], "stream": True}


@FAST
@given(anthropic_streams(), st.lists(st.integers(0, 4000), max_size=12))
def test_anthropic_stream_translation_is_split_independent_and_incremental(
    case: tuple[dict[str, Any], list[bytes]], cut_points: list[int]
) -> None:
    msg, events = case
    stream = b"".join(events)
    whole, wst = translate_stream(O2A, OPENAI_REQ, [stream])
    cuts = cuts_of(cut_points, len(stream))
    outs, sst = translate_stream(O2A, OPENAI_REQ, pieces_at(stream, cuts))
    assert chunks(b"".join(outs)) == chunks(whole[0]) and sst.usage == wst.usage and sst.complete and wst.complete
    # each backend event that carries content (or starts or ends the message) is passed on at once
    per_event, _ = translate_stream(O2A, OPENAI_REQ, events)
    for event, out in zip(events, per_event, strict=True):
        if any(m in event for m in (b'"text_delta"', b'"input_json_delta"', b"message_start", b"message_stop")):
            assert out, event
    # and after every piece the client has exactly what the events completed so far imply
    ends = [sum(len(e) for e in events[: i + 1]) for i in range(len(events))]
    fed = 0
    for k, piece in enumerate(pieces_at(stream, cuts)):
        fed += len(piece)
        done = sum(1 for e in ends if e <= fed)
        assert chunks(b"".join(outs[: k + 1])) == chunks(b"".join(per_event[:done]))
    # and it accumulates (openai SDK) to the non-streamed translation
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for c in chunks(whole[0]):
        if c != b"[DONE]":
            state.handle_chunk(ChatCompletionChunk.model_validate({**c, "created": 0}))
    got = state.current_completion_snapshot.choices[0]  # get_final_completion() refuses finish "length"
    want = ChatCompletion.model_validate_json(O2A.response(200, json.dumps(msg).encode()).body).choices[0]
    assert got.message.content == want.message.content and got.finish_reason == want.finish_reason
    assert [(c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in got.message.tool_calls or []] == [
        (c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
        for c in want.message.tool_calls or []]
    assert wst.usage == O2A.response(200, json.dumps(msg).encode()).usage


@FAST
@given(openai_streams(), st.lists(st.integers(0, 4000), max_size=12))
def test_openai_stream_translation_is_split_independent_and_incremental(
    case: tuple[dict[str, Any], list[bytes]], cut_points: list[int]
) -> None:
    answer, events = case
    stream = b"".join(events)
    whole, wst = translate_stream(A2O, ANTHROPIC_REQ, [stream])
    full = whole[0] + wst.end()
    cuts = cuts_of(cut_points, len(stream))
    outs, sst = translate_stream(A2O, ANTHROPIC_REQ, pieces_at(stream, cuts))
    assert b"".join(outs) + sst.end() == full and sst.usage == wst.usage and sst.complete
    per_event, _ = translate_stream(A2O, ANTHROPIC_REQ, events)
    for event, out in zip(events, per_event, strict=True):
        delta = (json.loads(event[6:])["choices"] or [{}])[0].get("delta", {}) if event != b"data: [DONE]\n\n" else {}
        if delta.get("content") or any((c.get("function") or {}).get("arguments") or c.get("id")
                                       for c in delta.get("tool_calls") or ()) or event is events[0]:
            assert out, event
    ends = [sum(len(e) for e in events[: i + 1]) for i in range(len(events))]
    fed = 0
    for k, piece in enumerate(pieces_at(stream, cuts)):
        fed += len(piece)
        done = sum(1 for e in ends if e <= fed)
        assert b"".join(outs[: k + 1]) == b"".join(per_event[:done])
    snapshot = None
    bufs: dict[int, bytes] = {}
    for block in full.decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ")
        snapshot = accumulate_event(event=EVENTS.validate_python(json.loads(data[6:])), current_snapshot=snapshot,
                                    json_bufs=bufs)
    assert snapshot is not None
    want = Message.model_validate_json(A2O.response(200, json.dumps(answer).encode()).body)
    assert [b.model_dump(exclude={"parsed_output"}) for b in snapshot.content] == [
        b.model_dump() for b in want.content]
    assert snapshot.stop_reason == want.stop_reason
    if json.loads(events[-2][6:]).get("usage"):  # the provider sent its usage chunk
        assert snapshot.usage.input_tokens == want.usage.input_tokens
        assert snapshot.usage.output_tokens == want.usage.output_tokens
        assert wst.usage == A2O.response(200, json.dumps(answer).encode()).usage
