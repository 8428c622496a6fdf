"""mesh/monitoring: the dashboard and the alerts name only metrics a running ext_proc exports,
and every expression parses.

The metric names come from a live `holysheep-mesh extproc` (subprocess on 127.0.0.1, one
worker, dummy key): its /metrics `# HELP`/`# TYPE` lines (prometheus-client declares a labelled
metric's family even before its first sample) plus the sample names (`_bucket`, `_count`...).
PromQL is parsed with `promql-parser` (the Prometheus parser, Rust-backed) when installed;
otherwise with the structural fallback below (brackets, strings, selectors, ranges).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.dev.processes import free_port
from tests.monitoring import ROOT, alert_rules, dashboard, grafana, label_values_metric, panel_queries, variable_queries

SEED = (ROOT / "mesh" / "samples" / "production-cluster.yaml").read_text()
FUNCTIONS = {"sum", "max", "min", "count", "rate", "increase", "histogram_quantile", "clamp_min", "absent",
             "by", "and", "or", "unless", "bool", "on", "ignoring", "group_left", "group_right", "without"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    config = tmp_path_factory.mktemp("extproc") / "config.yaml"
    config.write_text(SEED)
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["HOLYSHEEP_API_KEY"] = "dummy"
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.cli", "extproc", "--config", str(config),
         "--grpc-address", f"127.0.0.1:{grpc_port}", "--http-address", f"127.0.0.1:{http_port}",
         "--workers", "1", "--secrets-dir", str(config.parent / "secrets")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"extproc did not start: {err!r}") from None
                time.sleep(0.1)
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        names = set()
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                names.add(line.split()[2])
                if line.startswith("# TYPE ") and line.split()[3] == "histogram":  # its series' names
                    names |= {f"{line.split()[2]}_{s}" for s in ("bucket", "count", "sum")}
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
        yield names
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dashboard_exprs() -> list[str]:
    return [q.expr for q in panel_queries()] + [label_values_metric(v)[0] for v in variable_queries()]


def metric_names(expr: str) -> set[str]:
    try:
        import promql_parser
    except ImportError:
        return _fallback_names(expr)
    found: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector" and node.name:
            found.add(node.name)
        for attr in ("expr", "lhs", "rhs", "vector_selector", "args", "param"):
            child = getattr(node, attr, None)
            if isinstance(child, list | tuple):
                for c in child:
                    walk(c)
            elif child is not None and type(child).__module__.startswith("promql_parser"):
                walk(child)

    walk(promql_parser.parse(expr))
    return found


def _fallback_names(expr: str) -> set[str]:
    """Structural check and metric names without a real parser."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for ch in stripped:
        if ch in depth:
            depth[ch] += 1
        elif ch in closing:
            depth[closing[ch]] -= 1
            assert depth[closing[ch]] >= 0, f"unbalanced {ch!r} in {expr}"
    assert all(v == 0 for v in depth.values()), f"unbalanced brackets in {expr}"
    grouping = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    no_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|" + grouping, " ", stripped)
    no_numbers = re.sub(r"(?<![a-zA-Z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", no_labels)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_numbers))
    return {w for w in words if w not in FUNCTIONS and not re.fullmatch(r"\d+[smhdwy]|e\d+", w)}


def test_alerts_cover_the_issue() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert {"HolySheepProviderCircuitOpen", "HolySheepHighFailoverRate", "HolySheepAllProvidersDown",
            "HolySheepExtprocNotReady"} <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]


def test_every_expression_parses() -> None:
    exprs = [grafana(e) for e in dashboard_exprs()] + [r["expr"] for r in alert_rules()]
    assert len(exprs) > 20
    for expr in exprs:
        assert metric_names(expr), expr
    with pytest.raises((ValueError, AssertionError)):  # the check can fail
        metric_names("sum(rate(holysheep_requests_total[5m])")


def test_dashboard_covers_the_issue() -> None:
    dash = dashboard()
    used = set().union(*(metric_names(grafana(e)) for e in dashboard_exprs()))
    assert {"holysheep_requests_total", "holysheep_upstream_request_duration_seconds_bucket",
            "holysheep_tokens_total", "holysheep_cost_usd_total", "holysheep_workload_tokens_total",
            "holysheep_workload_cost_usd_total", "holysheep_failovers_total", "holysheep_circuit_state",
            "holysheep_cache_events_total"} <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "holysheep-mesh"


def test_queries_name_only_exported_metrics(exported: set[str]) -> None:
    assert "holysheep_requests_total" in exported and "holysheep_extproc_ready" in exported
    used = set()
    for expr in [grafana(e) for e in dashboard_exprs()] + [r["expr"] for r in alert_rules()]:
        used |= metric_names(expr)
    assert used - exported == set()
