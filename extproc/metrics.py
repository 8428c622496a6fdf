"""Prometheus metrics of the data plane.

Labels carry provider and model names and the calling workload, never a credential. Names
follow Prometheus conventions; token types use OpenTelemetry GenAI's ``gen_ai.token.type``
values (``input``/``output``). In multi-worker mode prometheus-client's multiprocess mode must
be configured (PROMETHEUS_MULTIPROC_DIR) before this module is imported.
"""

from __future__ import annotations

import atexit
import math
import threading
from asyncio import AbstractEventLoop, _get_running_loop
from bisect import bisect_left
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

from extproc import wakeups

disable_created_metrics()  # *_created series double the scrape size and no panel uses them

# --- per-request counts, written once per event-loop iteration ----------------------------------
#
# A request touches about seven series (requests, latency, two token counts, cost, cache store,
# cache entries). In multiprocess mode each prometheus-client write takes a lock, checks the pid
# and packs into an mmap, behind labels()'s tuple building and validation: ~3 us a write, a sixth
# of the processor's own CPU. The Batched* metrics below keep their children memoised and add
# to plain Python dicts instead; ``flush`` writes the sums (one write per series however many
# requests touched it). It runs FLUSH_DELAY after the first pending count (extproc/wakeups.py), so one
# write serves every request of that interval and a count is never more than FLUSH_DELAY late,
# nor lost: before every render of /metrics this process's own counts are flushed (so with one
# worker, the production layout, a scrape is exact), and on drain and at exit. Only another
# worker's counts can reach a scrape up to FLUSH_DELAY (plus settlements.DELAY for the counts
# its batched settles make) late. Without a running loop (a sync caller, a test) a count is
# written at once.
#
# (Flushing whenever no stream was left in flight, as before, wrote every request's ~12 values
# on its own at low concurrency: a tenth of the request's CPU at one connection.)

FLUSH_DELAY = 0.5

_pending: dict[Any, float] = {}  # prometheus-client value object -> amount to add
_settings: dict[Any, float] = {}  # value object -> value to set (gauges)
# The loop a flush is scheduled on; _UNSCHEDULED when none is (never None: that is what
# _get_running_loop() returns without a loop, and such a caller must write at once).
_UNSCHEDULED: Any = object()
_flush_on: Any = _UNSCHEDULED
_timer: Any = None
# Run first by every flush: work whose counts must be in it (extproc/settlements.py's batch).
_before_flush: list[Any] = []


def before_flush(fn: Any) -> None:
    """Have every ``flush`` call ``fn()`` first."""
    _before_flush.append(fn)


def flush() -> None:
    """Write every pending count now (idempotent; the loop callback, drain, render and exit)."""
    global _flush_on, _timer
    for fn in _before_flush:
        fn()
    _flush_on = _UNSCHEDULED
    if _timer is not None:
        _timer.cancel()
        _timer = None
    pending, settings = _pending, _settings
    while pending:
        value, amount = pending.popitem()
        value.inc(amount)
    while settings:
        value, number = settings.popitem()
        value.set(number)


def _schedule(loop: AbstractEventLoop | None) -> None:
    """Called when `loop` (the running one, or None) is not the one a flush is scheduled on:
    none is scheduled, or it was on a loop that has stopped since."""
    global _flush_on, _timer
    if loop is None:
        flush()  # no loop in this thread: nothing would run a callback
        return
    _flush_on = loop
    _timer = wakeups.call_later(FLUSH_DELAY, flush, loop)  # no timer on the loop (extproc/wakeups.py)


atexit.register(flush)


class _FlushFirst:
    """Registered before every metric of this module, so an in-process scrape of the default
    registry writes the pending counts before it reads them. Only on the main thread, the one
    the counts are added on: the admin server renders in a worker thread, after its own flush()."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        if threading.current_thread() is threading.main_thread():
            flush()
        return []


REGISTRY.register(_FlushFirst())  # type: ignore[arg-type]


class _MemoisedLabels(MetricWrapperBase):
    """``labels()`` children memoised per label tuple: prometheus-client builds and locks a key
    on every call, which the hot path makes several times per request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memo: dict[tuple[Any, ...], Any] = {}

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)
        child = self._memo.get(labelvalues)
        if child is None:
            child = self._memo[labelvalues] = super().labels(*labelvalues)
        return child

    def remove(self, *labelvalues: Any) -> None:
        self._memo.clear()
        super().remove(*labelvalues)

    def clear(self) -> None:
        self._memo.clear()
        super().clear()


class BatchedCounter(_MemoisedLabels, Counter):
    """A Counter whose ``labels()`` children are memoised and whose ``inc()`` is batched."""

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0 or exemplar is not None or self._is_parent():
            super().inc(amount, exemplar)  # raises as prometheus-client does, or writes at once
            return
        value = self._value
        _pending[value] = _pending.get(value, 0.0) + amount
        if (loop := _get_running_loop()) is not _flush_on:
            _schedule(loop)


class BatchedHistogram(_MemoisedLabels, Histogram):
    """A Histogram whose ``labels()`` children are memoised and whose ``observe()`` is batched
    (the bucket is found as prometheus-client does: the first upper bound >= the value)."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar is not None or self._is_parent() or math.isnan(amount):
            super().observe(amount, exemplar)
            return
        pending = _pending
        sum_value, bucket = self._sum, self._buckets[bisect_left(self._upper_bounds, amount)]
        pending[sum_value] = pending.get(sum_value, 0.0) + amount
        pending[bucket] = pending.get(bucket, 0.0) + 1
        if (loop := _get_running_loop()) is not _flush_on:
            _schedule(loop)


class BatchedGauge(Gauge):
    """A label-less Gauge whose ``set()`` is batched (the last value set wins); use only set()."""

    def set(self, value: float) -> None:
        if self._is_most_recent or self._is_parent():
            super().set(value)
            return
        _settings[self._value] = float(value)
        if (loop := _get_running_loop()) is not _flush_on:
            _schedule(loop)


REQUESTS = BatchedCounter(
    "holysheep_requests", "LLM requests answered, by the provider that answered and the HTTP status.",
    ["provider", "model", "status"],
)
UPSTREAM_LATENCY = BatchedHistogram(
    "holysheep_upstream_request_duration_seconds",
    "Time from sending a request to a provider to its response headers.",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = BatchedCounter(
    "holysheep_tokens", "Tokens reported in the provider's usage, by token type (input/output).",
    ["provider", "model", "type"],
)
COST = BatchedCounter("holysheep_cost_usd", "Cost in US dollars computed from spec.pricing.", ["provider", "model"])
FAILOVERS = BatchedCounter(
    "holysheep_failovers", "Requests moved from one provider to the next within the same client request.",
    ["from_provider", "to_provider"],
)
CIRCUIT_STATE = Gauge(
    "holysheep_circuit_state", "Circuit breaker state per provider: 0 closed, 1 open, 2 half-open.",
    ["provider"], multiprocess_mode="max",
)
PROVIDER_HEALTHY = Gauge(
    "holysheep_provider_healthy", "1 when the provider's last active health check passed.",
    ["provider"], multiprocess_mode="min",
)
CACHE_EVENTS = BatchedCounter(
    "holysheep_cache_events", "Response cache events: hit, miss, store, fallback, error.", ["event"],
)
CACHE_ENTRIES = BatchedGauge(
    "holysheep_cache_entries",
    "Entries in the process's memory cache tiers (each config's tier is bounded by its maxEntries).",
    multiprocess_mode="max",
)
# The calling workload: namespace and service account from its authenticated certificate; the
# workload name from the caller's node metadata, inside that namespace (extproc/identity.py).
WORKLOAD_LABELS = ["workload_namespace", "service_account", "workload"]
WORKLOAD_REQUESTS = BatchedCounter(
    "holysheep_workload_requests", "Requests per calling workload (its authenticated namespace and service account).",
    WORKLOAD_LABELS,
)
WORKLOAD_TOKENS = BatchedCounter(
    "holysheep_workload_tokens", "Tokens per calling workload and model.",
    [*WORKLOAD_LABELS, "model", "type"],
)
WORKLOAD_COST = BatchedCounter(
    "holysheep_workload_cost_usd", "Cost in US dollars per calling workload and model.",
    [*WORKLOAD_LABELS, "model"],
)
UNAUTHORIZED = Counter(
    "holysheep_unauthorized_calls",
    "ext_proc streams refused with PERMISSION_DENIED, by reason: no acceptable identity (e.g. xfcc_forwarded, "
    "not_spiffe, no_identity_source) or a caller outside the config's scope (namespace, service_account).",
    ["reason"],
)
ERRORS = BatchedCounter(
    "holysheep_client_errors", "Requests answered with an error by the data plane itself, by error type.",
    ["type"],
)
READY = Gauge("holysheep_extproc_ready", "1 when a valid config is loaded and gRPC is serving.",
              multiprocess_mode="min")
CONFIG_RELOADS = Counter("holysheep_config_reloads", "Config reload attempts, by result.", ["result"])

# Budgets (extproc/budgets.py). Labels are the budget's name (a DNS label from the config,
# unique across the data plane) and the unit (requests, tokens, usd), never an identity, so the
# series count is bounded by the config. The gauges describe counters the workers share (and
# the replicas, with Redis), so in multiprocess mode the replica's figure is the most recent any
# worker wrote (``max`` would keep the last window's peak after the window turned, ``sum`` would
# add the same counter once per worker); they are set at scrape time (export_budget_metrics).
BUDGET_USED = Gauge(
    "holysheep_budget_used",
    "Usage in the current window of the budget's most used counter (per ServiceAccount or Namespace: the "
    "identity closest to its limit), by unit (requests, tokens, usd).",
    ["budget", "unit"], multiprocess_mode="mostrecent",
)
BUDGET_LIMIT = Gauge(
    "holysheep_budget_limit", "The budget's limit per window, by unit (requests, tokens, usd).",
    ["budget", "unit"], multiprocess_mode="mostrecent",
)
BUDGET_REJECTIONS = Counter(
    "holysheep_budget_rejections", "Requests refused with 429 because a budget was used up, by budget and unit.",
    ["budget", "unit"],
)
BUDGET_STORE_ERRORS = Counter(
    "holysheep_budget_store_errors",
    "Budget store failures (a Redis error, which switches to local counting for a back-off, or a full counter "
    "table); no request fails because of one.",
)

class AnswerSeries:
    """The counter series one answered request adds to, for one (provider, model label, status,
    calling workload): resolved once and remembered (``answer_series``), so an answer costs two
    calls, ``answered`` and ``used``, not one ``labels().inc()`` per series. The adds are the
    Batched* metrics' own pending sums, flushed the same way."""

    __slots__ = ("_answered", "_cost", "_tokens", "_workload_cost", "_workload_tokens")

    def __init__(self, provider: str, model: str, status: str, workload: tuple[str, str, str] | None) -> None:
        self._answered = [REQUESTS.labels(provider, model, status)._value]
        self._tokens = (TOKENS.labels(provider, model, "input")._value, TOKENS.labels(provider, model, "output")._value)
        self._cost = COST.labels(provider, model)._value
        self._workload_tokens: tuple[Any, Any] | None = None
        self._workload_cost: Any = None
        if workload is not None:
            self._answered.append(WORKLOAD_REQUESTS.labels(*workload)._value)
            self._workload_tokens = (WORKLOAD_TOKENS.labels(*workload, model, "input")._value,
                                     WORKLOAD_TOKENS.labels(*workload, model, "output")._value)
            self._workload_cost = WORKLOAD_COST.labels(*workload, model)._value

    def answered(self) -> None:
        pending = _pending
        for value in self._answered:
            pending[value] = pending.get(value, 0.0) + 1
        if (loop := _get_running_loop()) is not _flush_on:
            _schedule(loop)

    def used(self, input_tokens: int, output_tokens: int, cost: float) -> None:
        """The answer's usage (tokens by type) and its cost; a zero cost adds no series."""
        pending = _pending
        inp, out = self._tokens
        pending[inp] = pending.get(inp, 0.0) + input_tokens
        pending[out] = pending.get(out, 0.0) + output_tokens
        if cost:
            pending[self._cost] = pending.get(self._cost, 0.0) + cost
        if self._workload_tokens is not None:
            inp, out = self._workload_tokens
            pending[inp] = pending.get(inp, 0.0) + input_tokens
            pending[out] = pending.get(out, 0.0) + output_tokens
            if cost:
                pending[self._workload_cost] = pending.get(self._workload_cost, 0.0) + cost
        if (loop := _get_running_loop()) is not _flush_on:
            _schedule(loop)


_answer_series: dict[tuple[str, str, str, tuple[str, str, str] | None], AnswerSeries] = {}
MAX_REMEMBERED_SERIES = 16384  # the label values are bounded already (MAX_MODEL_LABELS, workloads)


def answer_series(provider: str, model: str, status: str, workload: tuple[str, str, str] | None) -> AnswerSeries:
    """The AnswerSeries of (provider, model label, status, workload labels or None)."""
    key = (provider, model, status, workload)
    series = _answer_series.get(key)
    if series is None:
        series = AnswerSeries(provider, model, status, workload)
        if len(_answer_series) < MAX_REMEMBERED_SERIES:
            _answer_series[key] = series
    return series


# Model names come from clients when a glob route passes them through unchanged, so each
# process gives at most this many distinct names their own label value; later ones are counted
# under the route's pattern (e.g. "gpt-*"), which keeps every series count bounded.
MAX_MODEL_LABELS = 100
_model_labels: set[str] = set()


def model_label(model: str, pattern: str) -> str:
    """The ``model`` label for a request whose model matched a route's `pattern`."""
    if model == pattern or model in _model_labels:
        return model
    if len(_model_labels) < MAX_MODEL_LABELS:
        _model_labels.add(model)
        return model
    return pattern
