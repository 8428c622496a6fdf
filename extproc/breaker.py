"""Per-provider circuit breaker with a single half-open trial, plus active-health status.

State is per worker process by design: every worker sees the same provider failures under load
(requests are spread over workers by SO_REUSEPORT), so each opens within a few requests of the
others, and no cross-process lock sits on the hot path.
"""

from __future__ import annotations

import logging
import os
import time
from enum import IntEnum

from extproc import metrics
from extproc.spec import CircuitBreakerSpec

log = logging.getLogger(__name__)


class State(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, provider: str, spec: CircuitBreakerSpec, trial_timeout: float) -> None:
        self.provider = provider
        self.spec = spec
        self.trial_timeout = trial_timeout
        self.failures = 0
        self.opened_at = 0.0
        self.trial_started = 0.0
        self.trial_in_flight = False
        self._state = State.CLOSED
        self.healthy = True
        self._gauge = metrics.CIRCUIT_STATE.labels(provider)
        self._gauge.set(State.CLOSED)

    @property
    def state(self) -> State:
        if self._state is State.OPEN and time.monotonic() - self.opened_at >= self.spec.reset_timeout:
            self._set(State.HALF_OPEN)
        return self._state

    def _set(self, state: State) -> None:
        if state is not self._state:
            self._state = state
            self._gauge.set(state)
            # Exact wall-clock transitions (the chaos run's circuit timeline; a scrape misses a
            # half-open trial that fails within milliseconds).
            log.info("circuit state changed",
                     extra={"provider": self.provider, "state": state.name, "t": time.time(), "pid": os.getpid()})

    def available(self) -> bool:
        """May a request be sent now? Does not reserve the half-open trial."""
        if not self.healthy:
            return False
        if not self.spec.enabled:
            return True
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.HALF_OPEN:
            return not self.trial_in_flight or time.monotonic() - self.trial_started > self.trial_timeout
        return False

    def acquire(self) -> bool:
        """Reserve a slot: always in CLOSED, the single trial in HALF_OPEN."""
        if not self.available():
            return False
        if self.spec.enabled and self._state is State.HALF_OPEN:
            self.trial_in_flight = True
            self.trial_started = time.monotonic()
        return True

    def record_success(self) -> None:
        self.failures = 0
        self.trial_in_flight = False
        self._set(State.CLOSED)

    def record_failure(self) -> None:
        self.trial_in_flight = False
        if not self.spec.enabled:
            return
        self.failures += 1
        if self._state is State.HALF_OPEN or self.failures >= self.spec.failure_threshold:
            self.opened_at = time.monotonic()
            self._set(State.OPEN)

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            log.info("provider availability changed",
                     extra={"provider": self.provider, "healthy": healthy, "t": time.time(), "pid": os.getpid()})
        self.healthy = healthy
        metrics.PROVIDER_HEALTHY.labels(self.provider).set(1 if healthy else 0)
