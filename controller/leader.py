"""Leader election on a coordination.k8s.io/v1 Lease, following client-go's algorithm.

Expiry is judged by our own monotonic clock from when we last saw the record change, never
by comparing the holder's renewTime with our wall clock, so clock skew cannot split the brain.
A leader that has not renewed within renew_deadline (< lease_duration) stops writing before
anyone else can acquire the lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from controller.kube import LEASES, AlreadyExists, Conflict, Kube, NotFound
from protos.logs import utc_timestamp

log = logging.getLogger(__name__)


def _micro_now() -> str:
    return utc_timestamp(digits=6)  # a Lease's times are MicroTime


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert renew_deadline < lease_duration
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._leader = False
        self._renewed_at = 0.0

    def is_leader(self) -> bool:
        return self._leader and self.clock() - self._renewed_at < self.renew_deadline

    def _spec(self, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "acquireTime": acquire_time,
            "renewTime": _micro_now(),
            "leaseTransitions": transitions,
        }

    def try_acquire_or_renew(self) -> bool:
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name)
        except NotFound:
            try:
                self.kube.create(
                    LEASES,
                    self.namespace,
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": self._spec(_micro_now(), 0),
                    },
                )
            except AlreadyExists:  # another replica created it first
                return False
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False
        mine = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        acquire = str(spec["acquireTime"]) if mine and spec.get("acquireTime") else _micro_now()
        lease["spec"] = self._spec(acquire, transitions)
        try:
            self.kube.replace(LEASES, self.namespace, self.name, lease)
        except Conflict:  # someone else wrote first; they win this round
            return False
        return True

    def release(self) -> None:
        if not self._leader:
            return
        self._leader = False
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
                self.kube.replace(LEASES, self.namespace, self.name, lease)
        except Exception as exc:  # best effort: the lease expires anyway
            log.warning("lease release failed", extra={"error": repr(exc)})

    def run(
        self, stop: threading.Event, on_started: Callable[[], None], on_stopped: Callable[[], None]
    ) -> None:
        while not stop.is_set():
            try:
                ok = self.try_acquire_or_renew()
            except Exception as exc:
                log.warning("lease update failed", extra={"error": repr(exc)})
                ok = False
            if ok:
                self._renewed_at = self.clock()
                if not self._leader:
                    self._leader = True
                    log.info(
                        "became leader",
                        extra={"identity": self.identity, "lease": f"{self.namespace}/{self.name}"},
                    )
                    on_started()
            elif self._leader and not self.is_leader():
                self._leader = False
                log.warning("lost leadership", extra={"identity": self.identity})
                on_stopped()
                return
            stop.wait(self.retry_period)
