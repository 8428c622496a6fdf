"""The PrometheusRule's alerts (and recording rules, if any) proven with promtool.

`promtool check rules` validates spec.groups as Prometheus loads them; `promtool test rules`
runs the unit tests in tests/promtool/ (input series written there, with the labels and
annotations each alert must carry) against the same file. Every rule needs a case where it
fires and one where it must not; two mutations per alert show both kinds of case can fail.
By hand: see the README, "Checking the alerts and the dashboard".
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring import PROMTOOL_TESTS, alert_rules, binary, recording_rules, rule_groups, write_rules

UNIT_TESTS = sorted(PROMTOOL_TESTS.glob("*.test.yaml"))


def _cases() -> list[dict[str, Any]]:
    return [case for f in UNIT_TESTS for case in yaml.safe_load(f.read_text())["tests"]]


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The unit tests next to a rules file extracted from the PrometheusRule (their `rule_files`)."""
    for f in UNIT_TESTS:
        shutil.copy(f, tmp_path / f.name)
    write_rules(tmp_path)
    yield tmp_path


def _test_rules(workdir: Path, files: list[Path] = UNIT_TESTS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), "test", "rules", *(f.name for f in files)],
                          cwd=workdir, capture_output=True, text=True, timeout=60)


def test_check_rules(workdir: Path) -> None:
    result = subprocess.run([binary("promtool"), "check", "rules", str(write_rules(workdir))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in rule_groups())
    assert f"SUCCESS: {count} rules found" in result.stdout, result.stdout


def test_check_rules_can_fail(tmp_path: Path) -> None:
    broken = copy.deepcopy(rule_groups())
    broken[0]["rules"][0]["expr"] = "max by (provider) (holysheep_circuit_state > 0"
    result = subprocess.run([binary("promtool"), "check", "rules", str(write_rules(tmp_path, broken))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_unit_tests_pass(workdir: Path) -> None:
    assert UNIT_TESTS
    result = _test_rules(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_a_firing_and_a_quiet_case(rule: dict[str, Any]) -> None:
    tests = [t for case in _cases() for t in case.get("alert_rule_test", []) if t["alertname"] == rule["alert"]]
    firing = [a for t in tests for a in t.get("exp_alerts") or []]
    assert firing, f"no case where {rule['alert']} fires"
    for alert in firing:  # the alert's labels and every annotation are checked, not only its name
        assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
        assert set(alert["exp_annotations"]) == set(rule["annotations"]), alert
    assert any(not t.get("exp_alerts") for t in tests), f"no case where {rule['alert']} must stay quiet"


def test_every_recording_rule_has_a_sample_and_an_empty_case() -> None:
    # The PrometheusRule has no recording rule today: this guards the next one (a loop, not a
    # parametrisation, so an empty list is not a skip, which CI would turn into a failure).
    for rule in recording_rules():
        tests = [t for case in _cases() for t in case.get("promql_expr_test", []) if rule["record"] in t["expr"]]
        assert any(t.get("exp_samples") for t in tests), f"no case with samples of {rule['record']}"
        assert any(not t.get("exp_samples") for t in tests), f"no case where {rule['record']} must be empty"


def _mutated(alert: str, how: str) -> list[dict[str, Any]]:
    groups = copy.deepcopy(rule_groups())
    for group in groups:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = f"({rule['expr']}) {how} on() vector(1)"
    return groups


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_cases_catch_a_broken_alert(rule: dict[str, Any], workdir: Path) -> None:
    # `unless on() vector(1)`: never fires, so a firing case must fail; `or on() vector(1)`: fires
    # (without labels) whenever the real rule would not, so a quiet case must fail.
    files = [f for f in UNIT_TESTS if f"alertname: {rule['alert']}" in f.read_text()]
    for how, kind in (("unless", "never fires"), ("or", "always fires")):
        write_rules(workdir, _mutated(rule["alert"], how))
        result = _test_rules(workdir, files)
        assert result.returncode != 0, f"the unit tests pass although {rule['alert']} {kind}"
        assert rule["alert"] in result.stdout + result.stderr


def test_a_missing_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    # .ci/run installs prometheus; without it a CI run must go red, not quietly skip.
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI"):
        binary("holysheep-no-such-promtool")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        binary("holysheep-no-such-promtool")
