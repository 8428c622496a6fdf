"""The layers of the code base (pyproject.toml [tool.importlinter]), checked on every test run.

- protos/ is the contract both planes import: it imports neither extproc nor controller;
- extproc and controller never import each other, but for the one CLI dispatcher;
- no product module imports the dev tooling in extproc/dev, but for the `dev` subcommand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_layers_hold() -> None:
    # lint-imports is the import-linter console script; run it from this interpreter's install
    # so the check needs no activated venv (the README's test command does not activate one).
    script = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(script), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


def test_layers_catch_a_violation(tmp_path: Path) -> None:
    """The contracts are not vacuous: in a copy of the tree, a product module importing the dev
    tooling, or the contract importing a plane, breaks them."""
    for item in ("pyproject.toml", "extproc", "controller", "protos"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp_path / item)
    (tmp_path / "extproc" / "probe.py").write_text("import extproc.dev.mock_provider  # noqa: F401\n")
    (tmp_path / "protos" / "probe.py").write_text("import extproc.server  # noqa: F401\n")
    script = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(script), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "extproc.probe -> extproc.dev.mock_provider" in proc.stdout
    assert "protos.probe -> extproc.server" in proc.stdout
