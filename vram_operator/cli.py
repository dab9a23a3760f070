"""The `vram-operator` command: one entry point, a subcommand per component.

Each component parses its own flags and is imported lazily, so `vram-operator crds` does
not pay for kopf, and `vram-operator agent --help` shows the agent's own options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# subcommand -> (module with main(argv) -> int, help)
COMPONENTS = {
    "operator": ("vram_operator.operator.main", "run the operator (leader-elected kopf)"),
    "agent": ("vram_operator.node_agent.main", "run the node agent for one GPU node"),
    "vllm-supervisor": (
        "vram_operator.node_agent.vllm_supervisor",
        "start and stop `vllm serve` processes in the vLLM sidecar",
    ),
    "diffusion-server": (
        "vram_operator.diffusion.server",
        "hold Stable Diffusion pipelines on the GPUs and serve OpenAI's images API",
    ),
    "local-cluster": (
        "vram_operator.localcluster",
        "run a local kube-apiserver + etcd and print its kubeconfig",
    ),
    "gateway": (
        "vram_operator.gateway.main",
        "serve the OpenAI and Ollama APIs for every resident model",
    ),
    "demo": ("vram_operator.demo", "local control plane + simulated GPU nodes + operator"),
    "simulate": (
        "vram_operator.capacity.main",
        "replay request traces: eviction policies side by side, capacity sweeps",
    ),
}


def _crds() -> int:
    from .api.crd import render_yaml

    sys.stdout.write(render_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator",
        description="Keep LLM and diffusion models resident in GPU memory across a cluster.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    for name, (_, text) in COMPONENTS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMPONENTS:
        module = importlib.import_module(COMPONENTS[args[0]][0])
        result: int = module.main(args[1:])
        return result
    parsed = build_parser().parse_args(args)
    if parsed.command == "crds":
        return _crds()
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
