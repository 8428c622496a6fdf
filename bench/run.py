"""`python -m bench`: the data plane's overhead over plain Envoy, on loopback, in one run.

Targets (same front Envoy, fresh stack per run):
  a_baseline       Envoy alone proxying to the direct_response upstream
  b_extproc        + our ext_proc, full path: auth, model routing + route-cache clear, cache mode Fallback
  b_translated     b_extproc's route with an Anthropic provider: the OpenAI request and answer translated
  c_cache_hit      cache mode Always with a warm cache (ImmediateResponse from the request-body phase)
  e_failover       primary answers 500, the ext_proc calls the secondary itself (breaker disabled)
  e_circuit_open   primary answers 500 with the breaker enabled: once open, the primary must get 0 requests
  f_floor          a do-nothing ext_proc (empty "continue" to every message): the gRPC round-trip floor
  g_unbudgeted     a route with the cache off and no budget: what the g_budget_* rows are compared with
  g_budget_memory  the same route with a budget (requests + tokens) in the replica's memory table
  g_budget_redis   the same route with its budget in Redis (one EVALSHA per request, usage written after)
  d_stream_*       SSE upstream (several chunks, fixed gaps): time to first byte and gaps between chunks,
                   Envoy alone (baseline), via our ext_proc, via the floor
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.procstat import RssSampler, cpu_seconds, hwm_mb, rss_mb, thread_cpu, tree, trees
from bench.stack import Stack

RESULTS = Path(__file__).with_name("results")

# name -> (listener port key, Host header, model, ext_proc tree to account, upstream listeners to count)
TARGETS: dict[str, tuple[str, str, str, str | None, tuple[str, ...]]] = {
    "a_baseline": ("front", "bench-baseline", "bench-baseline", None, ("baseline",)),
    "b_extproc": ("front", "", "bench-fallback", "extproc", ("fallback",)),
    "b_translated": ("front", "", "bench-translated", "extproc", ("translated",)),
    "c_cache_hit": ("front", "", "bench-always", "extproc", ("always",)),
    "e_failover": ("front", "", "bench-failover", "extproc", ("fo_primary", "fo_secondary")),
    "e_circuit_open": ("front", "", "bench-open", "extproc", ("open_primary", "open_secondary")),
    "f_floor": ("floor_listen", "", "bench-floor", "floor", ("baseline",)),
    "g_unbudgeted": ("front", "", "bench-unbudgeted", "extproc", ("unbudgeted",)),
    "g_budget_memory": ("front", "", "bench-budget-memory", "extproc", ("budget_memory",)),
    "g_budget_redis": ("front", "", "bench-budget-redis", "extproc", ("budget_redis",)),
}
STREAM_TARGETS: dict[str, tuple[str, str, str | None]] = {
    "d_stream_baseline": ("front", "bench-baseline-sse", None),
    "d_stream_extproc": ("front", "", "extproc"),
    "d_stream_translated": ("front", "", "extproc"),  # d_stream_extproc's stream, from an Anthropic provider
    "d_stream_floor": ("floor_listen", "bench-baseline-sse", "floor"),
}
# target -> the upstream it must stop reaching once every replica holds its state (sanity step)
QUIET_AFTER_SANITY = {"e_circuit_open": "open_primary", "c_cache_hit": "always"}
MUST_BE_2XX = ("a_baseline", "b_extproc", "c_cache_hit", "e_failover", "e_circuit_open", "f_floor", "g_unbudgeted",
               "g_budget_memory", "g_budget_redis")


STREAM_MODELS = {"d_stream_translated": "bench-stream-translated"}
# What translation costs: each translated target against the same route untranslated.
TRANSLATION_PAIRS = {"b_translated": ("b_extproc", ("p50_ms", "p99_ms")),
                     "d_stream_translated": ("d_stream_extproc", ("ttfb_p50_ms", "ttfb_p99_ms", "gap_p50_ms"))}


def translation_overhead(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Each translated target's latencies minus its untranslated twin's, in ms, per connection
    count (medians of the rounds): b_translated - b_extproc, d_stream_translated - d_stream_extproc."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, (twin, keys) in TRANSLATION_PAIRS.items():
        for conns, s in summary.get(name, {}).items():
            base = summary.get(twin, {}).get(conns)
            if base:
                out.setdefault(name, {})[conns] = {k: s[k]["median"] - base[k]["median"] for k in keys}
    return out


def body_for(model: str, stream: bool = False) -> str:
    payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":"))


def target_request(name: str) -> tuple[str, str, str, bool, tuple[str, ...]]:
    """A target's listener, host, model, whether it streams, and the upstreams it counts."""
    if name in STREAM_TARGETS:
        listener, host, _ = STREAM_TARGETS[name]
        return listener, host, STREAM_MODELS.get(name, "bench-stream"), True, ()
    listener, host, model, _, counted = TARGETS[name]
    return listener, host, model, False, counted


class Bench:
    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and loadgen.have_wrk())
        self.peak_rss = 0.0

    def url(self, listener: str) -> str:
        return f"http://127.0.0.1:{self.stack.ports[listener]}/v1/chat/completions"

    def roots(self) -> dict[str, list[int]]:
        return {
            "extproc": self.stack.roots("extproc"),
            "floor": self.stack.roots("floor"),
            "envoy": self.stack.roots("front"),
        }

    def sanity(self) -> dict[str, Any]:
        """One request per target through urllib: status and provider/cache headers (also warms the cache)."""
        out: dict[str, Any] = {}
        for name, (listener, host, model, _, _) in TARGETS.items():
            headers = {"content-type": "application/json", **({"host": host} if host else {})}
            # State each replica keeps for itself, as each pod does: e_circuit_open's breaker opens
            # after `failureThreshold` failures seen by that replica, c_cache_hit's memory cache
            # holds what that replica stored, and Envoy spreads the requests over the replicas.
            # Send until 8 in a row no longer reach the upstream that must fall quiet (at most 60).
            quiet_upstream = QUIET_AFTER_SANITY.get(name)
            quiet, seen_before = 0, self.stack.upstream_count(quiet_upstream) if quiet_upstream else 0
            for attempt in range(60 if quiet_upstream else 1):
                req = urllib.request.Request(self.url(listener), data=body_for(model).encode(), headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        resp.read()
                        out[name] = {
                            "status": resp.status,
                            "provider": resp.headers.get("x-holysheep-provider"),
                            "cache": resp.headers.get("x-holysheep-cache"),
                            "remaining_requests": resp.headers.get("x-ratelimit-remaining-requests"),
                        }
                except urllib.error.HTTPError as exc:
                    out[name] = {"status": exc.code, "body": exc.read()[:300].decode(errors="replace")}
                if quiet_upstream:
                    seen = self.stack.upstream_count(quiet_upstream)
                    quiet, seen_before = (quiet + 1 if seen == seen_before else 0), seen
                    out[name]["attempts"] = attempt + 1
                    if quiet >= 8:
                        break
        return out

    def _load(self, listener: str, host: str, body: str, conns: int, duration: float, stream: bool) -> dict[str, Any]:
        if stream:
            return loadgen.run_aiohttp(self.url(listener), body, host, conns, duration, stream=True)
        if self.use_wrk:
            return loadgen.run_wrk(self.url(listener), body, host, conns, max(1, round(duration)))
        return loadgen.run_aiohttp(self.url(listener), body, host, conns, duration)

    def cell(self, name: str, conns: int, duration: float) -> dict[str, Any]:
        listener, host, model, stream, counted = target_request(name)
        roots = self.roots()

        def cpu_by_root() -> dict[str, list[float]]:  # each root's tree, read once per piece and replica
            return {k: [cpu_seconds(tree(root)) for root in r] for k, r in roots.items()}

        cpu0 = cpu_by_root()
        up0 = {c: self.stack.upstream_count(c) for c in counted}
        with RssSampler(roots["extproc"], 0.5) as rss:
            res = self._load(listener, host, body_for(model, stream), conns, duration, stream)
        cpu1 = cpu_by_root()
        n = max(1, res["requests"])
        res["rps"] = res["requests"] / res["duration_s"] if res["duration_s"] else 0.0
        for k in roots:
            used = [b - a for a, b in zip(cpu0[k], cpu1[k], strict=True)]
            res[f"{k}_cpu_s_per_1k"] = sum(used) * 1000 / n
            if k != "envoy":
                # Each replica's share of its piece's CPU in this cell: an even split shows Envoy
                # spread the streams (a lopsided one would mean one process did the work of two).
                total = sum(used)
                res[f"{k}_cpu_split"] = [round(u / total, 3) if total > 0 else 0.0 for u in used]
        res["extproc_rss_peak_mb"] = rss.peak
        self.peak_rss = max(self.peak_rss, rss.peak)
        for c in counted:
            res[f"upstream_{c}_requests"] = self.stack.upstream_count(c) - up0[c]
        return res

    def warm(self, names: list[str], conns: int) -> None:
        if self.args.warmup > 0:
            for name in names:
                self.cell(name, conns, self.args.warmup)


def _median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(cells: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    keys = (
        "rps",
        "p50_ms",
        "p99_ms",
        "extproc_cpu_s_per_1k",
        "floor_cpu_s_per_1k",
        "envoy_cpu_s_per_1k",
        "ttfb_p50_ms",
        "ttfb_p99_ms",
        "gap_p50_ms",
        "gap_p99_ms",
        "extproc_rss_peak_mb",
    )
    out: dict[str, dict[str, Any]] = {}
    for name, by_conns in cells.items():
        out[name] = {}
        for conns, rounds in by_conns.items():
            s: dict[str, Any] = {k: _median_spread([r[k] for r in rounds]) for k in keys if k in rounds[0]}
            s["requests"] = sum(r["requests"] for r in rounds)
            s["non2xx"] = sum(r["non2xx"] for r in rounds)
            s["errors"] = sum(r["errors"] for r in rounds)
            for k in rounds[0]:
                if k.startswith("upstream_"):
                    s[k] = sum(r[k] for r in rounds)
            out[name][str(conns)] = s
    for name, summary_by_conns in out.items():
        base_name = "d_stream_baseline" if name.startswith("d_") else "a_baseline"
        for conns_key, s in summary_by_conns.items():
            base = out.get(base_name, {}).get(conns_key)
            if not base:
                continue
            ratios = {}
            for k in ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "gap_p50_ms", "gap_p99_ms"):
                if k in s and k in base and base[k]["median"]:
                    ratios[k] = s[k]["median"] / base[k]["median"]
            s["vs_baseline"] = ratios
    return out


def budget_overhead(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """What a budget costs: each g_budget_* row's p50 and p99 minus g_unbudgeted's, in ms, per
    connection count (medians of the rounds)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("g_budget_memory", "g_budget_redis"):
        for conns, s in summary.get(name, {}).items():
            base = summary.get("g_unbudgeted", {}).get(conns)
            if base:
                out.setdefault(name, {})[conns] = {
                    k: s[k]["median"] - base[k]["median"] for k in ("p50_ms", "p99_ms")}
    return out


def table(summary: dict[str, dict[str, Any]], rounds: int) -> str:
    def fmt(stat: dict[str, float], nd: int = 2) -> str:
        spread = f" [{stat['min']:.{nd}f}-{stat['max']:.{nd}f}]" if rounds > 1 else ""
        return f"{stat['median']:.{nd}f}{spread}"

    lines = []
    head = (
        f"{'target':<16} {'conns':>5} {'req/s (median [min-max])':>30} {'x base':>6} {'p50 ms':>22} {'x':>5} "
        f"{'p99 ms':>22} {'x':>5} {'cpu s/1k req':>13} {'non2xx':>6}"
    )
    lines.append(head)
    lines.append("-" * len(head))
    for name, by_conns in summary.items():
        if name.startswith("d_"):
            continue
        for conns, s in by_conns.items():
            r = s.get("vs_baseline", {})
            cpu_key = "floor_cpu_s_per_1k" if name == "f_floor" else "extproc_cpu_s_per_1k"
            cpu = "-" if name == "a_baseline" else f"{s[cpu_key]['median']:.3f}"
            lines.append(
                f"{name:<16} {conns:>5} {fmt(s['rps'], 0):>30} {r.get('rps', 0):>6.2f} {fmt(s['p50_ms']):>22} "
                f"{r.get('p50_ms', 0):>5.2f} {fmt(s['p99_ms']):>22} {r.get('p99_ms', 0):>5.2f} "
                f"{cpu:>13} {s['non2xx']:>6}"
            )
    streams = [(n, c, s) for n, by in summary.items() if n.startswith("d_") for c, s in by.items()]
    if streams:
        lines.append("")
        head = (
            f"{'stream target':<18} {'conns':>5} {'req/s':>8} {'TTFB p50 ms':>20} {'x':>5} {'TTFB p99 ms':>20} "
            f"{'x':>5} {'gap p50 ms':>20} {'x':>5} {'gap p99 ms':>20} {'x':>5}"
        )
        lines.append(head)
        lines.append("-" * len(head))
        for name, conns, s in streams:
            r = s.get("vs_baseline", {})
            lines.append(
                f"{name:<18} {conns:>5} {s['rps']['median']:>8.1f} {fmt(s['ttfb_p50_ms']):>20} "
                f"{r.get('ttfb_p50_ms', 0):>5.2f} {fmt(s['ttfb_p99_ms']):>20} {r.get('ttfb_p99_ms', 0):>5.2f} "
                f"{fmt(s['gap_p50_ms']):>20} "
                f"{r.get('gap_p50_ms', 0):>5.2f} {fmt(s['gap_p99_ms']):>20} {r.get('gap_p99_ms', 0):>5.2f}"
            )
    return "\n".join(lines)


def environment(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    envoy_version = ""
    try:
        from extproc.dev.processes import envoy_binary

        envoy_version = (
            subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=20)
            .stdout.strip()
            .splitlines()[-1]
        )
    except Exception:
        pass
    return {
        "load_generator": "wrk" if bench.use_wrk else "aiohttp (bench.loadgen)",
        "stream_load_generator": "aiohttp (bench.loadgen --stream)",
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "replicas": args.replicas,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "envoy": envoy_version,
        "front_envoy_concurrency": 2,
        "upstream_envoy_concurrency": 1,
    }


def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    conns_list = [int(c) for c in args.connections.split(",")]
    names = [n for n in (*TARGETS, *STREAM_TARGETS) if not args.targets or n in args.targets.split(",")]
    stack = Stack(workers=args.workers, replicas=args.replicas, sse_chunks=args.stream_chunks,
                  sse_gap_ms=args.stream_gap_ms).start()
    try:
        bench = Bench(stack, args)
        print(
            f"# load generator: {'wrk' if bench.use_wrk else 'aiohttp (wrk not on PATH)'}; "
            f"ext_proc and floor: {args.replicas} replica(s) x {args.workers} worker(s); "
            f"{args.rounds} round(s) x {args.duration}s per cell; "
            f"connections {conns_list}",
            flush=True,
        )
        sanity = bench.sanity()
        cells: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in names}
        started = time.monotonic()
        for conns in conns_list:
            bench.warm(names, conns)
            for rnd in range(args.rounds):
                order = names if rnd % 2 == 0 else list(reversed(names))  # A B .. B A: drift cancels out
                for name in order:
                    res = bench.cell(name, conns, args.duration)
                    cells[name].setdefault(conns, []).append(res)
                    print(
                        f"  round {rnd + 1} {name:<18} c={conns:<3} {res['rps']:9.1f} req/s"
                        f"  p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms"
                        f"  non2xx {res['non2xx']}  errors {res['errors']}",
                        flush=True,
                    )
        extproc_tree = trees(stack.roots("extproc"))
        result = {
            "kind": "holysheep-mesh bench",
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "wall_s": time.monotonic() - started,
            "settings": {
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "connections": conns_list,
                "smoke": args.smoke,
                "stream_chunks": args.stream_chunks,
                "stream_gap_ms": args.stream_gap_ms,
            },
            "environment": environment(args, bench),
            "sanity": sanity,
            "summary": summarise(cells),
            "extproc_memory": {
                "peak_rss_sampled_mb": bench.peak_rss,
                "vmhwm_sum_mb": hwm_mb(extproc_tree),
                "rss_end_mb": rss_mb(extproc_tree),
                "processes": len(extproc_tree),
            },
            "budget_overhead_ms": budget_overhead(summarise(cells)),
            "translation_overhead_ms": translation_overhead(summarise(cells)),
            "circuit_open_primary_requests": sum(
                r.get("upstream_open_primary_requests", 0)
                for rounds in cells.get("e_circuit_open", {}).values()
                for r in rounds
            ),
            "cells": {n: {str(c): v for c, v in by.items()} for n, by in cells.items()},
        }
    finally:
        stack.stop()
    return result


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """(b) (or --soak-target) at saturation for args.soak seconds, the processor's RSS sampled every 10 s."""
    name = args.soak_target
    listener, host, model, acct, _ = TARGETS[name]
    stack = Stack(workers=args.workers, replicas=args.replicas).start()
    try:
        bench = Bench(stack, args)
        bench.sanity()
        bench.warm([name], args.soak_connections)
        root = stack.roots(acct or "extproc")
        interval = min(10.0, max(1.0, args.soak / 10))
        with RssSampler(root, interval) as rss:
            res = bench._load(listener, host, body_for(model), args.soak_connections, args.soak, False)
        samples = rss.samples
        at_1min = min(samples, key=lambda s: abs(s[0] - min(60.0, args.soak / 5)))
        end = samples[-1]
        res["rps"] = res["requests"] / res["duration_s"]
        return {
            "kind": "holysheep-mesh bench soak",
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "environment": environment(args, bench),
            "target": name,
            "process": acct or "extproc",
            "connections": args.soak_connections,
            "duration_s": args.soak,
            "load": res,
            "rss_samples_mb": [[round(t, 1), round(v, 2)] for t, v in samples],
            "rss_at_1min_mb": at_1min[1],
            "rss_at_1min_t": at_1min[0],
            "rss_end_mb": end[1],
            "rss_end_t": end[0],
            "rss_change_pct": (end[1] - at_1min[1]) * 100 / at_1min[1] if at_1min[1] else 0.0,
            "vmhwm_sum_mb": hwm_mb(trees(root)),
        }
    finally:
        stack.stop()


def _collapse_top(raw_path: Path, n: int = 25) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f and not f.startswith(("process ", "thread ("))]
        if not frames:
            continue
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c

    def top(d: dict[str, int]) -> list[dict[str, Any]]:
        return [
            {"function": k, "samples": v, "pct": round(v * 100 / total, 2) if total else 0.0}
            for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]
        ]

    return {"total_samples": total, "top_self": top(self_c), "top_inclusive": top(incl)}


def _frame_name(frame: str) -> str:
    # py-spy frames look like "function (path/to/file.py:123)": keep the function and the file, drop the line
    frame = frame.strip()
    if frame.endswith(")") and " (" in frame:
        func, _, loc = frame.rpartition(" (")
        path = loc[:-1].rpartition(":")[0] or loc[:-1]
        parts = path.split("/")
        short = "/".join(parts[-2:]) if len(parts) > 1 else path
        return f"{func} ({short})"
    return frame


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    """(b) at 16 connections while py-spy samples every ext_proc process."""
    import shutil

    pyspy = shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("py-spy not found: pip install py-spy")
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stack = Stack(workers=args.workers, replicas=args.replicas).start()
    try:
        bench = Bench(stack, args)
        bench.sanity()
        bench.warm(["b_extproc"], 16)
        root = stack.procs["extproc"].pid  # the first replica: it serves its share of the streams
        outputs: dict[str, dict[str, Any]] = {}
        for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
            path = RESULTS / f"profile-{stamp}.{suffix}"
            cmd = [
                pyspy,
                "record",
                "--pid",
                str(root),
                "--subprocesses",
                "--rate",
                str(args.profile_rate),
                "--duration",
                str(int(args.profile)),
                "--format",
                fmt,
                "-o",
                str(path),
            ]
            # --nonblocking does not pause the workers; native stacks need them paused
            cmd.append("--native" if args.profile_native else "--nonblocking")
            spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(1.0)
            threads0 = thread_cpu(tree(root))
            load = bench.cell("b_extproc", 16, args.profile)
            threads1 = thread_cpu(tree(root))
            per_1k = {
                k: round((v - threads0.get(k, 0.0)) * 1000 / max(1, load["requests"]), 4) for k, v in threads1.items()
            }
            load["cpu_s_per_1k_by_thread"] = dict(sorted(per_1k.items(), key=lambda kv: -kv[1]))
            out, _ = spy.communicate(timeout=args.profile + 60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {out.decode(errors='replace')[-1000:]}")
            outputs[fmt] = {"path": str(path), "load": load}
        top = _collapse_top(Path(outputs["raw"]["path"]))
        return {
            "kind": "holysheep-mesh bench profile",
            "target": "b_extproc",
            "connections": 16,
            "duration_s": args.profile,
            "rate_hz": args.profile_rate,
            "environment": environment(args, bench),
            "collapsed_stacks": outputs["raw"]["path"],
            "flamegraph": outputs["flamegraph"]["path"],
            "load_during_profile": outputs["raw"]["load"],
            **top,
        }
    finally:
        stack.stop()


def write(result: dict[str, Any], prefix: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{prefix}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured cell (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target and connection count")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating target order (default 2)")
    p.add_argument("--connections", default="1,16,64", help="comma-separated connection counts")
    p.add_argument("--targets", default="", help="comma-separated subset of targets (default: all)")
    p.add_argument("--replicas", type=int, default=os.cpu_count() or 1,
                   help="ext_proc (and floor) processes, each on its own port behind the front Envoy's "
                        "cluster, as pods behind a Service (default: cores)")
    p.add_argument("--workers", type=int, default=1,
                   help="workers per replica (`holysheep-mesh extproc --workers`; default 1, as in production)")
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="auto: wrk when on PATH, else the bounded aiohttp generator",
    )
    p.add_argument("--stream-chunks", type=int, default=8, help="SSE chunks per streamed response")
    p.add_argument("--stream-gap-ms", type=float, default=20.0, help="upstream delay between SSE chunks")
    p.add_argument("--smoke", action="store_true", help="a few seconds in all: 1 round, 1 s cells, 4 connections")
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="memory mode: (b) at saturation for SECONDS (e.g. 300), RSS every 10 s",
    )
    p.add_argument("--soak-connections", type=int, default=64)
    p.add_argument("--soak-target", default="b_extproc", choices=[n for n, t in TARGETS.items() if t[3]],
                   help="target for --soak (f_floor: the do-nothing processor, to tell gRPC from our code)")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="profile mode: (b) at 16 connections under py-spy for SECONDS (twice: raw + svg)",
    )
    p.add_argument("--profile-rate", type=int, default=250)
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the JSON results")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.rounds = 1.0, 0.0, 1
        if args.connections == "1,16,64":
            args.connections = "4"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    if args.soak:
        result = run_soak(args)
        path = write(result, "soak", out_dir)
        print(
            f"soak: {result['target']} at {args.soak_connections} connections for {args.soak:.0f}s, "
            f"{result['load']['rps']:.0f} req/s, non2xx {result['load']['non2xx']}"
        )
        print(
            f"{result['process']} RSS at t={result['rss_at_1min_t']:.0f}s: {result['rss_at_1min_mb']:.1f} MB; "
            f"at t={result['rss_end_t']:.0f}s: {result['rss_end_mb']:.1f} MB ({result['rss_change_pct']:+.1f}%)"
        )
    elif args.profile:
        result = run_profile(args)
        path = write(result, "profile", out_dir)
        print(
            f"profile: {result['total_samples']} samples; flamegraph {result['flamegraph']}; "
            f"collapsed stacks {result['collapsed_stacks']}"
        )
        print(
            "ext_proc CPU s per 1k requests by thread name:",
            json.dumps(result["load_during_profile"]["cpu_s_per_1k_by_thread"]),
        )
        print("top self time:")
        for row in result["top_self"][:15]:
            print(f"  {row['pct']:6.2f}%  {row['function']}")
    else:
        result = run_matrix(args)
        path = write(result, "bench", out_dir)
        print()
        print(
            f"load generator: {result['environment']['load_generator']} (streams: aiohttp); "
            f"{args.rounds} round(s), {args.duration:g}s per cell; ratios are to a_baseline (d_*: d_stream_baseline)"
        )
        print(table(result["summary"], args.rounds))
        for name, by_conns in result["budget_overhead_ms"].items():
            for conns, d in by_conns.items():
                print(f"{name} vs g_unbudgeted, c={conns}: p50 {d['p50_ms']:+.3f} ms, p99 {d['p99_ms']:+.3f} ms")
        for name, by_conns in result["translation_overhead_ms"].items():
            for conns, d in by_conns.items():
                twin = TRANSLATION_PAIRS[name][0]
                print(f"{name} vs {twin}, c={conns}: " + ", ".join(f"{k} {v:+.3f} ms" for k, v in d.items()))
        mem = result["extproc_memory"]
        print(
            f"\next_proc memory ({mem['processes']} processes): peak sampled RSS {mem['peak_rss_sampled_mb']:.1f} MB,"
            f" sum of VmHWM {mem['vmhwm_sum_mb']:.1f} MB"
        )
        print(f"circuit open: primary received {result['circuit_open_primary_requests']} requests during measurement")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
