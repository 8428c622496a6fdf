"""Per-provider circuit breaker with a single half-open trial, plus active-health status.

With several worker processes the *open* state is shared (``extproc/shared_state.py``): the
first worker to open a provider's circuit opens it for all of them, so an open provider gets no
request from any worker. Envoy pins each of its gRPC connections to one worker, so a worker may
see none of a failing provider's traffic; with per-worker state it would keep sending to the
provider long after the others had opened. Failure counts and the half-open trial stay per
worker (no cross-process lock on the hot path): after ``resetTimeout`` each worker may send one
trial, and the first success closes the circuit everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from enum import IntEnum

from extproc import metrics
from extproc.shared_state import SharedSlot
from protos.spec import CircuitBreakerSpec

log = logging.getLogger(__name__)


class State(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self, provider: str, spec: CircuitBreakerSpec, trial_timeout: float, shared: SharedSlot | None = None
    ) -> None:
        self.provider = provider
        self.shared = shared
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
        now = time.monotonic()
        if self._state is not State.OPEN or now - self.opened_at >= self.spec.reset_timeout:
            # Closed, half-open or due for a trial: another worker may have (re)opened it since.
            if self.shared is not None and (open_until := self.shared.get()) > now:
                self.opened_at = open_until - self.spec.reset_timeout
                self._set(State.OPEN)
            elif self._state is State.OPEN:
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
        if self._state is State.CLOSED and not self.failures and not self.trial_in_flight:
            return  # the usual answer: nothing to change
        self.failures = 0
        self.trial_in_flight = False
        if self._state is not State.CLOSED and self.shared is not None and self.shared.get() <= time.monotonic():
            self.shared.set(0.0)  # a trial passed: closed for every worker (unless one just reopened it)
        self._set(State.CLOSED)

    def record_failure(self) -> None:
        self.trial_in_flight = False
        if not self.spec.enabled:
            return
        self.failures += 1
        if self._state is State.HALF_OPEN or self.failures >= self.spec.failure_threshold:
            self.opened_at = time.monotonic()
            if self.shared is not None:
                self.shared.set(self.opened_at + self.spec.reset_timeout)
            self._set(State.OPEN)

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            log.info("provider availability changed",
                     extra={"provider": self.provider, "healthy": healthy, "t": time.time(), "pid": os.getpid()})
        self.healthy = healthy
        metrics.PROVIDER_HEALTHY.labels(self.provider).set(1 if healthy else 0)
