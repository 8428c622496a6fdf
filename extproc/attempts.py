"""Attempt planning: which backends one request may try, in which order, and what each attempt
sends (its one header set and body, from the provider's adapter)."""

from __future__ import annotations

from collections.abc import Mapping

from extproc import metrics
from extproc.api import Endpoint, ParsedRequest, bodyless_suffix
from extproc.routing import RouteMatch, order_backends
from extproc.runtime import Provider
from protos.spec import BackendSpec


class Attempt:
    """One backend chosen for this request, with what it sends."""

    __slots__ = ("body", "headers", "label", "model", "provider", "suffix")

    def __init__(self, provider: Provider, suffix: str, body: bytes | None, model: str = "", label: str = "") -> None:
        self.provider = provider
        self.suffix = suffix  # the endpoint on the provider, after its base path
        self.body = body  # None: the client's body is sent unchanged
        self.model = model  # the model the provider is asked for: what pricing looks up
        self.label = label  # the metrics' model label: always a name or glob from the config
        self.headers = provider.adapter.request_headers(suffix, body)

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
    or unhealthy circuits skipped; at most ``maxRetries + 1`` of them."""

    __slots__ = ("_endpoint", "_label", "_parsed", "_pattern", "pending", "skipped", "tried")

    def __init__(
        self, providers: Mapping[str, Provider], match: RouteMatch, endpoint: Endpoint, parsed: ParsedRequest
    ) -> None:
        self._endpoint = endpoint
        self._parsed = parsed
        self._pattern = match.pattern
        self._label: str | None = None
        self.tried: list[str] = []
        self.skipped: list[str] = []
        self.pending: list[tuple[Provider, BackendSpec]] = []
        budget = match.config.max_retries + 1
        for backend in order_backends(match.route.backends):
            provider = providers[backend.provider]
            if not provider.breaker.available():
                self.skipped.append(provider.name)
            elif len(self.pending) < budget:
                self.pending.append((provider, backend))

    def next(self) -> Attempt | None:
        """The next backend whose circuit lets a request through (a half-open one lets one
        trial through), or None when none is left."""
        while self.pending:
            provider, backend = self.pending.pop(0)
            if provider.breaker.acquire():
                self.tried.append(provider.name)
                return self._attempt(provider, backend)
            self.skipped.append(provider.name)
        return None

    def _attempt(self, provider: Provider, backend: BackendSpec) -> Attempt:
        adapter = provider.adapter
        body = adapter.request_body(self._parsed, backend.model)
        suffix = adapter.request_suffix(self._endpoint)
        if backend.model:
            return Attempt(provider, suffix, body, backend.model, backend.model)
        if self._label is None:
            self._label = metrics.model_label(self._parsed.model, self._pattern)
        return Attempt(provider, suffix, body, self._parsed.model, self._label)
