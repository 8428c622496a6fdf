"""The chaos run's open-circuit oracle (bench/chaos_oracle.py) on made-up request logs: it flags
what the breaker's documented semantics forbid and excuses only what they allow."""

from __future__ import annotations

import math

from bench.chaos_oracle import Arrival, judge

T, RESET, TRIAL = 3, 0.5, 0.5


def req(time: float, status: int | None = 500, sent: float | None = None, done: float | None = None) -> Arrival:
    """A request that reached the primary at `time`, sent 1 ms earlier and answered 5 ms later."""
    return Arrival(time, status, time - 0.001 if sent is None else sent, time + 0.005 if done is None else done)


OPENING = [req(0.00), req(0.01), req(0.02)]  # threshold failures: certainly open from 0.025


def test_a_request_sent_after_the_opening_is_flagged() -> None:
    late = req(0.10)
    verdict = judge([*OPENING, late], T, RESET, TRIAL)
    assert verdict.to_open == [late] and verdict.opened_at == [0.02]


def test_a_request_sent_before_the_opening_was_known_is_excused() -> None:
    in_flight = req(0.10, sent=0.021)  # sent before the opening failure's answer reached the client
    verdict = judge([*OPENING, in_flight], T, RESET, TRIAL)
    assert verdict.to_open == [] and verdict.in_flight == [in_flight]


def test_one_trial_per_reset_timeout() -> None:
    trial = req(0.52)  # >= 0.02 + resetTimeout
    second = req(0.53)  # while the trial is in flight
    early = req(0.60)  # the failed trial reopened the circuit at 0.52
    next_trial = req(1.03)
    verdict = judge([*OPENING, trial, second, early, next_trial], T, RESET, TRIAL)
    assert verdict.trials == [trial, next_trial]
    assert verdict.to_open == [second, early]
    assert verdict.opened_at == [0.02, 0.52, 1.03]


def test_a_trial_too_early_is_flagged() -> None:
    verdict = judge([*OPENING, req(0.51)], T, RESET, TRIAL)  # 0.49 s after the opening
    assert len(verdict.to_open) == 1 and verdict.trials == []


def test_a_hung_trial_lets_the_next_one_through_after_the_trial_timeout() -> None:
    hung = req(0.52, status=None, done=math.inf)
    after = req(0.52 + TRIAL + 0.01)
    verdict = judge([*OPENING, hung, after], T, RESET, TRIAL)
    assert verdict.trials == [hung, after] and verdict.to_open == []


def test_a_success_closes_the_circuit() -> None:
    verdict = judge([*OPENING, req(0.52, status=200), req(0.53, status=200), req(0.54)], T, RESET, TRIAL)
    assert verdict.to_open == []


def test_fewer_than_threshold_failures_or_a_success_between_them_do_not_open() -> None:
    assert judge([req(0.0), req(0.01), req(0.02, 200), req(0.03), req(0.04), req(0.05, 200)], T, RESET,
                 TRIAL).opened_at == []
    # A success answered after the run began may have reached the ext_proc after those failures.
    # Only the two failures after it count, so the next request is no violation (and opens it).
    slow_success = req(0.0, 200, done=0.015)
    verdict = judge([slow_success, *[req(0.01 + i * 0.01) for i in range(3)], req(0.1)], T, RESET, TRIAL)
    assert verdict.to_open == [] and verdict.opened_at == [0.1]


def test_a_restarted_ext_proc_starts_closed() -> None:
    verdict = judge([*OPENING, req(0.10, status=200)], T, RESET, TRIAL, restarts=[0.05])
    assert verdict.to_open == []
