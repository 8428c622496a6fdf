"""The dashboard and the alerts against a real Prometheus scraping a real dev stack.

One module-scoped scenario: three mock providers (extproc.dev.mock_provider, free ports),
`holysheep-mesh dev --config` (Envoy + ext_proc, free ports), and `prometheus` (loopback, 1 s
scrape and evaluation, tmp storage) loaded with the PrometheusRule's groups. Traffic through
Envoy: normal answers, Always-mode cache misses and hits, bad requests; then primary fails
(failover to secondary, its circuit opens); then every provider fails (cache fallback, a 503).
Each phase ends with a scrape that happened after it, so rates see an increase.

Then every query of every dashboard panel (Grafana's variables replaced) must return a series
with a number, the circuit alert (and the all-down and cache-fallback alerts) must be pending
or firing while the readiness alerts stay inactive, and `promtool check metrics` must pass on
ext_proc's /metrics. Bounded: every wait has a deadline; about 15 s in all on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import free_port
from tests.monitoring import (
    PanelQuery,
    alert_rules,
    binary,
    grafana,
    label_values_metric,
    panel_queries,
    variable_queries,
    write_rules,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

T = TypeVar("T")
PROVIDERS = ("primary", "secondary", "tertiary", "quaternary")

CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: live, namespace: default}}
spec:
  timeout: 5s
  maxRetries: 2
  # Two failures open the circuit; it stays open for the rest of the run.
  circuitBreaker: {{enabled: true, failureThreshold: 2, resetTimeout: 10m}}
  healthCheck: {{interval: 1s, endpoint: /models}}
  providers:
    - {{name: primary, baseUrl: "{primary}", auth: {{type: Bearer, env: LIVE_PRIMARY_KEY}}}}
    - {{name: secondary, baseUrl: "{secondary}", auth: {{type: Bearer, env: LIVE_SECONDARY_KEY}}}}
  routes:
    - models: ["gpt-4o*"]
      backends:
        - {{provider: primary, priority: 0}}
        - {{provider: secondary, priority: 1, model: deepseek-v3.2}}
  cache: {{mode: Fallback, ttl: 1h}}
  pricing:
    - {{model: "gpt-4o*", inputPerMillion: 2.5, outputPerMillion: 10}}
    - {{model: deepseek-v3.2, inputPerMillion: 0.28, outputPerMillion: 0.42}}
---
# A second config in the same data plane with an Always-mode cache: the hit-rate panel needs
# hit and miss events, which only that mode counts.
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: live-cached, namespace: default}}
spec:
  timeout: 5s
  healthCheck: {{interval: 1s, endpoint: /models}}
  providers:
    - {{name: tertiary, baseUrl: "{tertiary}", auth: {{type: Bearer, env: LIVE_TERTIARY_KEY}}}}
  routes:
    - models: ["cached-*"]
      backends: [{{provider: tertiary}}]
  cache: {{mode: Always, ttl: 1h}}
  pricing:
    - {{model: "cached-*", inputPerMillion: 1, outputPerMillion: 2}}
---
# A third config with a budget of 3 requests an hour: the budget panels' usage, limit and
# rejections, and the budget alert (the traffic spends it, then is refused).
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: live-budget, namespace: default}}
spec:
  timeout: 5s
  healthCheck: {{interval: 1s, endpoint: /models}}
  providers:
    - {{name: quaternary, baseUrl: "{quaternary}", auth: {{type: Bearer, env: LIVE_QUATERNARY_KEY}}}}
  routes:
    - models: ["budget-*"]
      backends: [{{provider: quaternary}}]
  cache: {{mode: "Off"}}
  budgets:
    - {{name: live-hourly, window: 1h, requests: 3, tokens: 1000000}}
"""


# Loopback only: no proxy from the environment, ever.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 2.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as resp:
        return bytes(resp.read())


def _wait(what: str, probe: Callable[[], T | None], timeout: float,
          procs: dict[str, subprocess.Popen[bytes]] | None = None) -> T:
    """Poll `probe` until it returns something other than None/False; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            result = probe()
            if result is not None and result is not False:
                return result
        for name, proc in (procs or {}).items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Live:
    prom: str  # Prometheus base URL
    extproc_metrics: str
    envoy_metrics: str
    mocks: dict[str, MockProvider]
    keys: dict[str, str]
    responses: dict[str, httpx.Response] = field(default_factory=dict)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prom}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = json.loads(_get(url, timeout=5))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return list(data["result"]) if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def scraped_after(self, t: float) -> bool:
        """True once Prometheus holds an ext_proc scrape that started after wall-clock time t."""
        # timestamp() of a bare selector: the sample's own time (of an expression, the query's).
        stamp = self.query('timestamp(up{job="holysheep-extproc"})')
        up = self.query('up{job="holysheep-extproc"}')
        return bool(stamp and up) and float(stamp[0]["value"][1]) > t and up[0]["value"][1] == "1"

    def wait_scrape(self) -> None:
        t = time.time()
        _wait("a scrape after the traffic", lambda: self.scraped_after(t), 10)

    def active_alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])


def _chat(client: httpx.Client, model: str, prompt: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": prompt}]})


def _fault(mock: MockProvider, mode: str) -> None:
    # The mock's HTTP control endpoint, as an operator would use it (README quick start).
    resp = httpx.post(f"http://127.0.0.1:{mock.control_port}/_mock/fault", json={"mode": mode}, timeout=5,
                      trust_env=False)
    assert resp.status_code == 200 and resp.json()["mode"] == mode, resp.text


def _drive(live: Live, client: httpx.Client) -> None:
    """The traffic. Responses are kept for test_traffic_was_what_the_panels_show."""
    r = live.responses
    # 1. Normal answers (stored in the Fallback cache), an Always-mode miss then hit, bad requests.
    for round_ in range(2):
        for i in range(3):
            r[f"normal-{i}"] = _chat(client, "gpt-4o-mini", f"normal {i}")
        r["cached-miss" if round_ == 0 else "cached-again"] = _chat(client, "cached-model", "cache me")
        r["bad-json"] = client.post("/v1/chat/completions", content=b'{"model": "gpt-4o-mini", "messages": [',
                                    headers={"content-type": "application/json"})
        r["unknown-model"] = _chat(client, "no-such-model", "hi")
        r[f"budget-{round_}"] = _chat(client, "budget-model", f"budget {round_}")
        live.wait_scrape()  # the second round lands in a later scrape: the rates are not zero
    # A budget of 3 an hour: the third answer spends it, the next ones are refused (429).
    for i in range(2, 5):
        r[f"budget-{i}"] = _chat(client, "budget-model", f"budget {i}")
    live.wait_scrape()
    # The store is asynchronous, after the answer: ask again until the cache answers.
    r["cached-hit"] = _wait("an Always-mode cache hit", lambda: (
        resp if (resp := _chat(client, "cached-model", "cache me")).headers.get("x-holysheep-cache") == "hit"
        else None), 5)

    # 2. primary rate-limits (429: its health check still passes, so only requests open the
    # circuit): two requests fail over to secondary, a scrape apart so the failover and error
    # rates are not zero; the second opens primary's circuit and later ones skip primary.
    _fault(live.mocks["primary"], "429")
    r["failover-0"] = _chat(client, "gpt-4o-mini", "failover 0")
    live.wait_scrape()
    for i in (1, 2):
        r[f"failover-{i}"] = _chat(client, "gpt-4o-mini", f"failover {i}")
    live.wait_scrape()
    r["failover-late"] = _chat(client, "gpt-4o-mini", "failover late")

    # 3. Every provider fails, health checks included: stored answers come from the cache,
    # anything else is a 503.
    for name in PROVIDERS:
        _fault(live.mocks[name], "500")
    r["fallback-0"] = _chat(client, "gpt-4o-mini", "normal 0")
    r["no-provider"] = _chat(client, "gpt-4o-mini", "never asked before")
    live.wait_scrape()
    r["fallback-1"] = _chat(client, "gpt-4o-mini", "normal 1")
    live.wait_scrape()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus = binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus-live")
    keys = {name: f"live-key-{name}" for name in PROVIDERS}
    mocks = {name: MockProvider(name, expect_key=keys[name], models=("gpt-4o-mini", "deepseek-v3.2", "cached-model"))
             for name in PROVIDERS}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for mock in mocks.values():
            mock.start_in_thread(port=0, control_port=0)
        config = tmp / "config.yaml"
        config.write_text(CONFIG.format(**{name: m.base_url for name, m in mocks.items()}))
        listen, grpc_port, admin, envoy_admin, prom_port = (free_port() for _ in range(5))
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update({f"LIVE_{name.upper()}_KEY": key for name, key in keys.items()})
        with (tmp / "dev.log").open("wb") as log:
            dev = subprocess.Popen(
                [sys.executable, "-m", "extproc.cli", "dev", "--config", str(config),
                 "--listen", f"127.0.0.1:{listen}", "--grpc-port", str(grpc_port), "--admin-port", str(admin),
                 "--envoy-admin-port", str(envoy_admin), "--secrets-dir", str(tmp / "secrets"),
                 "--log-level", "WARNING"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        procs.append(dev)

        write_rules(tmp)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["holysheep-rules.yaml"],
            "scrape_configs": [
                # `pod`: the label the Prometheus Operator's ServiceMonitor adds, used by the alerts.
                {"job_name": "holysheep-extproc", "static_configs": [
                    {"targets": [f"127.0.0.1:{admin}"], "labels": {"pod": "holysheep-dev"}}]},
                {"job_name": "envoy", "metrics_path": "/stats/prometheus",
                 "static_configs": [{"targets": [f"127.0.0.1:{envoy_admin}"]}]},
            ],
        }))
        with (tmp / "prometheus.log").open("wb") as log:
            prom = subprocess.Popen(
                [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        procs.append(prom)

        live = Live(prom=f"http://127.0.0.1:{prom_port}", extproc_metrics=f"http://127.0.0.1:{admin}/metrics",
                    envoy_metrics=f"http://127.0.0.1:{envoy_admin}/stats/prometheus", mocks=mocks,
                    keys=keys)
        _wait("ext_proc ready", lambda: _get(f"http://127.0.0.1:{admin}/ready"), 30, {"dev": dev})
        _wait("Envoy ready", lambda: _get(f"http://127.0.0.1:{envoy_admin}/ready"), 30, {"dev": dev})
        _wait("Prometheus ready", lambda: _get(f"{live.prom}/-/ready"), 30, {"prometheus": prom})
        _wait("a first scrape", lambda: live.scraped_after(0), 15, {"prometheus": prom, "dev": dev})
        with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10, trust_env=False) as client:
            _drive(live, client)
        yield live
    except AssertionError:
        for name in ("dev.log", "prometheus.log"):
            with contextlib.suppress(OSError):
                print(f"--- {name}\n{(tmp / name).read_text(errors='replace')[-4000:]}")
        raise
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for mock in mocks.values():
            mock.stop_in_thread()


def test_traffic_was_what_the_panels_show(live: Live) -> None:
    r = live.responses
    for i in range(3):
        assert r[f"normal-{i}"].status_code == 200 and r[f"normal-{i}"].headers["x-holysheep-provider"] == "primary"
    assert r["cached-miss"].status_code == 200 and "x-holysheep-cache" not in r["cached-miss"].headers
    assert r["cached-hit"].headers["x-holysheep-cache"] == "hit"
    assert r["bad-json"].status_code == 400 and r["bad-json"].json()["error"]["code"] == "invalid_json"
    assert r["unknown-model"].status_code == 404 and r["unknown-model"].json()["error"]["code"] == "model_not_found"
    for key in ("failover-0", "failover-1", "failover-2", "failover-late"):
        assert r[key].status_code == 200 and r[key].headers["x-holysheep-provider"] == "secondary", key
    for key in ("fallback-0", "fallback-1"):
        assert r[key].status_code == 200 and r[key].headers["x-holysheep-cache"] == "fallback", key
    assert r["no-provider"].status_code == 503
    assert r["no-provider"].json()["error"]["code"] == "no_provider_available"
    assert [r[f"budget-{i}"].status_code for i in range(5)] == [200, 200, 200, 429, 429]
    assert [r[f"budget-{i}"].headers["x-ratelimit-remaining-requests"] for i in range(5)] == ["2", "1", "0", "0", "0"]
    assert r["budget-3"].json()["error"]["code"] == "rate_limit_exceeded"
    # The mocks saw the failures the metrics report.
    assert live.mocks["primary"].stats()["by_status"].get("429") == 2


def _panel_params() -> list[Any]:
    params = []
    # Every panel, the per-workload ones too: the dev stack's Envoy calls the ext_proc over mTLS
    # as workload default/default (`holysheep-mesh dev --workload`), the identity they count.
    for q in panel_queries():
        params.append(pytest.param(q, id=f"{q.panel}{q.ref_id}-{q.title}"))
    return params


@pytest.mark.parametrize("query", _panel_params())
def test_every_panel_query_returns_data(live: Live, query: PanelQuery) -> None:
    result = live.query(grafana(query.expr))
    values = [float(s["value"][1]) for s in result]
    assert any(math.isfinite(v) for v in values), f"panel {query.panel} ({query.title}): {result}"


@pytest.mark.parametrize("definition", variable_queries())
def test_every_variable_has_values(live: Live, definition: str) -> None:
    metric, label = label_values_metric(definition)
    assert set(live.api(f"label/{label}/values", **{"match[]": metric})) == set(PROVIDERS)


def test_rules_load_and_evaluate(live: Live) -> None:
    rules = [r for g in live.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    _wait("every rule evaluated", lambda: all(
        r["health"] == "ok" for g in live.api("rules")["groups"] for r in g["rules"]), 5)


def test_failing_providers_raise_the_alerts(live: Live) -> None:
    def raised() -> list[dict[str, Any]] | None:
        alerts = live.active_alerts()
        names = {(a["labels"]["alertname"], a["labels"].get("provider")) for a in alerts}
        wanted = {("HolySheepProviderCircuitOpen", "primary"), ("HolySheepAllProvidersDown", None),
                  ("HolySheepServingFromCache", None)}
        return alerts if wanted <= names else None

    alerts = _wait("the circuit, all-down and fallback alerts", raised, 15)
    circuit = next(a for a in alerts if a["labels"]["alertname"] == "HolySheepProviderCircuitOpen"
                   and a["labels"]["provider"] == "primary")
    assert circuit["state"] in ("pending", "firing")
    assert circuit["labels"]["severity"] == "warning"
    assert circuit["annotations"]["summary"] == "Circuit open for provider primary"
    # Must not fire: tertiary only failed its health checks (no request reached it failing), and
    # the data plane is ready.
    names = {(a["labels"]["alertname"], a["labels"].get("provider")) for a in alerts}
    assert ("HolySheepProviderCircuitOpen", "tertiary") not in names
    assert not names & {("HolySheepExtprocNotReady", None), ("HolySheepExtprocDown", None)}
    # live-hourly is used up (3 of 3): its alert is on its way (pending for 2 minutes), for that
    # budget and unit only
    budget = [a for a in alerts if a["labels"]["alertname"] == "HolySheepBudgetNearLimit"]
    assert [(a["labels"]["budget"], a["labels"]["unit"]) for a in budget] == [("live-hourly", "requests")]
    assert budget[0]["state"] in ("pending", "firing")


def test_promtool_check_metrics_extproc(live: Live) -> None:
    text = _get(live.extproc_metrics, timeout=5)
    assert b"holysheep_failovers_total" in text and b"holysheep_cache_events_total" in text
    assert not [k for k in live.keys.values() if k.encode() in text]  # never a label value
    result = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# What `promtool check metrics` says about Envoy 1.40's /stats/prometheus: naming lint only
# (no HELP lines, counters without `_total`, ...), which is upstream's exposition, not ours.
ENVOY_LINT = ("no help text", 'counter metrics should have "_total" suffix',
              "metric names should not contain abbreviated units",
              'non-histogram and non-summary metrics should not have "_count" suffix',
              'non-counter metrics should not have "_total" suffix', 'use base unit "seconds" instead of')


def test_envoy_metrics_parse_with_lint_only(live: Live) -> None:
    assert live.query('up{job="envoy"} == 1')  # Prometheus scrapes Envoy without errors
    assert live.query('envoy_cluster_upstream_rq{envoy_cluster_name="provider-secondary"}')
    text = _get(live.envoy_metrics, timeout=5).decode()
    result = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=30)
    # 0: clean; 3: lint problems only (a parse error exits 1).
    assert result.returncode in (0, 3), result.stdout + result.stderr
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert all(any(lint in line for lint in ENVOY_LINT) for line in problems), problems
