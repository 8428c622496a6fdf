"""Budget metrics (defined here until the budgets are wired in; then they join extproc/metrics.py).

Same conventions as extproc/metrics.py: labels carry the budget's name (a DNS label from the
config) and the unit (``requests``, ``tokens``, ``usd``), never an identity or a credential, so
the series count is bounded by the config. The gauges describe counters the workers share (and
replicas, with Redis), not anything per process: in multiprocess mode the most recent value any
worker wrote is the replica's figure (``mostrecent``; ``max`` would keep the last window's peak
after the window turned, ``sum`` would add the same counter once per worker).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, disable_created_metrics

disable_created_metrics()

UNITS = ("requests", "tokens", "usd")

USED = Gauge(
    "holysheep_budget_used",
    "Usage in the current window of the budget's most used counter (per ServiceAccount or Namespace: the "
    "identity closest to its limit), by unit (requests, tokens, usd).",
    ["budget", "unit"], multiprocess_mode="mostrecent",
)
LIMIT = Gauge(
    "holysheep_budget_limit", "The budget's limit per window, by unit (requests, tokens, usd).",
    ["budget", "unit"], multiprocess_mode="mostrecent",
)
REJECTIONS = Counter(
    "holysheep_budget_rejections", "Requests refused with 429 because a budget was used up, by budget and unit.",
    ["budget", "unit"],
)
STORE_ERRORS = Counter(
    "holysheep_budget_store_errors",
    "Budget store failures (a Redis error, which switches to local counting for a back-off, or a full counter "
    "table); no request fails because of one.",
)
