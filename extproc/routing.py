"""Model routing, compiled once per config: exact names, then globs in declaration order."""

from __future__ import annotations

import fnmatch
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from protos.spec import BackendSpec, HolySheepConfig, RouteSpec


@dataclass(frozen=True)
class RouteMatch:
    config: HolySheepConfig
    route: RouteSpec
    # The configured name or glob that matched: the metrics' model label once a process has
    # seen too many distinct client-chosen names (metrics.model_label).
    pattern: str


class RouteTable:
    def __init__(self, configs: Sequence[HolySheepConfig]) -> None:
        self._exact: dict[str, RouteMatch] = {}
        self._exact_all: dict[str, list[RouteMatch]] = {}
        self._globs: list[tuple[re.Pattern[str], RouteMatch]] = []
        for cfg in configs:
            for route in cfg.routes:
                for pattern in route.models:
                    match = RouteMatch(cfg, route, pattern)
                    if any(c in pattern for c in "*?["):
                        self._globs.append((re.compile(fnmatch.translate(pattern)), match))
                    else:
                        self._exact.setdefault(pattern, match)
                        self._exact_all.setdefault(pattern, []).append(match)
        self._memo: dict[str, RouteMatch | None] = {}
        self._memo_all: dict[str, tuple[RouteMatch, ...]] = {}

    def match(self, model: str) -> RouteMatch | None:
        try:
            return self._memo[model]
        except KeyError:
            pass
        found = self._exact.get(model)
        if found is None:
            found = next((m for rx, m in self._globs if rx.match(model)), None)
        if len(self._memo) < 4096:  # model names come from clients: keep the memo bounded
            self._memo[model] = found
        return found

    def matches(self, model: str) -> tuple[RouteMatch, ...]:
        """Every route for ``model`` in precedence order (exact names in config order, then globs
        in declaration order); ``match`` is the first. The data plane takes the first one whose
        config is in the caller's scope (extproc/authz.py)."""
        try:
            return self._memo_all[model]
        except KeyError:
            pass
        found = (*self._exact_all.get(model, ()), *(m for rx, m in self._globs if rx.match(model)))
        if len(self._memo_all) < 4096:
            self._memo_all[model] = found
        return found


def order_backends(backends: Sequence[BackendSpec], rng: random.Random | None = None) -> list[BackendSpec]:
    """Priority ascending; within one priority a weighted random order (Efraimidis-Spirakis)."""
    if len(backends) == 1:
        return list(backends)
    draw = rng.random if rng is not None else random.random
    keyed = [(b.priority, -(draw() ** (1.0 / b.weight)), i, b) for i, b in enumerate(backends)]
    keyed.sort()
    return [k[3] for k in keyed]
