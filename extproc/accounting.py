"""What a request is counted as and leaves behind: request, token and cost metrics per provider
and per calling workload, and the cache's copy of a successful answer.

Usage is read from the answer (a JSON body, or a stream's SSE events) once it is complete; for
a streamed answer that is after the last chunk's ack (service.py), so none of this delays a
client.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from extproc import jsoncodec, metrics, settlements
from extproc.api import ApiSchema, Endpoint, ParsedRequest, Usage
from extproc.attempts import Attempt
from extproc.cache import CachedResponse, ResponseCache, cache_key
from extproc.identity import Caller
from extproc.runtime import Pricing
from extproc.sse import events_with
from extproc.upstream import MAX_RESPONSE_BYTES

# Past the cache's entry limit only this much of a streamed answer is kept: its end, where a
# stream's usage event lives.
USAGE_TAIL = 16 << 10

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def count_answer(attempt: Attempt, status: int, caller: Caller) -> None:
    """A provider answered (successfully, or with a client error); the attempt keeps the series
    its usage goes to."""
    series = attempt.series = metrics.answer_series(attempt.provider.name, attempt.label, str(status),
                                                    caller.labels if caller.workload else None)
    series.answered()


def count_failure(attempt: Attempt, status: int) -> None:
    """A provider failed (upstream.is_failure); the request moves on to the next backend."""
    metrics.REQUESTS.labels(attempt.provider.name, attempt.label, str(status)).inc()


def usage_of(body: bytes, schema: ApiSchema, streaming: bool) -> tuple[Usage | None, bool]:
    """Usage from a JSON answer or the last SSE event that carries one; and whether it is whole."""
    if not streaming:
        try:
            return schema.usage(jsoncodec.loads_for_reading(body)), True
        except ValueError:
            return None, False
    events, complete = events_with(body, b"usage")  # an event without the key carries no usage
    usage: Usage | None = None
    for event in events:
        found = schema.usage(event)
        if found is not None:
            usage = Usage(max(found.input_tokens, usage.input_tokens if usage else 0),
                          max(found.output_tokens, usage.output_tokens if usage else 0))
    return usage, complete


class ResponseCopy:
    """A streamed answer's chunks, copied for usage and the cache.

    Usage needs the whole answer (a JSON body parses only whole; an Anthropic stream reports its
    input tokens in its first event), whatever the cache may keep: so every chunk is kept up to
    the bound the failover path reads answers to (``upstream.MAX_RESPONSE_BYTES``), past it only
    the tail, where an OpenAI stream's usage event lives. The cache takes the copy only when it
    fits its own entry limit. (Bounding the copy by the cache's limit let an answer larger than
    ``maxEntryBytes`` go uncharged by token and cost budgets.)"""

    __slots__ = ("_cache_limit", "_chunks", "_size", "_tail")

    def __init__(self, cache_limit: int) -> None:
        self._cache_limit = cache_limit
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._chunks is not None and self._size <= MAX_RESPONSE_BYTES:
            self._chunks.append(chunk)
            return
        if self._chunks:
            self._tail = b"".join(self._chunks)
        self._chunks = None
        self._tail = (self._tail + chunk)[-USAGE_TAIL:]

    @property
    def whole(self) -> bool:
        """Whether every chunk was kept and the answer fits the cache's entry limit."""
        return self._chunks is not None and self._size <= self._cache_limit

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks) if self._chunks is not None else self._tail


@dataclass(slots=True)
class Ledger:
    """The accounting of one routed request: its caller, its config's prices and cache."""

    caller: Caller
    endpoint: Endpoint
    parsed: ParsedRequest
    pricing: Pricing
    cache: ResponseCache
    spawn: Spawn
    _key: str | None = None
    # Charges the budgets the request was admitted under: (tokens, cost in USD); None when no
    # budget applies (extproc/budgets.py BudgetEngine.record_usage).
    spend: Callable[[int, float], None] | None = None

    @property
    def key(self) -> str:
        """The cache key: the caller's scope, the endpoint and the canonical body, never the
        credential. Computed at most once, and only when the cache is used."""
        if self._key is None:
            self._key = cache_key(self.caller.tenant, self.endpoint.suffix, self.parsed.payload, self.parsed.strict)
        return self._key

    async def lookup(self, event: Literal["hit", "fallback"]) -> CachedResponse | None:
        """The cached answer, counted as `event` when found; an Always-mode lookup ("hit") that
        finds nothing counts as a miss."""
        if self.cache.spec.mode != "Always":
            # The answers batched since are in the cache too. (An Always-mode cache settles at
            # once, so nothing pending is its: no other config's batch runs on its hot path.)
            settlements.flush()
        found = await self.cache.get(self.key)
        if found is not None:
            metrics.CACHE_EVENTS.labels(event).inc()
        elif event == "hit":
            metrics.CACHE_EVENTS.labels("miss").inc()
        return found

    def settle_later(self, attempt: Attempt, body: bytes, status: int, content_type: str, whole: bool = True,
                     counted: tuple[Usage | None, bool] | None = None) -> None:
        """``settle`` in the next batch (extproc/settlements.py: once the answer is sent, nothing
        waits for it). At once where the next request may need it: on a budgeted route, whose
        budgets must be charged before the next request is admitted, and in Always mode, where
        the same request right after must be a hit (a lookup runs the batch first, but then on
        the next request's critical path)."""
        if self.spend is not None or self.cache.spec.mode == "Always":
            self.settle(attempt, body, status, content_type, whole, counted)
        else:
            settlements.later(len(body), self.settle, attempt, body, status, content_type, whole, counted)

    def settle(self, attempt: Attempt, body: bytes, status: int, content_type: str, whole: bool = True,
               counted: tuple[Usage | None, bool] | None = None) -> None:
        """A successful answer is complete: its usage, its cost, and its copy in the cache.

        ``counted`` is (usage, complete) when already read from the provider's answer: a
        translated one (extproc/translated.py), whose client-side form may not carry the usage."""
        usage, complete = counted if counted is not None else usage_of(body, self.endpoint.schema, self.parsed.stream)
        if usage is not None:
            self._record_usage(attempt, usage, status)
        if whole and complete and self.cache.enabled and body and status < 300:
            # Memory now (no task); a Redis write, if any, off the hot path.
            redis_write = self.cache.store(self.key, CachedResponse(status, content_type, body))
            if redis_write is not None:
                self.spawn(redis_write)

    def _record_usage(self, attempt: Attempt, usage: Usage, status: int) -> None:
        # Where the answer's usage is first known: the budgets are charged here, so the request
        # that crosses a token or cost limit completes and the next one is refused.
        cost = self.pricing.cost(attempt.model, usage.input_tokens, usage.output_tokens)
        series = attempt.series
        if series is None:  # not counted as answered (count_answer): resolved here
            caller = self.caller
            series = metrics.answer_series(attempt.provider.name, attempt.label, str(status),
                                           caller.labels if caller.workload else None)
        series.used(usage.input_tokens, usage.output_tokens, cost)
        if self.spend is not None:
            self.spend(usage.input_tokens + usage.output_tokens, cost)
