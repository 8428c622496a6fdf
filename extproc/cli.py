"""The `holysheep-mesh` command: extproc, dev, render, controller."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from extproc.credentials import DEFAULT_SECRETS_DIR


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT") from None


def _add_extproc(sub: Any) -> None:
    p = sub.add_parser("extproc", help="run the Envoy ext_proc data plane")
    p.add_argument("--config", required=True, help="HolySheepConfig YAML file (reloaded on change)")
    p.add_argument("--grpc-address", default="0.0.0.0:9002")
    p.add_argument("--http-address", default="0.0.0.0:8080", type=_hostport, help="/health /ready /metrics")
    p.add_argument("--secrets-dir", default=DEFAULT_SECRETS_DIR)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes sharing the gRPC port with SO_REUSEPORT (default: cores)")
    # Termination (README "Upgrade"; the defaults are extproc.server.ServerOptions' and are
    # explained next to the Deployment's probe in mesh/base/extproc.yaml).
    p.add_argument("--drain-delay-seconds", type=float, default=20.0,
                   help="after SIGTERM: not ready, yet serving new streams this long while the endpoint leaves "
                        "every load balancer (default: 20, the readiness probe's 3 x 5 s plus 5 s propagation)")
    p.add_argument("--drain-seconds", type=float, default=20.0,
                   help="then: how long the streams in flight may take to finish before they are cancelled")
    p.add_argument("--log-level", default=os.environ.get("HOLYSHEEP_LOG_LEVEL", "INFO"))
    p.set_defaults(func=extproc_main)


def _add_dev(sub: Any) -> None:
    p = sub.add_parser("dev", help="run a local Envoy with the ext_proc on its path")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="HolySheepConfig YAML file")
    src.add_argument("--demo", action="store_true", help="two local mock providers; no keys, no internet")
    p.add_argument("--listen", default="127.0.0.1:10000", type=_hostport)
    p.add_argument("--grpc-port", type=int, default=9002)
    p.add_argument("--admin-port", type=int, default=8080, help="ext_proc /health /ready /metrics")
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--secrets-dir", default=DEFAULT_SECRETS_DIR)
    p.add_argument("--log-level", default=os.environ.get("HOLYSHEEP_LOG_LEVEL", "INFO"))
    p.set_defaults(func=dev_main)


def extproc_main(args: argparse.Namespace) -> int:
    if args.workers > 1 and not os.environ.get("HOLYSHEEP_WORKER"):
        from extproc.workers import supervise

        return supervise(args.workers, sys.argv[1:])
    from protos import logs

    logs.setup(args.log_level)
    from extproc.server import ServerOptions, serve

    host, port = args.http_address
    asyncio.run(serve(ServerOptions(
        config_path=args.config, grpc_address=args.grpc_address, http_host=host, http_port=port,
        secrets_dir=args.secrets_dir, drain_delay_seconds=args.drain_delay_seconds, drain_seconds=args.drain_seconds,
    )))
    return 0


def dev_main(args: argparse.Namespace) -> int:
    from protos import logs

    logs.setup(args.log_level)
    try:
        from extproc.dev.devstack import DevOptions, run_demo, run_dev
    except ModuleNotFoundError as exc:  # the container image leaves the dev tooling out
        if not (exc.name or "").startswith("extproc.dev"):
            raise
        print("holysheep-mesh dev: the dev tooling (extproc/dev) is not installed here; run it from a "
              "checkout of the repository (pip install -e .)", file=sys.stderr)
        return 1

    host, port = args.listen
    options = DevOptions(
        config_path=args.config or "", listen_host=host, listen_port=port, grpc_port=args.grpc_port,
        admin_port=args.admin_port, envoy_admin_port=args.envoy_admin_port, secrets_dir=args.secrets_dir,
    )

    async def main() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await (run_demo(options, stop) if args.demo else run_dev(options, stop))

    try:
        asyncio.run(main())
    except Exception as exc:  # a clear line for the operator, not a trace
        from protos.spec import ConfigError

        if isinstance(exc, ConfigError | RuntimeError | OSError):
            print(f"holysheep-mesh dev: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holysheep-mesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_extproc(sub)
    _add_dev(sub)
    from controller.cli import add_subcommands

    add_subcommands(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
