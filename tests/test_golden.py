"""`holysheep-mesh render` output, byte for byte, against files captured before the architecture
change (tests/golden/, commit 78bcac2): moving the schema or the render code must not change a
single object the controller applies.

To accept an intended change: `holysheep-mesh render -f FILE > tests/golden/NAME.render.yaml`,
and say in the commit why the output changed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
INPUTS = [
    "mesh/samples/production-cluster.yaml",
    "tests/fixtures/render_seed.yaml",
    "tests/fixtures/render_three_providers.yaml",
    "tests/fixtures/render_gateway.yaml",
]


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The real console entry point, as `holysheep-mesh ARGS` runs it."""
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args], cwd=ROOT, capture_output=True, timeout=60)


@pytest.mark.parametrize("source", INPUTS)
def test_render_is_byte_identical_to_the_golden_file(source: str) -> None:
    result = cli("render", "-f", source)
    assert result.returncode == 0, result.stderr.decode()
    golden = GOLDEN / f"{Path(source).stem}.render.yaml"
    assert result.stdout == golden.read_bytes(), f"render -f {source} differs from {golden.name}"


def test_every_golden_file_has_its_input() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.render.yaml")) == sorted(
        f"{Path(s).stem}.render.yaml" for s in INPUTS
    )


def test_an_invalid_file_is_one_line_on_stderr_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / INPUTS[2]).read_text().replace("failureThreshold: 3", "failureThreshold: 0"))
    result = cli("render", "-f", str(bad))
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode() == (
        "holysheep-mesh render: document 0 (apps/multi): spec.circuitBreaker.failureThreshold: "
        "must be between 1 and 1000, got 0\n"
    )
