"""A loopback OpenAI chat-completions provider that validates what it receives as OpenAI does.

extproc/dev/mock_provider.py answers whatever it is sent (it is the benchmark's upstream and
must stay cheap), so it cannot tell a well-translated request from a broken one. This one checks
``POST /v1/chat/completions`` against the API: top-level and per-role message fields from the
SDK's own TypedDicts ("Unrecognized request argument supplied"), content-part shapes, tool calls
(string arguments) answered by tool messages for every id before the conversation goes on,
tools/tool_choice/parallel_tool_calls only with tools, stream_options only with stream, ranges.
It answers as OpenAI does: a ``chat.completion`` (text, or tool_calls when tool_choice forces a
tool), a stream of ``chat.completion.chunk`` events (tool-call deltas, the usage chunk when
``stream_options.include_usage`` asks for it, ``data: [DONE]``), and errors
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
    completion_create_params,
)

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

_PARAMS = completion_create_params.CompletionCreateParamsBase
TOP_LEVEL = _PARAMS.__required_keys__ | _PARAMS.__optional_keys__ | {"stream"}
MESSAGE_KEYS = {
    role: td.__required_keys__ | td.__optional_keys__
    for role, td in (
        ("system", ChatCompletionSystemMessageParam), ("developer", ChatCompletionDeveloperMessageParam),
        ("user", ChatCompletionUserMessageParam), ("assistant", ChatCompletionAssistantMessageParam),
        ("tool", ChatCompletionToolMessageParam),
    )
}
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _fail(param: str, message: str) -> Invalid:
    exc = Invalid(message)
    exc.param = param  # type: ignore[attr-defined]
    return exc


def _text_part(part: Any, param: str) -> None:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise _fail(param, f"Invalid value for '{param}': expected a text content part.")
    if set(part) - {"type", "text"}:
        raise _fail(param, f"Unrecognized field in '{param}'.")


def _user_part(part: Any, param: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        _text_part(part, param)
    elif kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise _fail(f"{param}.image_url", "Missing required parameter: 'image_url.url'.")
        if set(image) - {"url", "detail"} or image.get("detail", "auto") not in ("auto", "low", "high"):
            raise _fail(f"{param}.image_url", "Invalid image_url.")
        if not image["url"].startswith(("https://", "http://", "data:image/")):
            raise _fail(f"{param}.image_url.url", "Invalid image URL: expected an http(s) or data:image URL.")
    elif kind == "file":
        file = part.get("file")
        if not isinstance(file, dict) or not (set(file) <= {"file_data", "file_id", "filename"}):
            raise _fail(f"{param}.file", "Invalid file part.")
        data = file.get("file_data")
        if data is not None and not (isinstance(data, str) and data.startswith("data:")):
            raise _fail(f"{param}.file.file_data", "Expected a data URL.")
    elif kind == "input_audio":
        pass
    else:
        raise _fail(f"{param}.type", f"Invalid value: '{kind}'. Supported values are: 'text', 'image_url', "
                                     "'input_audio', and 'file'.")


def _content(content: Any, param: str, part: Any) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise _fail(param, f"Invalid '{param}': expected a string or a non-empty array of content parts.")
    for j, p in enumerate(content):
        part(p, f"{param}[{j}]")


def _messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "Invalid 'messages': empty array. Expected an array with minimum length 1.")
    pending: list[str] = []  # tool_call ids still to be answered by tool messages
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in MESSAGE_KEYS:
            raise _fail(f"{param}.role", f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', "
                                         "'user', 'tool', 'function', and 'developer'.")
        assert isinstance(msg, dict)
        extra = set(msg) - MESSAGE_KEYS[role]
        if extra:
            raise _fail(param, f"Unrecognized request argument supplied: {sorted(extra)[0]}")
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _fail(f"{param}.tool_call_id", "Missing required parameter: 'tool_call_id'.")
            if call_id not in pending:
                raise _fail(param, "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                                   "message with 'tool_calls'.")
            pending.remove(call_id)
            _content(msg.get("content"), f"{param}.content", _text_part)
            continue
        if pending:
            raise _fail("messages", "An assistant message with 'tool_calls' must be followed by tool messages "
                                    f"responding to each 'tool_call_id'. The following tool_call_ids did not have "
                                    f"response messages: {', '.join(pending)}")
        if role in ("system", "developer"):
            _content(msg.get("content"), f"{param}.content", _text_part)
        elif role == "user":
            _content(msg.get("content"), f"{param}.content", _user_part)
        else:
            calls = msg.get("tool_calls")
            content = msg.get("content")
            if content is None and not calls:
                raise _fail(f"{param}.content", "Invalid value for 'content': expected a string, got null.")
            if content is not None:
                _content(content, f"{param}.content", _text_part)
            for j, call in enumerate(calls or ()):
                cp = f"{param}.tool_calls[{j}]"
                if not isinstance(call, dict) or call.get("type") != "function" or set(call) - {"id", "type",
                                                                                                  "function"}:
                    raise _fail(cp, "Invalid tool call.")
                fn = call.get("function")
                if not isinstance(call.get("id"), str) or not isinstance(fn, dict):
                    raise _fail(cp, "Missing required parameter: 'id' or 'function'.")
                if not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
                    raise _fail(f"{cp}.function", "Expected 'name' and 'arguments' strings.")
                pending.append(call["id"])
    if pending:
        raise _fail("messages", "An assistant message with 'tool_calls' must be followed by tool messages "
                                f"responding to each 'tool_call_id': {', '.join(pending)}")


def _tools(tools: Any) -> set[str]:
    if not isinstance(tools, list):
        raise _fail("tools", "Invalid type for 'tools': expected an array.")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
            raise _fail(param, "Invalid tool: expected {'type': 'function', 'function': {...}}.")
        fn = tool.get("function")
        if not isinstance(fn, dict) or set(fn) - {"name", "description", "parameters", "strict"}:
            raise _fail(f"{param}.function", "Invalid function definition.")
        if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise _fail(f"{param}.function.name", "Invalid 'name': string does not match pattern "
                                                  "'^[a-zA-Z0-9_-]{1,64}$'.")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise _fail(f"{param}.function.parameters", "Invalid type: expected an object.")
        names.add(fn["name"])
    return names


def validate_chat_request(body: Any) -> None:
    """Raise ``Invalid`` with OpenAI's kind of message for a body chat completions refuses."""
    if not isinstance(body, dict):
        raise _fail("", "We could not parse the JSON body of your request.")
    for key in body:
        if key not in TOP_LEVEL:
            raise _fail(key, f"Unrecognized request argument supplied: {key}")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _fail("model", "you must provide a model parameter")
    _messages(body.get("messages"))
    for key in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _fail(key, f"Invalid '{key}': integer below minimum value.")
    for key, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(key)
        if value is not None and (not isinstance(value, int | float) or not 0 <= value <= high):
            raise _fail(key, f"Invalid '{key}': expected a number from 0 to {high}.")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise _fail("stop", "Invalid 'stop': expected a string or an array of at most 4 strings.")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise _fail("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    names = _tools(body["tools"]) if body.get("tools") is not None else None
    for key in ("tool_choice", "parallel_tool_calls"):
        if body.get(key) is not None and not names:
            raise _fail(key, f"Invalid value for '{key}': '{key}' is only allowed when 'tools' are specified.")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required"):
        fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        if not isinstance(fn, dict) or fn.get("name") not in (names or set()):
            raise _fail("tool_choice", "Invalid 'tool_choice': expected none, auto, required or a named function "
                                       "among 'tools'.")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
                raise _fail("response_format.json_schema.name", "Missing required parameter: "
                                                                "'response_format.json_schema.name'.")
        elif kind not in ("text", "json_object"):
            raise _fail("response_format.type", f"Invalid value: '{kind}'.")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh", "max"):
        raise _fail("reasoning_effort", f"Invalid value: '{effort}'.")


# --- answers ----------------------------------------------------------------------------------


def prompt_text(body: dict[str, Any]) -> str:
    def text_of(value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return "".join(text_of(v) for v in value)
        if isinstance(value, dict):
            return text_of(value.get("text")) + text_of(value.get("content"))
        return ""
    return text_of(body.get("messages"))


def completion(model: str, content: str | None, calls: list[dict[str, Any]], prompt: int, completion_tokens: int,
               finish: str | None = None, cached: int | None = None, cid: str = "chatcmpl-mock") -> dict[str, Any]:
    """A chat-completions answer (parses as ``openai.types.chat.ChatCompletion``)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                             "total_tokens": prompt + completion_tokens}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "id": cid, "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish or ("tool_calls" if calls else "stop")}],
        "usage": usage, "system_fingerprint": None,
    }


def _data(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def stream_events(answer: dict[str, Any], include_usage: bool, text_pieces: list[str] | None = None,
                  json_size: int = 7) -> list[bytes]:
    """The chunks OpenAI streams for ``answer`` (a ``chat.completion``)."""
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"], "system_fingerprint": None}
    choice = answer["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        extra = {"usage": None} if include_usage else {}
        return _data({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                      **extra})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    if message.get("content"):
        for piece in text_pieces or pieces(message["content"]):
            events.append(chunk({"content": piece}))
    for k, call in enumerate(message.get("tool_calls") or ()):
        head = {"index": k, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        events.append(chunk({"tool_calls": [head]}))
        args = json.loads(call["function"]["arguments"] or "{}")
        for piece in json_pieces(args, json_size):
            events.append(chunk({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}))
    events.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        events.append(_data({**base, "choices": [], "usage": answer["usage"]}))
    events.append(b"data: [DONE]\n\n")
    return events


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class MockOpenAI(LoopbackProvider):
    def __init__(self, name: str = "openai", key: str = "sk-openai-test-upstream", **kw: Any) -> None:
        super().__init__(name=name, key=key, **kw)

    def answer_for(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body["model"]
        choice = body.get("tool_choice")
        tools = body.get("tools") or []
        prompt = tokens(prompt_text(body))
        if tools and (choice == "required" or isinstance(choice, dict)):
            name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
            call = {"id": "call_mock1", "type": "function",
                    "function": {"name": name, "arguments": json.dumps(self.tool_input)}}
            return completion(model, None, [call], prompt, 12)
        text = self.reply_text()
        last = body["messages"][-1]
        if last.get("role") == "tool":
            content = last.get("content")
            text = f"{text}; tool said {content if isinstance(content, str) else json.dumps(content)}"
        return completion(model, text, [], prompt, len(pieces(text)))

    async def handle(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if request.method != "POST" or request.path != f"{self.prefix}/chat/completions":
            return json_response(error_body(f"Invalid URL ({request.method} {request.path})",
                                            "invalid_request_error", None), 404)
        if request.headers.get("authorization") != f"Bearer {self.key}":
            rec.error = "authorization"
            return json_response(error_body("Incorrect API key provided.", "invalid_request_error",
                                            "invalid_api_key"), 401)
        body = rec.body
        try:
            validate_chat_request(body)
        except Invalid as exc:
            rec.error = str(exc)
            return json_response(error_body(str(exc), "invalid_request_error", None,
                                            getattr(exc, "param", None)), 400)
        stream = body.get("stream") is True
        fault = self.take_fault()
        if fault is not None and not (fault.mid_stream and stream):
            headers = {"retry-after": "1"} if fault.status == 429 else None
            code = "rate_limit_exceeded" if fault.status == 429 else None
            return json_response(error_body(fault.message, fault.kind, code), fault.status, headers)
        answer = self.answer_for(body)
        rec.usage = answer["usage"]
        if not stream:
            return json_response(answer)
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        events = stream_events(answer, include_usage)
        if fault is not None:
            error = _data(error_body(fault.message, fault.kind, None))

            async def cut(i: int) -> bytes | None:
                return error if i == 2 else None

            return await stream_response(request, events, cut, self.stream_gap, rec.sent)
        return await stream_response(request, events, gap=self.stream_gap, sent=rec.sent)
