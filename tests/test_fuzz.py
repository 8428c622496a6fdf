"""The atheris request-body harness, bounded for CI (the long form is in its docstring).

It runs as a subprocess because libFuzzer owns the process: it exits on the first crash and
writes the input next to ``-artifact_prefix``. The seed is fixed so CI is reproducible; the
long runs use random seeds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[1]
RUNS = 20_000


def test_request_body_fuzzer_bounded(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tests.fuzz.fuzz_request_body", f"-runs={RUNS}", "-max_total_time=15",
           "-seed=1", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90, check=False)
    out = proc.stdout + proc.stderr
    tail = "\n".join(line for line in out.splitlines() if "Instrumenting" not in line)[-4000:]
    assert proc.returncode == 0, f"fuzzer failed (crash inputs in {tmp_path}):\n{tail}"
    assert not list(tmp_path.glob("crash-*")), tail
    counted = re.search(r"fuzz_request_body: (\d+) cases run \((.*)\)", out)
    executed = re.search(r"stat::number_of_executed_units: (\d+)", out)
    assert counted and executed, tail
    cases = int(counted.group(1))
    # Under -max_total_time on a loaded machine fewer may run; 1,000 is the floor that still
    # reaches every outcome class.
    assert 1_000 <= cases <= RUNS and cases == int(executed.group(1)), tail
    outcomes = dict(part.split("=") for part in counted.group(2).split(", "))
    for outcome in ("continue-primary", "error-400-invalid_json", "error-400-model_required",
                    "error-404-unknown_endpoint", "down-503"):
        assert int(outcomes.get(outcome, 0)) > 0, f"{outcome} never reached: {counted.group(0)}"
