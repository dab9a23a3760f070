"""The `vram-operator` command: one entry point, a subcommand per component.

Each subcommand imports its component lazily, so `vram-operator crds` does not pay for kopf.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__


def _crds(args: argparse.Namespace) -> int:
    from .api.crd import render_yaml

    sys.stdout.write(render_yaml())
    return 0


def _local_cluster(args: argparse.Namespace) -> int:
    from .localcluster import main as local_cluster_main

    return local_cluster_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator",
        description="Keep LLM and diffusion models resident in GPU memory across a cluster.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crds = commands.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    crds.set_defaults(func=_crds)

    local = commands.add_parser(
        "local-cluster",
        help="run a local kube-apiserver + etcd and print its kubeconfig",
        add_help=False,
    )
    local.add_argument("rest", nargs=argparse.REMAINDER)
    local.set_defaults(func=_local_cluster)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
