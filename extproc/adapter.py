"""How the data plane speaks to one provider: where a request goes, with which credential, in
which API.

In the style of Envoy AI Gateway's backend auth handlers and translators, everything that
depends on the provider an attempt goes to sits behind ``ProviderAdapter``: the processor asks
it for the request's path, body and headers and never looks at an auth type or an API itself.
A provider of another API family than the client's (Anthropic's Messages for an OpenAI client,
say) is ``extproc.translated.TranslatingAdapter``, chosen where ``Runtime`` builds the adapters
(``adapter_for``): its ``translation`` re-expresses the request for the provider and carries the
answer's way back; here it is always None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from extproc.api import Endpoint, ParsedRequest, encode_with_model
from extproc.auth import auth_headers
from extproc.credentials import Credential, CredentialStore
from protos.spec import ProviderSpec

if TYPE_CHECKING:
    from extproc.translated import Translation

Headers = list[tuple[str, bytes]]


class Passthrough:
    """An attempt's header set when the client's body goes on unchanged: the same for every
    request to one endpoint with one credential, so built once, and with it (``answer``, set by
    the processor) the request-body answer that carries it."""

    __slots__ = ("answer", "credential", "headers")

    def __init__(self, credential: Credential | None, headers: Headers) -> None:
        self.credential = credential
        self.headers = headers
        self.answer: Any = None  # a shared ProcessingResponse: never mutated


class ProviderAdapter:
    """A provider that speaks the client's API: the request goes out as the client sent it, the
    model rewritten when the backend asks, with the provider's credential."""

    __slots__ = ("_authority", "_base_path", "_base_url", "_credential", "_passthrough", "spec")

    # Passthrough header sets remembered per adapter: suffixes carry the client's query string.
    MAX_PASSTHROUGH = 64

    def __init__(self, spec: ProviderSpec, credentials: CredentialStore) -> None:
        self.spec = spec
        self._credential = credentials.reader(spec.auth)  # read per request: a rotated Secret applies at once
        self._passthrough: dict[str, Passthrough] = {}
        # Parsed once here, not per request (ProviderSpec's URL parts are computed properties).
        self._authority = spec.authority.encode()
        self._base_path = spec.base_path.encode()
        self._base_url = spec.base_url.rstrip("/")

    # --- request: what goes to the provider ---------------------------------------------------

    def translation(self, endpoint: Endpoint, parsed: ParsedRequest, model: str) -> Translation | None:
        """The request re-expressed in the provider's API, for ``model``; None when the provider
        serves the client's API (then the methods below address the request). Raises a
        ``ClientError`` naming what the provider's API cannot express."""
        return None

    def request_suffix(self, endpoint: Endpoint) -> str:
        """The endpoint on the provider, after its base path (with the client's query)."""
        return endpoint.suffix

    def request_body(self, parsed: ParsedRequest, model: str | None) -> bytes | None:
        """The body to send for a backend that rewrites the model to `model`; None when the
        client's body goes unchanged."""
        return encode_with_model(parsed, model) if model else None

    def auth_headers(self) -> Headers:
        """The credential headers; none when the credential cannot be read (the client's own
        value of them is removed all the same: ``Provider.remove_headers``)."""
        credential = self._credential()
        return auth_headers(self.spec.auth, credential) if credential is not None else []

    def passthrough(self, suffix: str) -> Passthrough:
        """``request_headers(suffix, None)``, built once per suffix and credential value."""
        credential = self._credential()
        entry = self._passthrough.get(suffix)
        if entry is None or entry.credential is not credential:
            headers = self._addressed(suffix)
            if credential is not None:
                headers += auth_headers(self.spec.auth, credential)
            entry = Passthrough(credential, headers)
            if len(self._passthrough) < self.MAX_PASSTHROUGH or suffix in self._passthrough:
                self._passthrough[suffix] = entry
        return entry

    def request_headers(self, suffix: str, body: bytes | None, translation: Translation | None = None) -> Headers:
        """The one header set of an attempt: Envoy's header mutation for the first attempt, and
        (``Attempt.call_headers``) the processor's own call on failover; a translated request adds
        the translation's (``anthropic-version``, an uncompressed answer).

        Header text is latin-1-decoded bytes (extproc.attributes.RequestInfo): the suffix is
        encoded back the same way, so a client's query bytes reach the provider unchanged.
        """
        headers = self._addressed(suffix)
        headers += self.auth_headers()
        if body is not None:
            headers.append(("content-length", str(len(body)).encode()))
        if translation is not None:
            headers += translation.headers
        return headers

    def _addressed(self, suffix: str) -> Headers:
        return [(":authority", self._authority), (":path", self._base_path + suffix.encode("latin-1"))]

    def url(self, suffix: str) -> str:
        """The URL of the processor's own call to the provider (failover)."""
        return self._base_url + suffix
