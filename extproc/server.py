"""The data plane process: gRPC ext_proc + health, HTTP /health /ready /metrics, reload, drain.

The gRPC port is plaintext, or mTLS requiring a client certificate from ``tls.client_ca``
(extproc/tls.py, files followed without a restart); ``identity_from`` says where each stream's
caller identity comes from (extproc/identity.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from extproc import heap, metrics, settlements, wakeups
from extproc.credentials import DEFAULT_SECRETS_DIR, CredentialStore
from extproc.health import HealthChecker
from extproc.identity import IdentityFrom, authenticator
from extproc.runtime import Runtime
from extproc.service import ExternalProcessorService
from extproc.tls import ReloadingServerCredentials, TLSFiles
from extproc.upstream import UpstreamClient
from protos.spec import ConfigError, load_text

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"  # its gRPC health service name


@dataclass
class ServerOptions:
    config_path: str
    grpc_address: str = "0.0.0.0:9002"
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    secrets_dir: str = DEFAULT_SECRETS_DIR
    reload_interval: float = 1.0
    # Termination (README "Upgrade"): after SIGTERM, not ready but still serving new streams for
    # drain_delay_seconds, then up to drain_seconds for the streams in flight. Same defaults as
    # the CLI's flags; mesh/base/extproc.yaml says why these values.
    drain_delay_seconds: float = 20.0
    drain_seconds: float = 20.0
    # Who is calling (README, Security). NONE refuses every stream: secure unless told otherwise.
    identity_from: IdentityFrom = IdentityFrom.NONE
    tls: TLSFiles | None = None  # with identity_from TLS: serve mTLS with these files
    tls_reload_interval: float = 1.0
    trust_domains: tuple[str, ...] = ()  # SPIFFE trust domains accepted; empty: any
    root_namespace: str = "istio-system"  # a config here serves every namespace (extproc/authz.py)


class DataPlane:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.credentials = CredentialStore(options.secrets_dir)
        self.upstream = UpstreamClient()
        self.health = HealthChecker(self.upstream)
        self.runtime: Runtime | None = None
        if (options.identity_from is IdentityFrom.TLS) != (options.tls is not None):
            raise ValueError("identity_from TLS and tls files go together")
        self.authenticate = authenticator(options.identity_from, options.trust_domains or None)
        self.serving = False
        self.shutting_down = False
        self._config_digest = b""
        self._tasks: set[asyncio.Task[Any]] = set()
        self.root_namespace = options.root_namespace  # read per stream

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.serving and not self.shutting_down

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire-and-forget work off the hot path; kept referenced so it is not collected."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Load the config file if it changed. A bad file keeps the last good config."""
        try:
            text = await asyncio.to_thread(_read, self.options.config_path)
        except OSError as exc:
            if self.runtime is None:
                log.error("cannot read config %s: %s", self.options.config_path, exc.strerror)
            return False
        digest = hashlib.sha256(text.encode()).digest()
        if digest == self._config_digest:
            return False
        self._config_digest = digest
        try:
            configs = load_text(text)
            runtime = Runtime(configs, self.credentials, previous=self.runtime)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("invalid").inc()
            log.error("config rejected, keeping the last good one: %s", exc)
            return False
        settlements.flush()  # the answers of the retiring config go to its caches before they close
        for cache in runtime.retired_caches:
            self.spawn(cache.close())
        for store in runtime.retired_budget_stores:
            self.spawn(store.close())  # after its usage writes in flight
        self.runtime = runtime
        self.health.start(runtime)
        metrics.CONFIG_RELOADS.labels("ok").inc()
        log.info("config loaded: %d document(s), providers %s", len(configs), ", ".join(runtime.providers))
        self._update_ready()
        return True

    async def _watch_config(self) -> None:
        while True:
            await wakeups.sleep(self.options.reload_interval)
            try:
                await self.reload()
            except Exception:
                log.exception("config reload failed")

    def _update_ready(self) -> None:
        metrics.READY.set(1 if self.ready else 0)

    async def run(self, stop: asyncio.Event) -> None:
        await self.reload()
        self.credentials.start()
        grpc_server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 << 20)])
        service = ExternalProcessorService(self)
        pbg.add_ExternalProcessorServicer_to_server(service, grpc_server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        files = self.options.tls
        tls = ReloadingServerCredentials(files, self.options.tls_reload_interval) if files is not None else None
        if tls is not None:
            port = grpc_server.add_secure_port(self.options.grpc_address, tls.server_credentials())
            tls.start()
        else:
            port = grpc_server.add_insecure_port(self.options.grpc_address)
        if port == 0:
            raise RuntimeError(f"cannot listen on {self.options.grpc_address}")
        # The health status is set before the port serves: the servicer starts out SERVING, which
        # a health check arriving first would otherwise see even with no valid config.
        status = health_pb2.HealthCheckResponse.SERVING if self.runtime else health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set("", status)
        await health_servicer.set(EXT_PROC_SERVICE, status)
        await grpc_server.start()
        runner = web.AppRunner(self._admin_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.options.http_host, self.options.http_port, reuse_port=True)
        await site.start()
        self.serving = True
        self._update_ready()
        heap.settle()  # the start-up heap is never scanned again (extproc/heap.py)
        log.info("serving ext_proc on %s (port %d, %s), admin on %s:%d",
                 self.options.grpc_address, port, "mTLS" if tls else "plaintext", self.options.http_host,
                 self.options.http_port)
        _log_identity_mode(self.options.identity_from)
        watcher = asyncio.get_running_loop().create_task(self._watch_config())
        await stop.wait()

        await self._drain(grpc_server, health_servicer, service)
        settlements.flush()  # the last answers' usage and cache copies, while caches and the loop run
        watcher.cancel()
        await runner.cleanup()
        await self.health.stop()
        await self.credentials.stop()
        if tls is not None:
            await tls.stop()
        await self.upstream.close()
        if self._tasks:  # the Redis writes of those copies (bounded: a dead Redis must not hold the exit)
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self.runtime is not None:
            for cache in self.runtime.caches.values():
                await cache.close()
            for store in self.runtime.budget_stores.values():
                await store.close()
        metrics.flush()  # the last requests' counts: nothing is lost on shutdown
        log.info("stopped")

    async def _drain(self, grpc_server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                     service: ExternalProcessorService) -> None:
        """Termination that loses no stream, in two phases.

        1. Not ready at once (/ready 503, gRPC health NOT_SERVING for every service), yet still
           accepting and serving new streams for drain_delay_seconds: until then some Envoy may
           not know yet that this endpoint is going (readiness probe, endpoint propagation; an
           active health check locally), and a stream refused meanwhile could only be retried
           if it failed before its first answer.
        2. grpc.aio's stop(grace): the listener closes and every connection gets a GOAWAY, so
           Envoy opens new streams elsewhere (a refused connection or a stream answered CANCELLED
           right at the GOAWAY are both in the filter's retry_on); the streams in flight run to
           their end for up to drain_seconds, after which gRPC cancels what is left. stop()
           returns as soon as the last one ends.
        """
        delay, grace = self.options.drain_delay_seconds, self.options.drain_seconds
        self.shutting_down = True
        self._update_ready()
        await health_servicer.enter_graceful_shutdown()
        log.info("shutting down: not ready; serving new streams for %gs more, then draining for up to %gs",
                 delay, grace, extra={"in_flight": service.in_flight})
        if delay > 0:
            await asyncio.sleep(delay)
        in_flight, t0 = service.in_flight, time.monotonic()
        stopping = asyncio.ensure_future(grpc_server.stop(grace=grace))
        try:
            await asyncio.wait_for(service.idle.wait(), grace)
        except TimeoutError:
            log.warning("drain deadline reached: cancelling %d stream(s) still in flight", service.in_flight)
        await stopping
        log.info("drained", extra={"in_flight_at_stop": in_flight, "drain_s": round(time.monotonic() - t0, 3)})

    def _admin_app(self) -> web.Application:
        app = web.Application()
        # Every admin answer says "Connection: close": aiohttp keeps an idle connection with a
        # timer on the loop, and a pending timer slows every gRPC write (extproc/wakeups.py). A
        # scraper that would keep its connection open (Prometheus) opens a new one per scrape.
        app.on_response_prepare.append(_close_after_answer)

        async def health_handler(_: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def ready_handler(_: web.Request) -> web.Response:
            if self.ready:
                return web.json_response({"status": "ready"})
            if self.shutting_down:
                reason = "shutting down"
            else:
                reason = "no valid config" if self.runtime is None else "starting"
            return web.json_response({"status": "not ready", "reason": reason}, status=503)

        async def metrics_handler(_: web.Request) -> web.Response:
            metrics.flush()  # this process's counts of the current loop iteration, before rendering
            body = await asyncio.to_thread(_render_metrics, self.runtime)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app.router.add_get("/health", health_handler)
        app.router.add_get("/ready", ready_handler)
        app.router.add_get("/metrics", metrics_handler)
        return app


async def _close_after_answer(_: web.Request, response: web.StreamResponse) -> None:
    response.force_close()


def _log_identity_mode(mode: IdentityFrom) -> None:
    if mode is IdentityFrom.TLS:
        log.info("caller identity: the SPIFFE ID of the client certificate (mTLS)")
    elif mode is IdentityFrom.XFCC:
        log.info("caller identity: x-forwarded-client-cert from this pod's Istio sidecar (trusted only behind it, "
                 "with forwardedClientCert SANITIZE_SET and STRICT mTLS on this port)")
    elif mode is IdentityFrom.INSECURE:
        log.warning("--insecure-no-identity: callers are NOT authenticated; any caller that reaches this port gets "
                    "provider credentials and chooses its own cache scope. Development only.")
    else:
        log.error("no identity source (--tls-cert/--tls-key/--client-ca or --identity-from xfcc): every ext_proc "
                  "stream is refused with PERMISSION_DENIED")


def _read(path: str) -> str:
    """A file, or every *.yaml/*.yml in a directory (ConfigMap mounts, several CRs' ConfigMaps
    projected into one volume), as one multi-document stream."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".yaml", ".yml")) and not n.startswith("."))
        return "\n---\n".join(_read(os.path.join(path, n)) for n in names)
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _render_metrics(runtime: Runtime | None = None) -> bytes:
    if runtime is not None:
        runtime.export_budget_metrics()  # gauges read from the counters at scrape time
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(DEFAULT_REGISTRY)


async def serve(options: ServerOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await DataPlane(options).run(stop)
