"""What the monitoring tests share: the rules and dashboard in mesh/monitoring, Grafana's
variables, and the Prometheus binaries (Debian's `prometheus` package, 2.42 or newer).

A missing binary skips on a developer machine but fails under CI (`CI` set, as CI services do):
.ci/run installs the package, so its absence there is a broken CI, not an optional extra.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "mesh" / "monitoring"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"
# The name the unit tests in tests/promtool/ give in `rule_files:`.
RULES_FILE = "holysheep-rules.yaml"
# Grafana's variables, replaced as Grafana would before the query reaches Prometheus. Interval
# variables get 1m: at least two samples at any scrape interval up to 30 s (the ServiceMonitor's).
GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "1m", "${__interval}": "1m", "$__range": "1h",
    "${provider}": ".*", "$provider": ".*",
}


@dataclass(frozen=True)
class PanelQuery:
    panel: int
    title: str
    ref_id: str
    expr: str  # as written in the dashboard, variables included


def dashboard() -> dict[str, Any]:
    return dict(json.loads((MONITORING / "holysheep-dashboard.json").read_text()))


def panel_queries() -> list[PanelQuery]:
    return [PanelQuery(int(p["id"]), str(p["title"]), str(t.get("refId", "")), str(t["expr"]))
            for p in dashboard()["panels"] for t in p.get("targets", [])]


def variable_queries() -> list[str]:
    """The dashboard's query variables, e.g. `label_values(holysheep_requests_total, provider)`."""
    return [str(v["definition"]) for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the tests do not know: {expr}"
    return expr


def rule_groups() -> list[dict[str, Any]]:
    """spec.groups of the PrometheusRule: exactly what the Prometheus Operator hands Prometheus."""
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return list(rule["spec"]["groups"])


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "record" in r]


def write_rules(directory: Path, groups: list[dict[str, Any]] | None = None) -> Path:
    """A plain Prometheus rules file (what `rule_files:` and promtool read) from the CR's groups."""
    path = directory / RULES_FILE
    path.write_text(yaml.safe_dump({"groups": rule_groups() if groups is None else groups}, sort_keys=False))
    return path


def binary(name: str) -> str:
    """Path of a Prometheus binary; skip without it, but fail under CI, which installs it."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if found is None:
        why = f"{name} not installed (apt-get install -y --no-install-recommends prometheus)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{why}; .ci/run installs it, so under CI this is an error", pytrace=False)
        pytest.skip(why)
    return found


def label_values_metric(definition: str) -> tuple[str, str]:
    """`label_values(metric, label)` -> (metric, label)."""
    m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", definition)
    assert m, f"unsupported variable query {definition!r}"
    return m.group(1), m.group(2)
