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
    sec = p.add_argument_group(
        "caller identity (README, Security)",
        "Where each stream's caller identity comes from. With none of these every stream is refused.")
    sec.add_argument("--tls-cert", metavar="FILE", help="serve gRPC over mTLS: the server certificate chain (PEM)")
    sec.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    sec.add_argument("--client-ca", metavar="FILE",
                     help="CA bundle client certificates must chain to; the caller is their SPIFFE URI SAN. "
                          "The three files are re-read when they change")
    sec.add_argument("--identity-from", choices=[IDENTITY_XFCC], default=None,
                     help="xfcc: behind this pod's own Istio sidecar, the caller is the peer certificate the "
                          "sidecar verified (x-forwarded-client-cert); needs the install's SANITIZE_SET annotation "
                          "and STRICT mTLS on the port")
    sec.add_argument("--trust-domain", action="append", default=[], metavar="DOMAIN",
                     help="accept SPIFFE IDs of this trust domain only (repeatable; default: any)")
    sec.add_argument("--root-namespace", default="istio-system",
                     help="Istio's root namespace: a HolySheepConfig there serves every namespace")
    sec.add_argument("--insecure-no-identity", action="store_true",
                     help="DEVELOPMENT ONLY: serve unauthenticated callers; anyone reaching the port gets credentials")
    p.set_defaults(func=extproc_main)


IDENTITY_XFCC = "xfcc"


def identity_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerOptions fields of the caller-identity flags; SystemExit(2) on a bad combination."""
    from extproc.identity import IdentityFrom
    from extproc.tls import TLSConfigError, TLSFiles, load

    given = [f for f in (args.tls_cert, args.tls_key, args.client_ca) if f]
    if given and len(given) != 3:
        _usage_error("--tls-cert, --tls-key and --client-ca go together")
    modes = [name for name, on in (("--tls-cert", bool(given)), ("--identity-from xfcc", bool(args.identity_from)),
                                   ("--insecure-no-identity", args.insecure_no_identity)) if on]
    if len(modes) > 1:
        _usage_error(f"{' and '.join(modes)} exclude each other")
    tls = None
    if given:
        tls = TLSFiles(args.tls_cert, args.tls_key, args.client_ca)
        try:
            load(tls)  # fail at once, naming the file, rather than in every worker
        except TLSConfigError as exc:
            _usage_error(str(exc))
        mode = IdentityFrom.TLS
    elif args.identity_from == IDENTITY_XFCC:
        mode = IdentityFrom.XFCC
    elif args.insecure_no_identity:
        mode = IdentityFrom.INSECURE
    else:
        mode = IdentityFrom.NONE
    return {"identity_from": mode, "tls": tls, "trust_domains": tuple(args.trust_domain),
            "root_namespace": args.root_namespace}


def _usage_error(message: str) -> None:
    print(f"holysheep-mesh extproc: {message}", file=sys.stderr)
    raise SystemExit(2)


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
    p.add_argument("--workload", default="default/default", type=_workload, metavar="NAMESPACE/SERVICE_ACCOUNT",
                   help="the identity Envoy's certificate gives it towards the ext_proc (default: default/default); "
                        "a config serves it only in its scope")
    p.add_argument("--log-level", default=os.environ.get("HOLYSHEEP_LOG_LEVEL", "INFO"))
    p.set_defaults(func=dev_main)


def _workload(text: str) -> tuple[str, str]:
    namespace, sep, service_account = text.partition("/")
    from extproc.spiffe import IdentityError, parse_spiffe_id

    try:
        if not sep:
            raise IdentityError("", "")
        parse_spiffe_id(f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}")
    except IdentityError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/SERVICE_ACCOUNT (Kubernetes names)") from None
    return namespace, service_account


def extproc_main(args: argparse.Namespace) -> int:
    identity = identity_options(args)
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
        **identity,
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
        workload=args.workload,
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
