"""Several workers, several replicas, and what a client sees when every ext_proc is gone.

Two real workers receive streams: Envoy runs two threads (``--concurrency 2``) and opens a new
connection to the ext_proc cluster for every stream (``max_requests_per_connection: 1``), so
the kernel's SO_REUSEPORT hash spreads the streams over the workers, as many sidecars'
connections do in a cluster. Which worker served what is read from each worker's own evidence:
its per-pid file in the prometheus multiprocess directory. What reached a provider is read from
the provider's own request log, never from the ext_proc's counters.

Production runs ``--workers=1`` per pod and scales pods with the HPA (README, "Workers and
replicas"): ``test_replicas_each_keep_their_own_breaker`` checks that shape, two single-worker
ext_procs behind one Envoy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from extproc.dev.envoy_bootstrap import EXTPROC_CLUSTER
from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import wait_until
from extproc.metrics import FLUSH_DELAY
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

THRESHOLD = 2  # failureThreshold of both documents
TRIAL_RESET = 1.0  # resetTimeout of the "trials" document
TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: workers, namespace: default}
spec:
  timeout: 2s
  circuitBreaker: {enabled: true, failureThreshold: 2, resetTimeout: 60s}
  providers:
    - {name: wa, baseUrl: "{wa}", auth: {env: E2E_WA_KEY}}
    - {name: wb, baseUrl: "{wb}", auth: {env: E2E_WB_KEY}}
  routes:
    - {models: ["*"], backends: [{provider: wa}, {provider: wb, priority: 1}]}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: trials, namespace: default}
spec:
  timeout: 2s
  circuitBreaker: {enabled: true, failureThreshold: 2, resetTimeout: 1s}
  providers:
    - {name: xa, baseUrl: "{xa}", auth: {env: E2E_XA_KEY}}
    - {name: xb, baseUrl: "{xb}", auth: {env: E2E_XB_KEY}}
  routes:
    - {models: [trial-model], backends: [{provider: xa}, {provider: xb, priority: 1}]}
"""
KEYS = {"wa": "sk-wa-4431", "wb": "sk-wb-4432", "xa": "sk-xa-4433", "xb": "sk-xb-4434"}


def _stack(**kwargs: Any) -> Stack:
    return Stack(TEMPLATE, {n: MockProvider(n, expect_key=k) for n, k in KEYS.items()},
                 env={f"E2E_{n.upper()}_KEY": k for n, k in KEYS.items()}, **kwargs)


def _one_stream_per_connection(boot: dict[str, Any]) -> dict[str, Any]:
    """Envoy opens a new ext_proc connection for every stream, so SO_REUSEPORT spreads them."""
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == EXTPROC_CLUSTER]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options["common_http_protocol_options"] = {"max_requests_per_connection": 1}
    return boot


def _spread_stack(metrics_dir: Path) -> Stack:
    stack = _stack(workers=2, envoy_concurrency=2, bootstrap_hook=_one_stream_per_connection)
    metrics_dir.mkdir()
    stack.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # the workers' per-pid files, read below
    return stack


def _worker_pids(supervisor: int) -> set[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(c) for c in children}


def per_worker(metrics_dir: Path, provider: str, status: str = "200") -> dict[int, float]:
    """holysheep_requests_total{provider, status} of each worker, from its own counter file."""
    out: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        total = 0.0
        for metric in MultiProcessCollector._read_metrics([str(path)]).values():
            for sample in metric.samples:
                labels = dict(sample.labels)  # the raw per-file samples carry (name, value) pairs
                if sample.name == "holysheep_requests_total" and labels.get("provider") == provider \
                        and labels.get("status") == status:
                    total += sample.value
        out[pid] = total
    return out


def settled_per_worker(metrics_dir: Path, provider: str, total: float | None = None) -> dict[int, float]:
    """``per_worker`` once the counts in flight are written: a worker writes its counts at most
    ``metrics.FLUSH_DELAY`` after a request. With ``total``, as soon as the workers' sum is that;
    without, after twice that delay."""
    if total is None:
        time.sleep(2 * FLUSH_DELAY)
        return per_worker(metrics_dir, provider)
    wait_until(lambda: sum(per_worker(metrics_dir, provider).values()) == total, timeout=10 * FLUSH_DELAY + 5,
               interval=0.02, what=f"{total:g} answers of {provider} in the workers' counter files")
    return per_worker(metrics_dir, provider)


def _api_requests(mock: MockProvider) -> list[Any]:
    return [r for r in mock.requests if r.path.endswith("/chat/completions")]


def _chat_many(s: Stack, model: str, n: int, tag: str) -> list[str]:
    """n requests, each on its own client connection; the provider that answered each one."""
    answered = []
    for i in range(n):
        with s.recording_client(f"{tag} client") as client:
            resp = client.post("/v1/chat/completions",
                               json={"model": model, "messages": [{"role": "user", "content": f"{tag}{i}"}]})
        assert resp.status_code == 200, resp.text[:300]
        answered.append(resp.headers["x-holysheep-provider"])
    return answered


def test_two_workers_share_the_open_circuit(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    with running(_spread_stack(metrics_dir)) as s:
        assert s.extproc.proc is not None
        workers = _worker_pids(s.extproc.proc.pid)
        assert len(workers) == 2
        wa, wb = s.mocks["wa"], s.mocks["wb"]

        n = 40
        assert _chat_many(s, "m", n, "w") == ["wa"] * n
        served = settled_per_worker(metrics_dir, "wa", n)
        assert set(served) == workers and sum(served.values()) == n
        assert all(v > 0 for v in served.values()), f"one worker got every stream: {served}"
        assert len(_api_requests(wa)) == n
        wait_until(lambda: f'holysheep_requests_total{{model="m",provider="wa",status="200"}} {float(n)}'
                   in s.extproc.metrics(), timeout=10 * FLUSH_DELAY + 5, what="both workers' counts on /metrics")

        # The primary fails. Failure counts are per worker and the open state is shared: the
        # first worker to count failureThreshold failures opens the circuit for both, so the
        # primary receives at most workers * (threshold - 1) + 1 requests (requests are
        # sequential here), then none from either worker while it is open (resetTimeout 60 s).
        # With per-worker open states it would receive 2 * threshold: each worker opens on its own.
        wa.mode = "500"
        before = len(_api_requests(wa))
        before_wb = per_worker(metrics_dir, "wb")
        assert _chat_many(s, "m", 40, "f") == ["wb"] * 40
        failed = _api_requests(wa)[before:]
        assert all(r.status == 500 for r in failed)
        assert THRESHOLD <= len(failed) <= 2 * (THRESHOLD - 1) + 1, len(failed)
        after_wb = settled_per_worker(metrics_dir, "wb", sum(before_wb.values()) + 40)
        assert all(after_wb[pid] - before_wb.get(pid, 0.0) >= 3 for pid in workers), \
            f"both workers must have routed requests while the circuit was open: {after_wb}"
        assert len(_api_requests(wa)) == before + len(failed), "an open circuit received a request"
        assert len(_api_requests(wb)) == 40


def test_half_open_trials_across_workers(tmp_path: Path) -> None:
    """After resetTimeout each worker may send one trial; a failed trial reopens the circuit for
    every worker; a successful one closes it, and both workers send to the provider again."""
    metrics_dir = tmp_path / "metrics"
    with running(_spread_stack(metrics_dir)) as s:
        assert s.extproc.proc is not None
        workers = _worker_pids(s.extproc.proc.pid)
        xa = s.mocks["xa"]
        xa.mode = "500"
        _chat_many(s, "trial-model", 10, "open")
        opening = _api_requests(xa)
        assert THRESHOLD <= len(opening) <= 2 * (THRESHOLD - 1) + 1
        opened_after = opening[-1].time  # the circuit opened once the ext_proc saw this one fail

        # Keep asking until the provider's own log shows the trial (bounded), then some more.
        deadline = time.monotonic() + 10 * TRIAL_RESET
        while len(_api_requests(xa)) == len(opening) and time.monotonic() < deadline:
            _chat_many(s, "trial-model", 1, "wait")
        _chat_many(s, "trial-model", 20, "more")
        seen = _api_requests(xa)
        trials = seen[len(opening):]
        assert trials, "no half-open trial within 10 x resetTimeout"
        assert all(r.status == 500 for r in trials)
        # The first trial no earlier than resetTimeout after the opening failure, and at most one
        # per worker per resetTimeout after that (a failed trial reopens the circuit for all).
        times = [opened_after] + [r.time for r in trials]
        assert times[1] - times[0] >= TRIAL_RESET - 0.01, times
        for i in range(1, len(times) - 2):
            assert times[i + 2] - times[i] >= TRIAL_RESET - 0.01, times

        xa.mode = "ok"
        wait_until(lambda: _chat_many(s, "trial-model", 1, "recover") == ["xa"], timeout=10 * TRIAL_RESET,
                   interval=0.01, what="a trial closes the circuit")
        before = settled_per_worker(metrics_dir, "xa")
        assert _chat_many(s, "trial-model", 30, "closed") == ["xa"] * 30
        after = settled_per_worker(metrics_dir, "xa", sum(before.values()) + 30)
        assert all(after[pid] - before.get(pid, 0.0) > 0 for pid in workers), (before, after)


def test_replicas_each_keep_their_own_breaker() -> None:
    """The production shape (--workers=1 per pod, replicas behind the sidecars' Envoy): each
    replica counts and opens on its own, so a failing provider receives at most
    replicas * failureThreshold requests, then none while open."""
    replica_keys = ["sk-wa-replica-0-5511", "sk-wa-replica-1-5512"]
    mocks = {n: MockProvider(n, expect_key=None if n == "wa" else k) for n, k in KEYS.items()}
    stack = Stack(TEMPLATE, mocks, env={**{f"E2E_{n.upper()}_KEY": k for n, k in KEYS.items()},
                                        "E2E_WA_KEY": replica_keys[0]},
                  extproc_count=2, bootstrap_hook=_one_stream_per_connection, leak_keys=replica_keys)
    with running(stack) as s:
        # The second replica sends its own key to the primary, so the primary's log tells who sent what.
        second = s.extprocs[1]
        second.stop()
        second.env = {**second.env, "E2E_WA_KEY": replica_keys[1]}
        second.start()
        wa = s.mocks["wa"]

        def both_replicas_route() -> bool:  # Envoy's health check takes the restarted one back in
            _chat_many(s, "m", 2, "spread")
            return {r.credential for r in _api_requests(wa)[-2:]} == set(replica_keys)

        wait_until(both_replicas_route, timeout=30, interval=0.0, what="both replicas routing")
        wa.mode = "500"
        before = len(_api_requests(wa))
        assert _chat_many(s, "m", 40, "f") == ["wb"] * 40
        failed = _api_requests(wa)[before:]
        per_replica = {k: sum(1 for r in failed if r.credential == k) for k in replica_keys}
        assert all(r.status == 500 for r in failed)
        # Envoy balances the two replicas round robin, so each sees (at least) threshold failures.
        assert per_replica == {k: THRESHOLD for k in replica_keys}, per_replica
        assert _chat_many(s, "m", 20, "g") == ["wb"] * 20
        assert len(_api_requests(wa)) == before + len(failed), "an open circuit received a request"


def test_fail_closed_when_every_ext_proc_is_gone() -> None:
    with running(_stack(extproc_count=2)) as s:
        assert s.chat("m").status_code == 200
        s.extprocs[0].stop()
        for i in range(10):  # one of two processors left: no client failure
            assert s.chat("m", content=f"one-left-{i}").status_code == 200
        s.extprocs[1].stop()
        mocks = list(s.mocks.values())
        before = sum(m.total for m in mocks)
        # Every kind of request a client can make, each carrying the app's own credential.
        app_key = {"authorization": "Bearer app-key", "x-api-key": "app-key"}
        attempts = [
            s.chat("m", headers=app_key),
            s.chat("m", headers=app_key, stream=True),
            s.client.get("/v1/models", headers={**app_key, "host": f"127.0.0.1:{s.mocks['wa'].port}"}),
            s.client.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=app_key),
        ]
        for resp in attempts:
            # A clear 5xx from Envoy itself (failure_mode_allow: false): no provider answered.
            assert resp.status_code == 500, (resp.status_code, resp.text[:200])
            assert "x-holysheep-provider" not in resp.headers
            assert resp.headers.get("server") == "envoy"
            # Envoy's own reply, mapped to the OpenAI error shape by the local_reply_config.
            assert resp.headers["content-type"] == "application/json"
            error = resp.json()["error"]
            assert error["type"] == "server_error" and error["code"].startswith("ext_proc_error"), error
        assert sum(m.total for m in mocks) == before, "no unauthenticated request may go out"
        assert all(m.auth_failures == 0 for m in mocks)
        # A processor back: requests flow again, with the mesh's key and not the app's.
        s.extprocs[0].start()
        wait_until(lambda: s.chat("m", headers=app_key).status_code == 200, timeout=20, what="recovery")
        assert sum(m.auth_failures for m in mocks) == 0  # nothing went out bare while it came back
        resp = s.chat("m", headers=app_key)
        assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] == "wa"
        seen = s.mocks["wa"].last_request
        assert seen is not None and seen.credential == KEYS["wa"] and "app-key" not in str(seen.headers)
