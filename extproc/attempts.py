"""Attempt planning: which backends one request may try, in which order, and what each attempt
sends (its one header set and body, from the provider's adapter)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from extproc import metrics
from extproc.api import Endpoint, ParsedRequest, bodyless_suffix
from extproc.errors import ClientError
from extproc.routing import RouteMatch, order_backends
from extproc.runtime import Provider
from protos.spec import BackendSpec

if TYPE_CHECKING:
    from extproc.adapter import Passthrough
    from extproc.translated import Translation


class Attempt:
    """One backend chosen for this request, with what it sends."""

    __slots__ = ("body", "headers", "label", "model", "passthrough", "provider", "series", "suffix", "translation")

    def __init__(self, provider: Provider, suffix: str, body: bytes | None, model: str = "", label: str = "",
                 translation: Translation | None = None) -> None:
        self.provider = provider
        self.suffix = suffix  # the endpoint on the provider, after its base path
        self.body = body  # None: the client's body is sent unchanged
        self.model = model  # the model the provider is asked for: what pricing looks up
        self.label = label  # the metrics' model label: always a name or glob from the config
        # Set when the provider speaks another API than the client (extproc/translated.py): the
        # answer comes back through it.
        self.translation = translation
        self.series: metrics.AnswerSeries | None = None  # set once it answered (accounting.count_answer)
        if body is None and translation is None:  # the client's body unchanged: a shared header set
            self.passthrough: Passthrough | None = provider.adapter.passthrough(suffix)
            self.headers = self.passthrough.headers
        else:
            self.passthrough = None
            self.headers = provider.adapter.request_headers(suffix, body, translation)

    def call_headers(self, accept: str) -> dict[str, str]:
        """The same headers for the processor's own call (failover): the pseudo-headers are the
        URL (``ProviderAdapter.url``), and aiohttp computes the length."""
        headers = {"content-type": "application/json", "accept": accept}
        headers.update((k, v.decode()) for k, v in self.headers if k[0] != ":" and k != "content-length")
        return headers


def bodyless_attempt(provider: Provider, path: str) -> Attempt:
    """GET /v1/models and friends: the client's path after its version prefix."""
    return Attempt(provider, bodyless_suffix(path, provider.spec.base_path), None)


class AttemptPlan:
    """The backends one request may try: by priority, then weight (routing.order_backends); open
    or unhealthy circuits skipped; at most ``maxRetries + 1`` of them. A backend whose API cannot
    express the request (extproc/translated.py) is refused, not tried, and costs no attempt."""

    __slots__ = ("_budget", "_endpoint", "_label", "_parsed", "_pattern", "pending", "refused", "skipped", "tried")

    def __init__(
        self, providers: Mapping[str, Provider], match: RouteMatch, endpoint: Endpoint, parsed: ParsedRequest
    ) -> None:
        self._endpoint = endpoint
        self._parsed = parsed
        self._pattern = match.pattern
        self._label: str | None = None
        self.tried: list[str] = []
        self.skipped: list[str] = []
        self.refused: list[ClientError] = []  # why backends could not take the request, in order
        self.pending: list[tuple[Provider, BackendSpec]] = []
        self._budget = match.config.max_retries + 1
        for backend in order_backends(match.route.backends):
            provider = providers[backend.provider]
            if not provider.breaker.available():
                self.skipped.append(provider.name)
            else:
                self.pending.append((provider, backend))

    def next(self) -> Attempt | None:
        """The next backend whose circuit lets a request through (a half-open one lets one
        trial through), or None when none is left."""
        while self.pending and self._budget > 0:
            provider, backend = self.pending.pop(0)
            try:
                attempt = self._attempt(provider, backend)
            except ClientError as err:  # its API cannot express the request: not an attempt
                self.refused.append(err)
                continue
            self._budget -= 1
            if provider.breaker.acquire():
                self.tried.append(provider.name)
                return attempt
            self.skipped.append(provider.name)
        return None

    @property
    def refusal(self) -> ClientError | None:
        """The answer when every backend refused the request (the first one's 400, naming the
        field), rather than a 503: no provider was ever going to take it."""
        return self.refused[0] if self.refused and not self.tried and not self.skipped else None

    def _attempt(self, provider: Provider, backend: BackendSpec) -> Attempt:
        adapter = provider.adapter
        model = backend.model or self._parsed.model
        translation = adapter.translation(self._endpoint, self._parsed, model)
        body: bytes | None
        if translation is not None:
            suffix, body = translation.request.suffix, translation.request.body
        else:
            body = adapter.request_body(self._parsed, backend.model)
            suffix = adapter.request_suffix(self._endpoint)
        if backend.model:
            return Attempt(provider, suffix, body, backend.model, backend.model, translation)
        if self._label is None:
            self._label = metrics.model_label(self._parsed.model, self._pattern)
        return Attempt(provider, suffix, body, self._parsed.model, self._label, translation)
