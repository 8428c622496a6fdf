"""The benchmark stack on loopback, started fresh for each run.

- upstream Envoy: one listener per fake provider, each a buffer filter + `direct_response`
  (a fixed OpenAI chat completion with usage, or a 500), so the upstream is never the bottleneck;
  per-listener stats count what each provider received.
- SSE server (bench.sse_server): the streaming upstream.
- ext_proc: R replicas of `holysheep-mesh extproc --workers N` with a bench config (one document
  per target), each on its own port and an endpoint of the front Envoy's ext_proc cluster.
- floor: R replicas of bench.floor (a do-nothing ext_proc), N workers each, the same way.
- front Envoy: extproc.dev.envoy_bootstrap.build_bootstrap() exactly as the dev stack renders it,
  plus passthrough vhosts for the baseline and a second listener whose ext_proc is the floor.

The default layout is production's: `--workers 1` per replica and Envoy balancing streams over
the replicas (README, "Workers and replicas"). Several workers behind one port share it by the
kernel's SO_REUSEPORT hash of each connection, and Envoy holds only a couple of long-lived
connections, so which worker gets the load is luck: a run measured one worker taking every
stream while the floor's two split theirs.

The ext_proc and the front Envoy are the e2e tests' stack (extproc.dev.stack.Stack, no mocks);
every process is started and stopped by the shared helpers (extproc.dev.processes).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.dev import stack as dev_stack
from extproc.dev.envoy_bootstrap import EXTPROC_CLUSTER
from extproc.dev.processes import Envoy, Process, RedisServer, free_port, http_get, wait_until
from protos.filter_config import ext_proc_filter

REPO = Path(__file__).resolve().parents[1]  # `python -m bench.floor` etc. run from the checkout

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
# The same answer as Anthropic's Messages API gives it (b_translated: an OpenAI client, an Anthropic provider).
MESSAGE_RESPONSE = json.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "bench",
        "content": [{"type": "text", "text": "Hello from the bench upstream."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 7},
    },
    separators=(",", ":"),
)
ERROR_RESPONSE = json.dumps({"error": {"message": "bench primary fails", "type": "server_error", "code": None}})

# Upstream listeners: name -> (status, body). Each provider needs its own port (one vhost per
# provider authority in the front Envoy).
UPSTREAMS = {
    "baseline": (200, CHAT_RESPONSE),
    "fallback": (200, CHAT_RESPONSE),
    "translated": (200, MESSAGE_RESPONSE),
    "always": (200, CHAT_RESPONSE),
    "fo_primary": (500, ERROR_RESPONSE),
    "fo_secondary": (200, CHAT_RESPONSE),
    "open_primary": (500, ERROR_RESPONSE),
    "open_secondary": (200, CHAT_RESPONSE),
    # g_*: the same route without a budget, with one in the memory store, with one in Redis
    "unbudgeted": (200, CHAT_RESPONSE),
    "budget_memory": (200, CHAT_RESPONSE),
    "budget_redis": (200, CHAT_RESPONSE),
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
---
# g_*: one route three times, cache off (so only the budget differs): no budget, a budget in the
# replica's memory table, a budget in Redis. The limits are never reached; every request is
# admitted (requests) and its usage charged (tokens), the work a budgeted route always does.
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-unbudgeted, namespace: bench}}
spec:
  timeout: 10s
  providers:
    - {{name: unbudgeted, baseUrl: "http://127.0.0.1:{unbudgeted}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes: [{{models: [bench-unbudgeted], backends: [{{provider: unbudgeted}}]}}]
  cache: {{mode: "Off"}}
  pricing: [{{model: "bench-*", inputPerMillion: 1, outputPerMillion: 2}}]
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-budget-memory, namespace: bench}}
spec:
  timeout: 10s
  providers:
    - {{name: budget-memory, baseUrl: "http://127.0.0.1:{budget_memory}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes: [{{models: [bench-budget-memory], backends: [{{provider: budget-memory}}]}}]
  cache: {{mode: "Off"}}
  pricing: [{{model: "bench-*", inputPerMillion: 1, outputPerMillion: 2}}]
  budgets:
    - {{name: bench-memory, window: 1h, requests: 1000000000000, tokens: 1000000000000000}}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-budget-redis, namespace: bench}}
spec:
  timeout: 10s
  providers:
    - {{name: budget-redis, baseUrl: "http://127.0.0.1:{budget_redis}/v1", auth: {{type: Bearer, env: {env}}}}}
  routes: [{{models: [bench-budget-redis], backends: [{{provider: budget-redis}}]}}]
  cache: {{mode: "Off", redisUrl: "redis://127.0.0.1:{redis}/0"}}
  pricing: [{{model: "bench-*", inputPerMillion: 1, outputPerMillion: 2}}]
  budgets:
    - {{name: bench-redis, window: 1h, requests: 1000000000000, tokens: 1000000000000000}}
"""

TRANSLATED_CONFIG = """\
---
# b_translated / d_stream_translated: b_extproc's and d_stream_extproc's routes with an Anthropic
# provider, so an OpenAI client's request and answer are translated (issue 16).
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: bench-translated, namespace: bench}}
spec:
  timeout: 30s
  maxRetries: 1
  providers:
    - {{name: translated, api: Anthropic, baseUrl: "http://127.0.0.1:{translated}/v1",
       auth: {{type: XApiKey, env: {env}}}}}
    - {{name: stream-translated, api: Anthropic, baseUrl: "http://127.0.0.1:{sse_translated}/v1",
       auth: {{type: XApiKey, env: {env}}}}}
  routes:
    - {{models: [bench-translated], backends: [{{provider: translated}}]}}
    - {{models: [bench-stream-translated], backends: [{{provider: stream-translated}}]}}
  cache: {{mode: Fallback, ttl: 1h}}
  pricing: [{{model: "bench-*", inputPerMillion: 1, outputPerMillion: 2}}]
"""

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_BUFFER = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"


def upstream_bootstrap(ports: dict[str, int], admin_port: int) -> dict[str, Any]:
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


def run_our_extproc(argv: list[str]) -> int:
    """`holysheep-mesh ARGV` in this process: what a wrapper module the stack starts ours with
    (``Stack.extproc_module``: bench.phases, bench.replay) runs once it has wrapped the service."""
    from extproc import cli

    sys.argv = ["holysheep-mesh", *argv]
    return cli.main()


def add_floor(boot: dict[str, Any], ports: dict[str, int], floor_ports: list[int]) -> dict[str, Any]:
    """The front Envoy's bootstrap (the dev stack's) plus the floor listener and its cluster."""
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
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    for port in floor_ports
                ]
            }
        ],
    }
    res["clusters"].append(grpc_cluster)
    return boot


@dataclass
class Stack:
    workers: int
    replicas: int = 1
    sse_chunks: int = 8
    sse_gap_ms: float = 20.0
    log_level: str = "WARNING"
    ports: dict[str, int] = field(default_factory=dict)
    workdir: str = ""
    front: dev_stack.Stack | None = None
    upstream: Envoy | None = None
    helpers: dict[str, Process] = field(default_factory=dict)
    redis: RedisServer | None = None  # the g_budget_redis target's
    # bench.phases: run both servers under its wrappers, which stamp each message into this directory
    trace_dir: str = ""
    # bench.replay: our ext_proc under its replay switch (the module), with its directory (the env)
    extproc_module: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def procs(self) -> dict[str, Any]:
        """The root process of each piece, by name; "extproc" and "floor" are their first replica."""
        out: dict[str, Any] = {name: p.proc for name, p in self.helpers.items() if not name.startswith("floor-")}
        if "floor-0" in self.helpers:
            out["floor"] = self.helpers["floor-0"].proc
        if self.upstream is not None:
            out["upstream"] = self.upstream.proc
        if self.front is not None and self.front.extprocs:
            out["extproc"] = self.front.extproc.proc
        if self.front is not None and self.front.envoy is not None:
            out["front"] = self.front.envoy.proc
        return out

    def roots(self, name: str) -> list[int]:
        """The pid of every replica of a piece ("extproc", "floor") or of the one process of
        another: what its CPU and memory are charged to, each with its workers below it."""
        if name == "extproc" and self.front is not None:
            return [ep.proc.pid for ep in self.front.extprocs if ep.proc is not None]
        if name == "floor":
            return [h.proc.pid for n, h in self.helpers.items() if n.startswith("floor-") and h.proc]
        return [self.procs[name].pid]

    def start(self) -> Stack:
        self.workdir = tempfile.mkdtemp(prefix="holysheep-bench-")
        work = Path(self.workdir)
        names = [*UPSTREAMS, "upstream_admin", "sse", "sse_translated", "floor_listen"]
        names += [f"floor_grpc_{i}" for i in range(self.replicas)]
        self.ports = {n: free_port() for n in names}
        p = self.ports
        floor_ports = [p[f"floor_grpc_{i}"] for i in range(self.replicas)]
        self.redis = RedisServer()
        config = CONFIG.format(env=API_KEY_ENV, sse=p["sse"], redis=self.redis.port, **{k: p[k] for k in UPSTREAMS})
        config += TRANSLATED_CONFIG.format(env=API_KEY_ENV, translated=p["translated"],
                                           sse_translated=p["sse_translated"])
        traced = {"BENCH_PHASES_DIR": self.trace_dir, "PYTHONPATH": str(REPO)} if self.trace_dir else {}
        if self.extra_env:
            traced = {**traced, **self.extra_env, "PYTHONPATH": str(REPO)}
        self.front = dev_stack.Stack(
            config,
            env={API_KEY_ENV: "sk-bench-not-a-secret", "HOLYSHEEP_LOG_LEVEL": self.log_level, **traced},
            passthrough=[("bench-baseline", p["baseline"]), ("bench-baseline-sse", p["sse"])],
            workers=self.workers,
            extproc_count=self.replicas,
            workdir=work,
            drain_seconds=1.0,
            log_level=self.log_level,
            envoy_concurrency=2,
            envoy_log_level="error",
            bootstrap_hook=lambda boot: add_floor(boot, p, floor_ports),
            extproc_module=self.extproc_module or ("bench.phases" if self.trace_dir else "extproc.cli"),
        )
        p.update(front=self.front.port, front_admin=self.front.admin_port)
        floor_tls: list[str] = []
        if hasattr(self.front, "pki") and not getattr(self.front, "insecure", True):
            # Envoy calls the ext_proc over mTLS, and the floor's cluster is a copy of its cluster:
            # the floor serves the ext_proc's own files, so both pay the same transport.
            from extproc.dev.mtls import DevPKI, parse_workload

            self.front.pki = DevPKI(work / "pki", parse_workload(self.front.workload or "bench/default"))
            floor_tls = self.front.pki.extproc_args()
        self.helpers = {
            "sse": Process([sys.executable, "-m", "bench.sse_server", "--port", str(p["sse"]), "--chunks",
                            str(self.sse_chunks), "--gap-ms", str(self.sse_gap_ms)], work / "sse.log", cwd=REPO),
            # d_stream_translated's Anthropic stream: the same server on a port of its own (one
            # provider per authority in the front Envoy)
            "sse_translated": Process([sys.executable, "-m", "bench.sse_server", "--port", str(p["sse_translated"]),
                                       "--chunks", str(self.sse_chunks), "--gap-ms", str(self.sse_gap_ms)],
                                      work / "sse-translated.log", cwd=REPO),
        }
        for i, port in enumerate(floor_ports):
            floor_cmd = ["bench.phases", "floor"] if self.trace_dir else ["bench.floor"]
            self.helpers[f"floor-{i}"] = Process(
                [sys.executable, "-m", *floor_cmd, "--address", f"127.0.0.1:{port}", "--workers", str(self.workers),
                 *floor_tls], work / f"floor-{i}.log", env={**os.environ, **traced} if traced else None, cwd=REPO)
        try:
            self.upstream = Envoy(upstream_bootstrap(p, p["upstream_admin"]), work, None, p["upstream_admin"],
                                  name="upstream", concurrency=1, log_level="error")
            self.upstream.start()
            self.redis.start()
            for helper in self.helpers.values():
                helper.start()
            self.front.start()  # the ext_proc (ready), then the front Envoy (ready)
            assert self.front.extproc.proc is not None
            p.update(grpc=self.front.extproc.grpc_port, http=self.front.extproc.http_port)
            alive = [h.proc for h in self.helpers.values()]
            wait_until(lambda: _port_open(p["sse"]) and _port_open(p["sse_translated"])
                       and all(_port_open(port) for port in floor_ports),
                       timeout=20,
                       what="the SSE upstream and the floor", alive=alive)
            # every worker of every replica must be up before measuring: wait until each tree has them all
            from bench.procstat import tree

            per_replica = 1 + (self.workers if self.workers > 1 else 0)
            for ep in self.front.extprocs:
                assert ep.proc is not None
                root = ep.proc.pid
                wait_until(lambda: len(tree(root)) >= per_replica, timeout=30,  # noqa: B023 - called at once
                           what="ext_proc workers", alive=[ep.proc])
            time.sleep(1.0 if self.workers > 1 else 0.2)  # workers bind after they start
        except BaseException:
            self.stop()
            raise
        return self

    def upstream_count(self, listener: str) -> int:
        """Requests a fake provider has received (its listener's downstream_rq_total)."""
        stat = f"http.{listener}.downstream_rq_total"
        _, text = http_get(f"http://127.0.0.1:{self.ports['upstream_admin']}/stats?filter=^{stat}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == stat:
                return int(value)
        return 0

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        for helper in self.helpers.values():
            helper.stop(grace=10)
        if self.upstream is not None:
            self.upstream.stop()
        if self.redis is not None:
            self.redis.kill()
        if self.workdir and not os.environ.get("BENCH_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
