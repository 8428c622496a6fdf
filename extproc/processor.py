"""One processor per HTTP request, with one method per ext_proc phase, in the order Envoy calls
them. Each returns its answer: a ``ProcessingResponse`` when it is known at once (the hot path,
no coroutine), an awaitable when it needs I/O (a cache lookup, failover calls).

Request headers: remember the request and its caller, refuse a caller in the scope of no
config; a bodyless call (GET /models) is routed here. Request body: parse the model, match a
route among the configs in the caller's scope, plan the attempts and send the first through
Envoy (its header set and body come from the provider's adapter). Response headers: on 5xx/429
(including Envoy's own 503/504 for refused connections and timeouts) call the next backends
directly and answer with an ImmediateResponse; when none can answer, serve the cache or a 503.
Response body: acknowledge each chunk at once; a copy feeds usage accounting and the cache
after the ack (``after_response_body``), settled in batches (extproc/settlements.py).

Authorization (extproc/authz.py): a caller only ever reaches configs in its scope; what it may
not use raises ``authz.Denied``, which ends the stream with PERMISSION_DENIED (service.py), so
Envoy fails the request closed.

Budgets (extproc/budgets.py): right after the route match, the config's budgets admit the
authenticated caller or refuse it with a 429 (no provider sees it); every answer of a budgeted
route carries OpenAI's x-ratelimit-* headers, and the usage is charged when it is settled.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeAlias

from extproc import authz, metrics, settlements
from extproc.accounting import Ledger, ResponseCopy, count_answer, count_failure
from extproc.api import Endpoint, ParsedRequest, classify_path, is_ai_endpoint, parse_body
from extproc.attempts import Attempt, AttemptPlan, bodyless_attempt
from extproc.attributes import RequestInfo, request_info
from extproc.budgets import BudgetEngine
from extproc.cache import CachedResponse
from extproc.errors import BodyTooLarge, ClientError, MissingModel, NoProviderAvailable, NotConfigured, UnknownModel
from extproc.identity import ANONYMOUS, Caller, Identify, caller_from_node_metadata
from extproc.routing import RouteMatch
from extproc.runtime import Provider, Runtime
from extproc.upstream import UpstreamClient, UpstreamResult, is_failure
from protos import messages as m

log = logging.getLogger(__name__)

PROVIDER_HEADER = "x-holysheep-provider"
CACHE_HEADER = "x-holysheep-cache"
MAX_REQUEST_BYTES = 8 << 20

Spawn = Callable[[Coroutine[Any, Any, None]], None]

# A phase's answer: ready now, or (only where I/O is needed) to be awaited.
Answer: TypeAlias = "m.ProcessingResponse | Awaitable[m.ProcessingResponse]"


class Processor(Protocol):
    """What service.py drives, one instance per ext_proc stream (one HTTP request)."""

    def request_headers(self, req: m.ProcessingRequest) -> Answer: ...
    def request_body(self, req: m.ProcessingRequest) -> Answer: ...
    def response_headers(self, req: m.ProcessingRequest) -> Answer: ...
    def response_body(self, req: m.ProcessingRequest) -> Answer: ...

    def after_response_headers(self) -> None:
        """Runs once the response headers' answer is handed to gRPC, so it never delays the
        client's first byte."""

    def after_response_body(self, req: m.ProcessingRequest) -> None:
        """Runs once the chunk's answer is handed to gRPC, so it never delays the client."""

    def stream_ended(self) -> None:
        """The stream is over, however it ended (a reset or cancel included): settle an answer
        whose last chunk never came."""

    def reject(self, err: ClientError) -> m.ProcessingResponse:
        """The OpenAI-style error answer that ends the request."""


class RequestProcessor:
    __slots__ = ("answer_status", "attempt", "caller", "copy", "endpoint", "identify", "info", "ledger",
                 "parsed", "plan", "rate_headers", "raw_body", "root_namespace", "rt", "spawn", "started", "success",
                 "upstream")

    def __init__(
        self, runtime: Runtime | None, upstream: UpstreamClient, spawn: Spawn,
        identify: Identify = caller_from_node_metadata,
        root_namespace: str = authz.DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.rt = runtime
        self.upstream = upstream
        self.spawn = spawn
        # service.py hands over the stream's authenticated identify (identity.authenticated_caller);
        # the default, nothing authenticated, is the insecure dev mode's (and the unit tests').
        self.identify = identify
        self.root_namespace = root_namespace
        self.info = _NO_INFO
        self.caller: Caller = ANONYMOUS
        # Set by the body phase; None for a bodyless call.
        self.endpoint: Endpoint | None = None
        self.parsed: ParsedRequest | None = None
        self.raw_body = b""
        self.plan: AttemptPlan | None = None
        self.ledger: Ledger | None = None
        # The attempt whose answer is awaited (None once the request is answered by us).
        self.attempt: Attempt | None = None
        self.started = 0.0
        self.copy: ResponseCopy | None = None
        self.answer_status = 200  # the provider's status of the answer the body phase passes on
        # (attempt, upstream latency histogram, seconds): a passed-on success not yet recorded
        # (after_response_headers). Its own attempt: reject() lets go of self.attempt.
        self.success: tuple[Attempt, Any, float] | None = None
        # OpenAI's x-ratelimit-* headers of the tightest budgets, on every answer of a budgeted route.
        self.rate_headers: list[tuple[str, bytes]] = []

    # --- request phases -------------------------------------------------------------------

    def request_headers(self, req: m.ProcessingRequest) -> m.ProcessingResponse:
        """Remember path, host and caller; bodyless calls (GET /models) are routed right here."""
        rt = self.rt
        if rt is None:
            return self.reject(NotConfigured())
        headers = req.request_headers  # each access builds a wrapper: once
        self.info = request_info(headers)
        self.caller = self.identify(req, self.info, rt.tenant_header)
        identity = self.caller.identity
        if identity is not None:
            reason = rt.scope_denial(identity, self.root_namespace)
            if reason is not None:
                raise authz.Denied(reason, f"{identity} is in the scope of no HolySheepConfig served here")
        if not headers.end_of_stream:
            return m.CONTINUE_REQUEST_HEADERS  # the body's answer carries the mutations
        if self.info.method == "POST" and is_ai_endpoint(self.info.path):
            # No body phase will follow: answer here what the body phase would have.
            return self.reject(MissingModel("The request has no body; a JSON object with a model is required"))
        provider = self._bodyless_provider(rt)
        if provider is None:
            return m.CONTINUE_REQUEST_HEADERS  # not a provider's host: not ours to touch
        attempt = bodyless_attempt(provider, self.info.path)
        self._send(attempt)
        return m.request_headers_response(attempt.headers, provider.remove_headers, None)

    def request_body(self, req: m.ProcessingRequest) -> Answer:
        try:
            match = self._route(req.request_body.body)
        except ClientError as err:
            return self.reject(err)
        # The config is known from here on, and the caller is in its scope (_route).
        budgets = self._plan(match)
        if budgets is not None:
            return self._admit(budgets)  # a 429 before any provider sees the request
        return self._proceed()

    def _proceed(self) -> Answer:
        assert self.ledger is not None
        if self.ledger.cache.spec.mode == "Always":
            return self._cached_or_first()  # the cache may answer before any provider
        first = self._first_attempt()
        return first if first is not None else self._exhausted()

    async def _admit(self, budgets: BudgetEngine) -> m.ProcessingResponse:
        """The config's budgets admit the request or refuse it (extproc/budgets.py), for the
        authenticated caller only: without an identity (the insecure dev mode) the caller is
        the anonymous one, namespace and service account "", whatever its metadata says."""
        identity = self.caller.identity
        namespace, service_account = (identity.namespace, identity.service_account) if identity else ("", "")
        admission = await budgets.admit(namespace, service_account)
        if admission is not None:
            self.rate_headers = [(k, v.encode()) for k, v in admission.headers()]
            if admission.refusal is not None:
                return self.reject(admission.refusal.error())
            assert self.ledger is not None
            self.ledger.spend = functools.partial(budgets.record_usage, admission)
        answer = self._proceed()
        return answer if isinstance(answer, m.ProcessingResponse) else await answer

    def _route(self, body: bytes) -> RouteMatch:
        """Parse the body and match its model's route. Raises ClientError."""
        if self.rt is None:
            raise NotConfigured()
        if len(body) > MAX_REQUEST_BYTES:
            raise BodyTooLarge(len(body), MAX_REQUEST_BYTES)
        self.raw_body = body
        self.endpoint = classify_path(self.info.path)
        self.parsed = parse_body(body)
        match = self._match(self.rt, self.parsed.model)
        if match is None:
            raise UnknownModel(self.parsed.model)
        return match

    def _match(self, rt: Runtime, model: str) -> RouteMatch | None:
        """The first route for ``model`` among the configs in the caller's scope: a config the
        caller may not use is skipped, so it neither serves nor shadows another config's route.
        Raises authz.Denied when routes exist for the model but none in scope."""
        identity = self.caller.identity
        if identity is None:  # --insecure-no-identity: every config
            return rt.routes.match(model)
        return rt.route_in_scope(identity, model, self.root_namespace)

    def _bodyless_provider(self, rt: Runtime) -> Provider | None:
        """The provider a bodyless call goes to: by host, among the configs in the caller's scope."""
        identity = self.caller.identity
        if identity is None:  # --insecure-no-identity: every config
            return rt.provider_for_host(self.info.host)
        return authz.first_in_scope(identity, rt.providers_for_host(self.info.host),
                                    f"called {self.info.host[:100]!r}, whose provider", self.root_namespace)

    def _plan(self, match: RouteMatch) -> BudgetEngine | None:
        """The attempts and the accounting of the request; returns the config's budgets."""
        rt, endpoint, parsed = self.rt, self.endpoint, self.parsed
        assert rt is not None and endpoint is not None and parsed is not None
        served = rt.served(match.config)
        self.plan = AttemptPlan(rt.providers, match, endpoint, parsed)
        self.ledger = Ledger(self.caller, endpoint, parsed, served.pricing, served.cache, self.spawn)
        return served.budgets

    async def _cached_or_first(self) -> m.ProcessingResponse:
        assert self.ledger is not None
        hit = await self.ledger.lookup("hit")
        if hit is not None:
            return _from_cache(hit, "hit", self.rate_headers)
        first = self._first_attempt()
        return first if first is not None else await self._exhausted()

    def _first_attempt(self) -> m.ProcessingResponse | None:
        """The first attempt goes through Envoy; None when no backend can be tried. When every
        backend refused the request (a field its API cannot express), that 400, not a 503."""
        assert self.plan is not None
        attempt = self.plan.next()
        if attempt is None:
            refusal = self.plan.refusal
            return self.reject(refusal) if refusal is not None else None
        self._send(attempt)
        shared = attempt.passthrough
        if shared is not None:  # the client's body goes on unchanged: one answer per header set
            if shared.answer is None:
                shared.answer = m.request_body_response(attempt.headers, attempt.provider.remove_headers, None, None)
            return shared.answer
        return m.request_body_response(attempt.headers, attempt.provider.remove_headers, attempt.body, None)

    def _send(self, attempt: Attempt) -> None:
        self.attempt = attempt
        self.started = time.monotonic()

    # --- response phases ------------------------------------------------------------------

    def response_headers(self, req: m.ProcessingRequest) -> Answer:
        attempt = self.attempt
        if attempt is None:
            return m.CONTINUE_RESPONSE_HEADERS
        status = _status(req.response_headers)
        provider_header, passed_on, latency = _provider_answer(attempt.provider.name)
        elapsed = time.monotonic() - self.started
        if is_failure(status):
            # Counts no answer waits for go to the batch after the answers (extproc/settlements.py).
            settlements.later(0, latency.observe, elapsed)
            self._failed(attempt, status)
            if self.parsed is None:  # bodyless call: nothing to fail over with
                return m.response_headers_response(provider_header)
            return self._failover()
        # The success's breaker and counts wait for after_response_headers: nothing in the
        # answer depends on them, and the client's first byte waits for the answer.
        self.answer_status = status
        self.success = (attempt, latency, elapsed)
        if self.parsed is None:
            return m.response_headers_response(provider_header)
        # Only now is the body worth asking for: usage and the cache need a successful answer.
        assert self.ledger is not None
        self.copy = ResponseCopy(self.ledger.cache.spec.max_entry_bytes)
        if attempt.translation is not None:  # the answer goes back in the client's API (translated.py)
            return attempt.translation.response_headers([*provider_header, *self.rate_headers], status)
        if not self.rate_headers:  # the same answer for every request to this provider: shared
            return passed_on
        # A budgeted route: the shared answer plus this request's x-ratelimit-* figures.
        return m.response_headers_with(provider_header, self.rate_headers, m.STREAMED_RESPONSE)

    async def _failover(self) -> m.ProcessingResponse:
        assert self.attempt is not None and self.plan is not None and self.ledger is not None
        failed = self.attempt.provider.name
        while (attempt := self.plan.next()) is not None:
            result = await self._call(attempt)
            if result.failed:
                self._failed(attempt, result.status)
                continue
            self._succeeded(attempt, result.status)
            metrics.FAILOVERS.labels(failed, attempt.provider.name).inc()
            translation = attempt.translation
            if translation is not None:  # in the client's API, counted as the translator read it
                result = translation.result(result)
            if result.status < 300:
                counted = translation.counted if translation is not None else None
                self.ledger.settle_later(attempt, result.body, result.status, result.content_type, counted=counted)
            ours = {k for k, _ in self.rate_headers}  # the budget's figures, not the provider's own
            headers = [(k, v.encode("latin-1")) for k, v in result.headers if k.lower() not in ours]
            headers += [(PROVIDER_HEADER, attempt.provider.name.encode()), *self.rate_headers]
            return m.immediate_response(result.status, headers, result.body, "holysheep_failover")
        return await self._exhausted()

    async def _call(self, attempt: Attempt) -> UpstreamResult:
        provider = attempt.provider
        headers = attempt.call_headers("text/event-stream" if self._streaming else "application/json")
        body = attempt.body if attempt.body is not None else self.raw_body
        url = provider.adapter.url(attempt.suffix)
        result = await self.upstream.request("POST", url, headers, body, provider.timeout)
        metrics.UPSTREAM_LATENCY.labels(provider.name).observe(result.latency)
        return result

    def after_response_headers(self) -> None:
        """The passed-on success of ``response_headers``, recorded once its answer is handed to
        gRPC (service.py): the breaker's success, the upstream latency and the answer's count,
        in the batch before this answer's settle (the queue keeps its order). Exactly once:
        stream_ended calls it too, for a stream that ended before the answer was written."""
        success = self.success
        if success is None:
            return
        self.success = None
        attempt, latency, elapsed = success
        attempt.provider.breaker.record_success()
        settlements.later(0, _count_passed_on, attempt, self.answer_status, self.caller, latency, elapsed)

    def _failed(self, attempt: Attempt, status: int) -> None:
        attempt.provider.breaker.record_failure()
        count_failure(attempt, status)

    def _succeeded(self, attempt: Attempt, status: int) -> None:
        attempt.provider.breaker.record_success()
        self.attempt = attempt
        # In the batch, before this answer's settle (the queue keeps its order), which counts its
        # usage on the series count_answer resolves.
        settlements.later(0, count_answer, attempt, status, self.caller)

    def response_body(self, req: m.ProcessingRequest) -> m.ProcessingResponse:
        attempt, copy = self.attempt, self.copy
        if attempt is None or attempt.translation is None or copy is None:
            # Passed through unchanged; the copy is taken after the ack (after_response_body).
            return m.CONTINUE_RESPONSE_BODY
        # Translated: the chunk becomes the client's bytes now, and those are what the copy keeps.
        body = req.response_body
        out = attempt.translation.body(body.body, body.end_of_stream)
        if out:
            copy.feed(out)
        return m.response_body_response(out)

    def after_response_body(self, req: m.ProcessingRequest) -> None:
        copy = self.copy
        if copy is None:
            return
        attempt = self.attempt
        translation = attempt.translation if attempt is not None else None
        body = req.response_body
        chunk = body.body
        if chunk and translation is None:  # a translated answer was copied as the client got it
            copy.feed(chunk)
        if body.end_of_stream:
            self._settle_copy(whole=copy.whole)

    def stream_ended(self) -> None:
        """A successful answer whose stream ended before its last chunk (the client went away
        after the usage and [DONE]: Envoy resets the stream before the end of the body reaches
        us) is settled with what was read: its usage is counted and charged, as the provider
        charges it, and a partial answer is never cached. Without this, a client that hung up
        right after [DONE] was never charged. A passed-on success whose answer was never
        written (the stream ended first) is recorded here, before that settle."""
        if self.success is not None:
            self.after_response_headers()
        if self.copy is not None:
            self._settle_copy(whole=False)

    def _settle_copy(self, whole: bool) -> None:
        """Settle the copied answer once (the copy is let go)."""
        copy, attempt, ledger = self.copy, self.attempt, self.ledger
        self.copy = None
        if copy is None or attempt is None or ledger is None:
            return
        translation = attempt.translation
        content_type = "text/event-stream" if ledger.parsed.stream else "application/json"
        counted = translation.counted if translation is not None else None
        ledger.settle_later(attempt, copy.body, self.answer_status, content_type, whole=whole, counted=counted)

    # --- answers of our own ---------------------------------------------------------------

    @property
    def _streaming(self) -> bool:
        return self.parsed is not None and self.parsed.stream

    async def _exhausted(self) -> m.ProcessingResponse:
        """No backend answered: the cached answer, when there is one, else a 503."""
        assert self.ledger is not None and self.plan is not None
        if self.ledger.cache.enabled:
            hit = await self.ledger.lookup("fallback")
            if hit is not None:
                return _from_cache(hit, "fallback", self.rate_headers)
        model = self.parsed.model if self.parsed else ""
        return self.reject(NoProviderAvailable(model, self.plan.tried, self.plan.skipped))

    def reject(self, err: ClientError) -> m.ProcessingResponse:
        metrics.ERRORS.labels(err.code).inc()
        self.attempt = None
        headers = [("content-type", b"application/json"), *((k, v.encode()) for k, v in err.headers),
                   *self.rate_headers]
        return m.immediate_response(err.status, headers, err.body, f"holysheep_{err.code}")


_NO_INFO = RequestInfo("/", "", "POST")  # before the request-headers message: nothing to read

# Per provider name: its x-holysheep-provider header, the shared answer that passes its
# successful answer on (the body STREAMED for usage and the cache), and its latency histogram.
# Names come from configs.
_provider_answers: dict[str, tuple[m.HeaderList, m.ProcessingResponse, Any]] = {}


def _provider_answer(name: str) -> tuple[m.HeaderList, m.ProcessingResponse, Any]:
    found = _provider_answers.get(name)
    if found is None:
        header = ((PROVIDER_HEADER, name.encode()),)
        found = (header, m.shared_response_headers_response(header, m.STREAMED_RESPONSE),
                 metrics.UPSTREAM_LATENCY.labels(name))
        if len(_provider_answers) < 1024:
            _provider_answers[name] = found
    return found


def _count_passed_on(attempt: Attempt, status: int, caller: Caller, latency: Any, elapsed: float) -> None:
    """A passed-on success's answer count and upstream latency: one queued call for both."""
    count_answer(attempt, status, caller)
    latency.observe(elapsed)


def _from_cache(hit: CachedResponse, how: str, extra: m.HeaderList = ()) -> m.ProcessingResponse:
    headers = [("content-type", hit.content_type.encode()), (CACHE_HEADER, how.encode()), *extra]
    return m.immediate_response(hit.status, headers, hit.body, f"holysheep_cache_{how}")


def _status(headers: Any) -> int:
    for h in headers.headers.headers:
        if h.key == ":status":
            try:
                return int(h.raw_value or h.value)
            except ValueError:
                return 502
    return 502
