"""Prometheus metrics of the data plane.

Labels carry provider and model names and the calling workload, never a credential. Names
follow Prometheus conventions; token types use OpenTelemetry GenAI's ``gen_ai.token.type``
values (``input``/``output``). In multi-worker mode prometheus-client's multiprocess mode must
be configured (PROMETHEUS_MULTIPROC_DIR) before this module is imported.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # *_created series double the scrape size and no panel uses them

REQUESTS = Counter(
    "holysheep_requests", "LLM requests answered, by the provider that answered and the HTTP status.",
    ["provider", "model", "status"],
)
UPSTREAM_LATENCY = Histogram(
    "holysheep_upstream_request_duration_seconds",
    "Time from sending a request to a provider to its response headers.",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter(
    "holysheep_tokens", "Tokens reported in the provider's usage, by token type (input/output).",
    ["provider", "model", "type"],
)
COST = Counter("holysheep_cost_usd", "Cost in US dollars computed from spec.pricing.", ["provider", "model"])
FAILOVERS = Counter(
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
CACHE_EVENTS = Counter(
    "holysheep_cache_events", "Response cache events: hit, miss, store, fallback, error.", ["event"],
)
CACHE_ENTRIES = Gauge(
    "holysheep_cache_entries",
    "Entries in the process's memory cache tiers (each config's tier is bounded by its maxEntries).",
    multiprocess_mode="max",
)
WORKLOAD_REQUESTS = Counter(
    "holysheep_workload_requests", "Requests per calling workload, when the mesh identifies it.",
    ["workload_namespace", "workload"],
)
WORKLOAD_TOKENS = Counter(
    "holysheep_workload_tokens", "Tokens per calling workload and model.",
    ["workload_namespace", "workload", "model", "type"],
)
WORKLOAD_COST = Counter(
    "holysheep_workload_cost_usd", "Cost in US dollars per calling workload and model.",
    ["workload_namespace", "workload", "model"],
)
ERRORS = Counter(
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
BUDGET_UNITS = ("requests", "tokens", "usd")
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
