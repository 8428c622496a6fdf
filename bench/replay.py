"""`python -m bench.replay`: how much of the gap to the floor is our processing, and how much is
what our answers make the rest of the system do.

The floor (`bench.floor`) answers every message with an empty "continue". Our answers are not
empty: the request body's answer sets the provider's credential and authority (so Envoy routes
the request again, to the provider's cluster), the response headers' answer adds a header, and
Envoy sends our ext_proc the request attributes the floor's filter does not ask for. None of
that is our processing, but all of it is in the ext_proc CPU per request that issue 12's target
compares with the floor's.

So this runs our real ext_proc (`python -m bench.replay extproc ARGS`: `holysheep-mesh extproc`
with its real arguments) with one switch. SIGUSR1 turns replay on and SIGUSR2 turns it off. While
replay is on, each new stream is answered, message by message, with the answers our `Process`
gave to the first complete stream after the switch (processed as usual, and recorded): no
identity, no processor, no metrics, no settle. While it is off, our `Process` runs unwrapped.
Everything else is the same process, the same listener, routes and upstream, so the same bytes
go to Envoy and come back. Three cells alternate in one run, for target (b), or with
`--pair stream` for the streamed target (d):

- `ours`: our ext_proc processing every stream;
- `replay`: the same processes replaying our answers;
- `floor`: `bench.floor` behind its own listener.

`ours - replay` is our processing; `replay - floor` is what our answers and attributes cost
the ext_proc process without any processing. Each replica reports how many streams it replayed,
and the run fails unless replay answered every request of its cells but the recorded ones (at
most one per connection and replica: each replica records its own first stream).

    python -m bench.replay                                  # 1 and 16 connections, 3 rounds of 6 s
    python -m bench.replay --connections 16 --rounds 5 --duration 8
    python -m bench.replay --pair stream                    # d_stream_extproc: TTFB too

Writes `bench/results/replay-<stamp>.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")
CELLS = ("ours", "replay", "floor")
# (our target, the floor's): --pair, as bench.phases has it
PAIRS = {"chat": ("b_extproc", "f_floor"), "stream": ("d_stream_extproc", "d_stream_floor")}


# --- inside our ext_proc -----------------------------------------------------------------------

class _RecordingContext:
    """Delegates to the grpc.aio context and keeps every answer written, by phase."""

    __slots__ = ("_ctx", "answers", "phase")

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self.answers: dict[str, Any] = {}
        self.phase = ""

    async def read(self) -> Any:
        req = await self._ctx.read()
        if hasattr(req, "WhichOneof"):
            self.phase = req.WhichOneof("request")
        return req

    async def write(self, message: Any) -> None:
        self.answers[self.phase] = message
        await self._ctx.write(message)

    def __getattr__(self, name: str) -> Any:  # auth_context, peer, abort, ...
        return getattr(self._ctx, name)


def serve_extproc(argv: list[str]) -> int:
    import grpc

    from bench.stack import run_our_extproc
    from extproc import service

    state: dict[str, Any] = {"on": False, "replayed": 0, "answers": {}}
    out = Path(os.environ["BENCH_REPLAY_DIR"]) / f"replica-{os.getpid()}.json"
    process = service.ExternalProcessorService.Process
    eof = grpc.aio.EOF

    def switch(signum: int, _frame: Any) -> None:
        state["on"] = signum == signal.SIGUSR1
        if state["on"]:
            state["answers"] = {}  # the cell's first complete stream is processed and recorded
        else:  # the count so far, for the driver to check
            out.write_text(json.dumps({"replayed": state["replayed"], "phases": sorted(state["answers"])}))

    signal.signal(signal.SIGUSR1, switch)
    signal.signal(signal.SIGUSR2, switch)

    async def Process(self: Any, request_iterator: Any, context: Any) -> None:
        if not state["on"]:  # ours, unwrapped: its cells pay no recording
            return await process(self, request_iterator, context)
        answers = state["answers"]
        if not answers:
            recording = _RecordingContext(context)
            await process(self, request_iterator, recording)
            if "response_body" in recording.answers:  # a complete exchange: the one to replay
                state["answers"] = recording.answers
            return
        state["replayed"] += 1
        while (req := await context.read()) is not eof:
            phase = req.WhichOneof("request")
            resp = answers[phase]
            await context.write(resp)
            # Where our Process ends the stream (extproc/service.py), so Envoy sees the same close.
            if phase == "response_body":
                if req.response_body.end_of_stream or resp.HasField("immediate_response"):
                    return
            elif service._ends_exchange(phase, req, resp):
                return

    service.ExternalProcessorService.Process = Process  # type: ignore[method-assign]
    return run_our_extproc(argv)


# --- the measurement ---------------------------------------------------------------------------

def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)
    time.sleep(0.3)  # the servers' main threads run the handler between two bytecodes


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from bench.run import Bench
    from bench.stack import Stack

    replay_dir = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    stack = Stack(workers=1, replicas=args.replicas, extproc_module="bench.replay",
                  extra_env={"BENCH_REPLAY_DIR": str(replay_dir)}).start()
    bench = Bench(stack, argparse.Namespace(loadgen="auto"))
    ours = stack.roots("extproc")
    cells: dict[int, dict[str, list[dict[str, Any]]]] = {}
    try:
        sanity = bench.sanity()
        for conns in args.connections:
            cells[conns] = {c: [] for c in CELLS}
            for cell in CELLS:  # warm-up: each cell once
                _run_cell(bench, ours, cell, PAIRS[args.pair], conns, args.warmup, replay_dir)
            for rnd in range(args.rounds):
                order = CELLS if rnd % 2 == 0 else tuple(reversed(CELLS))
                for cell in order:
                    res = _run_cell(bench, ours, cell, PAIRS[args.pair], conns, args.duration, replay_dir)
                    cells[conns][cell].append(res)
                    print(f"  round {rnd + 1} {cell:<7} c={conns:<3} {res['rps']:8.1f} req/s  "
                          f"cpu {res['cpu_us_per_request']:7.1f} us/request  p50 {res['p50_ms']:6.2f} ms"
                          + (f"  replayed {res['replayed']}" if cell == "replay" else ""), flush=True)
    finally:
        stack.stop()
        shutil.rmtree(replay_dir, ignore_errors=True)
    return {
        "kind": "holysheep-mesh bench replay",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {"connections": args.connections, "rounds": args.rounds, "duration_s": args.duration,
                     "warmup_s": args.warmup, "replicas": args.replicas, "workers": 1, "pair": args.pair,
                     "targets": PAIRS[args.pair]},
        "sanity": sanity.get(PAIRS[args.pair][0]),
        "cells": cells,
        "summary": summarise(cells),
    }


def _run_cell(bench: Any, ours: list[int], cell: str, pair: tuple[str, str], conns: int, duration: float,
              replay_dir: Path) -> dict[str, Any]:
    if cell == "replay":
        _signal_all(ours, signal.SIGUSR1)
        before = _replayed(replay_dir)
    res = bench.cell(pair[1] if cell == "floor" else pair[0], conns, duration)
    res["cpu_us_per_request"] = res["floor_cpu_s_per_1k" if cell == "floor" else "extproc_cpu_s_per_1k"] * 1000
    res["envoy_cpu_us_per_request"] = res["envoy_cpu_s_per_1k"] * 1000  # the front Envoy's, same cell
    if cell == "replay":
        _signal_all(ours, signal.SIGUSR2)
        res["replayed"] = _replayed(replay_dir) - before
        # Only the streams recorded are not replayed. Each replica records its own: until its
        # first stream completes, every connection's stream it is given is processed, and a
        # connection's next stream may go to a replica that has not recorded yet. So at most
        # one per connection and replica.
        if res["replayed"] < res["requests"] - conns * len(ours):
            raise RuntimeError(f"replay answered {res['replayed']} of {res['requests']} requests")
    if res["non2xx"] or res["errors"]:
        raise RuntimeError(f"{cell}: {res['non2xx']} non-2xx answers, {res['errors']} errors")
    return res


def _replayed(replay_dir: Path) -> int:
    total = 0
    for path in replay_dir.glob("replica-*.json"):
        total += json.loads(path.read_text())["replayed"]
    return total


_MEDIANS = ("cpu_us_per_request", "envoy_cpu_us_per_request", "rps", "p50_ms", "p99_ms", "ttfb_p50_ms",
            "ttfb_p99_ms", "gap_p50_ms")


def summarise(cells: dict[int, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per connection count: each cell's medians, and the shares of the floor's CPU per request."""
    out: dict[str, dict[str, Any]] = {}
    for conns, by_cell in cells.items():
        med = {c: {k: statistics.median(r[k] for r in rows) for k in _MEDIANS if k in rows[0]}
               for c, rows in by_cell.items() if rows}
        floor_cpu = med["floor"]["cpu_us_per_request"]
        out[str(conns)] = {
            **med,
            "ours_over_floor_cpu": med["ours"]["cpu_us_per_request"] / floor_cpu,
            "replay_over_floor_cpu": med["replay"]["cpu_us_per_request"] / floor_cpu,
            "processing_share_of_floor_cpu": (med["ours"]["cpu_us_per_request"]
                                              - med["replay"]["cpu_us_per_request"]) / floor_cpu,
            "ours_over_floor_rps": med["ours"]["rps"] / med["floor"]["rps"],
            "replay_over_floor_rps": med["replay"]["rps"] / med["floor"]["rps"],
        }
    return out


def render(summary: dict[str, dict[str, Any]]) -> str:
    head = ("connections", "cell", "cpu us/req", "/ floor", "req/s", "/ floor", "p50 ms", "envoy us/req")
    lines = [" ".join(f"{h:>{w}}" for h, w in zip(head, (11, 7, 11, 8, 8, 8, 7, 12), strict=True))]
    for conns, s in summary.items():
        for cell in CELLS:
            c = s[cell]
            lines.append(f"{conns:>11} {cell:>7} {c['cpu_us_per_request']:11.1f} "
                         f"{c['cpu_us_per_request'] / s['floor']['cpu_us_per_request']:7.3f}x "
                         f"{c['rps']:8.1f} {c['rps'] / s['floor']['rps']:7.3f}x {c['p50_ms']:7.2f} "
                         f"{c['envoy_cpu_us_per_request']:12.1f}")
        lines.append(f"{'':>11} our processing: {s['processing_share_of_floor_cpu']:+.3f} of the floor's CPU; "
                     f"our answers without it: {s['replay_over_floor_cpu'] - 1:+.3f}")
        if "ttfb_p50_ms" in s["floor"]:
            lines.append(f"{'':>11} TTFB p50 ms: ours {s['ours']['ttfb_p50_ms']:.2f}, replay "
                         f"{s['replay']['ttfb_p50_ms']:.2f}, floor {s['floor']['ttfb_p50_ms']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="chat",
                   help="b_extproc/f_floor, or the streamed d_stream_extproc/d_stream_floor")
    p.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per cell (default 6)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["extproc"]:  # the server the stack starts (Stack.extproc_module)
        return serve_extproc(argv)
    args = parse_args(argv)
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"replay-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result["summary"]))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
