"""The translation interface: one ``Translator`` per (client API, backend API) pair.

As in Envoy AI Gateway, a translator turns the client's request into the backend's (path,
body, extra headers), the backend's answer or error into the client's, and makes a
``StreamTranslator`` per streamed answer that is fed the backend's bytes as they arrive and
returns the client's bytes at once: a stream is never buffered to its end.

Translators are stateless singletons; everything a single exchange needs to remember travels in
the ``BackendRequest`` (client-side flags) or the ``StreamTranslator`` (stream state).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from extproc.api import Usage
from extproc.errors import ClientError, UntranslatableField
from extproc.sse import SSEAssembler

# A provider's API family, as `spec.providers[].api` names it (issue 16).
OPENAI = "OpenAI"
ANTHROPIC = "Anthropic"

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """What a provider's configuration adds to a request translated for it."""

    # Anthropic requires max_tokens; an OpenAI client may leave it out.
    default_max_tokens: int = 4096
    anthropic_version: str = "2023-06-01"
    # The OpenAI-compatible field an Anthropic max_tokens becomes: most OpenAI-compatible relays
    # and self-hosted servers know only "max_tokens"; OpenAI's reasoning models want
    # "max_completion_tokens".
    openai_max_tokens_field: str = "max_tokens"


DEFAULT_OPTIONS = BackendOptions()


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """A client request re-expressed for the backend."""

    suffix: str  # the backend endpoint after the provider's base path, e.g. "/messages"
    body: bytes
    headers: tuple[tuple[str, str], ...]  # to add to the request (auth is not ours: extproc.auth)
    stream: bool
    include_usage: bool  # an OpenAI client asked for the final usage chunk


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """A backend's answer (or error) re-expressed for the client."""

    status: int
    body: bytes
    usage: Usage | None = None  # as the client's API counts it: what accounting records
    content_type: str = JSON


class StreamTranslator(ABC):
    """Fed the backend's SSE bytes in any chunk split; returns the client's SSE bytes.

    Each ``feed`` returns every client event that the events completed so far produce, so the
    client sees a token as soon as its backend event is whole. ``usage`` holds the usage in the
    client API's terms once the backend reported it; ``complete`` tells a stream that reached its
    end event from a cut one (only a complete stream may be cached).
    """

    def __init__(self) -> None:
        self._sse = SSEAssembler()
        self.usage: Usage | None = None
        self.complete = False
        self.failed = False

    def feed(self, chunk: bytes) -> bytes:
        if self.failed or self.complete:
            return b""
        sse = self._sse
        sse.feed(chunk)
        if not sse.events:
            return b""
        events, sse.events = sse.events, []
        out: list[bytes] = []
        for data in events:
            try:
                self._event(data, out)
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                # A provider stream we cannot read: tell the client in its own format and stop,
                # rather than pass on something its SDK would choke on.
                self.failed = True
                out.append(self._failure(f"unexpected stream event ({type(exc).__name__})"))
                break
            if self.complete or self.failed:
                break
        return b"".join(out)

    def end(self) -> bytes:
        """The backend's stream ended: whatever the client still needs (nothing for a cut stream)."""
        if self.failed or self.complete:
            return b""
        out: list[bytes] = []
        self._end(out)
        return b"".join(out)

    @abstractmethod
    def _event(self, data: bytes, out: list[bytes]) -> None:
        """Translate one backend event's data, appending client events to ``out``."""

    def _end(self, out: list[bytes]) -> None:  # noqa: B027 - optional hook
        """The backend stream ended without its final event."""

    @abstractmethod
    def _failure(self, detail: str) -> bytes:
        """A client error event for a backend stream that cannot be translated."""


class Translator(ABC):
    client_api: ClassVar[str]
    backend_api: ClassVar[str]
    client_suffix: ClassVar[str]
    backend_suffix: ClassVar[str]

    @abstractmethod
    def request(
        self, payload: Mapping[str, Any], model: str, options: BackendOptions = DEFAULT_OPTIONS
    ) -> BackendRequest:
        """The backend request for the client's parsed body, for ``model`` (the backend's model).

        Raises ``UntranslatableField`` (400, naming the field) for what the backend cannot do,
        and ``ClientError`` (400) for a body the client's own API would refuse.
        """

    def response(self, status: int, body: bytes) -> ClientResponse:
        """A non-streamed answer of any status: 2xx bodies are translated, others via ``error``."""
        if not 200 <= status < 300:
            return self.error(status, body)
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise TypeError("not an object")
            return self._answer(payload)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            return self._untranslatable(f"{type(exc).__name__} in the answer")

    def unreadable(self, detail: str) -> ClientResponse:
        """The client's error (a 502 in its API's shape) for an answer that cannot be read at all."""
        return self._untranslatable(detail)

    @abstractmethod
    def error(self, status: int, body: bytes) -> ClientResponse:
        """A backend error (any body, even one that is not JSON) as the client's API reports it."""

    @abstractmethod
    def stream(self, request: BackendRequest) -> StreamTranslator:
        """A translator for the streamed answer to ``request``."""

    @abstractmethod
    def _answer(self, payload: dict[str, Any]) -> ClientResponse: ...

    @abstractmethod
    def _untranslatable(self, detail: str) -> ClientResponse: ...


# --- helpers shared by the translators ----------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """Compact JSON; non-ASCII stays UTF-8 (smaller, and what both providers send)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800": valid JSON, not UTF-8): kept escaped
        return json.dumps(obj, separators=(",", ":")).encode()


def untranslatable(field: str, api: str, reason: str) -> UntranslatableField:
    return UntranslatableField(field, api, reason)


def invalid(field: str, what: str) -> ClientError:
    """A body the client's own API would refuse (the backend would answer it with a 400 too)."""
    return ClientError(f"Invalid '{field}': {what}", param=field)


def error_message(body: bytes, fallback: str) -> tuple[str, str | None, str | None]:
    """(message, type, code) from an OpenAI- or Anthropic-style error body, or the fallback."""
    try:
        payload = json.loads(body)
    except ValueError:
        return fallback, None, None
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        kind, code = err.get("type"), err.get("code")
        return (
            message if isinstance(message, str) and message else fallback,
            kind if isinstance(kind, str) else None,
            code if isinstance(code, str) else None,
        )
    if isinstance(err, str) and err:  # some OpenAI-compatible servers answer {"error": "..."}
        return err, None, None
    return fallback, None, None


def as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
