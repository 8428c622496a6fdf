"""Requests to an open circuit, judged from the provider's own request log and the client's clock.

Nothing here reads the ext_proc: the oracle replays the breaker's *documented* semantics (README,
"Circuit breaker") over what the primary received (arrival time, status, the routing ext_proc's
key, the client's request id) and what the client saw (send and completion time of each id).

Per ext_proc (one worker each in the chaos rig):

* **Opening.** ``failureThreshold`` consecutive failures (5xx, 429, a hang the ext_proc timed
  out) open the circuit. It is *certainly* open once the client got the answer to the request
  whose attempt was the last of them (``X``): the breaker counts the failure before it fails
  over. It opened no earlier than that attempt's arrival at the primary (``L``). A run only counts
  if every earlier success of that ext_proc had been answered before the run's first failure
  arrived, so the ext_proc cannot have seen them in another order.
* **Excused, in flight.** A request the client sent no later than ``X`` may have been routed
  while the circuit was still closed: allowed.
* **Excused, the half-open trial.** One request per ``resetTimeout``: the first to arrive at
  or after ``L + resetTimeout``. A trial that fails reopens the circuit (``L`` = its arrival,
  ``X`` = its send time, since no request may be routed while it is in flight); one that
  outlives the trial timeout (the provider ``timeout``) lets the next request through as a new
  trial. Any success closes the circuit.
* Everything else that reaches the primary while the model holds the circuit open is a request
  to an open circuit. Health-check outages are not modelled: they only remove requests.

Failures the primary never sees (refused connections) cannot be counted, so the model may hold
a circuit closed that was open; it never holds one open that was closed, hence no false alarm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Arrival", "Judgement", "judge"]

FAILURE = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Arrival:
    """One API request the primary received (from its /_mock/stats) and the client's view of it."""

    time: float  # arrival at the primary, wall clock
    status: int | None  # what the primary answered; None: still pending when collected
    t_send: float  # when the client sent it (inf when the client record is missing)
    t_done: float  # when the client had its answer (inf when missing)
    chaos_id: str | None = None

    @property
    def failed(self) -> bool:
        return self.status is None or self.status in FAILURE


@dataclass
class Judgement:
    to_open: list[Arrival] = field(default_factory=list)  # the violations
    in_flight: list[Arrival] = field(default_factory=list)  # excused: sent before it certainly opened
    trials: list[Arrival] = field(default_factory=list)  # excused: the half-open trials
    opened_at: list[float] = field(default_factory=list)  # each opening the model saw (L), a failed trial's too


def judge(arrivals: Sequence[Arrival], threshold: int, reset_timeout: float, trial_timeout: float,
          restarts: Iterable[float] = ()) -> Judgement:
    """Replay one ext_proc's requests to the primary (any order; sorted by arrival here)."""
    out = Judgement()
    restart_times = sorted(restarts)
    is_open = False
    open_lb = certain = 0.0  # L and X above
    trial: Arrival | None = None
    run: list[Arrival] = []  # consecutive failures while closed
    last_success_done = -math.inf
    previous = -math.inf
    for r in sorted(arrivals, key=lambda a: a.time):
        if any(previous < t <= r.time for t in restart_times):  # a restarted ext_proc starts closed
            is_open, trial, run, last_success_done = False, None, [], -math.inf
        previous = r.time
        counted_trial = False
        if is_open:
            if r.t_send <= certain:
                out.in_flight.append(r)
            elif r.time < open_lb + reset_timeout:
                out.to_open.append(r)
            elif trial is None or r.time > trial.t_send + trial_timeout:
                trial, counted_trial = r, True
                out.trials.append(r)
            else:
                out.to_open.append(r)  # a second request while the trial was in flight
        if not r.failed:
            is_open, trial, run = False, None, []
            last_success_done = max(last_success_done, r.t_done)
            continue
        if is_open:
            if counted_trial:  # the trial failed: open again from its arrival
                open_lb, certain, trial = r.time, r.t_send, None
                out.opened_at.append(r.time)
            continue
        run.append(r)
        while run and last_success_done >= run[0].time:
            run.pop(0)  # that success may have reached the ext_proc after this failure
        if len(run) >= threshold:
            is_open, open_lb, certain, trial, run = True, run[-1].time, run[-1].t_done, None, []
            out.opened_at.append(open_lb)
    return out
