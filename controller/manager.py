"""Wires leader election, the informer, the work queue, resync and the reconcile worker.

Only the leader runs the informer and worker; every write is additionally guarded by
`is_leader()`, so a replica whose renewals stall stops writing before the lease can move.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass, field

from controller.informer import Informer
from controller.kube import HOLYSHEEPCONFIGS, Kube
from controller.leader import LeaderElector
from controller.reconcile import NotLeader, Reconciler
from controller.render import RenderOptions
from controller.workqueue import WorkQueue
from protos import logs

log = logging.getLogger(__name__)


@dataclass
class ManagerConfig:
    namespace: str | None = None
    lease_namespace: str = "holysheep-system"
    lease_name: str = "holysheep-mesh-controller"
    identity: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    resync_seconds: float = 300.0
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    watch_timeout: int = 300
    max_backoff: float = 60.0


class Manager:
    def __init__(self, kube: Kube, options: RenderOptions, config: ManagerConfig) -> None:
        self.kube = kube
        self.config = config
        self.elector = LeaderElector(
            kube,
            config.lease_namespace,
            config.lease_name,
            config.identity,
            config.lease_duration,
            config.renew_deadline,
            config.retry_period,
        )
        self.reconciler = Reconciler(
            kube, options, may_write=self.elector.is_leader, identity=config.identity
        )
        self.queue = WorkQueue()
        self.stop = threading.Event()  # set by the owner: shut down
        self._work_stop = threading.Event()  # set when leadership ends
        self._triggers: dict[str, str] = {}
        self._failures: dict[str, int] = {}
        self.informer = Informer(
            kube,
            HOLYSHEEPCONFIGS,
            config.namespace,
            self._enqueue,
            self._work_stop,
            watch_timeout=config.watch_timeout,
        )
        self.lost_leadership = False
        self._threads: list[threading.Thread] = []

    def _enqueue(self, key: str, trigger: str) -> None:
        self._triggers[key] = trigger
        self.queue.add(key)

    def _spawn(self, target: object, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _on_started(self) -> None:
        self._spawn(self.informer.run, "informer")
        self._spawn(self._worker, "worker")
        self._spawn(self._resync, "resync")

    def _on_stopped(self) -> None:
        self.lost_leadership = True
        self._work_stop.set()
        self.queue.shutdown()
        self.stop.set()

    def _resync(self) -> None:
        while not self._work_stop.wait(self.config.resync_seconds):
            # Plus configs that only left objects in other namespaces behind (deleted while no
            # controller ran): their reconcile finds no CR and prunes those.
            for key in set(self.informer.keys()) | self.reconciler.remote_keys(self.config.namespace):
                self._enqueue(key, "resync")

    def _worker(self) -> None:
        while not self._work_stop.is_set():
            key = self.queue.get(timeout=0.5)
            if key is None:
                continue
            try:
                result = self.reconciler.reconcile(key, self._triggers.get(key, "event"))
                self._failures.pop(key, None)
                if result.requeue_after:
                    self.queue.add_after(key, result.requeue_after)
            except NotLeader:
                log.info("not the leader; skipping writes", extra={"key": key})
            except Exception as exc:
                n = self._failures[key] = self._failures.get(key, 0) + 1
                delay = min(0.25 * 2**n, self.config.max_backoff)
                log.error("reconcile failed", extra={"key": key, "error": repr(exc), "retry_in": delay})
                self.queue.add_after(key, delay)
            finally:
                self.queue.done(key)

    def start(self) -> None:
        """Run in background threads; call shutdown() to stop."""
        self._spawn(lambda: self.elector.run(self.stop, self._on_started, self._on_stopped), "leader")

    def shutdown(self, release: bool = True) -> None:
        self.stop.set()
        self._work_stop.set()
        self.queue.shutdown()
        for t in self._threads:
            if t.name != "informer":  # a watch ends on its own timeout; it writes nothing
                t.join(timeout=5)
        if release:
            self.elector.release()

    def run(self) -> int:
        self.start()
        self.stop.wait()
        self.shutdown()
        return 1 if self.lost_leadership else 0


def _load_kube(kubeconfig: str | None, identity: str) -> Kube:
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return Kube(client.ApiClient(), user_agent=f"holysheep-mesh/{identity}")


def run_from_args(args: argparse.Namespace, options: RenderOptions) -> int:
    logs.setup(args.log_level)
    mc = ManagerConfig(
        namespace=args.namespace,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        resync_seconds=args.resync_seconds,
    )
    if args.identity:
        mc.identity = args.identity
    manager = Manager(_load_kube(args.kubeconfig, mc.identity), options, mc)
    signal.signal(signal.SIGTERM, lambda *_: manager.stop.set())
    signal.signal(signal.SIGINT, lambda *_: manager.stop.set())
    log.info("starting", extra={"identity": mc.identity, "namespace": mc.namespace or "*"})
    return manager.run()
