"""Model-specific request parsing: which API a path is, where the model and usage live.

Each API schema sits behind the small ``ApiSchema`` interface, so adding one (say, Gemini) is
one class and one table entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from extproc import jsoncodec
from extproc.errors import InvalidJSON, MissingModel, UnsupportedEndpoint


class Usage(NamedTuple):  # a tuple: built per answer, and a frozen dataclass costs twice as much
    input_tokens: int = 0
    output_tokens: int = 0


class ApiSchema:
    name = "openai"

    def usage(self, payload: Any) -> Usage | None:
        """Usage from a response JSON object or an SSE event's JSON, if it carries one."""
        if not isinstance(payload, dict):
            return None
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            resp = payload.get("response")  # Responses API streams usage inside response.completed
            usage = resp.get("usage") if isinstance(resp, dict) else None
            if not isinstance(usage, dict):
                return None
        inp = usage.get("prompt_tokens", usage.get("input_tokens", 0))
        out = usage.get("completion_tokens", usage.get("output_tokens", 0))
        return Usage(int(inp) if isinstance(inp, int) else 0, int(out) if isinstance(out, int) else 0)


class OpenAIApi(ApiSchema):
    name = "openai"


class AnthropicMessagesApi(ApiSchema):
    name = "anthropic"

    def usage(self, payload: Any) -> Usage | None:
        if isinstance(payload, dict) and isinstance(payload.get("message"), dict):
            payload = payload["message"]  # message_start carries usage inside the message
        return super().usage(payload)


OPENAI = OpenAIApi()
ANTHROPIC = AnthropicMessagesApi()

# Endpoint suffixes we understand, longest first so `/chat/completions` wins over `/completions`.
ENDPOINTS: tuple[tuple[str, ApiSchema], ...] = (
    ("/chat/completions", OPENAI),
    ("/completions", OPENAI),
    ("/embeddings", OPENAI),
    ("/responses", OPENAI),
    ("/messages", ANTHROPIC),
)


@dataclass(frozen=True)
class Endpoint:
    suffix: str  # the part of the path after the client's version prefix, with the query
    schema: ApiSchema


def classify_path(path: str) -> Endpoint:
    found = _classified.get(path)
    if found is not None:
        return found
    bare, _, query = path.partition("?")
    bare = bare.rstrip("/")
    for suffix, schema in ENDPOINTS:
        if bare.endswith(suffix):
            found = Endpoint(suffix + ("?" + query if query else ""), schema)
            if len(_classified) < 1024:  # paths come from clients: a bounded memo
                _classified[path] = found
            return found
    raise UnsupportedEndpoint(bare)


_classified: dict[str, Endpoint] = {}


def is_ai_endpoint(path: str) -> bool:
    try:
        classify_path(path)
    except UnsupportedEndpoint:
        return False
    return True


def bodyless_suffix(path: str, base_path: str = "") -> str:
    """For GET /v1/models and friends: the path after the client's version prefix."""
    bare, sep, query = path.partition("?")
    for prefix in (base_path, "/v1"):
        if prefix and bare.startswith(prefix + "/"):
            bare = bare[len(prefix):]
            break
    return bare + sep + query


@dataclass(slots=True)
class ParsedRequest:
    payload: dict[str, Any]
    model: str
    stream: bool
    strict: bool = False  # parsed by orjson (extproc/jsoncodec.py): its encoders may re-encode it


def parse_body(body: bytes) -> ParsedRequest:
    """Decode a request body and pull out the model. Raises ClientError subclasses."""
    if not body:
        raise MissingModel("The request has no body; a JSON object with a model is required")
    try:
        payload, strict = jsoncodec.loads_strict(body)
    except UnicodeDecodeError:
        raise InvalidJSON("it is not UTF-8") from None
    except RecursionError:
        raise InvalidJSON("it is nested too deeply") from None
    except ValueError as exc:
        raise InvalidJSON(str(exc)[:200]) from None
    if not isinstance(payload, dict):
        raise InvalidJSON("the top level must be an object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise MissingModel("'model' must be a non-empty string" if "model" in payload else
                           "you must provide a model parameter")
    if not model.isascii():
        try:
            model.encode()  # the model becomes a metric label and a log field: it must be UTF-8
        except UnicodeEncodeError:
            raise InvalidJSON("'model' contains an unpaired surrogate escape") from None
    return ParsedRequest(payload=payload, model=model, stream=payload.get("stream") is True, strict=strict)


def encode_with_model(parsed: ParsedRequest, model: str) -> bytes:
    """The body to send when a backend rewrites the model name."""
    return jsoncodec.dumps({**parsed.payload, "model": model}, parsed.strict)
