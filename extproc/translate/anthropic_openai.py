"""An Anthropic Messages client served by an OpenAI chat-completions backend.

So the Anthropic SDK keeps working when its route fails over to an OpenAI-compatible provider.
Request: ``system`` becomes a leading system message, ``tool_result`` blocks become tool
messages (ahead of the rest of their user turn, as OpenAI wants them right after the assistant's
calls), ``tool_use`` blocks become assistant ``tool_calls``, images and PDFs become image and
file parts; a stream asks for ``stream_options.include_usage`` so the final usage is known.
Answer: an Anthropic ``message``; stream: ``message_start``, ``content_block_*``,
``message_delta`` (stop reason and usage) and ``message_stop`` events; errors in Anthropic's
shape with the backend's status.

What OpenAI lacks (``thinking``, server tools, citations, MCP...) is refused with a 400 naming
the field; ``cache_control`` (a caching hint: OpenAI caches on its own) is accepted and not
forwarded. A tool result's ``is_error: true`` (which agent SDKs send after any failed tool) has no
OpenAI field either: its text is kept, prefixed ``Error: `` (``_failed_tool``), and the flag dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from extproc.api import Usage
from extproc.errors import UntranslatableAnswer
from extproc.translate.base import (
    ANTHROPIC,
    DEFAULT_OPTIONS,
    OPENAI,
    BackendOptions,
    BackendRequest,
    ClientResponse,
    StreamTranslator,
    Translator,
    as_int,
    dumps,
    error_message,
    invalid,
    untranslatable,
)

API = "OpenAI chat completions"

# field -> why it cannot be translated (refused whatever its value, unless noted in request()).
UNTRANSLATABLE: dict[str, str] = {
    "thinking": "OpenAI chat completions return no thinking blocks",
    "top_k": "OpenAI has no top-k sampling",
    "container": "OpenAI has no code-execution containers",
    "mcp_servers": "OpenAI chat completions do not call MCP servers",
    "context_management": "OpenAI chat completions have no context management",
    "diagnostics": "OpenAI has no request diagnostics",
    "inference_geo": "OpenAI has no inference region setting",
    "speed": "OpenAI has no speed setting",
    "user_profile_id": "OpenAI has no user profiles",
    "workspace_id": "OpenAI has no workspaces",
}
HINTS = frozenset({"cache_control", "service_tier"})  # caching hint; OpenAI's default tier is standard

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_TEXT_KEYS = frozenset({"type", "text", "cache_control", "citations"})
_TOOL_KEYS = frozenset({"name", "description", "input_schema", "cache_control", "strict", "type"})


def anthropic_error_type(status: int, code: str | None = None) -> str:
    if code == "insufficient_quota":
        return "billing_error"
    if status >= 500:
        return {503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}.get(status, "api_error")
    return {
        401: "authentication_error", 402: "billing_error", 403: "permission_error", 404: "not_found_error",
        413: "request_too_large", 429: "rate_limit_error",
    }.get(status, "invalid_request_error")


def anthropic_error(kind: str, message: str) -> bytes:
    return dumps({"type": "error", "error": {"type": kind, "message": message}})


class AnthropicToOpenAI(Translator):
    client_api = ANTHROPIC
    backend_api = OPENAI
    client_suffix = "/messages"
    backend_suffix = "/chat/completions"

    # --- request -------------------------------------------------------------------------------

    def request(
        self, payload: Mapping[str, Any], model: str, options: BackendOptions = DEFAULT_OPTIONS
    ) -> BackendRequest:
        out: dict[str, Any] = {"model": model}
        system: list[dict[str, Any]] = []
        messages: list[dict[str, Any]] = []
        stream = False
        parallel = True
        tools: list[dict[str, Any]] = []
        choice: Any = None
        for key, value in payload.items():
            if value is None or key == "model":
                continue
            if key == "messages":
                messages = _messages(value)
            elif key == "system":
                system = [_system(value)]
            elif key == "max_tokens":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise invalid(key, "must be a non-negative integer")
                out[options.openai_max_tokens_field] = value
            elif key in ("temperature", "top_p"):
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise invalid(key, "must be a number")
                out[key] = value
            elif key == "stop_sequences":
                if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                    raise invalid(key, "must be an array of strings")
                if value:
                    out["stop"] = value
            elif key == "stream":
                stream = value is True
            elif key == "tools":
                tools = _tools(value)
            elif key == "tool_choice":
                choice, parallel = _tool_choice(value)
            elif key == "metadata":
                if not isinstance(value, dict):
                    raise invalid(key, "must be an object")
                for meta in value:
                    if meta != "user_id" and value[meta] is not None:
                        raise untranslatable(f"metadata.{meta}", API, "OpenAI takes only a user id")
                if isinstance(value.get("user_id"), str):
                    out["user"] = value["user_id"]
            elif key == "output_config":
                _output_config(value, out)
            elif key == "thinking" and isinstance(value, dict) and value.get("type") == "disabled":
                continue
            elif key in UNTRANSLATABLE:
                raise untranslatable(key, API, UNTRANSLATABLE[key])
            elif key not in HINTS:
                raise untranslatable(key, API, "the field is not part of the translated API")
        if not messages:
            raise invalid("messages", "must be a non-empty array")
        out["messages"] = system + messages
        if tools:
            out["tools"] = tools
            if choice is not None:
                out["tool_choice"] = choice
            if not parallel:
                out["parallel_tool_calls"] = False
        elif choice not in (None, "auto", "none"):
            out["tool_choice"] = choice  # the backend refuses a forced tool without tools, as Anthropic does
        if stream:
            out["stream"] = True
            out["stream_options"] = {"include_usage": True}  # message_delta carries the usage
        return BackendRequest(
            suffix=self.backend_suffix, body=dumps(out), headers=(), stream=stream, include_usage=stream
        )

    # --- answer --------------------------------------------------------------------------------

    def _answer(self, payload: dict[str, Any]) -> ClientResponse:
        choice = payload["choices"][0]
        message = choice["message"]
        content: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, list):  # some OpenAI-compatible servers answer with parts
            text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            content.append({"type": "text", "text": refusal})
        for call in message.get("tool_calls") or ():
            fn = call["function"]
            content.append(
                {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": _arguments(fn.get("arguments"))}
            )
        finish = choice.get("finish_reason")
        stop = "refusal" if refusal else STOP_REASONS.get(finish, "end_turn")
        usage, counted = _usage(payload.get("usage") or {})
        body = {
            "id": payload.get("id") or "msg_translated",
            "type": "message",
            "role": "assistant",
            "model": payload.get("model") or "",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        return ClientResponse(200, dumps(body), counted)

    def error(self, status: int, body: bytes) -> ClientResponse:
        message, _, code = error_message(body, f"The {API} provider answered with status {status}")
        return ClientResponse(status, anthropic_error(anthropic_error_type(status, code), message))

    def _untranslatable(self, detail: str) -> ClientResponse:
        err = UntranslatableAnswer(API, detail)
        return ClientResponse(err.status, anthropic_error("api_error", err.message))

    def stream(self, request: BackendRequest) -> StreamTranslator:
        return ChunksToAnthropic()


def _arguments(raw: Any) -> dict[str, Any]:
    """A tool call's arguments as the JSON object Anthropic's tool_use input must be."""
    parsed = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    if not isinstance(parsed, dict):
        raise TypeError("tool arguments are not a JSON object")
    return parsed


def _usage(raw: Mapping[str, Any]) -> tuple[dict[str, Any], Usage]:
    """Anthropic usage: input tokens exclude the cached ones, which get their own counts."""
    details = raw.get("prompt_tokens_details")
    read = write = None
    if isinstance(details, dict):
        read, write = details.get("cached_tokens"), details.get("cache_write_tokens")
    prompt, completion = as_int(raw.get("prompt_tokens")), as_int(raw.get("completion_tokens"))
    inp = max(0, prompt - as_int(read) - as_int(write))
    usage: dict[str, Any] = {"input_tokens": inp, "output_tokens": completion}
    if read is not None:
        usage["cache_read_input_tokens"] = as_int(read)
    if write is not None:
        usage["cache_creation_input_tokens"] = as_int(write)
    return usage, Usage(inp, completion)


class ChunksToAnthropic(StreamTranslator):
    """OpenAI ``chat.completion.chunk`` events -> Anthropic's stream events."""

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._block = -1  # index of the last block opened
        self._open = False
        self._text_prefix = b""  # the bytes of a text delta event before its text, per open block
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> Anthropic block index
        self._finish: str | None = None
        self._raw_usage: dict[str, Any] | None = None

    def _event(self, data: bytes, out: list[bytes]) -> None:
        if data == b"[DONE]":
            if self._started:
                self._close(out)
                self._stop(out)
            return
        chunk = json.loads(data)
        if isinstance(chunk.get("error"), (dict, str)) and not chunk.get("choices"):
            message, _, code = error_message(data, "provider stream error")
            error = {"type": anthropic_error_type(500, code), "message": message}
            out.append(_event(b"error", {"type": "error", "error": error}))
            self.failed = True
            return
        if not self._started:
            self._started = True
            start: dict[str, Any] = {
                "id": chunk.get("id") or "msg_translated", "type": "message", "role": "assistant",
                "model": chunk.get("model") or "", "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            out.append(_event(b"message_start", {"type": "message_start", "message": start}))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._raw_usage = usage
            self.usage = _usage(usage)[1]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                self._text(text, out)
            refusal = delta.get("refusal")
            if refusal:
                self._text(refusal, out)
                self._finish = "refusal"
            for call in delta.get("tool_calls") or ():
                self._tool(call, out)
            finish = choice.get("finish_reason")
            if finish is not None:
                self._close(out)
                self._finish = self._finish or STOP_REASONS.get(finish, "end_turn")
        if self._finish is not None and self._raw_usage is not None:
            self._stop(out)  # the usage chunk that include_usage asked for ends the message

    def _end(self, out: list[bytes]) -> None:
        if self._started and self._finish is not None:
            self._close(out)  # a provider that sends neither usage nor [DONE]
            self._stop(out)

    def _text(self, text: str, out: list[bytes]) -> None:
        if not self._open or not self._text_prefix:
            self._close(out)
            self._open_block({"type": "text", "text": ""}, out)
            self._text_prefix = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                + str(self._block).encode() + b',"delta":{"type":"text_delta","text":'
            )
        out.append(self._text_prefix + dumps(text) + b"}}\n\n")

    def _tool(self, call: dict[str, Any], out: list[bytes]) -> None:
        k = call.get("index", 0)
        fn = call.get("function") or {}
        block = self._tools.get(k)
        if block is None:
            self._close(out)
            name = fn.get("name") or ""
            self._open_block({"type": "tool_use", "id": call.get("id") or f"toolu_{k}", "name": name, "input": {}},
                             out)
            block = self._tools[k] = self._block
        args = fn.get("arguments")
        if args:
            delta = {"type": "content_block_delta", "index": block,
                     "delta": {"type": "input_json_delta", "partial_json": args}}
            out.append(_event(b"content_block_delta", delta))

    def _open_block(self, block: dict[str, Any], out: list[bytes]) -> None:
        self._block += 1
        self._open = True
        self._text_prefix = b""
        out.append(_event(b"content_block_start",
                          {"type": "content_block_start", "index": self._block, "content_block": block}))

    def _close(self, out: list[bytes]) -> None:
        if self._open:
            self._open = False
            out.append(_event(b"content_block_stop", {"type": "content_block_stop", "index": self._block}))

    def _stop(self, out: list[bytes]) -> None:
        usage = _usage(self._raw_usage or {})[0]
        delta = {"type": "message_delta", "delta": {"stop_reason": self._finish or "end_turn", "stop_sequence": None},
                 "usage": usage}
        out.append(_event(b"message_delta", delta))
        out.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        self.complete = True

    def _failure(self, detail: str) -> bytes:
        err = UntranslatableAnswer(API, detail)
        return _event(b"error", {"type": "error", "error": {"type": "api_error", "message": err.message}})


def _event(name: bytes, obj: Any) -> bytes:
    return b"event: " + name + b"\ndata: " + dumps(obj) + b"\n\n"


# --- request pieces -------------------------------------------------------------------------------


def _system(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"role": "system", "content": value}
    if not isinstance(value, list):
        raise invalid("system", "must be a string or an array of text blocks")
    return {"role": "system", "content": [_text(b, f"system[{j}]") for j, b in enumerate(value)]}


def _text(block: Any, field: str) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise invalid(field, "must be a text block")
    for key, value in block.items():
        if key not in _TEXT_KEYS or (key == "citations" and value):
            raise untranslatable(f"{field}.{key}", API, "OpenAI text parts carry only text")
    return {"type": "text", "text": block["text"]}


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty array")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise invalid(f"messages[{i}]", "must be an object")
        role, content = msg.get("role"), msg.get("content")
        for key in msg:
            if key not in ("role", "content"):
                raise untranslatable(f"messages[{i}].{key}", API, "the field is not part of the translated API")
        if role not in ("user", "assistant"):
            raise invalid(f"messages[{i}].role", "must be user or assistant")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif not isinstance(content, list):
            raise invalid(f"messages[{i}].content", "must be a string or an array of content blocks")
        elif role == "user":
            _user(content, i, out)
        else:
            out.append(_assistant(content, i))
    return out


def _content_blocks(blocks: list[Any], i: int, kinds: tuple[str, ...]) -> Iterator[tuple[str, str, Any]]:
    """messages[i]'s content blocks, in order, as (field, type, block); a block whose type is not
    one of ``kinds`` is refused when the iteration reaches it."""
    for j, block in enumerate(blocks):
        field = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str) or kind not in kinds:
            raise untranslatable(f"{field}.type", API, f"'{kind}' blocks are not translated")
        yield field, kind, block


def _user(blocks: list[Any], i: int, out: list[dict[str, Any]]) -> None:
    parts: list[dict[str, Any]] = []
    for field, kind, block in _content_blocks(blocks, i, ("tool_result", "text", "image", "document")):
        if kind == "tool_result":
            out.append(_tool_result(block, field))
        elif kind == "text":
            parts.append(_text(block, field))
        elif kind == "image":
            parts.append(_image(block, field))
        else:  # document
            parts.append(_document(block, field))
    if parts:
        out.append({"role": "user", "content": parts})


def _tool_result(block: dict[str, Any], field: str) -> dict[str, Any]:
    for key in block:
        if key not in ("type", "tool_use_id", "content", "is_error", "cache_control"):
            raise untranslatable(f"{field}.{key}", API, "the field is not part of the translated API")
    if not isinstance(block.get("tool_use_id"), str):
        raise invalid(f"{field}.tool_use_id", "is required")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise invalid(f"{field}.is_error", "must be a boolean")
    content = block.get("content")
    result: dict[str, Any] = {"role": "tool", "tool_call_id": block["tool_use_id"]}
    if content is None or isinstance(content, str):
        result["content"] = _failed_tool(content or "") if is_error else content or ""
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") != "text":
                raise untranslatable(f"{field}.content[{k}]", API, "OpenAI tool messages carry only text")
            parts.append(_text(part, f"{field}.content[{k}]"))
        if is_error:
            if parts:
                parts[0] = {"type": "text", "text": _failed_tool(parts[0]["text"])}
            else:
                parts = [{"type": "text", "text": _failed_tool("")}]
        result["content"] = parts
    else:
        raise invalid(f"{field}.content", "must be a string or an array of blocks")
    return result


def _failed_tool(text: str) -> str:
    """A tool result marked ``is_error``: OpenAI tool messages have no such flag, so the failure
    goes in the text the model reads (agent SDKs mark every failed tool call this way; refusing
    them would break any agent loop on failover). Text that already says so is left alone."""
    if text[:5].lower() == "error":
        return text
    return f"Error: {text}" if text else "Error"


def _image(block: dict[str, Any], field: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict):
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise untranslatable(f"{field}.source", API, "only base64 and URL images are translated")
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], field: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64" or source.get("media_type") != "application/pdf":
        raise untranslatable(f"{field}.source", API, "only base64 PDF documents are translated")
    for key, value in block.items():
        if key in ("context", "citations") and value:
            raise untranslatable(f"{field}.{key}", API, "OpenAI file parts have no context or citations")
    file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{source.get('data')}"}
    if isinstance(block.get("title"), str):
        file["filename"] = block["title"]
    return {"type": "file", "file": file}


def _assistant(blocks: list[Any], i: int) -> dict[str, Any]:
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for field, kind, block in _content_blocks(blocks, i, ("text", "tool_use")):
        if kind == "text":
            texts.append(_text(block, field))
        else:  # tool_use
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise invalid(field, "a tool_use block needs an id and a name")
            if not isinstance(block.get("input"), dict):
                raise invalid(f"{field}.input", "must be an object")
            arguments = dumps(block["input"]).decode()
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": arguments}})
    msg: dict[str, Any] = {"role": "assistant"}
    if len(texts) == 1:
        msg["content"] = texts[0]["text"]
    elif texts:
        msg["content"] = texts
    else:
        msg["content"] = None if calls else ""
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid("tools", "must be an array")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise invalid(f"tools[{i}]", "must be an object")
        if tool.get("type") not in (None, "custom"):
            raise untranslatable(f"tools[{i}].type", API, f"the server tool '{tool['type']}' has no OpenAI equivalent")
        for key in tool:
            if key not in _TOOL_KEYS:
                raise untranslatable(f"tools[{i}].{key}", API, "the field is not part of the translated API")
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise invalid(f"tools[{i}]", "needs a name and an input_schema")
        fn: dict[str, Any] = {"name": tool["name"]}
        if tool.get("description"):
            fn["description"] = tool["description"]
        fn["parameters"] = tool["input_schema"]
        if tool.get("strict") is True:
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value: Any) -> tuple[Any, bool]:
    """(OpenAI tool_choice, parallel tool calls allowed)."""
    kind = value.get("type") if isinstance(value, dict) else None
    parallel = not (isinstance(value, dict) and value.get("disable_parallel_tool_use") is True)
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool" and isinstance(value, dict) and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}, parallel
    raise invalid("tool_choice", "must be auto, any, tool (with a name) or none")


def _output_config(value: Any, out: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise invalid("output_config", "must be an object")
    for key, item in value.items():
        if item is None:
            continue
        if key == "effort":
            out["reasoning_effort"] = item
        elif key == "format":
            schema = item.get("schema") if isinstance(item, dict) and item.get("type") == "json_schema" else None
            if not isinstance(schema, dict):
                raise invalid("output_config.format", "must be a json_schema format with a schema")
            # Anthropic always enforces the schema: OpenAI's strict mode is the same promise.
            out["response_format"] = {
                "type": "json_schema", "json_schema": {"name": "response", "schema": schema, "strict": True}
            }
        else:
            raise untranslatable(f"output_config.{key}", API, "the field is not part of the translated API")
