"""An OpenAI chat-completions client served by an Anthropic Messages backend.

Request: system/developer messages become ``system`` (hoisted, in order, as Anthropic has no
system turns), tool messages become ``tool_result`` blocks in a user turn, assistant
``tool_calls`` become ``tool_use`` blocks, consecutive turns of one role are merged (Anthropic
alternates user and assistant), ``max_tokens`` comes from the request or the provider's default.
Answer: ``chat.completion`` with content, ``tool_calls``, ``finish_reason`` from ``stop_reason``
and usage counted the OpenAI way (prompt tokens include cached ones). Stream: Anthropic's events
become ``chat.completion.chunk`` events ending with ``data: [DONE]``.

Fields Anthropic has no equivalent for are refused with a 400 naming them (``UNTRANSLATABLE``),
unless their value is the no-op default (``n: 1``, ``logprobs: false``...). Hints that cannot
change the answer (``prompt_cache_key``, image ``detail``, ``stream_options.include_obfuscation``)
are accepted and not forwarded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from extproc.api import Usage
from extproc.errors import ProviderError, UntranslatableAnswer
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

API = "Anthropic Messages"

# field -> (accepted no-op values, why any other value cannot be translated)
UNTRANSLATABLE: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "Anthropic returns a single choice"),
    "logprobs": ((False,), "Anthropic does not return log probabilities"),
    "top_logprobs": ((0,), "Anthropic does not return log probabilities"),
    "frequency_penalty": ((0,), "Anthropic has no frequency penalty"),
    "presence_penalty": ((0,), "Anthropic has no presence penalty"),
    "logit_bias": (({},), "Anthropic has no logit bias"),
    "seed": ((), "Anthropic has no seeded sampling"),
    "modalities": ((["text"],), "Anthropic answers in text only"),
    "audio": ((), "Anthropic has no audio output"),
    "prediction": ((), "Anthropic has no predicted outputs"),
    "web_search_options": ((), "web search is not translated to Anthropic's server tool"),
    "verbosity": ((), "Anthropic has no verbosity setting"),
    "functions": ((), "deprecated function calling is not translated; use 'tools'"),
    "function_call": ((), "deprecated function calling is not translated; use 'tool_choice'"),
    "store": ((False,), "Anthropic does not store completions"),
    "metadata": (({},), "Anthropic's metadata carries only a user id; use 'user'"),
    "service_tier": (("auto", "default"), "Anthropic has no such service tier"),
    "moderation": ((), "Anthropic has no moderation setting"),
}
# Accepted and not forwarded: routing and caching hints with no effect on the answer.
HINTS = frozenset({"prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"})

_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type -> (OpenAI error type, code); statuses are kept, but 529 (Anthropic's
# "overloaded") becomes 503, which OpenAI clients know.
ERRORS: dict[str, tuple[str, str]] = {
    "invalid_request_error": ("invalid_request_error", "invalid_request_error"),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", "server_error"),
    "timeout_error": ("server_error", "timeout"),
    "overloaded_error": ("server_error", "overloaded"),
}


class OpenAIToAnthropic(Translator):
    client_api = OPENAI
    backend_api = ANTHROPIC
    client_suffix = "/chat/completions"
    backend_suffix = "/messages"

    # --- request -------------------------------------------------------------------------------

    def request(
        self, payload: Mapping[str, Any], model: str, options: BackendOptions = DEFAULT_OPTIONS
    ) -> BackendRequest:
        out: dict[str, Any] = {"model": model, "max_tokens": options.default_max_tokens}
        stream = include_usage = False
        parallel = True
        tools: list[dict[str, Any]] | None = None
        choice: dict[str, Any] | None = None
        user: str | None = None
        for key, value in payload.items():
            if value is None or key == "model":
                continue  # null is "not set" throughout OpenAI's API
            if key == "messages":
                system, messages = _messages(value)
                if system is not None:
                    out["system"] = system
                out["messages"] = messages
            elif key in ("max_tokens", "max_completion_tokens"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise invalid(key, "must be a positive integer")
                if key == "max_completion_tokens" or payload.get("max_completion_tokens") is None:
                    out["max_tokens"] = value
            elif key == "temperature":
                _number(key, value)
                if value > 1:
                    raise untranslatable(key, API, "Anthropic accepts a temperature from 0 to 1")
                out["temperature"] = value
            elif key == "top_p":
                out["top_p"] = _number(key, value)
            elif key == "top_k":  # a common extension of OpenAI-compatible APIs; Anthropic has it
                out["top_k"] = value
            elif key == "stop":
                stops = [value] if isinstance(value, str) else value
                if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                    raise invalid(key, "must be a string or an array of strings")
                if stops:
                    out["stop_sequences"] = stops
            elif key == "stream":
                stream = value is True
            elif key == "stream_options":
                include_usage = _stream_options(value)
            elif key == "tools":
                tools = _tools(value)
            elif key == "tool_choice":
                choice = _tool_choice(value)
            elif key == "parallel_tool_calls":
                parallel = value is not False
            elif key in ("user", "safety_identifier"):
                if not isinstance(value, str):
                    raise invalid(key, "must be a string")
                if key == "safety_identifier" or user is None:
                    user = value
            elif key == "response_format":
                fmt = _response_format(value)
                if fmt is not None:
                    out.setdefault("output_config", {})["format"] = fmt
            elif key == "reasoning_effort":
                if value not in _EFFORTS:
                    raise untranslatable(key, API, f"Anthropic's effort levels are {', '.join(sorted(_EFFORTS))}")
                out.setdefault("output_config", {})["effort"] = value
            elif key in UNTRANSLATABLE:
                noop, reason = UNTRANSLATABLE[key]
                if not any(_same(value, v) for v in noop):
                    raise untranslatable(key, API, reason)
            elif key not in HINTS:
                raise untranslatable(key, API, "the field is not part of the translated API")
        if "messages" not in out:
            raise invalid("messages", "is required")
        if tools:
            out["tools"] = tools
            if not parallel:
                choice = {**(choice or {"type": "auto"})}
                if choice["type"] != "none":
                    choice["disable_parallel_tool_use"] = True
        if choice is not None and (tools or choice["type"] not in ("auto", "none")):
            out["tool_choice"] = choice  # without tools, auto and none mean what no choice means
        if user is not None:
            out["metadata"] = {"user_id": user}
        if stream:
            out["stream"] = True
        return BackendRequest(
            suffix=self.backend_suffix,
            body=dumps(out),
            headers=(("anthropic-version", options.anthropic_version),),
            stream=stream,
            include_usage=stream and include_usage,
        )

    # --- answer --------------------------------------------------------------------------------

    def _answer(self, payload: dict[str, Any]) -> ClientResponse:
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in payload["content"]:
            kind = block["type"]
            if kind == "text":
                texts.append(block["text"])
            elif kind == "tool_use":
                calls.append(_tool_call(block["id"], block["name"], dumps(block["input"]).decode()))
            # thinking blocks only come when asked for, and the translation never asks
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
        message["refusal"] = None
        if calls:
            message["tool_calls"] = calls
        usage, counted = _usage(payload.get("usage") or {})
        stop = payload.get("stop_reason") or ""
        body = {
            "id": payload.get("id") or "chatcmpl-translated",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload.get("model") or "",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH_REASONS.get(stop, "stop")}
            ],
            "usage": usage,
            "system_fingerprint": None,
        }
        return ClientResponse(200, dumps(body), counted)

    def error(self, status: int, body: bytes) -> ClientResponse:
        message, kind, _ = error_message(body, f"The {API} provider answered with status {status}")
        return ClientResponse(*_openai_error(status, kind, message))

    def _untranslatable(self, detail: str) -> ClientResponse:
        err = UntranslatableAnswer(API, detail)
        return ClientResponse(err.status, err.body)

    def stream(self, request: BackendRequest) -> StreamTranslator:
        return AnthropicToChunks(request.include_usage)


class AnthropicToChunks(StreamTranslator):
    """Anthropic's stream events -> OpenAI ``chat.completion.chunk`` events."""

    def __init__(self, include_usage: bool) -> None:
        super().__init__()
        self._include_usage = include_usage
        self._prefix = b""  # everything of a chunk before its delta, fixed at message_start
        self._tail = b""
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._raw_usage: dict[str, Any] = {}
        self._head: dict[str, Any] = {}

    def _event(self, data: bytes, out: list[bytes]) -> None:
        event = json.loads(data)
        kind = event["type"]
        if kind == "content_block_delta":  # the common case first
            delta = event["delta"]
            dk = delta["type"]
            if dk == "text_delta":
                out.append(self._chunk({"content": delta["text"]}))
            elif dk == "input_json_delta":
                if delta["partial_json"]:
                    call = {"index": self._tools[event["index"]], "function": {"arguments": delta["partial_json"]}}
                    out.append(self._chunk({"tool_calls": [call]}))
            # thinking, signature and citation deltas only come when asked for
        elif kind == "message_start":
            message = event["message"]
            head = {"id": message.get("id") or "chatcmpl-translated", "object": "chat.completion.chunk"}
            head.update(created=int(time.time()), model=message.get("model") or "")
            self._head = head
            self._prefix = b'data: ' + dumps(head)[:-1] + b',"choices":[{"index":0,"delta":'
            self._raw_usage = dict(message.get("usage") or {})
            self.usage = _usage(self._raw_usage)[1]
            # content null, not "": the answer may turn out to be tool calls only, whose content is null
            out.append(self._chunk({"role": "assistant", "content": None}))
        elif kind == "content_block_start":
            block = event["content_block"]
            if block["type"] == "tool_use":
                index = self._tools[event["index"]] = len(self._tools)
                args = dumps(block["input"]).decode() if block.get("input") else ""
                call = {**_tool_call(block["id"], block["name"], args), "index": index}
                out.append(self._chunk({"tool_calls": [call]}))
            elif block["type"] == "text" and block.get("text"):
                out.append(self._chunk({"content": block["text"]}))
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                # cumulative counts: they replace, and an absent one keeps message_start's value
                self._raw_usage.update({k: v for k, v in usage.items() if v is not None})
                self.usage = _usage(self._raw_usage)[1]
            stop = (event.get("delta") or {}).get("stop_reason")
            if isinstance(stop, str):
                out.append(self._chunk({}, FINISH_REASONS.get(stop, "stop")))
        elif kind == "message_stop":
            if self._include_usage:
                usage = _usage(self._raw_usage)[0]
                out.append(b"data: " + dumps({**self._head, "choices": [], "usage": usage}) + b"\n\n")
            out.append(b"data: [DONE]\n\n")
            self.complete = True
        elif kind == "error":
            err = event.get("error") or {}
            etype = str(err.get("type"))
            _, body = _openai_error(_STATUS_OF.get(etype, 500), etype, err.get("message") or "provider stream error")
            out.append(b"data: " + body + b"\n\n")
            self.failed = True
        # ping, content_block_stop and event types added later need nothing

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        if not self._prefix:
            raise ValueError("an event before message_start")
        return self._prefix + dumps(delta) + _FINISH[finish]

    def _failure(self, detail: str) -> bytes:
        err = UntranslatableAnswer(API, detail)
        return b"data: " + err.body + b"\n\n"


_FINISH = {
    r: b',"logprobs":null,"finish_reason":' + dumps(r) + b"}]}\n\n"
    for r in (None, "stop", "length", "tool_calls", "content_filter")
}
_STATUS_OF = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}


def _openai_error(status: int, anthropic_type: str | None, message: str) -> tuple[int, bytes]:
    if status == 529:
        status = 503
    kind, code = ERRORS.get(anthropic_type or "") or (
        ("server_error", "server_error") if status >= 500 else ("invalid_request_error", "invalid_request_error")
    )
    err = ProviderError(status, kind, code, message)
    return err.status, err.body


def _usage(raw: Mapping[str, Any]) -> tuple[dict[str, Any], Usage]:
    """OpenAI usage (prompt tokens include cache reads and writes, as OpenAI counts them)."""
    read, write = raw.get("cache_read_input_tokens"), raw.get("cache_creation_input_tokens")
    prompt = as_int(raw.get("input_tokens")) + as_int(read) + as_int(write)
    completion = as_int(raw.get("output_tokens"))
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if read is not None or write is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": as_int(read), "cache_write_tokens": as_int(write)}
    return usage, Usage(prompt, completion)


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- request pieces -------------------------------------------------------------------------------


def _same(value: Any, noop: Any) -> bool:
    """value is the no-op default: equal, and a number only when the default is one (True != 1 here)."""
    if isinstance(noop, bool) or isinstance(value, bool):
        return value is noop
    if isinstance(noop, int):
        return isinstance(value, int | float) and value == noop
    return type(value) is type(noop) and value == noop


def _number(field: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise invalid(field, "must be a non-negative number")
    return value


def _stream_options(value: Any) -> bool:
    if not isinstance(value, dict):
        raise invalid("stream_options", "must be an object")
    for key in value:
        if key not in ("include_usage", "include_obfuscation"):
            raise untranslatable(f"stream_options.{key}", API, "the option is not part of the translated API")
    return value.get("include_usage") is True


def _response_format(value: Any) -> dict[str, Any] | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise invalid("response_format.json_schema.schema", "must be an object")
        if spec.get("description"):
            raise untranslatable("response_format.json_schema.description", API,
                                 "Anthropic's output format has no description")
        # name is only an identifier; Anthropic always enforces the schema, as strict asks
        return {"type": "json_schema", "schema": spec["schema"]}
    if kind == "json_object":
        raise untranslatable("response_format", API, "Anthropic has no JSON mode without a schema; use json_schema")
    raise invalid("response_format", "type must be text, json_object or json_schema")


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid("tools", "must be an array")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise untranslatable(f"tools[{i}].type", API, "only function tools are translated")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"tools[{i}].function.name", "is required")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        elif not isinstance(params, dict):
            raise invalid(f"tools[{i}].function.parameters", "must be an object")
        elif "type" not in params:
            params = {"type": "object", **params}  # OpenAI's function parameters are always an object
        spec: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            spec["description"] = fn["description"]
        spec["input_schema"] = params
        if fn.get("strict") is True:
            spec["strict"] = True
        out.append(spec)
    return out


def _tool_choice(value: Any) -> dict[str, Any]:
    if value == "auto":
        return {"type": "auto"}
    if value == "none":
        return {"type": "none"}
    if value == "required":
        return {"type": "any"}
    if isinstance(value, dict) and value.get("type") == "function":
        name = (value.get("function") or {}).get("name")
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    if isinstance(value, dict) and value.get("type") in ("allowed_tools", "custom"):
        raise untranslatable("tool_choice", API, f"tool_choice type '{value['type']}' is not translated")
    raise invalid("tool_choice", "must be auto, none, required or a named function")


def _messages(value: Any) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(system, messages): system turns hoisted, tool turns folded into user turns, roles merged."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty array")
    system: list[dict[str, Any]] = []
    system_str: str | None = None
    system_turns = 0
    turns: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise invalid(f"messages[{i}]", "must be an object")
        role = msg.get("role")
        allowed = _MESSAGE_KEYS.get(role) if isinstance(role, str) else None
        for key, v in msg.items():
            if allowed is not None and key not in allowed and v is not None:
                reason = _MESSAGE_FIELD_REASONS.get(key, "the field is not part of the translated API")
                raise untranslatable(f"messages[{i}].{key}", API, reason)
        if role in ("system", "developer"):
            content = msg.get("content")
            system_turns += 1
            if isinstance(content, str):
                system_str = content
                if content:
                    system.append({"type": "text", "text": content})
            else:
                system_str = None
                system.extend(_text_parts(content, f"messages[{i}].content"))
        elif role == "user":
            _append(turns, "user", _user_content(msg.get("content"), i))
        elif role == "assistant":
            _append(turns, "assistant", _assistant_content(msg, i))
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise invalid(f"messages[{i}].tool_call_id", "is required")
            content = msg.get("content")
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
            if isinstance(content, str):
                result["content"] = content
            else:
                result["content"] = _text_parts(content, f"messages[{i}].content")
            _append(turns, "user", [result])
        elif role == "function":
            raise untranslatable(f"messages[{i}].role", API, "deprecated function messages are not translated")
        else:
            raise invalid(f"messages[{i}].role", "must be system, developer, user, assistant or tool")
    # One system turn with a string stays a string; anything else is a list of text blocks.
    out_system: str | list[dict[str, Any]] | None = None
    if system_turns == 1 and system_str is not None:
        out_system = system_str
    elif system:
        out_system = system
    return out_system, turns


_MESSAGE_KEYS: dict[str, tuple[str, ...]] = {
    "system": ("role", "content"),
    "developer": ("role", "content"),
    "user": ("role", "content"),
    "assistant": ("role", "content", "tool_calls", "refusal"),
    "tool": ("role", "content", "tool_call_id"),
}
_MESSAGE_FIELD_REASONS = {
    "name": "Anthropic messages have no participant names",
    "audio": "Anthropic has no audio output",
    "function_call": "deprecated function calling is not translated; use tool_calls",
}


def _append(turns: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Add a turn, merging it into the previous one of the same role (Anthropic alternates)."""
    if turns and turns[-1]["role"] == role:
        prev = turns[-1]
        blocks = _blocks(prev["content"]) + _blocks(content)
        if role == "user":  # tool results must open a user turn
            blocks = [b for b in blocks if b["type"] == "tool_result"] + [
                b for b in blocks if b["type"] != "tool_result"
            ]
        prev["content"] = blocks
    else:
        turns.append({"role": role, "content": content})


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _text_parts(content: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise invalid(field, "must be a string or an array of text parts")
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise untranslatable(f"{field}[{j}]", API, "only text parts are translated here")
        out.append({"type": "text", "text": part["text"]})
    return out


def _user_content(content: Any, i: int) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"messages[{i}].content", "must be a string or an array of content parts")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        field = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            out.append(_image(part.get("image_url"), field))
        elif kind == "file":
            out.append(_document(part.get("file"), field))
        elif kind == "input_audio":
            raise untranslatable(field, API, "Anthropic does not take audio input")
        else:
            raise invalid(field, "must be a text, image_url, input_audio or file part")
    return out


def _data_url(url: str, field: str) -> tuple[str, str]:
    head, sep, data = url.partition(",")
    media, _, encoding = head[5:].partition(";")
    if not sep or encoding != "base64":
        raise untranslatable(field, API, "only base64 data URLs are translated")
    return media, data


def _image(spec: Any, field: str) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise invalid(f"{field}.image_url.url", "is required")
    # `detail` is a resolution hint Anthropic has no equivalent for; the image itself is sent.
    if url.startswith("data:"):
        media, data = _data_url(url, f"{field}.image_url.url")
        if media not in _IMAGE_TYPES:
            raise untranslatable(f"{field}.image_url.url", API, f"Anthropic accepts {', '.join(sorted(_IMAGE_TYPES))}")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid(f"{field}.image_url.url", "must be an http(s) or data URL")


def _document(spec: Any, field: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise invalid(f"{field}.file", "must be an object")
    if spec.get("file_id") is not None or not isinstance(spec.get("file_data"), str):
        raise untranslatable(f"{field}.file.file_id", API, "uploaded files are not translated; send file_data")
    media, data = _data_url(spec["file_data"], f"{field}.file.file_data")
    if media != "application/pdf":
        raise untranslatable(f"{field}.file.file_data", API, "Anthropic accepts PDF documents")
    block: dict[str, Any] = {"type": "document", "source": {"type": "base64", "media_type": media, "data": data}}
    if isinstance(spec.get("filename"), str):
        block["title"] = spec["filename"]
    return block


def _assistant_content(msg: dict[str, Any], i: int) -> str | list[dict[str, Any]]:
    content = msg.get("content")
    calls = msg.get("tool_calls")
    refusal = msg.get("refusal")
    if isinstance(content, str) and not calls and not refusal:
        return content
    out: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            out.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text = part["text"]
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                text = part["refusal"]
            else:
                raise invalid(f"messages[{i}].content[{j}]", "must be a text or refusal part")
            if text:
                out.append({"type": "text", "text": text})
    elif content is not None:
        raise invalid(f"messages[{i}].content", "must be a string, an array of parts or null")
    if isinstance(refusal, str) and refusal:
        out.append({"type": "text", "text": refusal})
    if calls is not None:
        if not isinstance(calls, list):
            raise invalid(f"messages[{i}].tool_calls", "must be an array")
        for j, call in enumerate(calls):
            out.append(_tool_use(call, f"messages[{i}].tool_calls[{j}]"))
    return out


def _tool_use(call: Any, field: str) -> dict[str, Any]:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise untranslatable(f"{field}.type", API, "only function tool calls are translated")
    fn = call.get("function")
    if not isinstance(call.get("id"), str) or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid(field, "needs an id and a function name")
    args = fn.get("arguments")
    try:
        parsed = json.loads(args) if isinstance(args, str) and args.strip() else {}
    except ValueError:
        raise invalid(f"{field}.function.arguments", "is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise untranslatable(f"{field}.function.arguments", API, "Anthropic tool input must be a JSON object")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}
