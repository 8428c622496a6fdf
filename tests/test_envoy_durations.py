"""Regression: sub-second and fractional timeouts must render as Envoy JSON Durations.

Found by the chaos run (python -m bench.chaos --timeout 0.5): the dev-stack bootstrap rendered
``timeout: 500ms`` as ``"500ms"``, which Envoy's protobuf-JSON parser rejects ("duration must
end with a single 's'"), so Envoy never started. The same helper rendered the EnvoyFilter's
``message_timeout`` (timeout x attempts + 5 s, e.g. ``9500ms``), which a sidecar would refuse.
Istio's own CRD fields keep Go durations (controller/render.py), which Istio accepts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from extproc.dev.envoy_bootstrap import BootstrapOptions, build_bootstrap
from extproc.dev.processes import envoy_binary
from protos.durations import proto_duration
from protos.filter_config import ext_proc_filter
from protos.spec import load_text

CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: subsecond, namespace: default}
spec:
  timeout: 500ms
  maxRetries: 2
  providers:
    - {name: a, baseUrl: "http://127.0.0.1:18001/v1", auth: {env: A_KEY}}
    - {name: b, baseUrl: "http://127.0.0.1:18002/v1", auth: {env: B_KEY}, timeout: 1500ms}
"""


@pytest.mark.parametrize(("seconds", "text"), [
    (0.5, "0.5s"), (1.0, "1s"), (30.0, "30s"), (9.5, "9.5s"), (0.001, "0.001s"), (1.25, "1.25s"), (0.0, "0s"),
])
def test_proto_duration(seconds: float, text: str) -> None:
    assert proto_duration(seconds) == text


def test_filter_message_timeout_is_an_envoy_duration() -> None:
    typed = ext_proc_filter("c", 9.5)["typed_config"]
    assert typed["message_timeout"] == "9.5s"


def test_envoy_loads_a_bootstrap_with_subsecond_timeouts(tmp_path: Path) -> None:
    bootstrap = build_bootstrap(load_text(CONFIG), BootstrapOptions(listen_port=10999, admin_port=10998))
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
