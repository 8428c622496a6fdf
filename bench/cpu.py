"""`python -m bench.cpu`: ext_proc CPU per request, ours against the floor, in one run, in a way
that does not depend on what else the machine is doing.

Each request is the four ext_proc messages Envoy sends for bench target (b): request headers,
the buffered request body, response headers (200) and one response-body chunk (a chat
completion with usage), in Fallback cache mode with one provider. They are driven through the
real ``ExternalProcessorService.Process`` (so ``_answer``'s dispatch, the processor, the metrics
in multiprocess mode and the cache store off the hot path all run) and through
``bench.floor.Floor.Process``, with a context that reads and writes the way grpc.aio does
(each message parsed from its bytes on read, each answer serialised on write). What differs
between the two is exactly our own per-request cost; gRPC's own cost is the same for both and
is not in this figure (``--grpc`` adds it, over a real loopback server).

    python -m bench.cpu                      # CPU time (process_time), quick, sensitive to load
    python -m bench.cpu --callgrind          # instructions under valgrind: repeatable under load
    python -m bench.cpu --scenario stream    # a streamed answer (--chunks SSE chunks)
    python -m bench.cpu --profile            # cProfile of our side, top functions by own time
    python -m bench.cpu --grpc --callgrind   # the same over real gRPC (client in this process)

With ``--callgrind`` each target runs under ``valgrind --tool=callgrind`` with instrumentation
switched on (``callgrind_control -i on``) for exactly the N measured requests, after start-up
and the warm-up: their instructions divided by N is the figure, the same on a loaded machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCENARIOS = ("fallback", "stream", "hit", "unbudgeted", "budget")  # the last two: bench targets g_*
API_KEY = "sk-bench-cpu-0001"


# --- the messages Envoy sends ---------------------------------------------------------------

def _messages(scenario: str, chunks: int, workload: bool) -> list[bytes]:
    """One request's ext_proc messages, serialised as they arrive on the wire."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    from bench.run import body_for
    from bench.stack import CHAT_RESPONSE

    def headers(pairs: list[tuple[str, str]], end_of_stream: bool) -> Any:
        hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
        return pb.HttpHeaders(headers=hm, end_of_stream=end_of_stream)

    model = {"fallback": "bench-fallback", "stream": "bench-stream", "hit": "bench-always",
             "unbudgeted": "bench-unbudgeted", "budget": "bench-budget-memory"}[scenario]
    body = body_for(model, stream=scenario == "stream").encode()
    # Envoy sends the attributes the filter asks for (protos.filter_config.REQUEST_ATTRIBUTES);
    # without node metadata (the bench's front Envoy) the struct has no fields.
    attrs = struct_pb2.Struct()
    if workload:
        attrs.update({"xds.node.metadata.NAMESPACE": "shop", "xds.node.metadata.WORKLOAD_NAME": "checkout"})
    req_headers = pb.ProcessingRequest(
        request_headers=headers([
            (":authority", "127.0.0.1:10000"), (":path", "/v1/chat/completions"), (":method", "POST"),
            (":scheme", "http"), ("content-type", "application/json"), ("content-length", str(len(body))),
            ("x-forwarded-proto", "http"), ("x-request-id", "5b4c2c4e-8d0e-4f5e-9a43-2f1d0c9b7a61"),
        ], end_of_stream=False),
    )
    req_headers.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    out = [req_headers, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]
    if scenario == "hit":
        return [r.SerializeToString() for r in out]  # the cache answers the body phase
    content_type = "text/event-stream" if scenario == "stream" else "application/json"
    out.append(pb.ProcessingRequest(response_headers=headers([
        (":status", "200"), ("content-type", content_type), ("date", "Wed, 02 Dec 2026 01:00:00 GMT"),
        ("server", "envoy"), ("x-envoy-upstream-service-time", "0"),
    ], end_of_stream=False)))
    if scenario == "stream":
        event = json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "bench-stream",
                            "choices": [{"index": 0, "delta": {"content": "tok "}}]}, separators=(",", ":"))
        usage = json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                            "usage": {"prompt_tokens": 9, "completion_tokens": chunks}}, separators=(",", ":"))
        parts = [f"data: {event}\n\n".encode() for _ in range(chunks)]
        parts.append(f"data: {usage}\n\ndata: [DONE]\n\n".encode())
        out += [pb.ProcessingRequest(response_body=pb.HttpBody(body=p, end_of_stream=False)) for p in parts]
        out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)))
    else:
        out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=CHAT_RESPONSE.encode(), end_of_stream=True)))
    return [r.SerializeToString() for r in out]


class _Context:
    """What ``Process`` uses of a grpc.aio servicer context: read() parses the next message from
    its bytes (as grpc.aio's deserializer does), write() serialises the answer."""

    __slots__ = ("_i", "_msgs", "_parse", "_yield", "written")

    # What grpc.aio's auth_context() holds for a connection whose client certificate our mTLS
    # verified (the bench's front Envoy presents bench/default): ours reads it on a connection's first
    # stream, and peer() with peer_identities() on every stream.
    AUTH_CONTEXT = {"transport_security_type": [b"ssl"], "peer_uri": [b"spiffe://cluster.local/ns/bench/sa/default"]}

    def __init__(self, msgs: list[bytes], parse: Callable[[bytes], Any], interleave: bool = False) -> None:
        self._msgs = msgs
        self._parse = parse
        self._yield = interleave
        self._i = 0
        self.written = 0

    def auth_context(self) -> dict[str, list[bytes]]:
        return {k: list(v) for k, v in self.AUTH_CONTEXT.items()}  # a fresh copy, as grpc builds one

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def peer_identities(self) -> list[bytes]:
        return list(self.AUTH_CONTEXT["peer_uri"])  # the verified certificate's SANs, as gRPC lists them

    async def read(self) -> Any:
        import grpc

        if self._yield:  # --concurrency: let the other streams run, as a real read would
            await asyncio.sleep(0)
        i = self._i
        if i == len(self._msgs):
            return grpc.aio.EOF
        self._i = i + 1
        return self._parse(self._msgs[i])

    async def write(self, resp: Any) -> None:
        self.written += len(resp.SerializeToString())


# --- the two servers, in process --------------------------------------------------------------

def _config_file(tmp: str) -> str:
    from bench.stack import API_KEY_ENV, CONFIG, UPSTREAMS

    # Ports nothing listens on: the scenarios never leave the process (any other placeholder,
    # e.g. a Redis URL's port, gets one too).
    ports: dict[str, object] = collections.defaultdict(
        lambda: 19999, {name: 20000 + i for i, name in enumerate([*UPSTREAMS, "sse"])})
    ports["env"] = API_KEY_ENV
    path = os.path.join(tmp, "config.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(CONFIG.format_map(ports))
    os.environ[API_KEY_ENV] = API_KEY
    return path


async def _ours(tmp: str, identity: str = "tls") -> tuple[Any, Callable[[], Any]]:
    from extproc.server import DataPlane, ServerOptions
    from extproc.service import ExternalProcessorService

    options = ServerOptions(config_path=_config_file(tmp), secrets_dir=os.path.join(tmp, "secrets"))
    if hasattr(options, "identity_from"):
        from extproc.identity import IdentityFrom, authenticator

        # No TLS in process: INSECURE builds the plane, then (identity "tls", as every bench
        # target runs) the mTLS authenticator reads _Context's auth context, as it reads grpc's.
        options.identity_from = IdentityFrom.INSECURE
    plane = DataPlane(options)
    if identity == "tls" and hasattr(options, "identity_from"):
        plane.authenticate = authenticator(IdentityFrom.TLS)
    if not await plane.reload():
        raise RuntimeError("bench config rejected")
    service = ExternalProcessorService(plane)
    if os.environ.get("BENCH_CPU_GC", "settle") == "settle":
        try:
            from extproc import heap
        except ImportError:  # an older tree
            pass
        else:
            heap.settle()  # as DataPlane.run does once serving

    async def drain() -> None:  # the settles still batched, and the cache stores spawned off the hot path
        try:
            from extproc import settlements
        except ImportError:  # an older tree
            pass
        else:
            settlements.flush()
        while plane._tasks:
            await asyncio.gather(*list(plane._tasks))

    return service, drain


async def _floor(tmp: str) -> tuple[Any, Callable[[], Any]]:
    from bench.floor import Floor

    async def drain() -> None:
        return None

    return Floor(), drain


def _handshake(gate: str | None, say: str) -> None:
    """With --callgrind: tell the parent `say` ("on"/"off": it switches valgrind's
    instrumentation with callgrind_control) and wait until it has. This polls a file rather than
    blocking, since valgrind handles callgrind_control's commands only while the program runs."""
    if gate is None:
        return
    Path(gate + ".child").write_text(say)
    ack = Path(gate + ".parent")
    while not (ack.exists() and ack.read_text() == say):
        time.sleep(0.005)


async def _drive(target: str, scenario: str, warmup: int, requests: int, chunks: int, workload: bool,
                 profile: str | None, gate: str | None = None, concurrency: int = 1,
                 identity: str = "tls") -> dict[str, Any]:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    tmp = tempfile.mkdtemp(prefix="bench-cpu-")
    try:
        service, drain = await (_ours(tmp, identity) if target == "ours" else _floor(tmp))
        msgs = _messages(scenario, chunks, workload)
        parse = pb.ProcessingRequest.FromString
        written = 0

        async def stream_after_stream(n: int) -> None:
            nonlocal written
            for _ in range(n):
                ctx = _Context(msgs, parse, interleave=concurrency > 1)
                await service.Process(None, ctx)
                written += ctx.written
                await asyncio.sleep(0)  # callbacks scheduled by the request (after_response_body)

        async def run(n: int) -> None:
            # `concurrency` streams at a time, their messages interleaved (like N connections)
            share = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
            await asyncio.gather(*(stream_after_stream(k) for k in share))
            await drain()
            await asyncio.sleep(0.02)  # timers (a metrics flush) due by now

        if scenario == "hit":  # warm the cache as bench.run's sanity request does
            await _drive_fallback_like(service, msgs, parse)
            await drain()
        await run(warmup)
        written = 0
        prof = cProfile.Profile() if profile else None
        _handshake(gate, "on")
        t0 = time.process_time()
        if prof is not None:
            prof.enable()
        await run(requests)
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)  # type: ignore[arg-type]
        _handshake(gate, "off")
        cpu = time.process_time() - t0
        return {"target": target, "requests": requests, "cpu_s": cpu, "answer_bytes": written}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _drive_fallback_like(service: Any, msgs: list[bytes], parse: Callable[[bytes], Any]) -> None:
    """A request to the Always config that reaches the provider and is stored (warms the cache)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from bench.stack import CHAT_RESPONSE

    extra = [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(end_of_stream=False)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=CHAT_RESPONSE.encode(), end_of_stream=True)),
    ]
    extra[0].response_headers.headers.headers.add(key=":status", raw_value=b"200")
    await service.Process(None, _Context([*msgs, *(e.SerializeToString() for e in extra)], parse))
    await asyncio.sleep(0)


# --- over real gRPC -----------------------------------------------------------------------------

def _cpu_now() -> float:
    """This process's CPU seconds, every thread (gRPC's poller and event engine threads too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _serve_grpc(target: str, tmp: str, port_file: str, warmup: int, total_streams: int,
                      profile: str | None = None, gate: str | None = None) -> float:
    """A real grpc.aio server with the service under test; exits after `total_streams` streams
    and returns the CPU seconds the streams after the warm-up took."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

    # A plaintext loopback server: no certificate to read an identity from.
    service, drain = await (_ours(tmp, "insecure") if target == "ours" else _floor(tmp))
    done = asyncio.Event()
    count = 0
    inner = service.Process
    started = [_cpu_now()]
    prof = cProfile.Profile() if profile else None

    async def process(request_iterator: Any, context: Any) -> None:
        nonlocal count
        try:
            await inner(request_iterator, context)
        finally:
            count += 1
            if count == warmup:
                _handshake(gate, "on")
                started[0] = _cpu_now()
                if prof is not None:
                    prof.enable()
            if count >= total_streams:
                done.set()

    service.Process = process
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pbg.add_ExternalProcessorServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    if total_streams:
        await done.wait()
    await drain()
    cpu = _cpu_now() - started[0]
    if prof is not None and profile:
        prof.disable()
        prof.dump_stats(profile)
    _handshake(gate, "off")
    await server.stop(None)
    return cpu


def _grpc_client(port: int, msgs: list[bytes], streams: int) -> None:
    """Envoy's side: one stream per request, each message sent after the previous answer."""
    import queue

    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

    parsed = [pb.ProcessingRequest.FromString(b) for b in msgs]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pbg.ExternalProcessorStub(channel)
        for _ in range(streams):
            outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

            def gen(box: queue.SimpleQueue[Any] = outbox) -> Any:
                while (item := box.get()) is not None:
                    yield item

            answers = stub.Process(gen(), timeout=60)
            for req in parsed:
                outbox.put(req)
                resp = next(answers)
                if resp.HasField("immediate_response"):
                    break
            outbox.put(None)
            for _ in answers:
                pass


# --- measurement ---------------------------------------------------------------------------------

def _child_cmd(args: argparse.Namespace, target: str, requests: int, extra: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bench.cpu", "--child", target, "--scenario", args.scenario,
           "--warmup", str(args.warmup), "--requests", str(requests), "--chunks", str(args.chunks)]
    if args.workload:
        cmd.append("--workload")
    if args.concurrency > 1:
        cmd += ["--concurrency", str(args.concurrency)]
    cmd += ["--identity", args.identity]
    if not args.multiprocess:
        cmd.append("--no-multiprocess")
    return cmd + (extra or [])


def _instructions(out_file: str) -> int:
    # "totals:" is the events collected (summary: only those of the last dump's part)
    with open(out_file, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {out_file}")


def _run_child(args: argparse.Namespace, target: str, requests: int, tmp: str, tag: str) -> tuple[dict[str, Any], int]:
    """One child run; (its JSON line, the measured requests' instructions or 0 without --callgrind)."""
    cmd = _child_cmd(args, target, requests)
    out_file = os.path.join(tmp, f"callgrind.{target}.{tag}.out")
    gate = os.path.join(tmp, f"gate.{target}.{tag}")
    streams = args.warmup + requests
    port_file = os.path.join(tmp, f"port.{target}.{tag}")
    if args.grpc:
        cmd += ["--grpc-port-file", port_file, "--grpc-streams", str(streams)]
        if args.profile_out:
            cmd += ["--profile-out", args.profile_out]
    if args.callgrind:
        # Instrumentation off until the warm-up is done (start-up runs at near native speed),
        # on for exactly the measured requests.
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
               *cmd, "--gate", gate]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gatekeeper = threading.Thread(target=_keep_gate, args=(proc, gate), daemon=True) if args.callgrind else None
    if gatekeeper is not None:
        gatekeeper.start()
    if args.grpc:
        deadline = time.monotonic() + 600
        while not os.path.exists(port_file) or not Path(port_file).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.05)
        msgs = _messages(args.scenario, args.chunks, args.workload)
        _grpc_client(int(Path(port_file).read_text()), msgs, streams)
    stdout, stderr = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-4000:]}")
    line = stdout.strip().splitlines()[-1] if stdout.strip() else "{}"
    result = json.loads(line)
    return result, _instructions(out_file) if args.callgrind else 0


def _keep_gate(proc: subprocess.Popen[str], gate: str) -> None:
    """The parent's side of _handshake: callgrind_control -i on/off when the child asks."""
    asked, done = Path(gate + ".child"), ""
    while proc.poll() is None and done != "off":
        say = asked.read_text() if asked.exists() else ""
        if say and say != done:
            subprocess.run(["callgrind_control", "-i", say, str(proc.pid)], check=True, capture_output=True)
            Path(gate + ".parent").write_text(say)
            done = say
        time.sleep(0.01)


def _child(args: argparse.Namespace) -> int:
    if args.multiprocess and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # As `holysheep-mesh extproc --workers N` runs: prometheus-client's multiprocess mode.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-cpu-metrics-")
    if args.grpc_port_file:
        tmp = tempfile.mkdtemp(prefix="bench-cpu-")
        cpu = asyncio.run(_serve_grpc(args.child, tmp, args.grpc_port_file, args.warmup, args.grpc_streams,
                                      args.profile_out, args.gate))
        print(json.dumps({"target": args.child, "requests": args.requests, "cpu_s": cpu}))
        return 0
    result = asyncio.run(_drive(args.child, args.scenario, args.warmup, args.requests, args.chunks, args.workload,
                                args.profile_out, args.gate, args.concurrency, args.identity))
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--scenario", choices=SCENARIOS, default="fallback")
    p.add_argument("--requests", type=int, default=0, help="measured requests (default: 2000, 300 with --callgrind)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--chunks", type=int, default=8, help="SSE chunks for --scenario stream")
    p.add_argument("--concurrency", type=int, default=1,
                   help="in process: streams in flight at once, their messages interleaved (like N connections)")
    p.add_argument("--workload", action="store_true", help="node metadata names the calling workload (a mesh)")
    p.add_argument("--identity", choices=("tls", "insecure"), default="tls",
                   help="in process: the caller's SPIFFE ID from an mTLS auth context, as every bench target runs "
                        "(default), or --insecure-no-identity (the figures before this flag); --grpc is insecure")
    p.add_argument("--no-multiprocess", dest="multiprocess", action="store_false",
                   help="prometheus-client in single-process mode (like --workers 1)")
    p.add_argument("--callgrind", action="store_true", help="count instructions under valgrind")
    p.add_argument("--grpc", action="store_true", help="over a real loopback grpc.aio server")
    p.add_argument("--rounds", type=int, default=3, help="CPU-time mode: alternating rounds, median")
    p.add_argument("--targets", default="ours,floor")
    p.add_argument("--profile", action="store_true", help="cProfile our side and print the top functions")
    p.add_argument("--profile-sort", default="tottime", help="pstats sort key (tottime, cumulative, ...)")
    p.add_argument("--profile-limit", default=35, type=int, help="functions printed")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--child", choices=("ours", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument("--grpc-port-file", help=argparse.SUPPRESS)
    p.add_argument("--gate", help=argparse.SUPPRESS)
    p.add_argument("--grpc-streams", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if not args.requests:
        args.requests = 300 if args.callgrind else 2000
    if args.callgrind and shutil.which("valgrind") is None:
        p.error("--callgrind needs valgrind")
    targets = [t for t in args.targets.split(",") if t]
    tmp = tempfile.mkdtemp(prefix="bench-cpu-runs-")
    try:
        if args.profile:
            return _profile(args, tmp)
        per_request: dict[str, float] = {}
        if args.callgrind:
            for target in targets:
                _, measured = _run_child(args, target, args.requests, tmp, "callgrind")
                per_request[target] = measured / args.requests
            unit = "instructions"
        else:
            samples: dict[str, list[float]] = {t: [] for t in targets}
            for r in range(args.rounds):
                for target in targets if r % 2 == 0 else reversed(targets):
                    result, _ = _run_child(args, target, args.requests, tmp, f"r{r}")
                    samples[target].append(result.get("cpu_s", 0.0) / args.requests * 1e6)
            per_request = {t: sorted(v)[len(v) // 2] for t, v in samples.items()}
            unit = "CPU us" + (" (server, incl. gRPC)" if args.grpc else "")
        report = {"scenario": args.scenario, "concurrency": args.concurrency, "unit": unit + " per request",
                  "per_request": per_request,
                  "grpc": args.grpc, "multiprocess": args.multiprocess, "workload": args.workload,
                  "identity": "insecure" if args.grpc else args.identity}
        if "ours" in per_request and "floor" in per_request:
            report["ours_minus_floor"] = per_request["ours"] - per_request["floor"]
            report["ratio"] = per_request["ours"] / per_request["floor"] if per_request["floor"] else None
        if args.json:
            print(json.dumps(report))
        else:
            where = "real gRPC" if args.grpc else "in process, gRPC excluded"
            print(f"scenario {args.scenario} ({where}, {args.concurrency} stream(s) at a time), "
                  f"{args.requests} requests after {args.warmup} warm-up")
            for t, v in per_request.items():
                print(f"  {t:6s} {v:12.0f} {report['unit']}")
            if "ratio" in report:
                print(f"  ours - floor: {report['ours_minus_floor']:.0f}; ours / floor: {report['ratio']:.2f}")
        return 0
    finally:
        if not os.environ.get("BENCH_CPU_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


def _profile(args: argparse.Namespace, tmp: str) -> int:
    out = os.path.join(tmp, "ours.prof")
    if args.grpc:
        args.profile_out = out
        _run_child(args, "ours", args.requests, tmp, "prof")
    else:
        subprocess.run(_child_cmd(args, "ours", args.requests, ["--profile-out", out]), check=True,
                       stdout=subprocess.DEVNULL)
    stats = pstats.Stats(out)
    stats.sort_stats(args.profile_sort).print_stats(args.profile_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
