"""Budgets per workload: which budgets a caller spends, admission, refusals and OpenAI's headers.

A budget limits the requests, tokens and US dollars a set of callers may spend in a fixed window
aligned to the Unix epoch (a 1h window runs from one full hour to the next, on every replica).
The caller is the authenticated identity (namespace, service account), never something the
request says. Rules, in the order a request meets them:

- **Matching.** A budget applies when the caller's namespace matches one of ``namespaces`` and
  its service account one of ``service_accounts`` (shell globs). Its counter is per
  ``ServiceAccount`` (``ns/sa``), per ``Namespace`` (``ns``) or ``Shared`` (one for every match).
- **Admission.** One request is counted in every matching budget at once, or in none: when any
  budget is used up the request is refused and counted nowhere. A refused request is not
  counted, so a client retrying while refused cannot drain a wider budget (say its namespace's)
  that its own, narrower one protects, and ``used`` never passes a request limit.
- **Usage.** Tokens (input + output) and cost are added when the response's usage is known, to
  the window current then: the request that crosses a token or cost limit completes, the next
  ones are refused until the window turns. A budget is used up when ``used + 1 > requests``,
  ``used >= tokens`` or ``used >= costUsd``.
- **Refusal.** 429 with the budget, the unit and the reset: when several budgets are used up,
  the one whose window ends last (retrying earlier would be refused again), and within one
  budget cost before tokens before requests. OpenAI's codes: ``rate_limit_exceeded`` for
  requests and tokens, ``insufficient_quota`` for cost.
- **Headers.** Every answer of a budgeted route carries OpenAI's ``x-ratelimit-*-requests``
  triple, and the ``-tokens`` triple when a token limit applies, each for the tightest matching
  budget of that unit: the lowest remaining fraction (remaining / limit), ties broken by the
  sooner reset, then the name. OpenAI's two triples already describe two independent limits, so
  they may come from two budgets. Figures are as of admission (remaining requests include this
  one; tokens are those of earlier responses). Cost has no OpenAI header.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from extproc import metrics
from extproc.budget_store import BudgetStore, CounterRef, Counts, Limits
from extproc.errors import BudgetExceeded
from protos.spec import BudgetSpec

_MEMO_LIMIT = 4096
ANY = ("*",)
_UNIT = {"requests": 0, "tokens": 1, "usd": 2}  # a unit's index in Counts and Budget.unit_limits
_HEADER_NAMES = tuple(
    (_UNIT[unit], (f"x-ratelimit-limit-{unit}", f"x-ratelimit-remaining-{unit}", f"x-ratelimit-reset-{unit}"))
    for unit in ("requests", "tokens"))


@dataclass(frozen=True, slots=True)
class Budget:
    """One spec.budgets entry, compiled for one config: its counters' id, window and limits."""

    spec: BudgetSpec
    budget_id: int  # names its counters in the table (for the gauges)
    window: int  # seconds
    namespaces: tuple[str, ...]  # the spec's, or every namespace (of the config's scope) when it lists none
    limits: Limits
    unit_limits: tuple[float | None, float | None, float | None]  # requests, tokens, usd
    limit_texts: tuple[str, str, str]  # the same, as header values ("" for none)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def charges_usage(self) -> bool:
        """Whether answers' usage counts here (a token or cost limit)."""
        return self.limits.tokens is not None or self.limits.cost_usd is not None

    def matches(self, namespace: str, service_account: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, g) for g in self.namespaces) and any(
            fnmatch.fnmatchcase(service_account, g) for g in self.spec.service_accounts)

    def subject(self, namespace: str, service_account: str) -> str:
        """Whose counter: ``*`` cannot be part of a Kubernetes name, so it never names one."""
        per = self.spec.per
        if per == "ServiceAccount":
            return f"{namespace}/{service_account}"
        return namespace if per == "Namespace" else "*"

    def limit(self, unit: str) -> float | None:
        return self.unit_limits[_UNIT[unit]]


def compile_budget(scope: str, spec: BudgetSpec) -> Budget:
    window = int(spec.window)
    if window != spec.window or window < 1:  # the schema asks for whole seconds, at least 1m
        raise ValueError(f"budget {spec.name}: window must be a whole number of seconds")
    budget_id = int.from_bytes(
        hashlib.blake2b(f"{scope}\0{spec.name}\0{window}".encode(), digest_size=8).digest(), "little")
    limits = (spec.requests, spec.tokens, spec.cost_usd)
    r, t, c = ("" if v is None else _number(v) for v in limits)
    return Budget(spec, budget_id, window, spec.namespaces or ANY, Limits(*limits), limits, (r, t, c))


def window_bounds(now: float, window: int) -> tuple[int, int]:
    """The fixed window holding `now`: [start, end), aligned to the Unix epoch."""
    start = int(now // window) * window
    return start, start + window


_resets: dict[int, str] = {}  # whole seconds -> text: every answer within a second shares it


def format_reset(seconds: float) -> str:
    """OpenAI's format for x-ratelimit-reset-*: Go durations (``17ms``, ``1s``, ``6m0s``, ``1h0m0s``),
    rounded up to whole seconds from one second on."""
    if seconds < 1:
        ms = max(1, math.ceil(seconds * 1000))
        if ms < 1000:
            return f"{ms}ms"
    whole = max(1, math.ceil(seconds))
    text = _resets.get(whole)
    if text is None:
        hours, rest = divmod(whole, 3600)
        minutes, secs = divmod(rest, 60)
        if hours:
            text = f"{hours}h{minutes}m{secs}s"
        else:
            text = f"{minutes}m{secs}s" if minutes else f"{secs}s"
        if len(_resets) >= _MEMO_LIMIT:
            _resets.clear()
        _resets[whole] = text
    return text


def format_window(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


@dataclass(frozen=True, slots=True)
class BudgetFigures:
    """One matching budget at the time of a decision."""

    budget: Budget
    used: Counts
    reset: float  # seconds until its window ends


@dataclass(frozen=True, slots=True)
class Refusal:
    budget: str
    unit: str  # requests | tokens | usd
    limit: float
    window: int
    reset: float  # seconds until the window ends
    resets_at: float  # the window's end, Unix seconds

    @property
    def code(self) -> str:
        return "insufficient_quota" if self.unit == "usd" else "rate_limit_exceeded"

    @property
    def retry_after(self) -> int:
        """``retry-after``: whole seconds, rounded up, at least 1."""
        return max(1, math.ceil(self.reset))

    def error(self) -> BudgetExceeded:
        """The 429 the client gets (extproc/errors.py)."""
        at = datetime.fromtimestamp(self.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return BudgetExceeded(self.budget, self.unit, _number(self.limit), format_window(self.window),
                              self.retry_after, at)

    @property
    def message(self) -> str:
        return self.error().message


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer for one request: figures of every matching budget, and a refusal or none."""

    namespace: str
    service_account: str
    figures: tuple[BudgetFigures, ...]
    refusal: Refusal | None

    @property
    def admitted(self) -> bool:
        return self.refusal is None

    def headers(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for i, names in _HEADER_NAMES:  # on every answer of a budgeted route: kept cheap
            best: tuple[float, float, str] | None = None
            tight: tuple[str, float, float] = ("", 0.0, 0.0)
            for f in self.figures:
                limit = f.budget.unit_limits[i]
                if limit is None:
                    continue
                used = f.used[i]
                remaining = limit - used if limit > used else 0
                rank = (remaining / limit if limit else 0.0, f.reset, f.budget.name)
                if best is None or rank < best:
                    best, tight = rank, (f.budget.limit_texts[i], remaining, f.reset)
            if best is not None:
                text, remaining, reset = tight
                out += [(names[0], text), (names[1], _number(remaining)), (names[2], format_reset(reset))]
        return out


def _refusal(figures: Sequence[BudgetFigures], now: float) -> Refusal:
    over = [(f, f.budget.limits.exceeded(f.used)) for f in figures]
    f, units = max(((f, u) for f, u in over if u), key=lambda fu: fu[0].reset)
    unit = units[0]  # exceeded() lists usd, then tokens, then requests
    return Refusal(f.budget.name, unit, f.budget.limit(unit) or 0, f.budget.window, f.reset, now + f.reset)


class BudgetEngine:
    """The budgets of one config over a store. Cheap to rebuild on reload: counts live in the
    store under keys of (scope, budget name, window), so a new engine finds them."""

    def __init__(
        self, scope: str, budgets: Sequence[BudgetSpec], store: BudgetStore, clock: Callable[[], float] = time.time,
    ) -> None:
        names = [b.name for b in budgets]
        if len(set(names)) != len(names):
            raise ValueError("budget names must be unique within a config")
        self.scope = scope  # e.g. "<config namespace>/<config name>": two configs never share a counter
        self.store = store
        self.clock = clock
        # A budget that lists no namespaces covers every namespace in the config's scope, which
        # is "*": a caller meets a config's budgets only once authorized for it (extproc/authz.py).
        self.budgets = tuple(compile_budget(scope, b) for b in budgets)
        self._matching: dict[tuple[str, str], tuple[Budget, ...]] = {}
        # The hot path's counters, made once per (budget, caller, window): a key and its digest.
        self._refs: dict[tuple[int, str, str, int], CounterRef] = {}

    def budget(self, name: str) -> Budget:
        return next(b for b in self.budgets if b.name == name)

    def matching(self, namespace: str, service_account: str) -> tuple[BudgetSpec, ...]:
        """The budgets that apply to a caller, in config order."""
        return tuple(b.spec for b in self._match(namespace, service_account))

    def _match(self, namespace: str, service_account: str) -> tuple[Budget, ...]:
        found = self._matching.get((namespace, service_account))
        if found is None:
            found = tuple(b for b in self.budgets if b.matches(namespace, service_account))
            if len(self._matching) >= _MEMO_LIMIT:
                self._matching.clear()
            self._matching[(namespace, service_account)] = found
        return found

    def key(self, budget: Budget, namespace: str, service_account: str, now: float) -> str:
        """The counter's key. The braces are a Redis Cluster hash tag: one config's counters
        share a slot, so one script may touch all of a request's budgets."""
        start, _ = window_bounds(now, budget.window)
        return (f"holysheep:budget:v1:{{{self.scope}}}:{budget.name}:{budget.window}:"
                f"{budget.subject(namespace, service_account)}:{start}")

    def _counters(self, budgets: Sequence[Budget], namespace: str, service_account: str,
                  now: float) -> list[CounterRef]:
        refs = []
        for b in budgets:
            start = int(now // b.window) * b.window
            memo = (b.budget_id, namespace, service_account, start)
            ref = self._refs.get(memo)
            if ref is None:
                ref = CounterRef(self.key(b, namespace, service_account, now), b.budget_id, float(start + b.window),
                                 b.limits)
                if len(self._refs) >= _MEMO_LIMIT:
                    self._refs.clear()  # callers x windows seen since: rebuilt as they come
                self._refs[memo] = ref
            refs.append(ref)
        return refs

    def counter(self, name: str, namespace: str, service_account: str, now: float) -> CounterRef:
        """The counter a caller spends of budget `name` at `now`."""
        return self._counters([self.budget(name)], namespace, service_account, now)[0]

    async def admit(self, namespace: str, service_account: str) -> Admission | None:
        """None when no budget applies to this caller (nothing counted, no headers)."""
        budgets = self._match(namespace, service_account)
        if not budgets:
            return None
        now = self.clock()
        counters = self._counters(budgets, namespace, service_account, now)
        admitted, used = await self.store.admit(counters, now)
        figures = tuple(BudgetFigures(b, u, ref.expires_at - now)
                        for b, u, ref in zip(budgets, used, counters, strict=True))
        refusal = None if admitted else _refusal(figures, now)
        if refusal is not None:
            metrics.BUDGET_REJECTIONS.labels(refusal.budget, refusal.unit).inc()
        return Admission(namespace, service_account, figures, refusal)

    def record_usage(self, admission: Admission, tokens: int, cost_usd: float) -> None:
        """A response's usage, for the budgets its request was admitted under; the window
        current now (a response may finish after its request's window turned)."""
        if not admission.admitted or not (tokens or cost_usd):
            return
        # Only budgets that limit tokens or cost keep them (no write for a requests-only budget).
        budgets = [f.budget for f in admission.figures if f.budget.charges_usage]
        if not budgets:
            return
        now = self.clock()
        self.store.add_usage(self._counters(budgets, admission.namespace, admission.service_account, now),
                             max(0, tokens), max(0.0, cost_usd), now)

    def export_metrics(self) -> set[tuple[str, str]]:
        """Set holysheep_budget_used/limit from the replica's counters (at scrape time: the
        counters change with every request, the gauges only need to be right when read).
        Returns the (budget, unit) label pairs it set."""
        now = self.clock()
        peaks = self.store.table().peaks(now)
        exported: set[tuple[str, str]] = set()
        for b in self.budgets:
            peak = peaks.get(b.budget_id, Counts())
            for unit, used in (("requests", peak.requests), ("tokens", peak.tokens), ("usd", peak.cost_usd)):
                limit = b.limit(unit)
                if limit is None:
                    continue
                metrics.BUDGET_USED.labels(b.name, unit).set(used)
                metrics.BUDGET_LIMIT.labels(b.name, unit).set(limit)
                exported.add((b.name, unit))
        return exported


_exported: set[tuple[str, str]] = set()
_export_lock = threading.Lock()  # scrapes run in threads, possibly two at once


def export_budget_metrics(engines: Iterable[BudgetEngine]) -> None:
    """Every config's budget gauges. A budget (or unit) a reload removed loses its series; in
    prometheus-client's multiprocess mode, which cannot remove one, its usage reads 0 instead,
    so no alert on it stays firing."""
    with _export_lock:
        current: set[tuple[str, str]] = set()
        for engine in engines:
            current |= engine.export_metrics()
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        for labels in _exported - current:
            if multiprocess:
                metrics.BUDGET_USED.labels(*labels).set(0)
            else:
                metrics.BUDGET_USED.remove(*labels)
                metrics.BUDGET_LIMIT.remove(*labels)
        _exported.clear()
        _exported.update(current)
