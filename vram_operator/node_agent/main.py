"""`vram-operator agent`: build the agent from flags and environment, then run it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence

from vram_operator.api import Backend, parse_bytes
from vram_operator.kubeconfig import api_client
from vram_operator.metrics_server import add_metrics_arguments, serve_metrics
from vram_operator.policy.eviction import POLICIES, EvictionConfig

from .agent import AgentConfig, NodeAgent
from .backends import DiffusersBackend, ModelBackend, OllamaBackend, VLLMBackend
from .demand import DemandAwareBackend, GatewayDemand
from .metrics import AgentMetrics
from .monitors import GPUSource, HostMonitor, detect_gpu_source
from .storage import GPUNodeStore

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator agent",
        description="Measure this node's GPUs and memory, and load what its GPUNode assigns.",
    )
    parser.add_argument("--node", default=os.environ.get("NODE_NAME"), help="node name (NODE_NAME)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster)")
    parser.add_argument("--report-interval", type=float, default=10.0, help="seconds")
    parser.add_argument("--ollama-url", default=None, help="e.g. http://127.0.0.1:11434")
    parser.add_argument(
        "--ollama-max-loaded-models",
        type=int,
        default=16,
        help="the Ollama sidecar's OLLAMA_MAX_LOADED_MODELS (0: no limit reported); the "
        "operator places no more Ollama models on this node",
    )
    parser.add_argument("--vllm-supervisor-url", default=None, help="e.g. http://127.0.0.1:8900")
    parser.add_argument("--diffusion-server-url", default=None, help="e.g. http://127.0.0.1:8950")
    parser.add_argument(
        "--gateway-demand-url",
        default=None,
        help="the gateway's /demand, e.g. its headless Service (every replica is read): last "
        "request times join the backends' own for eviction recency",
    )
    parser.add_argument(
        "--policy",
        "--eviction-policy",
        dest="policy",
        choices=POLICIES,
        default=EvictionConfig.policy,
        help="eviction policy (cost: GreedyDual-Size-Frequency, see BENCHMARKS.md)",
    )
    parser.add_argument("--min-residency", type=float, default=120.0, help="seconds")
    parser.add_argument(
        "--psi-threshold", type=float, default=10.0, help="PSI some avg10 (%%) that is pressure"
    )
    parser.add_argument("--min-free", default="256Mi", help="VRAM kept free per GPU")
    parser.add_argument(
        "--retry-initial-seconds",
        type=float,
        default=5.0,
        help="wait before retrying a failed load; doubles per failure up to --retry-max-seconds",
    )
    parser.add_argument("--retry-max-seconds", type=float, default=300.0)
    add_metrics_arguments(parser, port=9400)
    parser.add_argument("--proc", default="/proc", help="root of the proc filesystem")
    parser.add_argument(
        "--simulate-gpus",
        metavar="STATE_FILE",
        default=None,
        help="read GPUs from a simulated GPU state file instead of NVML (tests and demos only)",
    )
    parser.add_argument(
        "--drop-page-cache-above",
        default=None,
        help="drop the host page cache before loading a model larger than this (needs privilege)",
    )
    parser.add_argument(
        "--clean-orphan-shm",
        action="store_true",
        help="remove System V shared-memory segments no process is attached to",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def _gpu_source(args: argparse.Namespace) -> GPUSource:
    if args.simulate_gpus:
        from vram_operator.simulation.gpu_source import SimulatedGPUSource

        return SimulatedGPUSource(args.simulate_gpus)
    return detect_gpu_source()


def _backends(args: argparse.Namespace) -> dict[Backend, ModelBackend]:
    backends: dict[Backend, ModelBackend] = {}
    if args.ollama_url:
        backends[Backend.OLLAMA] = OllamaBackend(
            args.ollama_url, max_loaded_models=args.ollama_max_loaded_models or None
        )
    if args.vllm_supervisor_url:
        backends[Backend.VLLM] = VLLMBackend(args.vllm_supervisor_url)
    if args.diffusion_server_url:
        backends[Backend.DIFFUSERS] = DiffusersBackend(args.diffusion_server_url)
    if args.gateway_demand_url:
        demand = GatewayDemand(args.gateway_demand_url, interval=args.report_interval / 2)
        return {kind: DemandAwareBackend(b, demand) for kind, b in backends.items()}
    return backends


async def _run(args: argparse.Namespace) -> int:
    config = AgentConfig(
        node=args.node,
        report_interval=args.report_interval,
        eviction=EvictionConfig(
            policy=args.policy,
            min_residency_seconds=args.min_residency,
            psi_some_threshold=args.psi_threshold,
        ),
        retry_initial_seconds=args.retry_initial_seconds,
        retry_max_seconds=args.retry_max_seconds,
        min_free_bytes=parse_bytes(args.min_free),
        drop_page_cache_above=(
            parse_bytes(args.drop_page_cache_above) if args.drop_page_cache_above else None
        ),
        clean_orphan_shm=args.clean_orphan_shm,
        proc=args.proc,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = AgentMetrics()
    runner = None
    if args.metrics_port:
        runner = await serve_metrics(metrics.registry, args.metrics_address, args.metrics_port)
        log.info("metrics on http://%s:%s/metrics", args.metrics_address, args.metrics_port)
    backends = _backends(args)
    gpus = _gpu_source(args)
    client = api_client(args.kubeconfig)
    try:
        agent = NodeAgent(
            config,
            GPUNodeStore(client, args.node),
            gpus,
            HostMonitor(args.proc),
            backends,
            metrics,
        )
        log.info("agent for node %s starting", args.node)
        await agent.run(stop)
    finally:
        for backend in backends.values():
            await backend.aclose()
        gpus.close()
        client.close()
        if runner is not None:
            await runner.cleanup()
    log.info("agent for node %s stopped", args.node)
    return 0


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.node:
        build_parser().error("the node name is required: pass --node or set NODE_NAME")
    try:
        return asyncio.run(_run(args))
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
