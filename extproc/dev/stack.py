"""A whole data plane on loopback, as processes: mock providers, ext_proc(s), a real Envoy.

The one stack harness of the tests (tests/harness.py adds the leak guard on top) and the bench
(bench/stack.py adds its fixed upstreams and the floor; bench/chaos.py uses it as is). Every
piece binds 127.0.0.1 on a free port and can be stopped and restarted on its own, to inject
faults. The Envoy bootstrap is the dev stack's own (``envoy_bootstrap.build_bootstrap``).

Envoy calls the ext_proc over mTLS (extproc.dev.mtls.DevPKI, a throwaway CA per stack) and
presents a workload certificate, so every test through a Stack is authenticated and authorized:
``workload="NAMESPACE/SERVICE_ACCOUNT"`` (default: service account ``default`` in the first
config's namespace, so the stack's own config is in scope). ``insecure=True`` runs the ext_proc
with ``--insecure-no-identity`` and Envoy in plaintext instead (tests of that dev mode only).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from extproc.dev.envoy_bootstrap import BootstrapOptions, Passthrough, build_bootstrap
from extproc.dev.mtls import DevPKI, parse_workload
from extproc.dev.processes import Envoy, ExtProc, free_port
from protos.spec import load_text

if TYPE_CHECKING:  # httpx is a test/bench dependency: imported only by the client methods
    import grpc
    import httpx

    from extproc.dev.mock_provider import MockProvider

__all__ = ["Stack", "running"]

BootstrapHook = Callable[[dict[str, Any]], dict[str, Any]]


class Stack:
    """Mocks + ext_proc(s) + Envoy built from one HolySheepConfig template.

    The template's ``{name}`` placeholders are replaced by the base URL of the mock of that name;
    a mock whose ``port`` is unset is started on a thread here (one given a port runs elsewhere,
    e.g. in its own process). ``bootstrap_hook`` may amend the Envoy bootstrap before it starts.
    """

    def __init__(
        self,
        template: str,
        mocks: dict[str, MockProvider] | None = None,
        env: dict[str, str] | None = None,
        secrets: dict[tuple[str, str], str] | None = None,
        passthrough: Sequence[tuple[str, int]] = (),
        workers: int = 1,
        extproc_count: int = 1,
        node_metadata: dict[str, str] | None = None,
        *,
        workdir: Path | None = None,
        drain_seconds: float = 5.0,
        drain_delay_seconds: float = 0.0,
        log_level: str = "DEBUG",
        envoy_concurrency: int = 1,
        envoy_log_level: str = "warning",
        bootstrap_hook: BootstrapHook | None = None,
        workload: str = "",
        insecure: bool = False,
        extproc_module: str = "extproc.cli",
    ) -> None:
        self.template = template
        self.mocks = mocks or {}
        self.node_metadata = node_metadata or {}
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="holysheep-e2e-"))
        self.secrets_dir = self.workdir / "secrets"
        self.secrets_dir.mkdir(exist_ok=True)
        for (secret, key), value in (secrets or {}).items():
            self.write_secret(secret, key, value)
        self.config_path = self.workdir / "config.yaml"
        self.env = {**os.environ, **(env or {})}
        for inherited in ("PROMETHEUS_MULTIPROC_DIR", "HOLYSHEEP_WORKER"):  # set per process by the supervisor
            self.env.pop(inherited, None)
        self.passthrough = passthrough
        self.workers = workers
        self.extproc_count = extproc_count
        self.drain_seconds = drain_seconds
        self.drain_delay_seconds = drain_delay_seconds
        self.log_level = log_level
        self.envoy_concurrency = envoy_concurrency
        self.envoy_log_level = envoy_log_level
        self.bootstrap_hook = bootstrap_hook
        self.workload = workload
        self.insecure = insecure
        self.extproc_module = extproc_module
        self.pki: DevPKI | None = None
        self.extprocs: list[ExtProc] = []
        self.envoy: Envoy | None = None
        self.port = free_port()
        self.admin_port = free_port()
        self.started = False

    @property
    def extproc(self) -> ExtProc:
        return self.extprocs[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- clients to this stack's Envoy ---------------------------------------------------------

    def _transport(self, label: str, http2: bool) -> httpx.HTTPTransport:
        import httpx

        return httpx.HTTPTransport(http1=not http2, http2=http2)

    def _async_transport(self, label: str, http2: bool) -> httpx.AsyncHTTPTransport:
        import httpx

        return httpx.AsyncHTTPTransport(http1=not http2, http2=http2)

    def new_client(self, label: str = "client", http2: bool = False, **kwargs: Any) -> httpx.Client:
        """An httpx client to this stack's Envoy; ``http2=True`` speaks h2c with prior knowledge."""
        import httpx

        kwargs.setdefault("base_url", self.url)
        kwargs.setdefault("timeout", 30)
        return httpx.Client(transport=self._transport(label, http2), **kwargs)

    def new_async_client(self, label: str = "async client", http2: bool = False,
                         **kwargs: Any) -> httpx.AsyncClient:
        import httpx

        kwargs.setdefault("base_url", self.url)
        kwargs.setdefault("timeout", 30)
        return httpx.AsyncClient(transport=self._async_transport(label, http2), **kwargs)

    @cached_property
    def client(self) -> httpx.Client:
        return self.new_client(label="stack.client")

    def chat(self, model: str, content: str = "hi", headers: dict[str, str] | None = None,
             stream: bool = False, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        if stream:
            body["stream"] = True
        return self.client.post("/v1/chat/completions", json=body, headers=headers or {})

    # ---- config and secrets ----------------------------------------------------------------------

    def render(self, template: str | None = None) -> str:
        text = template or self.template
        for name, mock in self.mocks.items():
            text = text.replace("{" + name + "}", f"http://127.0.0.1:{mock.port}{mock.prefix}")
        return text

    def write_config(self, template: str | None = None) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.render(template))
        tmp.replace(self.config_path)  # atomic, as kubelet's symlink swap is

    def write_secret(self, secret: str, key: str, value: str) -> None:
        d = self.secrets_dir / secret
        d.mkdir(exist_ok=True)
        tmp = d / f".{key}.tmp"
        tmp.write_text(value)
        tmp.replace(d / key)

    # ---- lifecycle -------------------------------------------------------------------------------

    def bootstrap(self) -> dict[str, Any]:
        boot = build_bootstrap(load_text(self.render()), BootstrapOptions(
            listen_port=self.port, admin_port=self.admin_port,
            extproc_addresses=[("127.0.0.1", ep.grpc_port) for ep in self.extprocs],
            passthrough=[Passthrough(d, "127.0.0.1", p) for d, p in self.passthrough],
            node_metadata=self.node_metadata,
            extproc_tls=self.pki.upstream_tls() if self.pki is not None else None,
        ))
        return self.bootstrap_hook(boot) if self.bootstrap_hook else boot

    def start(self) -> Stack:
        for mock in self.mocks.values():
            if not mock.port:
                mock.start_in_thread()
        self.write_config()
        if not self.insecure and self.pki is None:
            workload = self.workload or f"{load_text(self.render())[0].namespace}/default"
            self.pki = DevPKI(self.workdir / "pki", parse_workload(workload))
        for i in range(self.extproc_count):
            ep = ExtProc(self.config_path, self.secrets_dir, self.env, workers=self.workers,
                         log_path=self.workdir / f"extproc-{i}.log", drain_seconds=self.drain_seconds,
                         drain_delay_seconds=self.drain_delay_seconds, log_level=self.log_level,
                         module=self.extproc_module)
            ep.extra_args = self.pki.extproc_args() if self.pki is not None else ["--insecure-no-identity"]
            ep.start()
            self.extprocs.append(ep)
        self.envoy = Envoy(self.bootstrap(), self.workdir, self.port, self.admin_port,
                           concurrency=self.envoy_concurrency, log_level=self.envoy_log_level)
        self.started = True
        self.envoy.start()
        return self

    def extproc_channel(self, index: int = 0) -> grpc.Channel:
        """A gRPC channel straight to an ext_proc, presenting the stack's workload certificate as
        its Envoy does (plaintext for an insecure stack)."""
        import grpc

        target = f"127.0.0.1:{self.extprocs[index].grpc_port}"
        if self.pki is None:
            return grpc.insecure_channel(target)
        cert = self.pki.envoy_cert
        creds = grpc.ssl_channel_credentials(b"".join(ca.cert_pem for ca in self.pki.trusted), cert.key_pem,
                                             cert.cert_pem)
        return grpc.secure_channel(target, creds)

    def stop(self) -> None:
        if "client" in self.__dict__:
            self.client.close()
        if self.envoy:
            self.envoy.stop()
        for ep in self.extprocs:
            ep.stop()
        for mock in self.mocks.values():
            mock.stop_in_thread()
        self.started = False

    def log_files(self) -> list[Path]:
        """Every log this stack's processes write: ext_procs (all workers share one), Envoy."""
        paths = set(self.workdir.rglob("*.log"))
        paths |= {ep.log_path for ep in self.extprocs if ep.log_path is not None}
        if self.envoy is not None:
            paths.add(self.envoy.log_path)
        return sorted(paths)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.workdir.glob("*.log"))


S = TypeVar("S", bound=Stack)


@contextlib.contextmanager
def running(stack: S) -> Iterator[S]:
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
