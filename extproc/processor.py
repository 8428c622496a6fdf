"""One processor per HTTP request, with one method per ext_proc phase.

Request body (or headers, for bodyless calls): parse the model, pick a backend, inject its
credential, rewrite host/path/model and clear the route cache, so Envoy sends the first attempt.
Response headers: on 5xx/429 (including Envoy's own 503/504 for refused connections and
timeouts) call the next backends directly and answer with an ImmediateResponse; when none can
answer, serve the cache or a 503. Response body: acknowledge each chunk at once, then feed a
copy to usage accounting and the cache.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from extproc import metrics
from extproc.api import (
    ApiSchema,
    Endpoint,
    ParsedRequest,
    Usage,
    bodyless_suffix,
    classify_path,
    encode_with_model,
    is_ai_endpoint,
    parse_body,
)
from extproc.attributes import RequestInfo, request_info
from extproc.auth import auth_header_dict, auth_headers
from extproc.cache import CachedResponse, ResponseCache, cache_key
from extproc.errors import (
    BodyTooLarge,
    ClientError,
    InternalError,
    MissingModel,
    NoProviderAvailable,
    NotConfigured,
    UnknownModel,
)
from extproc.routing import order_backends
from extproc.runtime import Provider, Runtime
from extproc.sse import SSEAssembler
from extproc.upstream import UpstreamClient, UpstreamResult
from protos import messages as m
from protos.spec import BackendSpec, HolySheepConfig

log = logging.getLogger(__name__)

PROVIDER_HEADER = "x-holysheep-provider"
CACHE_HEADER = "x-holysheep-cache"
MAX_REQUEST_BYTES = 8 << 20
_USAGE_TAIL = 16 << 10

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def is_failure(status: int) -> bool:
    return status >= 500 or status == 429


class Attempt:
    """One backend chosen for this request, with the body it needs."""

    __slots__ = ("backend", "body", "label", "model", "provider")

    def __init__(
        self, provider: Provider, backend: BackendSpec, model: str, body: bytes | None, label: str = ""
    ) -> None:
        self.provider = provider
        self.backend = backend
        self.model = model
        self.body = body  # None: the client's body is sent unchanged
        self.label = label  # the metrics' model label: always a name or glob from the config


class RequestProcessor:
    def __init__(self, runtime: Runtime | None, upstream: UpstreamClient, spawn: Spawn) -> None:
        self.rt = runtime
        self.upstream = upstream
        self.spawn = spawn
        self.info = RequestInfo()
        self.config: HolySheepConfig | None = None
        self.endpoint: Endpoint | None = None
        self.parsed: ParsedRequest | None = None
        self.raw_body = b""
        self.attempt: Attempt | None = None
        self.pending: list[Attempt] = []
        self.skipped: list[str] = []
        self.tried: list[str] = []
        self.started = 0.0
        self.answered = False
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._tail = b""

    # --- request phases -------------------------------------------------------------------

    def on_request_body(self, req: m.ProcessingRequest) -> m.ProcessingResponse | None:
        """Returns None when the answer needs I/O (cache lookup); call ``resolve`` then."""
        try:
            return self._route_body(req)
        except ClientError as err:
            return self._error(err)

    def _route_body(self, req: m.ProcessingRequest) -> m.ProcessingResponse | None:
        if self.rt is None:
            raise NotConfigured()
        body = req.request_body.body
        if len(body) > MAX_REQUEST_BYTES:
            raise BodyTooLarge(len(body), MAX_REQUEST_BYTES)
        self.raw_body = body
        self.endpoint = classify_path(self.info.path)
        self.parsed = parse_body(body)
        match = self.rt.routes.match(self.parsed.model)
        if match is None:
            raise UnknownModel(self.parsed.model)
        self.config = match.config
        self._plan(order_backends(match.route.backends), match.pattern)
        if self._cache().spec.mode == "Always":
            return None  # resolved asynchronously: the cache may answer before any provider
        return self._first_attempt()  # None when no backend can be tried: resolve() falls back

    async def resolve(self) -> m.ProcessingResponse:
        """The async part of the request-body phase: an ``Always``-mode lookup, or the fallback
        (memory and Redis) when every backend is open or unhealthy."""
        try:
            if self._cache().spec.mode == "Always":
                hit = await self._cache().get(self._cache_key())
                if hit is not None:
                    metrics.CACHE_EVENTS.labels("hit").inc()
                    return self._from_cache(hit, "hit")
                metrics.CACHE_EVENTS.labels("miss").inc()
            return self._first_attempt() or await self._exhausted()
        except ClientError as err:
            return self._error(err)

    def _plan(self, backends: list[BackendSpec], pattern: str) -> None:
        assert self.rt is not None and self.parsed is not None and self.config is not None
        budget = self.config.max_retries + 1
        plan: list[Attempt] = []
        for backend in backends:
            provider = self.rt.providers[backend.provider]
            if not provider.breaker.available():
                self.skipped.append(provider.name)
                continue
            if len(plan) < budget:
                model = backend.model or self.parsed.model
                body = encode_with_model(self.parsed, model) if backend.model else None
                label = backend.model or metrics.model_label(self.parsed.model, pattern)
                plan.append(Attempt(provider, backend, model, body, label))
        self.pending = plan

    def _next_attempt(self) -> Attempt | None:
        while self.pending:
            attempt = self.pending.pop(0)
            if attempt.provider.breaker.acquire():
                return attempt
            self.skipped.append(attempt.provider.name)
        return None

    def _first_attempt(self) -> m.ProcessingResponse | None:
        assert self.endpoint is not None and self.parsed is not None
        attempt = self._next_attempt()
        if attempt is None:
            return None
        self.attempt = attempt
        self.tried.append(attempt.provider.name)
        provider = attempt.provider
        credential = self.rt.credentials.get(provider.spec.auth) if self.rt else None
        headers = [
            (":authority", provider.spec.authority.encode()),
            (":path", provider.spec.base_path.encode() + self.endpoint.suffix.encode("latin-1")),
        ]
        if credential is not None:
            headers += auth_headers(provider.spec.auth, credential)
        if attempt.body is not None:
            headers.append(("content-length", str(len(attempt.body)).encode()))
        self.started = time.monotonic()
        return m.request_body_response(headers, provider.remove_headers, attempt.body, None)

    def on_request_headers(self, req: m.ProcessingRequest) -> m.ProcessingResponse:
        """Remember path, host and caller; bodyless calls (GET /models) are routed right here."""
        if self.rt is None:
            return self._error(NotConfigured())
        self.info = request_info(req, self.rt.tenant_header)
        if not req.request_headers.end_of_stream:
            return m.CONTINUE_REQUEST_HEADERS  # the body's answer carries the mutations
        if self.info.method == "POST" and is_ai_endpoint(self.info.path):
            # No body phase will follow: answer here what the body phase would have.
            return self._error(MissingModel("The request has no body; a JSON object with a model is required"))
        host = self.info.host
        provider = self.rt.by_authority.get(host) or self.rt.by_authority.get(host.partition(":")[0])
        if provider is None:
            if len(self.rt.providers) != 1:
                return m.CONTINUE_REQUEST_HEADERS
            provider = next(iter(self.rt.providers.values()))
        # Header text is latin-1-decoded bytes (protos.messages.headers_to_dict): encode it back
        # the same way, so a client's query bytes reach the provider unchanged.
        suffix = bodyless_suffix(self.info.path, provider.spec.base_path).encode("latin-1")
        set_headers = [
            (":authority", provider.spec.authority.encode()),
            (":path", provider.spec.base_path.encode() + suffix),
        ]
        credential = self.rt.credentials.get(provider.spec.auth)
        if credential is not None:
            set_headers += auth_headers(provider.spec.auth, credential)
        self.attempt = Attempt(provider, BackendSpec(provider.name), "", None)
        self.tried.append(provider.name)
        self.started = time.monotonic()
        return m.request_headers_response(set_headers, provider.remove_headers, None)

    # --- response phases ------------------------------------------------------------------

    def on_response_headers(self, req: m.ProcessingRequest) -> m.ProcessingResponse | None:
        """Returns None when the upstream failed and failover (I/O) is needed: call ``failover``."""
        attempt = self.attempt
        if attempt is None:
            return m.CONTINUE_RESPONSE_HEADERS
        status = _status(req.response_headers)
        provider = attempt.provider
        metrics.UPSTREAM_LATENCY.labels(provider.name).observe(time.monotonic() - self.started)
        if is_failure(status):
            provider.breaker.record_failure()
            metrics.REQUESTS.labels(provider.name, attempt.label, str(status)).inc()
            if self.parsed is None:  # bodyless call: nothing to fail over with
                return m.response_headers_response([(PROVIDER_HEADER, provider.name.encode())])
            return None
        provider.breaker.record_success()
        self.answered = True
        self._count_request(provider, attempt.label, status)
        # Only now is the body worth asking for: usage and the cache need a successful answer.
        mode = m.STREAMED_RESPONSE if self.parsed is not None else None
        return m.response_headers_response([(PROVIDER_HEADER, provider.name.encode())], mode)

    async def failover(self) -> m.ProcessingResponse:
        try:
            return await self._failover()
        except ClientError as err:
            return self._error(err)
        except Exception:
            log.exception("failover failed")
            return self._error(InternalError())

    async def _failover(self) -> m.ProcessingResponse:
        assert self.attempt is not None and self.endpoint is not None
        failed = self.attempt.provider.name
        while (attempt := self._next_attempt()) is not None:
            self.tried.append(attempt.provider.name)
            result = await self._call(attempt)
            if result.failed:
                attempt.provider.breaker.record_failure()
                metrics.REQUESTS.labels(attempt.provider.name, attempt.label, str(result.status)).inc()
                continue
            attempt.provider.breaker.record_success()
            metrics.FAILOVERS.labels(failed, attempt.provider.name).inc()
            self.attempt = attempt
            self.answered = True
            self._count_request(attempt.provider, attempt.label, result.status)
            if result.status < 300:
                self._account(result.body, result.status, result.content_type)
            headers = [(k, v.encode("latin-1")) for k, v in result.headers]
            headers.append((PROVIDER_HEADER, attempt.provider.name.encode()))
            return m.immediate_response(result.status, headers, result.body, "holysheep_failover")
        return await self._exhausted()

    async def _call(self, attempt: Attempt) -> UpstreamResult:
        assert self.endpoint is not None and self.rt is not None
        provider = attempt.provider
        accept = "text/event-stream" if self._streaming else "application/json"
        headers = {"content-type": "application/json", "accept": accept}
        headers.update(auth_header_dict(provider.spec.auth, self.rt.credentials.get(provider.spec.auth)))
        url = provider.spec.base_url.rstrip("/") + self.endpoint.suffix
        body = attempt.body if attempt.body is not None else self.raw_body
        result = await self.upstream.request("POST", url, headers, body, provider.timeout)
        metrics.UPSTREAM_LATENCY.labels(provider.name).observe(result.latency)
        return result

    def after_response_body(self, req: m.ProcessingRequest) -> None:
        """Runs after the chunk was acknowledged, so it never delays the client."""
        chunk = req.response_body.body
        if chunk:
            self._size += len(chunk)
            limit = self.config.cache.max_entry_bytes if self.config is not None else 0
            if self._chunks is not None and self._size <= limit:
                self._chunks.append(chunk)
            else:
                # Too large to cache: keep only the tail, where a stream's usage event lives.
                if self._chunks:
                    self._tail = b"".join(self._chunks)
                self._chunks = None
                self._tail = (self._tail + chunk)[-_USAGE_TAIL:]
        if req.response_body.end_of_stream and self.attempt is not None and self.answered:
            cacheable = self._chunks is not None
            body = b"".join(self._chunks) if self._chunks is not None else self._tail
            content_type = "text/event-stream" if self._streaming else "application/json"
            self._account(body, 200, content_type, cacheable=cacheable)

    # --- accounting and cache -------------------------------------------------------------

    @property
    def _streaming(self) -> bool:
        return self.parsed is not None and self.parsed.stream

    def _count_request(self, provider: Provider, model: str, status: int) -> None:
        metrics.REQUESTS.labels(provider.name, model, str(status)).inc()
        if self.info.workload:
            metrics.WORKLOAD_REQUESTS.labels(self.info.workload_namespace, self.info.workload).inc()

    def _account(self, body: bytes, status: int, content_type: str, cacheable: bool = True) -> None:
        """Usage, cost and cache store for a successful answer."""
        attempt, config = self.attempt, self.config
        if attempt is None or config is None or self.endpoint is None:
            return
        usage, complete = _usage(body, self.endpoint.schema, self._streaming)
        if usage is not None:
            self._record_usage(attempt, config, usage)
        cache = self._cache()
        if cacheable and complete and cache.enabled and body and status < 300:
            self.spawn(cache.put(self._cache_key(), CachedResponse(status, content_type, body)))

    def _record_usage(self, attempt: Attempt, config: HolySheepConfig, usage: Usage) -> None:
        assert self.rt is not None
        name, model = attempt.provider.name, attempt.label
        metrics.TOKENS.labels(name, model, "input").inc(usage.input_tokens)
        metrics.TOKENS.labels(name, model, "output").inc(usage.output_tokens)
        cost = self.rt.pricing_for(config).cost(attempt.model, usage.input_tokens, usage.output_tokens)
        if cost:
            metrics.COST.labels(name, model).inc(cost)
        if self.info.workload:
            ns, wl = self.info.workload_namespace, self.info.workload
            metrics.WORKLOAD_TOKENS.labels(ns, wl, model, "input").inc(usage.input_tokens)
            metrics.WORKLOAD_TOKENS.labels(ns, wl, model, "output").inc(usage.output_tokens)
            if cost:
                metrics.WORKLOAD_COST.labels(ns, wl, model).inc(cost)

    def _cache(self) -> ResponseCache:
        assert self.rt is not None and self.config is not None
        return self.rt.cache_for(self.config)

    def _cache_key(self) -> str:
        assert self.parsed is not None and self.endpoint is not None
        return cache_key(self.info.tenant, self.endpoint.suffix, self.parsed.payload)

    def _from_cache(self, hit: CachedResponse, how: str) -> m.ProcessingResponse:
        headers = [("content-type", hit.content_type.encode()), (CACHE_HEADER, how.encode())]
        return m.immediate_response(hit.status, headers, hit.body, f"holysheep_cache_{how}")

    async def _exhausted(self) -> m.ProcessingResponse:
        if self._cache().enabled:
            hit = await self._cache().get(self._cache_key())
            if hit is not None:
                metrics.CACHE_EVENTS.labels("fallback").inc()
                return self._from_cache(hit, "fallback")
        return self._error(NoProviderAvailable(self.parsed.model if self.parsed else "", self.tried, self.skipped))

    def _error(self, err: ClientError) -> m.ProcessingResponse:
        metrics.ERRORS.labels(err.code).inc()
        self.attempt = None
        headers = [("content-type", b"application/json")]
        return m.immediate_response(err.status, headers, err.body, f"holysheep_{err.code}")


def _status(headers: Any) -> int:
    for h in headers.headers.headers:
        if h.key == ":status":
            try:
                return int(h.raw_value or h.value)
            except ValueError:
                return 502
    return 502


def _usage(body: bytes, schema: ApiSchema, streaming: bool) -> tuple[Usage | None, bool]:
    """Usage from a JSON answer or the last SSE event that carries one; and whether it is whole."""
    if not streaming:
        try:
            return schema.usage(json.loads(body)), True
        except ValueError:
            return None, False
    sse = SSEAssembler()
    sse.feed(body)
    usage: Usage | None = None
    for event in sse.json_events():
        found = schema.usage(event)
        if found is not None:
            usage = Usage(max(found.input_tokens, usage.input_tokens if usage else 0),
                          max(found.output_tokens, usage.output_tokens if usage else 0))
    return usage, sse.complete
