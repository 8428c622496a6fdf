"""`holysheep-mesh render`, `crd` and `controller`, wired into the console script by extproc.cli."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from controller import crd, naming
from controller.render import RenderOptions, dump_stream, render_all
from protos.spec import ConfigError, load_text


def _add_extproc_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--extproc-service",
        default=naming.DEFAULT_EXTPROC_SERVICE,
        help="ext_proc Service name (default: %(default)s)",
    )
    p.add_argument(
        "--extproc-namespace",
        default=naming.DEFAULT_EXTPROC_NAMESPACE,
        help="ext_proc Service namespace (default: %(default)s)",
    )
    p.add_argument(
        "--extproc-port",
        type=int,
        default=naming.DEFAULT_EXTPROC_PORT,
        help="ext_proc Service gRPC port (default: %(default)s)",
    )
    p.add_argument(
        "--mesh-root-namespace",
        default=naming.DEFAULT_ROOT_NAMESPACE,
        help="Istio root namespace; CRs there apply mesh-wide (default: %(default)s)",
    )


def render_options(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions(
        extproc_service=args.extproc_service,
        extproc_namespace=args.extproc_namespace,
        extproc_port=args.extproc_port,
        root_namespace=args.mesh_root_namespace,
    )


def add_subcommands(subparsers: Any) -> None:
    render = subparsers.add_parser("render", help="print the objects the controller would apply")
    render.add_argument("-f", "--filename", required=True, help="HolySheepConfig YAML file ('-' for stdin)")
    _add_extproc_flags(render)
    render.set_defaults(func=render_main)

    crd_cmd = subparsers.add_parser("crd", help="print the HolySheepConfig CRD (mesh/crd/holysheepconfig.yaml)")
    crd_cmd.set_defaults(func=crd_main)

    ctl = subparsers.add_parser("controller", help="run the HolySheepConfig controller")
    _add_extproc_flags(ctl)
    ctl.add_argument("--namespace", default=None, help="watch one namespace only (default: all)")
    ctl.add_argument("--lease-name", default="holysheep-mesh-controller")
    ctl.add_argument("--lease-namespace", default=naming.DEFAULT_EXTPROC_NAMESPACE)
    ctl.add_argument("--identity", default=None, help="leader election identity (default: hostname + pid)")
    ctl.add_argument("--resync-seconds", type=float, default=300.0)
    ctl.add_argument("--kubeconfig", default=None, help="default: in-cluster, then ~/.kube/config")
    ctl.add_argument("--log-level", default=os.environ.get("HOLYSHEEP_LOG_LEVEL", "INFO"))
    ctl.set_defaults(func=controller_main)


def render_main(args: argparse.Namespace) -> int:
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as fh:
                text = fh.read()
        objects = render_all(load_text(text), render_options(args))
    except (OSError, ConfigError) as exc:
        print(f"holysheep-mesh render: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(dump_stream(objects))
    return 0


def crd_main(args: argparse.Namespace) -> int:
    sys.stdout.write(crd.crd_yaml())
    return 0


def controller_main(args: argparse.Namespace) -> int:
    from controller.manager import run_from_args  # the kubernetes client only when needed

    return run_from_args(args, render_options(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holysheep-mesh")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
