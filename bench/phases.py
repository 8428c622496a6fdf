"""`python -m bench.phases`: where each ext_proc message's time goes, ours against the floor, live.

The whole-run ratios of `python -m bench` move by more than a single change is worth on a
shared VM. This measures inside the two servers instead, in one stack and one run. Our
`ExternalProcessorService.Process` and the floor's `Floor.Process` get a context that stamps
`time.monotonic()` at four points of every message:
- when `read()` returns (arrival);
- when `write()` is called (our processing done);
- when `write()` returns (gRPC took the answer);
- when the next `read()` is called (the work after the answer: for the last response-body
  chunk, `after_response_body`: usage, cost and the Fallback cache's store).

One line per stream goes to a file per process when the stream ends. Both servers pay the same
stamps (about 1 µs each) and the same line. The product's code runs unchanged: the wrappers
replace only the context, and start the real servers with their real arguments.

    python -m bench.phases                                  # b_extproc vs f_floor, 1 connection, 8 s
    python -m bench.phases --connections 16 --duration 10
    python -m bench.phases --pair stream                    # d_stream_extproc vs d_stream_floor

Prints, per phase, the medians in µs of processing, write and after-answer for each side, and
Envoy's time from one answer to the next message. It also writes
`bench/results/phases-<stamp>.json`.

`python -m bench.phases extproc ARGS` and `python -m bench.phases floor ARGS` are the two
wrapped servers that the stack starts with `BENCH_PHASES_DIR` set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")
PAIRS = {"chat": ("b_extproc", "f_floor"), "stream": ("d_stream_extproc", "d_stream_floor")}


# --- inside the servers ------------------------------------------------------------------------


class _StampedContext:
    """A grpc.aio servicer context whose read and write stamp the time; the rest is delegated."""

    __slots__ = ("_ctx", "_events", "_first_read", "_sink", "_started")

    def __init__(self, ctx: Any, sink: Any) -> None:
        self._ctx = ctx
        self._sink = sink
        self._events: list[Any] = []  # phase, arrived, answered, written, next read called
        self._started = time.monotonic()
        self._first_read = 0.0

    async def read(self) -> Any:
        now = time.monotonic()
        if not self._first_read:
            self._first_read = now  # the stream's setup (identity, processor) is done
        if self._events and len(self._events[-1]) == 4:
            self._events[-1].append(now)
        req = await self._ctx.read()
        if hasattr(req, "WhichOneof"):
            self._events.append([req.WhichOneof("request"), time.monotonic()])
        return req

    async def write(self, message: Any) -> None:
        event = self._events[-1] if self._events else None
        if event is not None and len(event) == 2:
            event.append(time.monotonic())
        await self._ctx.write(message)
        if event is not None and len(event) == 3:
            event.append(time.monotonic())

    def finish(self) -> None:
        now = time.monotonic()
        if self._events and len(self._events[-1]) == 4:
            self._events[-1].append(now)
        setup = self._first_read - self._started if self._first_read else None
        self._sink.write(json.dumps({"setup": setup, "events": self._events}) + "\n")

    def __getattr__(self, name: str) -> Any:  # auth_context, peer, abort, ...
        return getattr(self._ctx, name)


def _sink(kind: str) -> Any:
    out = Path(os.environ["BENCH_PHASES_DIR"]) / f"{kind}-{os.getpid()}.jsonl"
    return open(out, "a", buffering=1, encoding="utf-8")


def _stamp(cls: Any, kind: str) -> None:
    """Wrap cls.Process so each stream runs with a stamped context."""
    process, sink = cls.Process, _sink(kind)

    async def Process(self: Any, request_iterator: Any, context: Any) -> None:
        stamped = _StampedContext(context, sink)
        try:
            await process(self, request_iterator, stamped)
        finally:
            stamped.finish()

    cls.Process = Process


def serve_extproc(argv: list[str]) -> int:
    from bench.stack import run_our_extproc
    from extproc import service

    _stamp(service.ExternalProcessorService, "ours")
    return run_our_extproc(argv)


def serve_floor(argv: list[str]) -> int:
    from bench import floor

    _stamp(floor.Floor, "floor")
    sys.argv = ["bench.floor", *argv]
    return floor.main()


# --- the measurement ---------------------------------------------------------------------------


def _load_streams(directory: Path, kind: str) -> list[dict[str, Any]]:
    streams = []
    for path in sorted(directory.glob(f"{kind}-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line:
                streams.append(json.loads(line))
    return streams


def _median_us(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1e6, 1) if values else None


def summarise(streams: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per phase: medians of processing, write, after the answer, and Envoy's time to the next
    message of the stream (from this answer's write to that message's arrival); under "stream
    setup", the time from the stream's start to its first read (identity, processor)."""
    parts: dict[str, dict[str, list[float]]] = {}
    arrivals: dict[str, int] = {}  # every message, answered or not
    setups = [s["setup"] for s in streams if s["setup"] is not None]
    for stream in streams:
        events = stream["events"]
        for i, event in enumerate(events):
            arrivals[event[0]] = arrivals.get(event[0], 0) + 1
            if len(event) < 4:
                continue  # a message not answered (the stream ended first)
            phase, arrived, answered, written = event[:4]
            p = parts.setdefault(phase, {"processing": [], "write": [], "after": [], "envoy_to_next": []})
            p["processing"].append(answered - arrived)
            p["write"].append(written - answered)
            if len(event) > 4:
                p["after"].append(event[4] - written)
            if i + 1 < len(events):
                p["envoy_to_next"].append(events[i + 1][1] - written)
    # n: the messages whose answer's write returned, which the medians are over. Envoy may end a
    # stream right after its last ack, before gRPC reports that write done: under load that
    # leaves a tenth of the last writes untimed, though every message arrived and was answered.
    out = {phase: {"n": len(v["processing"]), "arrived": arrivals.get(phase, 0),
                   **{k: _median_us(xs) for k, xs in v.items()}}
           for phase, v in parts.items()}
    out["stream setup"] = {"n": len(setups), "processing": _median_us(setups)}
    return out


PHASE_ORDER = ("stream setup", "request_headers", "request_body", "response_headers", "response_body")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from bench.run import Bench, body_for, target_request
    from bench.stack import Stack

    trace_dir = Path(tempfile.mkdtemp(prefix="bench-phases-"))
    stack = Stack(workers=1, replicas=args.replicas, trace_dir=str(trace_dir)).start()
    bench = Bench(stack, argparse.Namespace(loadgen="auto"))  # wrk when on PATH, as `python -m bench`
    runs: dict[str, dict[str, Any]] = {}
    try:
        for target in PAIRS[args.pair]:
            listener, host, model, stream, _ = target_request(target)
            body = body_for(model, stream)
            warm = bench._load(listener, host, body, args.connections, args.warmup, stream)
            res = bench._load(listener, host, body, args.connections, args.duration, stream)
            runs[target] = {"requests": res["requests"], "warmup_requests": warm["requests"],
                            "p50_ms": res.get("p50_ms"), "ttfb_p50_ms": res.get("ttfb_p50_ms")}
            time.sleep(0.5)
    finally:
        stack.stop()  # the servers end; every stream's line is on disk
    ours = summarise(_load_streams(trace_dir, "ours"))
    floor = summarise(_load_streams(trace_dir, "floor"))
    shutil.rmtree(trace_dir, ignore_errors=True)
    return {
        "kind": "holysheep-mesh bench phases",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {"pair": args.pair, "connections": args.connections, "duration_s": args.duration,
                     "warmup_s": args.warmup, "replicas": args.replicas, "workers": 1},
        "load": runs,
        "ours": ours,
        "floor": floor,
        "note": "medians in microseconds, over the warm-up's streams and the measured ones",
    }


def render(result: dict[str, Any]) -> str:
    ours, floor = result["ours"], result["floor"]
    lines = [f"{'phase':<18} {'':>9} {'processing':>11} {'write':>8} {'after':>8} {'envoy->next':>12} {'n':>7}"]
    for phase in (*PHASE_ORDER, *sorted(set(ours) - set(PHASE_ORDER))):
        for side, table in (("ours", ours), ("floor", floor)):
            row = table.get(phase)
            if row is None:
                continue

            def f(key: str, row: dict[str, Any] = row) -> str:
                value = row.get(key)
                return "-" if value is None else f"{value:.1f}"

            lines.append(f"{phase:<18} {side:>9} {f('processing'):>11} {f('write'):>8} {f('after'):>8} "
                         f"{f('envoy_to_next'):>12} {row['n']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["extproc"]:
        return serve_extproc(argv)
    if argv[:1] == ["floor"]:
        return serve_floor(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="chat", help="b_extproc/f_floor or the streamed pair")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per side (default 8)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    result = measure(args)
    print(render(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"phases-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
