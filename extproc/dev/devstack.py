"""`holysheep-mesh dev`: a real Envoy with our ext_proc on its path, from one HolySheepConfig.

The secure path, as in the mesh: a throwaway CA (extproc.dev.mtls) issues the ext_proc's server
certificate and the workload certificate Envoy presents to it over mTLS (``--workload
NAMESPACE/SERVICE_ACCOUNT``, default default/default), and the ext_proc authorizes that identity
per config like any caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extproc import authz
from extproc.dev.envoy_bootstrap import BootstrapOptions, Passthrough, build_bootstrap
from extproc.dev.mtls import DEFAULT_WORKLOAD, DevPKI
from extproc.dev.processes import envoy_binary
from extproc.identity import IdentityFrom
from extproc.server import DataPlane, ServerOptions
from extproc.spiffe import parse_spiffe_id
from protos.spec import load_file

__all__ = ["DEMO_CONFIG", "DevOptions", "demo_banner", "envoy_binary", "run_demo", "run_dev"]

log = logging.getLogger(__name__)

DEMO_PORTS = {"primary": (18001, 18101), "secondary": (18002, 18102)}


@dataclass
class DevOptions:
    config_path: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    grpc_port: int = 9002
    admin_port: int = 8080
    envoy_admin_port: int = 9901
    secrets_dir: str = "/var/run/secrets/holysheep"
    passthrough: Sequence[Passthrough] = field(default_factory=list)
    envoy_log_level: str = "warning"
    workload: tuple[str, str] = DEFAULT_WORKLOAD  # the (namespace, service account) Envoy presents


async def _wait_ready(url: str, proc: asyncio.subprocess.Process, deadline: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end:
        if proc.returncode is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            status = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=1).status)
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("envoy did not become ready")


async def run_dev(options: DevOptions, stop: asyncio.Event, banner: str = "") -> None:
    configs = load_file(options.config_path)
    workdir = tempfile.mkdtemp(prefix="holysheep-dev-")
    pki = DevPKI(Path(workdir) / "pki", options.workload)
    identity = parse_spiffe_id(pki.workload_id)
    if authz.scope_denial(identity, configs) is not None:
        scopes = ", ".join(authz.describe(c) for c in configs)
        print(f"holysheep-mesh dev: warning: the workload {'/'.join(options.workload)} is in the scope of no config "
              f"({scopes}): every request will be refused. Pass --workload NAMESPACE/SERVICE_ACCOUNT.",
              file=sys.stderr, flush=True)
    bootstrap = build_bootstrap(configs, BootstrapOptions(
        listen_address=options.listen_host,
        listen_port=options.listen_port,
        admin_port=options.envoy_admin_port,
        extproc_addresses=[("127.0.0.1", options.grpc_port)],
        passthrough=options.passthrough,
        extproc_tls=pki.upstream_tls(),
    ))
    bootstrap_path = os.path.join(workdir, "envoy.json")
    with open(bootstrap_path, "w", encoding="utf-8") as fh:
        json.dump(bootstrap, fh, indent=1)

    plane = DataPlane(ServerOptions(
        config_path=options.config_path,
        grpc_address=f"127.0.0.1:{options.grpc_port}",
        http_host="127.0.0.1",
        http_port=options.admin_port,
        secrets_dir=options.secrets_dir,
        drain_seconds=5.0,
        identity_from=IdentityFrom.TLS,
        tls=pki.server_files,
        drain_delay_seconds=0.0,  # Envoy, the one client, is stopped first
    ))
    plane_stop = asyncio.Event()
    plane_task = asyncio.get_running_loop().create_task(plane.run(plane_stop))
    envoy = await asyncio.create_subprocess_exec(
        envoy_binary(), "-c", bootstrap_path, "--disable-hot-restart", "--log-level", options.envoy_log_level,
        "--concurrency", "2", start_new_session=True,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{options.envoy_admin_port}/ready", envoy)
        print(f"holysheep-mesh dev: Envoy listening on http://{options.listen_host}:{options.listen_port}"
              f" (ext_proc gRPC 127.0.0.1:{options.grpc_port}, metrics http://127.0.0.1:{options.admin_port}/metrics)",
              flush=True)
        print(f"holysheep-mesh dev: Envoy calls the ext_proc over mTLS as {pki.workload_id} (throwaway CA in "
              f"{pki.dir})", flush=True)
        if banner:
            print(banner, flush=True)
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(envoy.wait()), plane_task]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters[:2]:
            w.cancel()
    finally:
        if envoy.returncode is None:
            envoy.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(envoy.wait(), 10)
            except TimeoutError:
                envoy.kill()
        plane_stop.set()
        with contextlib.suppress(Exception):
            await plane_task
        shutil.rmtree(workdir, ignore_errors=True)


DEMO_CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata:
  name: demo
  namespace: default
spec:
  timeout: 5s
  maxRetries: 2
  circuitBreaker: {{enabled: true, failureThreshold: 3, resetTimeout: 15s}}
  healthCheck: {{interval: 5s, endpoint: /models}}
  providers:
    - name: primary
      baseUrl: http://127.0.0.1:{p1}/v1
      auth: {{type: Bearer, env: HOLYSHEEP_DEMO_PRIMARY_KEY}}
    - name: secondary
      baseUrl: http://127.0.0.1:{p2}/v1
      auth: {{type: Bearer, env: HOLYSHEEP_DEMO_SECONDARY_KEY}}
  routes:
    - models: ["gpt-4o*", "deepseek-*"]
      backends:
        - {{provider: primary, priority: 0}}
        - {{provider: secondary, priority: 1, model: deepseek-v3.2}}
    - models: ["*"]
      backends:
        - {{provider: primary, weight: 1}}
        - {{provider: secondary, weight: 1}}
  cache: {{mode: Fallback, ttl: 1h}}
  pricing:
    - {{model: "gpt-4o*", inputPerMillion: 2.5, outputPerMillion: 10}}
    - {{model: deepseek-v3.2, inputPerMillion: 0.28, outputPerMillion: 0.42}}
"""


def demo_banner(listen: str, admin_port: int) -> str:
    (p1, c1), (_, c2) = DEMO_PORTS["primary"], DEMO_PORTS["secondary"]
    return textwrap.dedent(f"""\
        Demo providers: primary on 127.0.0.1:{p1}, secondary on 127.0.0.1:{DEMO_PORTS['secondary'][0]}. Try:
          curl -s http://{listen}/v1/chat/completions -H 'content-type: application/json' \\
               -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}' -i
          curl -s -XPOST 127.0.0.1:{c1}/_mock/fault -d '{{"mode":"500"}}'   # primary fails: failover
          curl -s -XPOST 127.0.0.1:{c2}/_mock/fault -d '{{"mode":"500"}}'   # both fail: cache fallback
          curl -s -XPOST 127.0.0.1:{c1}/_mock/recover; curl -s -XPOST 127.0.0.1:{c2}/_mock/recover
          curl -s http://127.0.0.1:{admin_port}/metrics | grep ^holysheep_
        Ctrl-C stops everything.""")


async def run_demo(options: DevOptions, stop: asyncio.Event) -> None:
    from extproc.dev.mock_provider import MockProvider

    keys = {"primary": "demo-key-primary", "secondary": "demo-key-secondary"}
    os.environ["HOLYSHEEP_DEMO_PRIMARY_KEY"] = keys["primary"]
    os.environ["HOLYSHEEP_DEMO_SECONDARY_KEY"] = keys["secondary"]
    mocks = []
    for name, (port, control) in DEMO_PORTS.items():
        mock = MockProvider(name, expect_key=keys[name], models=("gpt-4o-mini", "deepseek-v3.2"))
        await mock.start(port=port, control_port=control)
        mocks.append(mock)
    workdir = tempfile.mkdtemp(prefix="holysheep-demo-")
    path = os.path.join(workdir, "demo.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(DEMO_CONFIG.format(p1=DEMO_PORTS["primary"][0], p2=DEMO_PORTS["secondary"][0]))
    options.config_path = path
    try:
        await run_dev(options, stop, demo_banner(f"{options.listen_host}:{options.listen_port}", options.admin_port))
    finally:
        for mock in mocks:
            await mock.stop()
        shutil.rmtree(workdir, ignore_errors=True)
