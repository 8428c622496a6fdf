"""Multi-worker mode, and what a client sees when every ext_proc is gone (fail closed)."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import wait_until
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: workers, namespace: default}
spec:
  timeout: 2s
  circuitBreaker: {enabled: true, failureThreshold: 2, resetTimeout: 30s}
  providers:
    - {name: wa, baseUrl: "{wa}", auth: {env: E2E_WA_KEY}}
    - {name: wb, baseUrl: "{wb}", auth: {env: E2E_WB_KEY}}
  routes:
    - {models: ["*"], backends: [{provider: wa}, {provider: wb, priority: 1}]}
"""
KEYS = {"wa": "sk-wa-4431", "wb": "sk-wb-4432"}


def _stack(**kwargs: Any) -> Stack:
    return Stack(TEMPLATE, {n: MockProvider(n, expect_key=k) for n, k in KEYS.items()},
                 env={f"E2E_{n.upper()}_KEY": k for n, k in KEYS.items()}, **kwargs)


def test_metrics_from_all_workers_and_a_shared_breaker() -> None:
    with running(_stack(workers=2)) as s:
        n = 40
        for i in range(n):
            assert s.chat("m", content=f"w{i}").status_code == 200
        text = s.extproc.metrics()
        found = re.search(r'holysheep_requests_total\{model="m",provider="wa",status="200"\} (\S+)', text)
        assert found is not None, text
        total = float(found[1])
        assert total == n  # summed over both workers, whichever served the scrape
        # The open state is shared by the workers: the first to count failureThreshold (2)
        # failures opens the circuit for both, so the primary sees at most threshold + workers - 1
        # requests, then none from either worker.
        s.mocks["wa"].mode = "500"
        for i in range(20):
            assert s.chat("m", content=f"f{i}").headers["x-holysheep-provider"] == "wb"
        failed = s.mocks["wa"].by_status[500]
        assert 2 <= failed <= 3
        assert 'holysheep_circuit_state{provider="wa"} 1.0' in s.extproc.metrics()
        for i in range(30):
            assert s.chat("m", content=f"g{i}").headers["x-holysheep-provider"] == "wb"
        assert s.mocks["wa"].by_status[500] == failed


def test_fail_closed_when_every_ext_proc_is_gone() -> None:
    with running(_stack(extproc_count=2)) as s:
        assert s.chat("m").status_code == 200
        s.extprocs[0].stop()
        for i in range(10):  # one of two processors left: no client failure
            assert s.chat("m", content=f"one-left-{i}").status_code == 200
        s.extprocs[1].stop()
        mocks = list(s.mocks.values())
        before = sum(m.total for m in mocks)
        time.sleep(0.2)
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
        restarted = time.monotonic()
        wait_until(lambda: s.chat("m", headers=app_key).status_code == 200, timeout=20, what="recovery")
        assert time.monotonic() - restarted < 20
        assert sum(m.auth_failures for m in mocks) == 0  # nothing went out bare while it came back
        resp = s.chat("m", headers=app_key)
        assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] == "wa"
        seen = s.mocks["wa"].last_request
        assert seen is not None and seen.credential == KEYS["wa"] and "app-key" not in str(seen.headers)
