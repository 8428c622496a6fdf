"""Rolling restart of the ext_proc under steady load: ``python -m bench.rolling_restart``.

What a Deployment rollout does to the data plane, on loopback: two ``holysheep-mesh extproc``
replicas (``--workers 1``) behind a real Envoy whose ext_proc filter is exactly the one
``holysheep-mesh render`` puts in the EnvoyFilter (the HTTP_FILTER patch value, cluster name
included) and whose ext_proc cluster is the dev stack's (extproc/dev/envoy_bootstrap.py): an
active gRPC health check on each replica every second (the local stand-in for the readiness
probe and endpoint propagation), no outlier ejection, no retry cap. A closed-loop client keeps
``concurrency`` requests in flight (a mock provider in its own process answers each after
``latency_ms``, so streams are in flight at every signal). Each round signals replica A, starts
it again, waits until Envoy sends it streams (its own request counter moves), then does B.

``--signal TERM`` (the default) is a rolling update: the figure is the failed requests, 0 when
termination loses nothing. ``--signal KILL`` is a crash or a lost node: the requests in flight
on the killed replica fail closed (Envoy cannot replay an ext_proc stream past its first
answer), and the report counts them, per kill. tests/test_rolling_restart.py runs the TERM
form in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from controller.render import render_all
from extproc.dev.envoy_bootstrap import EXTPROC_CLUSTER
from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import ExtProc, MockProviderProcess, http_get, wait_until
from extproc.dev.stack import Stack
from protos.filter_config import FILTER_NAME
from protos.spec import load_text

MODEL = "restart-model"
KEY_ENV = "RESTART_PROVIDER_KEY"
KEY = "sk-restart-not-a-secret"
TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: restart, namespace: default}
spec:
  timeout: 10s
  providers:
    - {name: one, baseUrl: "{one}", auth: {env: RESTART_PROVIDER_KEY}}
  routes:
    - {models: [restart-model], backends: [{provider: one}]}
"""
REQUESTS_TOTAL = re.compile(r"^holysheep_requests_total\{[^}]*\} (\S+)$", re.M)


@dataclass
class RestartSettings:
    signal: str = "TERM"
    rounds: int = 3
    concurrency: int = 8
    latency_ms: float = 20.0
    # Two of the stand-in readiness probe's 1 s periods: Envoy's health check has seen
    # NOT_SERVING and stopped sending streams well before the replica stops accepting them.
    drain_delay_seconds: float = 2.0
    drain_seconds: float = 5.0
    request_timeout: float = 10.0
    max_requests: int = 100_000
    max_seconds: float = 150.0  # the load stops by then whatever happens
    wait_timeout: float = 20.0  # bound on every wait for a replica

    def __post_init__(self) -> None:
        if self.signal not in ("TERM", "KILL"):
            raise ValueError(f"signal must be TERM or KILL, not {self.signal!r}")


@dataclass(slots=True)
class Outcome:
    t_send: float  # time.monotonic()
    t_done: float
    status: int  # 0: no HTTP answer
    error: str  # "" for a 200 with a completion; else "http-<status> <code>", "timeout" or an exception name


@dataclass
class Restart:
    round: int
    replica: int
    signal: str
    t_signal: float
    t_exit: float = 0.0
    t_ready: float = 0.0  # the new process answers /ready
    t_serving: float = 0.0  # Envoy sends it streams
    served_after_signal: int = -1  # requests the old process completed after its SIGTERM (TERM only)
    exit_code: int | None = None


class ClosedLoopLoad:
    """``concurrency`` requests always in flight, each sent when the previous one is answered.

    Bounded in count (``max_requests``), in time (``max_seconds``, per-request timeout) and in
    concurrency; runs on its own thread and event loop so the orchestration may block.
    """

    def __init__(self, url: str, settings: RestartSettings) -> None:
        self.url = url
        self.settings = settings
        self.outcomes: list[Outcome] = []
        self.failures: list[tuple[Outcome, str]] = []  # with the start of the answer's body
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="restart-load", daemon=True)
        self._sent = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(self.settings.request_timeout + 10)

    async def _run(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(limit=s.concurrency)
        timeout = aiohttp.ClientTimeout(total=s.request_timeout)
        deadline = time.monotonic() + s.max_seconds
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def worker(w: int) -> None:
                while not self._stop.is_set() and self._sent < s.max_requests and time.monotonic() < deadline:
                    self._sent += 1
                    await self._one(session, f"{w}-{self._sent}")

            await asyncio.gather(*(worker(w) for w in range(s.concurrency)))

    async def _one(self, session: aiohttp.ClientSession, tag: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"restart {tag}"}]}
        t_send, status, error, text = time.monotonic(), 0, "", ""
        try:
            async with session.post(self.url + "/v1/chat/completions", json=body) as resp:
                status, raw = resp.status, await resp.read()
                text = raw[:300].decode("utf-8", "replace")
                if status != 200:
                    code = ""
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        code = json.loads(raw)["error"]["code"]
                    error = f"http-{status} {code}".strip()
                elif b'"choices"' not in raw:
                    error = "bad-body"
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = type(exc).__name__
        outcome = Outcome(t_send, time.monotonic(), status, error)
        self.outcomes.append(outcome)
        if error:
            self.failures.append((outcome, text))


def rendered_ext_proc_filter(config_text: str) -> dict[str, Any]:
    """The HTTP_FILTER patch value of the EnvoyFilter `render` makes for this config."""
    objects = render_all(load_text(config_text))
    (ef,) = [o for o in objects if o["kind"] == "EnvoyFilter"]
    values = [p["patch"]["value"] for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    assert values and all(v == values[0] for v in values), "one ext_proc filter per port, all alike"
    return copy.deepcopy(values[0])


def use_rendered_filter(boot: dict[str, Any], rendered: dict[str, Any]) -> dict[str, Any]:
    """The dev bootstrap with its ext_proc filter replaced by the rendered one, and its ext_proc
    cluster renamed to the cluster that filter names (Istio's outbound cluster of the Service)."""
    name = rendered["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    resources = boot["static_resources"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                filters = f["typed_config"].get("http_filters", [])
                for i, http_filter in enumerate(filters):
                    if http_filter["name"] == FILTER_NAME:
                        filters[i] = copy.deepcopy(rendered)
    (cluster,) = [c for c in resources["clusters"] if c["name"] == EXTPROC_CLUSTER]
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
    return boot


def requests_served(ep: ExtProc) -> float:
    """The replica's own count of requests it routed (0 for a fresh process)."""
    return sum(float(v) for v in REQUESTS_TOTAL.findall(ep.metrics()))


class RollingRestart:
    def __init__(self, settings: RestartSettings, stack_class: type[Stack] = Stack) -> None:
        self.settings = settings
        self.workdir = Path(tempfile.mkdtemp(prefix="holysheep-restart-"))
        self.provider = MockProviderProcess("one", self.workdir / "mock-one.log",
                                            ["--expect-key", KEY, "--latency-ms", f"{settings.latency_ms:g}"])
        self.placeholder = MockProvider("one")
        self.rendered: dict[str, Any] = {}
        self.stack = stack_class(
            TEMPLATE, {"one": self.placeholder}, env={KEY_ENV: KEY}, extproc_count=2, workdir=self.workdir,
            drain_delay_seconds=settings.drain_delay_seconds, drain_seconds=settings.drain_seconds,
            log_level="INFO", bootstrap_hook=self._bootstrap,
        )
        self.restarts: list[Restart] = []

    def _bootstrap(self, boot: dict[str, Any]) -> dict[str, Any]:
        self.rendered = rendered_ext_proc_filter(self.stack.render())
        return use_rendered_filter(boot, self.rendered)

    @property
    def cluster(self) -> str:
        return str(self.rendered["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"])

    def envoy_hosts(self) -> dict[int, str]:
        """{port: health_flags} of the ext_proc cluster's hosts, from Envoy's admin /clusters."""
        assert self.stack.envoy is not None
        status, text = http_get(self.stack.envoy.admin + "/clusters")
        hosts = {}
        for line in text.splitlines() if status == 200 else []:
            if line.startswith(self.cluster + "::") and "::health_flags::" in line:
                _, host, _, flags = line.split("::", 3)
                hosts[int(host.rsplit(":", 1)[1])] = flags
        return hosts

    def envoy_counter(self, stat: str) -> int:
        assert self.stack.envoy is not None
        _, text = http_get(f"{self.stack.envoy.admin}/stats?filter={re.escape(stat)}$")
        found = re.search(rf"{re.escape(stat)}: (\d+)", text)
        return int(found[1]) if found else 0

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.provider.start()
        self.placeholder.port = self.provider.port
        load = ClosedLoopLoad(self.stack.url, s)
        stats = ("upstream_rq_retry", "upstream_rq_retry_overflow", "upstream_cx_connect_fail")
        before: dict[str, int] = {}
        envoy_stats: dict[str, int] = {}
        try:
            self.stack.start()
            wait_until(lambda: list(self.envoy_hosts().values()) == ["healthy", "healthy"],
                       timeout=s.wait_timeout, what="both replicas healthy in Envoy")
            before = {stat: self.envoy_counter(f"cluster.{self.cluster}.{stat}") for stat in stats}
            t0 = time.monotonic()
            load.start()
            wait_until(lambda: len(load.outcomes) >= 4 * s.concurrency, timeout=s.wait_timeout, what="load running")
            for rnd in range(1, s.rounds + 1):
                for i, ep in enumerate(self.stack.extprocs):
                    self.restarts.append(self._restart(rnd, i, ep))
            time.sleep(0.5)  # some load after the last restart, on both replicas
            t1 = time.monotonic()
        finally:
            load.stop()
            if before:
                envoy_stats = {stat: self.envoy_counter(f"cluster.{self.cluster}.{stat}") - before[stat]
                               for stat in stats}
            self.stack.stop()
            self.provider.stop()
        return self._report(load, t0, t1, envoy_stats)

    def _restart(self, rnd: int, i: int, ep: ExtProc) -> Restart:
        s = self.settings
        assert ep.proc is not None
        proc = ep.proc
        served_before = requests_served(ep) if s.signal == "TERM" else 0.0
        r = Restart(rnd, i, s.signal, time.monotonic())
        os.killpg(proc.pid, signal.SIGTERM if s.signal == "TERM" else signal.SIGKILL)
        if s.signal == "TERM":
            # The admin port serves until the drain ends: the last scrape before the delay is
            # over says how many streams the replica took and served after its SIGTERM.
            with contextlib.suppress(OSError, RuntimeError):
                while time.monotonic() < r.t_signal + s.drain_delay_seconds - 0.3:
                    r.served_after_signal = int(requests_served(ep) - served_before)
                    time.sleep(0.1)
        r.exit_code = proc.wait(s.drain_delay_seconds + s.drain_seconds + 10)
        r.t_exit = time.monotonic()
        ep.start(timeout=s.wait_timeout)
        r.t_ready = time.monotonic()
        wait_until(lambda: requests_served(ep) > 0, timeout=s.wait_timeout, what=f"Envoy sends replica {i} streams")
        r.t_serving = time.monotonic()
        return r

    def _report(self, load: ClosedLoopLoad, t0: float, t1: float, envoy_stats: dict[str, int]) -> dict[str, Any]:
        outcomes = load.outcomes
        failed = [o for o in outcomes if o.error]
        restarts: list[dict[str, Any]] = []
        for r in self.restarts:
            # A failure belongs to the restart whose signal came last before the request ended.
            later = [x.t_signal for x in self.restarts if x.t_signal > r.t_signal]
            until = later[0] if later else float("inf")
            mine = [o for o in failed if r.t_signal <= o.t_done < until]
            restarts.append({
                **{k: v for k, v in asdict(r).items() if not k.startswith("t_")},
                "exit_s": round(r.t_exit - r.t_signal, 3),
                "back_serving_s": round(r.t_serving - r.t_exit, 3),
                "requests_during": sum(1 for o in outcomes if r.t_signal <= o.t_send < r.t_serving),
                "failed": len(mine),
                "failed_in_flight_at_signal": sum(1 for o in mine if o.t_send < r.t_signal),
                "failed_by_kind": dict(Counter(o.error for o in mine)),
            })
        rounds = []
        for rnd in range(1, self.settings.rounds + 1):
            of_round = [x for x in restarts if x["round"] == rnd]
            rounds.append({"round": rnd, "requests_during": sum(x["requests_during"] for x in of_round),
                           "failed": sum(x["failed"] for x in of_round)})
        return {
            "kind": "rolling-restart",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "settings": asdict(self.settings),
            "cluster": self.cluster,
            "totals": {
                "requests": len(outcomes),
                "failed": len(failed),
                "failed_by_kind": dict(Counter(o.error for o in failed)),
                "seconds": round(t1 - t0, 2),
                "requests_per_s": round(len(outcomes) / max(t1 - t0, 1e-9), 1),
            },
            "rounds": rounds,
            "restarts": restarts,
            "envoy": envoy_stats,
            "failure_samples": [{"error": o.error, "body": body} for o, body in load.failures[:10]],
        }


def table(report: dict[str, Any]) -> str:
    t = report["totals"]
    lines = [f"rolling restart, SIG{report['settings']['signal']}: {t['requests']} requests in {t['seconds']} s "
             f"({t['requests_per_s']}/s), {t['failed']} failed {t['failed_by_kind'] or ''}".rstrip(),
             f"{'round':>5} {'replica':>7} {'exit s':>7} {'back s':>7} {'served after signal':>19} "
             f"{'requests during':>15} {'failed':>6} {'in flight at signal':>19}"]
    for r in report["restarts"]:
        lines.append(f"{r['round']:>5} {r['replica']:>7} {r['exit_s']:>7} {r['back_serving_s']:>7} "
                     f"{r['served_after_signal']:>19} {r['requests_during']:>15} {r['failed']:>6} "
                     f"{r['failed_in_flight_at_signal']:>19}")
    lines.append(f"envoy {report['cluster']}: {report['envoy']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rolling_restart", description=__doc__.split("\n\n")[0])
    p.add_argument("--signal", choices=["TERM", "KILL"], default="TERM")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--drain-delay-seconds", type=float, default=2.0)
    p.add_argument("--drain-seconds", type=float, default=5.0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    settings = RestartSettings(signal=args.signal, rounds=args.rounds, concurrency=args.concurrency,
                               latency_ms=args.latency_ms, drain_delay_seconds=args.drain_delay_seconds,
                               drain_seconds=args.drain_seconds)
    report = RollingRestart(settings).run()
    print(table(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"restart-{args.signal.lower()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
