"""The benchmark stack on loopback, started fresh for each run.

- upstream Envoy: one listener per fake provider, each a buffer filter + `direct_response`
  (a fixed OpenAI chat completion with usage, or a 500), so the upstream is never the bottleneck;
  per-listener stats count what each provider received.
- SSE server (bench.sse_server): the streaming upstream.
- ext_proc: `holysheep-mesh extproc --workers N` with a bench config (one document per target).
- floor: bench.floor, a do-nothing ext_proc.
- front Envoy: extproc.dev.envoy_bootstrap.build_bootstrap() exactly as the dev stack renders it,
  plus passthrough vhosts for the baseline and a second listener whose ext_proc is the floor.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from extproc.dev.devstack import envoy_binary
from extproc.dev.envoy_bootstrap import EXTPROC_CLUSTER, BootstrapOptions, Passthrough, build_bootstrap
from protos.filter_config import ext_proc_filter
from protos.spec import load_file

CHAT_RESPONSE = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    },
    separators=(",", ":"),
)
ERROR_RESPONSE = json.dumps({"error": {"message": "bench primary fails", "type": "server_error", "code": None}})

# Upstream listeners: name -> (status, body). Each provider needs its own port (one vhost per
# provider authority in the front Envoy).
UPSTREAMS = {
    "baseline": (200, CHAT_RESPONSE),
    "fallback": (200, CHAT_RESPONSE),
    "always": (200, CHAT_RESPONSE),
    "fo_primary": (500, ERROR_RESPONSE),
    "fo_secondary": (200, CHAT_RESPONSE),
    "open_primary": (500, ERROR_RESPONSE),
    "open_secondary": (200, CHAT_RESPONSE),
}

API_KEY_ENV = "HOLYSHEEP_BENCH_KEY"

CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-fallback, namespace: bench}}
spec:
  timeout: 10s
  maxRetries: 1
  providers:
    - {{name: fallback, baseUrl: "http://127.0.0.1:{fallback}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes:
    - models: [bench-fallback]
      backends: [{{provider: fallback}}]
  cache: {{mode: Fallback, ttl: 1h}}
  pricing: [{{model: "bench-*", inputPerMillion: 1, outputPerMillion: 2}}]
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-always, namespace: bench}}
spec:
  timeout: 10s
  maxRetries: 1
  providers:
    - {{name: always, baseUrl: "http://127.0.0.1:{always}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes:
    - models: [bench-always]
      backends: [{{provider: always}}]
  cache: {{mode: Always, ttl: 1h}}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-failover, namespace: bench}}
spec:
  timeout: 10s
  maxRetries: 1
  circuitBreaker: {{enabled: false}}
  providers:
    - {{name: fo-primary, baseUrl: "http://127.0.0.1:{fo_primary}/v1", auth: {{type: Bearer, env: {env}}}}}
    - {{name: fo-secondary, baseUrl: "http://127.0.0.1:{fo_secondary}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes:
    - models: [bench-failover]
      backends: [{{provider: fo-primary, priority: 0}}, {{provider: fo-secondary, priority: 1}}]
  cache: {{mode: Fallback, ttl: 1h}}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-open, namespace: bench}}
spec:
  timeout: 10s
  maxRetries: 1
  circuitBreaker: {{enabled: true, failureThreshold: 3, resetTimeout: 1h}}
  providers:
    - {{name: open-primary, baseUrl: "http://127.0.0.1:{open_primary}/v1", auth: {{type: Bearer, env: {env}}}}}
    - {{name: open-secondary, baseUrl: "http://127.0.0.1:{open_secondary}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes:
    - models: [bench-open]
      backends: [{{provider: open-primary, priority: 0}}, {{provider: open-secondary, priority: 1}}]
  cache: {{mode: Fallback, ttl: 1h}}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-stream, namespace: bench}}
spec:
  timeout: 30s
  maxRetries: 1
  providers:
    - {{name: stream, baseUrl: "http://127.0.0.1:{sse}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes:
    - models: [bench-stream]
      backends: [{{provider: stream}}]
  cache: {{mode: Fallback, ttl: 1h}}
"""

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_BUFFER = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream_bootstrap(ports: dict[str, int], admin_port: int) -> dict:
    listeners = []
    for name, (status, body) in UPSTREAMS.items():
        hcm = {
            "@type": _HCM,
            "stat_prefix": name,
            "codec_type": "AUTO",
            "route_config": {
                "name": name,
                "virtual_hosts": [
                    {
                        "name": name,
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "direct_response": {"status": status, "body": {"inline_string": body}},
                                "response_headers_to_add": [
                                    {"header": {"key": "content-type", "value": "application/json"}}
                                ],
                            }
                        ],
                    }
                ],
            },
            "http_filters": [
                {"name": "envoy.filters.http.buffer", "typed_config": {"@type": _BUFFER, "max_request_bytes": 1 << 20}},
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
            ],
        }
        listeners.append(
            {
                "name": name,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports[name]}},
                "filter_chains": [
                    {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                ],
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "node": {"id": "bench-upstream", "cluster": "bench-upstream"},
        "static_resources": {"listeners": listeners},
    }


def front_bootstrap(config_path: str, ports: dict[str, int]) -> dict:
    boot = build_bootstrap(
        load_file(config_path),
        BootstrapOptions(
            listen_port=ports["front"],
            admin_port=ports["front_admin"],
            extproc_addresses=[("127.0.0.1", ports["grpc"])],
            passthrough=[
                Passthrough("bench-baseline", "127.0.0.1", ports["baseline"]),
                Passthrough("bench-baseline-sse", "127.0.0.1", ports["sse"]),
            ],
        ),
    )
    res = boot["static_resources"]
    # Floor: a second listener, same HCM settings, whose (enabled) ext_proc is the do-nothing server
    # and whose routes go straight to the baseline upstreams.
    listener = copy.deepcopy(res["listeners"][0])
    listener["name"] = "floor"
    listener["address"]["socket_address"]["port_value"] = ports["floor_listen"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "floor"
    ext = hcm["http_filters"][0]
    timeout = ext["typed_config"]["message_timeout"]
    floor_filter = ext_proc_filter("bench-floor", 1.0, disabled=False)
    floor_filter["typed_config"]["message_timeout"] = timeout
    floor_filter["typed_config"]["max_message_timeout"] = timeout
    floor_filter["typed_config"].pop("request_attributes", None)
    hcm["http_filters"][0] = floor_filter
    hcm["route_config"] = {
        "name": "floor",
        "virtual_hosts": [
            {
                "name": "floor-sse",
                "domains": ["bench-baseline-sse"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "passthrough-1"}}],
            },
            {
                "name": "floor",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "passthrough-0"}}],
            },
        ],
    }
    res["listeners"].append(listener)
    grpc_cluster = copy.deepcopy(next(c for c in res["clusters"] if c["name"] == EXTPROC_CLUSTER))
    grpc_cluster["name"] = "bench-floor"
    grpc_cluster["load_assignment"] = {
        "cluster_name": "bench-floor",
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports["floor_grpc"]}}
                        }
                    }
                ]
            }
        ],
    }
    res["clusters"].append(grpc_cluster)
    return boot


def _get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _wait(url: str, procs: list[subprocess.Popen], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode} before ready")
        with contextlib.suppress(OSError):
            if _get(url)[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {deadline}s")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Stack:
    workers: int
    sse_chunks: int = 8
    sse_gap_ms: float = 20.0
    log_level: str = "WARNING"
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    workdir: str = ""
    _logs: list = field(default_factory=list)

    def start(self) -> Stack:
        self.workdir = tempfile.mkdtemp(prefix="holysheep-bench-")
        names = [
            *UPSTREAMS,
            "upstream_admin",
            "sse",
            "grpc",
            "http",
            "floor_grpc",
            "front",
            "front_admin",
            "floor_listen",
        ]
        self.ports = {n: free_port() for n in names}
        p = self.ports
        config_path = os.path.join(self.workdir, "bench.yaml")
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(CONFIG.format(env=API_KEY_ENV, sse=p["sse"], **{k: p[k] for k in UPSTREAMS}))
        os.makedirs(os.path.join(self.workdir, "secrets"), exist_ok=True)
        envoy = envoy_binary()
        try:
            self._spawn_envoy("upstream", envoy, upstream_bootstrap(p, p["upstream_admin"]), 1)
            self.procs["sse"] = self._popen(
                [
                    sys.executable,
                    "-m",
                    "bench.sse_server",
                    "--port",
                    str(p["sse"]),
                    "--chunks",
                    str(self.sse_chunks),
                    "--gap-ms",
                    str(self.sse_gap_ms),
                ]
            )
            env = {**os.environ, API_KEY_ENV: "sk-bench-not-a-secret", "HOLYSHEEP_LOG_LEVEL": self.log_level}
            env.pop("HOLYSHEEP_WORKER", None)
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            self.procs["extproc"] = self._popen(
                [
                    # The interpreter running the bench, so an un-activated venv works too.
                    sys.executable,
                    "-m",
                    "extproc.cli",
                    "extproc",
                    "--config",
                    config_path,
                    "--grpc-address",
                    f"127.0.0.1:{p['grpc']}",
                    "--http-address",
                    f"127.0.0.1:{p['http']}",
                    "--workers",
                    str(self.workers),
                    "--secrets-dir",
                    os.path.join(self.workdir, "secrets"),
                    "--drain-seconds",
                    "1",
                    "--log-level",
                    self.log_level,
                ],
                env=env,
            )
            self.procs["floor"] = self._popen(
                [
                    sys.executable,
                    "-m",
                    "bench.floor",
                    "--address",
                    f"127.0.0.1:{p['floor_grpc']}",
                    "--workers",
                    str(self.workers),
                ]
            )
            self._spawn_envoy("front", envoy, front_bootstrap(config_path, p), 2)
            _wait(f"http://127.0.0.1:{p['upstream_admin']}/ready", list(self.procs.values()))
            _wait(f"http://127.0.0.1:{p['front_admin']}/ready", list(self.procs.values()))
            _wait(f"http://127.0.0.1:{p['http']}/ready", list(self.procs.values()))
            self._wait_port(p["sse"])
            self._wait_port(p["floor_grpc"])
            # every worker must be up before measuring: wait until the tree has them all
            from bench.procstat import tree

            end = time.monotonic() + 30
            while len(tree(self.procs["extproc"].pid)) < 1 + (self.workers if self.workers > 1 else 0):
                if time.monotonic() > end:
                    raise RuntimeError("ext_proc workers did not start")
                time.sleep(0.1)
            time.sleep(1.0 if self.workers > 1 else 0.2)  # workers bind after they start
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_port(self, port: int, deadline: float = 20.0) -> None:
        end = time.monotonic() + deadline
        while not _port_open(port):
            if time.monotonic() > end:
                raise RuntimeError(f"port {port} not open")
            time.sleep(0.1)

    def _popen(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, os.path.basename(cmd[0]) + f"-{len(self.procs)}.log"), "wb")
        self._logs.append(log)
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _spawn_envoy(self, name: str, binary: str, bootstrap: dict, concurrency: int) -> None:
        path = os.path.join(self.workdir, f"{name}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(bootstrap, fh, indent=1)
        self.procs[name] = self._popen(
            [
                binary,
                "-c",
                path,
                "--disable-hot-restart",
                "--log-level",
                "error",
                "--concurrency",
                str(concurrency),
                "--base-id",
                str(free_port()),
            ]
        )

    def upstream_count(self, listener: str) -> int:
        """Requests a fake provider has received (its listener's downstream_rq_total)."""
        stat = f"http.{listener}.downstream_rq_total"
        _, text = _get(f"http://127.0.0.1:{self.ports['upstream_admin']}/stats?filter=^{stat}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == stat:
                return int(value)
        return 0

    def stop(self) -> None:
        for name in ("front", "floor", "extproc", "sse", "upstream"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.workdir and not os.environ.get("BENCH_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)
