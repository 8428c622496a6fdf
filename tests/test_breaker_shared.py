"""Circuit state shared across worker processes (extproc/shared_state.py, extproc/breaker.py).

Each "worker" here is a separate interpreter mapping the same state directory, as the workers
of one ext_proc do; the e2e form through Envoy is in test_e2e_workers.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from extproc.breaker import CircuitBreaker, State
from extproc.dev.processes import wait_until
from extproc.shared_state import STATE_DIR_ENV, breaker_slot
from protos.spec import CircuitBreakerSpec

SPEC = CircuitBreakerSpec(enabled=True, failure_threshold=3, reset_timeout=0.5)
OPEN_IN_OTHER_WORKER = """
from extproc.breaker import CircuitBreaker
from extproc.shared_state import breaker_slot
from protos.spec import CircuitBreakerSpec
b = CircuitBreaker("primary", CircuitBreakerSpec(enabled=True, failure_threshold=3, reset_timeout=0.5), 1.0,
                   breaker_slot("primary"))
for _ in range(3):
    b.record_failure()
assert b.state.name == "OPEN"
"""


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    return tmp_path


def _worker(provider: str = "primary") -> CircuitBreaker:
    return CircuitBreaker(provider, SPEC, 1.0, breaker_slot(provider))


def test_a_circuit_opened_by_one_worker_is_open_in_every_worker(state_dir: Path) -> None:
    here = _worker()
    assert here.available() and here.state is State.CLOSED
    before_opening = time.monotonic()
    subprocess.run([sys.executable, "-c", OPEN_IN_OTHER_WORKER], check=True, env={STATE_DIR_ENV: str(state_dir)},
                   cwd=Path(__file__).resolve().parents[1], timeout=60)
    # This worker saw no failure at all, and still sends nothing to the provider.
    assert not here.available() and here.state is State.OPEN
    assert not here.acquire()
    assert _worker().state is State.OPEN  # a breaker made after a config reload, too
    assert _worker("secondary").available()  # per provider

    wait_until(lambda: here.state is State.HALF_OPEN, timeout=10 * SPEC.reset_timeout, interval=0.01,
               what="resetTimeout elapsed")
    assert time.monotonic() - before_opening >= SPEC.reset_timeout  # not before resetTimeout
    assert here.acquire() and not here.acquire()  # this worker's single trial
    here.record_success()
    assert here.state is State.CLOSED
    assert _worker().state is State.CLOSED  # the passed trial closed it for everyone


def test_a_failed_trial_reopens_for_every_worker(state_dir: Path) -> None:
    first, second = _worker(), _worker()
    for _ in range(SPEC.failure_threshold):
        first.record_failure()
    assert second.state is State.OPEN
    wait_until(second.available, timeout=10 * SPEC.reset_timeout, interval=0.01, what="resetTimeout elapsed")
    assert second.acquire()
    second.record_failure()  # the trial failed: open again, from now
    assert first.state is State.OPEN and not first.available()


def test_without_workers_the_state_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    assert breaker_slot("primary") is None
    first, second = _worker(), _worker()
    for _ in range(SPEC.failure_threshold):
        first.record_failure()
    assert first.state is State.OPEN and second.state is State.CLOSED
