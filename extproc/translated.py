"""Providers of another API family than the client's (issue 16): the adapter that translates,
and one attempt's translation on every path a backend is used.

``adapter_for`` is what ``Runtime`` builds for each provider: the plain ``ProviderAdapter`` for a
provider that serves every API family itself (``api`` plus ``passThrough``), else a
``TranslatingAdapter``. Its ``translation(endpoint, parsed, model)`` is None when the provider
serves the client's API (the request goes out as the client sent it), else a ``Translation``:
the request re-expressed for the provider by ``extproc.translate`` (raising a ``ClientError``
that names what cannot be translated: ``AttemptPlan`` skips that backend).

A ``Translation`` belongs to one attempt. It carries the backend request (path, body, the
``anthropic-version`` header) and brings the answer back in the client's API on both paths:

- through Envoy (the first attempt): ``response_headers`` sets the client's content type, removes
  the length and asks for the body in STREAMED mode; ``body`` turns each chunk into the client's
  bytes as it arrives (a stream's events at once, a JSON answer collected and answered with the
  last chunk, which is the only way to translate a JSON document);
- on failover (the processor's own call, read whole): ``result``.

Either way ``counted`` is the usage in the client's API's terms and whether the answer is whole,
which is what accounting records and the cache keeps (the client's format, keyed on what the
client sent).
"""

from __future__ import annotations

from collections.abc import Iterable

from extproc.adapter import Headers, ProviderAdapter
from extproc.api import Endpoint, ParsedRequest, Usage
from extproc.credentials import CredentialStore
from extproc.translate import (
    API_OF_ENDPOINT,
    EVENT_STREAM,
    JSON,
    BackendOptions,
    BackendRequest,
    StreamTranslator,
    Translator,
    translator_for,
)
from extproc.upstream import MAX_RESPONSE_BYTES, UpstreamResult
from protos import messages as m
from protos.spec import API_FAMILIES, ProviderSpec

# A translated answer must not come back compressed: the translator reads its bytes.
_IDENTITY = ("accept-encoding", b"identity")
_NO_LENGTH = ("content-length",)
_CONTENT_TYPES = {JSON: JSON.encode(), EVENT_STREAM: EVENT_STREAM.encode()}


def adapter_for(spec: ProviderSpec, credentials: CredentialStore) -> ProviderAdapter:
    """The adapter of one provider: a translating one unless it serves every API family itself."""
    if set(API_FAMILIES) <= {spec.api, *spec.pass_through}:
        return ProviderAdapter(spec, credentials)
    return TranslatingAdapter(spec, credentials)


def client_api(endpoint: Endpoint) -> str | None:
    """The API family of the client's endpoint (None for one no translator knows)."""
    suffix = endpoint.suffix
    found = API_OF_ENDPOINT.get(suffix)  # a suffix without a query: the usual case, one lookup
    if found is None and "?" in suffix:
        found = API_OF_ENDPOINT.get(suffix.partition("?")[0].rstrip("/"))
    return found


class TranslatingAdapter(ProviderAdapter):
    """A provider of one API family (``spec.api``): requests of another are translated for it."""

    __slots__ = ("_native", "_options")

    def __init__(self, spec: ProviderSpec, credentials: CredentialStore) -> None:
        super().__init__(spec, credentials)
        self._native = frozenset((spec.api, *spec.pass_through))
        self._options = BackendOptions(default_max_tokens=spec.max_tokens, anthropic_version=spec.anthropic_version)

    def translation(self, endpoint: Endpoint, parsed: ParsedRequest, model: str) -> Translation | None:
        if client_api(endpoint) in self._native:
            return None
        translator = translator_for(endpoint.suffix, self.spec.api)  # raises UntranslatableEndpoint
        if translator is None:
            return None
        return Translation(translator, translator.request(parsed.payload, model, self._options))


class Translation:
    """One attempt's translation: the backend request, and its answer's way back."""

    __slots__ = ("_parts", "_size", "_status", "_stream", "complete", "request", "translator", "usage")

    def __init__(self, translator: Translator, request: BackendRequest) -> None:
        self.translator = translator
        self.request = request
        self.usage: Usage | None = None  # in the client's API's terms, once known
        self.complete = False  # the answer reached its end and was translated whole
        self._stream: StreamTranslator | None = None
        self._status = 200
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def headers(self) -> Headers:
        """What the translated request adds to the provider's header set."""
        return [*((k, v.encode()) for k, v in self.request.headers), _IDENTITY]

    @property
    def counted(self) -> tuple[Usage | None, bool]:
        """(usage, whole) for ``Ledger.settle``: what the translator read, not what the client got
        (an OpenAI stream reports usage only when asked, but the provider's always counts)."""
        return self.usage, self.complete

    def _streams(self, status: int) -> bool:
        # A provider's error is a JSON document even for a streamed request.
        return self.request.stream and 200 <= status < 300

    # --- the first attempt, through Envoy --------------------------------------------------------

    def response_headers(self, set_headers: Iterable[tuple[str, bytes]], status: int) -> m.ProcessingResponse:
        """The provider's headers answered in the client's API: its content type, no length (the
        body changes), and every body chunk asked for."""
        self._status = status
        content_type = JSON
        if self._streams(status):
            self._stream = self.translator.stream(self.request)
            content_type = EVENT_STREAM
        headers = [*set_headers, ("content-type", _CONTENT_TYPES[content_type])]
        return m.response_headers_mutation(headers, _NO_LENGTH, m.STREAMED_RESPONSE)

    def body(self, chunk: bytes, end: bool) -> bytes:
        """The client's bytes for one chunk of the provider's body (Envoy's STREAMED mode): a
        stream's events translated at once, a JSON answer with its last chunk."""
        stream = self._stream
        if stream is not None:
            out = stream.feed(chunk) if chunk else b""
            if end:
                out += stream.end()
            self.usage, self.complete = stream.usage, stream.complete and not stream.failed
            return out
        self._size += len(chunk)
        if self._size <= MAX_RESPONSE_BYTES:
            self._parts.append(chunk)
        if not end:
            return b""
        if self._size > MAX_RESPONSE_BYTES:
            answer = self.translator.unreadable(f"the answer is larger than {MAX_RESPONSE_BYTES} bytes")
        else:
            answer = self.translator.response(self._status, b"".join(self._parts))
        self._parts = []
        self.usage, self.complete = answer.usage, answer.status < 300
        return answer.body

    # --- a failover attempt, read whole by the processor ------------------------------------------

    def result(self, result: UpstreamResult) -> UpstreamResult:
        """A failover call's answer in the client's API: status, content type and body."""
        if self._streams(result.status):
            stream = self.translator.stream(self.request)
            body = stream.feed(result.body) + stream.end()
            self.usage, self.complete = stream.usage, stream.complete and not stream.failed
            status, content_type = result.status, EVENT_STREAM
        else:
            answer = self.translator.response(result.status, result.body)
            body, status, content_type = answer.body, answer.status, answer.content_type
            self.usage, self.complete = answer.usage, answer.status < 300
        headers = [(k, v) for k, v in result.headers if k != "content-type"]
        headers.append(("content-type", content_type))
        return UpstreamResult(status, headers, body, result.latency, result.error)
