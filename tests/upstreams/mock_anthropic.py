"""A loopback Anthropic Messages provider that validates what it receives as the Messages API does.

``validate_messages_request`` checks a body against the Messages API: required fields (model,
max_tokens, messages), known top-level fields only ("Extra inputs are not permitted"), role
alternation, content-block shapes per role, tool_use/tool_result pairing (every tool_use answered
by a tool_result at the start of the next user turn), tool and tool_choice shapes, sampling ranges.
It is stricter than Anthropic in one place: consecutive turns of one role, which Anthropic merges,
are refused, so a translator must produce proper alternation.

``MockAnthropic`` requires ``x-api-key`` and ``anthropic-version`` and answers as Anthropic does:
a ``message`` (text, or a tool_use when tool_choice forces a tool), a stream framed
``event: <type>\\ndata: <json>\\n\\n`` (message_start, ping, content_block_start/delta/stop with
text_delta or input_json_delta, message_delta with usage, message_stop), and errors in the shape
``{"type": "error", "error": {"type", "message"}}`` with their statuses (400, 401, 404, 429,
500, 529...), also as an ``event: error`` in the middle of a stream.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from aiohttp import web
from anthropic._constants import ANTHROPIC_API_VERSION
from anthropic.types.message_create_params import MessageCreateParamsBase

from tests.upstreams.base import (
    Invalid,
    LoopbackProvider,
    Recorded,
    json_pieces,
    json_response,
    pieces,
    stream_response,
    tokens,
)

# The versions the API takes, and the one the installed SDK sends (a pass-through Anthropic
# client's own header reaches the provider unchanged).
VERSIONS = frozenset({"2023-06-01", "2023-01-01", ANTHROPIC_API_VERSION})
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")

# The SDK's own list of request fields, plus `stream` and the sampling fields the API takes
# (temperature, top_p, top_k: the SDK's newest types leave them out, the API still accepts them).
TOP_LEVEL = (
    MessageCreateParamsBase.__required_keys__
    | MessageCreateParamsBase.__optional_keys__
    | {"stream", "temperature", "top_p", "top_k"}
)


def _fail(path: str, what: str) -> Invalid:
    return Invalid(f"{path}: {what}")


def _keys(obj: dict[str, Any], allowed: set[str], path: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _fail(f"{path}.{key}", "Extra inputs are not permitted")


def _nonempty_text(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise _fail(path, "Input should be a valid string")
    if not value.strip():
        raise _fail(path, "text content blocks must contain non-whitespace text")


def _cache_control(block: dict[str, Any], path: str) -> None:
    cc = block.get("cache_control")
    if cc is not None and (not isinstance(cc, dict) or cc.get("type") != "ephemeral"):
        raise _fail(f"{path}.cache_control", "Input tag does not match the expected tag 'ephemeral'")


def _text_block(block: dict[str, Any], path: str) -> None:
    _keys(block, {"type", "text", "cache_control", "citations"}, path)
    _nonempty_text(block.get("text"), f"{path}.text")
    _cache_control(block, path)


def _image_block(block: dict[str, Any], path: str) -> None:
    _keys(block, {"type", "source", "cache_control"}, path)
    source = block.get("source")
    if not isinstance(source, dict):
        raise _fail(f"{path}.source", "Field required")
    if source.get("type") == "base64":
        _keys(source, {"type", "media_type", "data"}, f"{path}.source")
        if source.get("media_type") not in IMAGE_TYPES:
            raise _fail(f"{path}.source.media_type", f"Input should be one of {sorted(IMAGE_TYPES)}")
        _base64(source.get("data"), f"{path}.source.data")
    elif source.get("type") == "url":
        _keys(source, {"type", "url"}, f"{path}.source")
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("http://", "https://")):
            raise _fail(f"{path}.source.url", "must be an http(s) URL")
    else:
        raise _fail(f"{path}.source.type", "Input tag does not match 'base64' or 'url'")
    _cache_control(block, path)


def _base64(data: Any, path: str) -> None:
    if not isinstance(data, str) or not data:
        raise _fail(path, "Input should be a non-empty base64 string")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _fail(path, "invalid base64 data") from None


def _document_block(block: dict[str, Any], path: str) -> None:
    _keys(block, {"type", "source", "title", "context", "citations", "cache_control"}, path)
    source = block.get("source")
    if not isinstance(source, dict):
        raise _fail(f"{path}.source", "Field required")
    if source.get("type") == "base64":
        if source.get("media_type") != "application/pdf":
            raise _fail(f"{path}.source.media_type", "Input should be 'application/pdf'")
        _base64(source.get("data"), f"{path}.source.data")
    elif source.get("type") == "text":
        if source.get("media_type") != "text/plain" or not isinstance(source.get("data"), str):
            raise _fail(f"{path}.source", "a text source needs media_type text/plain and data")
    elif source.get("type") != "url":
        raise _fail(f"{path}.source.type", "Input tag does not match a document source")
    if "title" in block and not isinstance(block["title"], str | None):
        raise _fail(f"{path}.title", "Input should be a valid string")


def _tool_result_block(block: dict[str, Any], path: str) -> None:
    _keys(block, {"type", "tool_use_id", "content", "is_error", "cache_control"}, path)
    if not isinstance(block.get("tool_use_id"), str):
        raise _fail(f"{path}.tool_use_id", "Field required")
    content = block.get("content")
    if isinstance(content, list):
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                _text_block(part, f"{path}.content.{k}")
            elif kind == "image":
                _image_block(part, f"{path}.content.{k}")
            else:
                raise _fail(f"{path}.content.{k}.type", "Input tag does not match 'text' or 'image'")
    elif content is not None and not isinstance(content, str):
        raise _fail(f"{path}.content", "Input should be a valid string or list")
    if "is_error" in block and not isinstance(block["is_error"], bool):
        raise _fail(f"{path}.is_error", "Input should be a valid boolean")


def _tool_use_block(block: dict[str, Any], path: str) -> None:
    _keys(block, {"type", "id", "name", "input", "cache_control"}, path)
    if not isinstance(block.get("id"), str) or not _TOOL_ID.match(block["id"]):
        raise _fail(f"{path}.id", "String should match pattern '^[a-zA-Z0-9_-]+$'")
    if not isinstance(block.get("name"), str) or not _TOOL_NAME.match(block["name"]):
        raise _fail(f"{path}.name", "String should match pattern '^[a-zA-Z0-9_-]{1,128}$'")
    if not isinstance(block.get("input"), dict):
        raise _fail(f"{path}.input", "Input should be a valid dictionary")


_USER_BLOCKS = {"text": _text_block, "image": _image_block, "document": _document_block,
                "tool_result": _tool_result_block}
_ASSISTANT_BLOCKS = {"text": _text_block, "tool_use": _tool_use_block}


def _messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "at least one message is required")
    pending: list[str] = []  # tool_use ids the previous assistant turn left to answer
    prev_role = None
    for i, msg in enumerate(messages):
        path = f"messages.{i}"
        if not isinstance(msg, dict):
            raise _fail(path, "Input should be a valid dictionary")
        _keys(msg, {"role", "content"}, path)
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant"):
            raise _fail(f"{path}.role", "Input should be 'user' or 'assistant'")
        if role == prev_role:
            raise _fail(path, f"roles must alternate between 'user' and 'assistant'; two '{role}' turns in a row")
        last = i == len(messages) - 1
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise _fail(f"{path}.content", "Input should be a valid string or list")
        if not blocks or (isinstance(content, str) and not content.strip()):
            if not (last and role == "assistant"):
                raise _fail(path, "all messages must have non-empty content except for the optional final "
                                  "assistant message")
            blocks = []
        table = _USER_BLOCKS if role == "user" else _ASSISTANT_BLOCKS
        answered: list[str] = []
        seen_other = False
        for j, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            check = table.get(kind)  # type: ignore[arg-type]
            if check is None:
                raise _fail(f"{path}.content.{j}.type", f"'{kind}' blocks are not allowed in {role} messages")
            check(block, f"{path}.content.{j}")
            if kind == "tool_result":
                if seen_other:
                    raise _fail(f"{path}.content.{j}", "tool_result blocks must come first in the user message")
                answered.append(block["tool_use_id"])
            else:
                seen_other = True
        if pending:
            missing = [t for t in pending if t not in answered]
            if missing:
                raise _fail(path, f"`tool_use` ids were found without `tool_result` blocks immediately after: "
                                  f"{', '.join(missing)}")
        unexpected = [t for t in answered if t not in pending]
        if unexpected:
            raise _fail(path, f"unexpected `tool_use_id` found in `tool_result` blocks: {', '.join(unexpected)}. "
                              "Each `tool_result` block must have a corresponding `tool_use` block in the "
                              "previous message.")
        pending = [b["id"] for b in blocks if b.get("type") == "tool_use"] if role == "assistant" else []
        prev_role = role


def _tools(tools: Any) -> set[str]:
    if not isinstance(tools, list):
        raise _fail("tools", "Input should be a valid list")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        path = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _fail(path, "Input should be a valid dictionary")
        if tool.get("type") not in (None, "custom"):
            names.add(str(tool.get("name")))  # a server tool: its own schema, not checked here
            continue
        _keys(tool, {"name", "description", "input_schema", "cache_control", "strict", "type", "input_examples",
                     "defer_loading", "allowed_callers", "eager_input_streaming"}, path)
        if not isinstance(tool.get("name"), str) or not _TOOL_NAME.match(tool["name"]):
            raise _fail(f"{path}.name", "String should match pattern '^[a-zA-Z0-9_-]{1,128}$'")
        if tool["name"] in names:
            raise _fail("tools", f"Tool names must be unique: {tool['name']}")
        names.add(tool["name"])
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise _fail(f"{path}.input_schema.type", "Input should be 'object'")
        if "description" in tool and not isinstance(tool["description"], str):
            raise _fail(f"{path}.description", "Input should be a valid string")
        if "strict" in tool and not isinstance(tool["strict"], bool):
            raise _fail(f"{path}.strict", "Input should be a valid boolean")
    return names


def _tool_choice(choice: Any, names: set[str] | None) -> None:
    if not isinstance(choice, dict):
        raise _fail("tool_choice", "Input should be a valid dictionary")
    kind = choice.get("type")
    if kind in ("auto", "any"):
        _keys(choice, {"type", "disable_parallel_tool_use"}, "tool_choice")
    elif kind == "tool":
        _keys(choice, {"type", "name", "disable_parallel_tool_use"}, "tool_choice")
        if not isinstance(choice.get("name"), str):
            raise _fail("tool_choice.name", "Field required")
        if names is not None and choice["name"] not in names:
            raise _fail("tool_choice.name", f"Tool '{choice['name']}' not found in tools")
    elif kind == "none":
        _keys(choice, {"type"}, "tool_choice")
    else:
        raise _fail("tool_choice.type", "Input tag does not match 'auto', 'any', 'tool' or 'none'")
    if kind in ("any", "tool") and names is None:
        raise _fail("tool_choice", "tool_choice may only be specified while providing tools")
    if "disable_parallel_tool_use" in choice and not isinstance(choice["disable_parallel_tool_use"], bool):
        raise _fail("tool_choice.disable_parallel_tool_use", "Input should be a valid boolean")


def _number(body: dict[str, Any], key: str, high: float) -> None:
    value = body.get(key)
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= high):
        raise _fail(key, f"Input should be a number from 0 to {high}")


def validate_messages_request(body: Any) -> None:
    """Raise ``Invalid`` with Anthropic's kind of message for a body the Messages API refuses."""
    if not isinstance(body, dict):
        raise Invalid("The request body is not valid JSON: an object is required")
    for key in body:
        if key not in TOP_LEVEL:
            raise _fail(key, "Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _fail("model", "Field required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise _fail("max_tokens", "Field required" if max_tokens is None else "Input should be a valid integer >= 0")
    _messages(body.get("messages"))
    system = body.get("system")
    if isinstance(system, list):
        for j, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise _fail(f"system.{j}.type", "Input should be 'text'")
            _text_block(block, f"system.{j}")
    elif system is not None and not isinstance(system, str):
        raise _fail("system", "Input should be a valid string or list")
    _number(body, "temperature", 1.0)
    _number(body, "top_p", 1.0)
    if "top_k" in body and (not isinstance(body["top_k"], int) or body["top_k"] < 0):
        raise _fail("top_k", "Input should be a valid integer >= 0")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise _fail("stop_sequences", "Input should be a list of non-empty strings")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _fail("stream", "Input should be a valid boolean")
    names = _tools(body["tools"]) if "tools" in body else None
    if "tool_choice" in body:
        _tool_choice(body["tool_choice"], names)
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _fail("metadata", "Input should be a valid dictionary")
        _keys(metadata, {"user_id"}, "metadata")
        if not isinstance(metadata.get("user_id"), str | None):
            raise _fail("metadata.user_id", "Input should be a valid string")
    config = body.get("output_config")
    if config is not None:
        if not isinstance(config, dict):
            raise _fail("output_config", "Input should be a valid dictionary")
        _keys(config, {"effort", "format"}, "output_config")
        if config.get("effort") not in (None, "low", "medium", "high", "xhigh", "max"):
            raise _fail("output_config.effort", "Input should be 'low', 'medium', 'high', 'xhigh' or 'max'")
        fmt = config.get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "json_schema"
                                or not isinstance(fmt.get("schema"), dict)):
            raise _fail("output_config.format", "a json_schema format with a schema is required")
        if isinstance(fmt, dict):
            _keys(fmt, {"type", "schema"}, "output_config.format")


# --- answers ----------------------------------------------------------------------------------


def prompt_text(body: dict[str, Any]) -> str:
    """Every text of the request, for the mock's token count."""
    def text_of(value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return "".join(text_of(v) for v in value)
        if isinstance(value, dict):
            return text_of(value.get("text")) + text_of(value.get("content"))
        return ""
    return text_of(body.get("system")) + text_of(body.get("messages"))


def message(model: str, content: list[dict[str, Any]], input_tokens: int, output_tokens: int,
            stop_reason: str | None = None, msg_id: str = "msg_01mock") -> dict[str, Any]:
    """A Messages API answer (parses as ``anthropic.types.Message``)."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
    return {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def sse(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode()


def stream_events(answer: dict[str, Any], text_pieces: list[list[str]] | None = None,
                  json_size: int = 7) -> list[bytes]:
    """The events Anthropic streams for ``answer`` (a ``message``); text blocks split into
    ``text_pieces[i]`` (default: word by word) and tool inputs into ``json_size`` fragments."""
    start = {**answer, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**answer["usage"], "output_tokens": 1}}
    events = [sse("message_start", {"type": "message_start", "message": start}), sse("ping", {"type": "ping"})]
    texts = iter(text_pieces or [])
    for index, block in enumerate(answer["content"]):
        if block["type"] == "text":
            events.append(sse("content_block_start", {"type": "content_block_start", "index": index,
                                                      "content_block": {"type": "text", "text": ""}}))
            for piece in next(texts, None) or pieces(block["text"]):
                events.append(sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                          "delta": {"type": "text_delta", "text": piece}}))
        else:
            head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            events.append(sse("content_block_start",
                              {"type": "content_block_start", "index": index, "content_block": head}))
            for piece in json_pieces(block["input"], json_size):
                delta = {"type": "input_json_delta", "partial_json": piece}
                events.append(sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                          "delta": delta}))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(sse("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": answer["stop_reason"], "stop_sequence": None},
                                        "usage": {"output_tokens": answer["usage"]["output_tokens"]}}))
    events.append(sse("message_stop", {"type": "message_stop"}))
    return events


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class MockAnthropic(LoopbackProvider):
    def __init__(self, name: str = "anthropic", key: str = "sk-ant-test-upstream", **kw: Any) -> None:
        super().__init__(name=name, key=key, **kw)

    def answer_for(self, body: dict[str, Any]) -> dict[str, Any]:
        """Text, or a tool_use of the forced (or only) tool; the last tool result is echoed."""
        model = body["model"]
        choice = body.get("tool_choice") or {}
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        content: list[dict[str, Any]]
        if choice.get("type") in ("any", "tool") and tools:
            name = choice.get("name") or tools[0]["name"]
            content = [{"type": "tool_use", "id": "toolu_01mock", "name": name, "input": self.tool_input}]
            out = 12
        else:
            text = self.reply_text()
            last = body["messages"][-1]["content"]
            results = [b for b in last if isinstance(b, dict) and b.get("type") == "tool_result"] \
                if isinstance(last, list) else []
            if results:
                result = results[-1].get("content")
                text = f"{text}; tool said {result if isinstance(result, str) else json.dumps(result)}"
            content = [{"type": "text", "text": text}]
            out = len(pieces(text))
        return message(model, content, tokens(prompt_text(body)), out)

    def _refused(self, request: web.Request, rec: Recorded) -> web.Response | None:
        """Anthropic's answer to a request without the key or a known anthropic-version."""
        key = request.headers.get("x-api-key")
        if key != self.key:
            rec.error = "x-api-key"
            return json_response(error_body("authentication_error", "invalid x-api-key"), 401)
        version = request.headers.get("anthropic-version")
        if version not in VERSIONS:
            rec.error = "anthropic-version"
            what = "is required" if version is None else f"'{version}' is not a valid version"
            return json_response(error_body("invalid_request_error", f"anthropic-version: header {what}"), 400)
        return None

    async def handle(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if request.method == "GET" and request.path == f"{self.prefix}/models":  # what a health check asks
            refused = self._refused(request, rec)
            model = {"type": "model", "id": "claude-test", "display_name": "Claude Test",
                     "created_at": "2025-01-01T00:00:00Z"}
            return refused or json_response({"data": [model], "has_more": False, "first_id": "claude-test",
                                             "last_id": "claude-test"})
        if request.method != "POST" or request.path != f"{self.prefix}/messages":
            return json_response(error_body("not_found_error", f"Not found: {request.path}"), 404)
        refused = self._refused(request, rec)
        if refused is not None:
            return refused
        body = rec.body
        try:
            validate_messages_request(body)
        except Invalid as exc:
            rec.error = str(exc)
            return json_response(error_body("invalid_request_error", str(exc)), 400)
        stream = body.get("stream") is True
        fault = self.take_fault()
        if fault is not None and not (fault.mid_stream and stream):
            headers = {"retry-after": "1"} if fault.status == 429 else None
            return json_response(error_body(fault.kind, fault.message), fault.status, headers)
        answer = self.answer_for(body)
        rec.usage = answer["usage"]
        if not stream:
            return json_response(answer)
        events = stream_events(answer)
        if fault is not None:  # mid-stream: the error replaces everything after the first text delta
            error = sse("error", error_body(fault.kind, fault.message))

            async def cut(i: int) -> bytes | None:
                return error if i == 3 else None

            return await stream_response(request, events, cut, self.stream_gap, rec.sent)
        return await stream_response(request, events, gap=self.stream_gap, sent=rec.sent)
