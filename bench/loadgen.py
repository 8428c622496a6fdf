"""Load generators. wrk (when on PATH) for request/response targets; a bounded aiohttp
generator otherwise and always for the streaming target (it needs per-chunk timings).

Both report one dict: requests, duration_s, non2xx, errors, p50_ms, p90_ms, p99_ms, max_ms,
mean_ms (and for streams: ttfb_* and gap_* percentiles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LUA = Path(__file__).with_name("post.lua")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, body: str, host: str, connections: int, duration: int, threads: int = 2) -> dict:
    threads = max(1, min(threads, connections))
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, duration)}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    env = {**os.environ, "BENCH_BODY": body, "BENCH_HOST": host}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 30, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def _summary(lat: list[float], n: int, non2xx: int, errors: int, elapsed: float) -> dict:
    lat.sort()
    return {
        "requests": n,
        "duration_s": elapsed,
        "non2xx": non2xx,
        "errors": errors,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else 0.0,
        "mean_ms": sum(lat) / len(lat) if lat else 0.0,
    }


async def _http(url: str, body: bytes, host: str, connections: int, duration: float, max_requests: int) -> dict:
    import aiohttp

    headers = {"content-type": "application/json"}
    if host:
        headers["host"] = host
    lat: list[float] = []
    counts = {"n": 0, "non2xx": 0, "errors": 0}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout) as session:
        start = time.monotonic()
        deadline = start + duration

        async def worker() -> None:
            while time.monotonic() < deadline and counts["n"] < max_requests:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if not 200 <= resp.status < 300:
                            counts["non2xx"] += 1
                except (aiohttp.ClientError, TimeoutError):
                    counts["errors"] += 1
                    continue
                lat.append((time.perf_counter() - t0) * 1000)
                counts["n"] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - start
    return _summary(lat, counts["n"], counts["non2xx"], counts["errors"], elapsed)


async def _stream(url: str, body: bytes, host: str, connections: int, duration: float, max_requests: int) -> dict:
    """Each request: time to the first body byte, and the gaps between body reads."""
    import aiohttp

    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if host:
        headers["host"] = host
    lat: list[float] = []
    ttfb: list[float] = []
    gaps: list[float] = []
    chunks_seen: list[int] = []
    counts = {"n": 0, "non2xx": 0, "errors": 0}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout) as session:
        start = time.monotonic()
        deadline = start + duration

        async def worker() -> None:
            while time.monotonic() < deadline and counts["n"] < max_requests:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        last = 0.0
                        first: float | None = None
                        n = 0
                        async for _chunk in resp.content.iter_any():
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append((now - last) * 1000)
                            last = now
                            n += 1
                        if not 200 <= resp.status < 300:
                            counts["non2xx"] += 1
                except (aiohttp.ClientError, TimeoutError):
                    counts["errors"] += 1
                    continue
                end = time.perf_counter()
                lat.append((end - t0) * 1000)
                if first is not None:
                    ttfb.append((first - t0) * 1000)
                chunks_seen.append(n)
                counts["n"] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - start
    out = _summary(lat, counts["n"], counts["non2xx"], counts["errors"], elapsed)
    ttfb.sort()
    gaps.sort()
    out.update(
        {
            "ttfb_p50_ms": percentile(ttfb, 50),
            "ttfb_p99_ms": percentile(ttfb, 99),
            "gap_p50_ms": percentile(gaps, 50),
            "gap_p99_ms": percentile(gaps, 99),
            "chunks_per_response": sum(chunks_seen) / len(chunks_seen) if chunks_seen else 0.0,
        }
    )
    return out


def run_aiohttp(
    url: str,
    body: str,
    host: str,
    connections: int,
    duration: float,
    stream: bool = False,
    max_requests: int = 5_000_000,
) -> dict:
    """Runs the aiohttp generator in a child process (so it does not share our interpreter)."""
    cmd = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        url,
        "--body",
        body,
        "--host",
        host,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--max-requests",
        str(max_requests),
    ]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-1000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True)
    p.add_argument("--host", default="")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=5_000_000)
    p.add_argument("--stream", action="store_true")
    a = p.parse_args()
    fn = _stream if a.stream else _http
    result = asyncio.run(fn(a.url, a.body.encode(), a.host, a.connections, a.duration, a.max_requests))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
