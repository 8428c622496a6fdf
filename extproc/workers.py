"""Multi-process mode: N workers share the gRPC and admin ports with SO_REUSEPORT.

Workers are separate interpreters (not forks) so no gRPC state crosses a fork. Metrics use
prometheus-client's multiprocess mode over a directory the supervisor owns, so any worker's
/metrics shows the sum over all of them; circuit state is shared through another directory
(extproc/shared_state.py). A worker that dies is restarted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from extproc.shared_state import STATE_DIR_ENV


def supervise(workers: int, argv: list[str]) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="holysheep-metrics-")
    os.makedirs(metrics_dir, exist_ok=True)
    # Circuit state the workers share (extproc/breaker.py); private to this supervisor's workers.
    state_dir = tempfile.mkdtemp(prefix="holysheep-state-")
    env = {
        **os.environ, "HOLYSHEEP_WORKER": "1", "PROMETHEUS_MULTIPROC_DIR": metrics_dir, STATE_DIR_ENV: state_dir,
    }
    cmd = [sys.executable, "-m", "extproc.cli", *argv]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def start(i: int) -> None:
        procs[i] = subprocess.Popen(cmd, env={**env, "HOLYSHEEP_WORKER_ID": str(i)})

    def on_signal(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(workers):
        start(i)
    try:
        while not stopping:
            for i, p in list(procs.items()):
                if p.poll() is not None and not stopping:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(p.pid, metrics_dir)  # type: ignore[no-untyped-call]
                    start(i)
            time.sleep(0.2)
        for p in procs.values():
            p.wait()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
