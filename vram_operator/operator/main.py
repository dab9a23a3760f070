"""`vram-operator operator`: elect a leader, then run the kopf handlers and the worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import kopf

from vram_operator.api import parse_bytes
from vram_operator.kubeconfig import api_client
from vram_operator.metrics_server import add_metrics_arguments, serve_metrics

from .demand import DemandReader
from .handlers import registry
from .leader import LeaderElector
from .metrics import OperatorMetrics
from .placement import PlacementConfig
from .service import OperatorConfig, OperatorService
from .storage import ClusterStore

EVENT_SENDERS = 2
"""Tasks posting Events (`ClusterStore.send_events`), beside the reconcile workers."""

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator operator",
        description="Place ModelDeployments on GPUs across the cluster and keep status true.",
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster)")
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader-election Lease (POD_NAMESPACE)",
    )
    parser.add_argument("--lease-name", default="vram-operator")
    parser.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
    )
    parser.add_argument("--strategy", choices=["binpack", "spread"], default="binpack")
    parser.add_argument("--heartbeat-grace", type=float, default=60.0, help="seconds")
    parser.add_argument("--max-temperature", type=int, default=85, help="°C")
    parser.add_argument("--no-preemption", action="store_true")
    parser.add_argument(
        "--default-vram", default="4Gi", help="budget for a model without spec.vram until measured"
    )
    parser.add_argument(
        "--gpu-reserve",
        default="256Mi",
        help="the agents' --min-free: never promised to a model, with a little slack on top",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=OperatorConfig.workers,
        help="ModelDeployments reconciled at once (never one object twice at once)",
    )
    parser.add_argument(
        "--gateway-demand-url",
        default=None,
        help="the gateway's /demand (a headless Service: every replica is read); enables "
        "spec.autoscaling, wake on request and demand-aware placement",
    )
    parser.add_argument(
        "--demand-interval",
        type=float,
        default=OperatorConfig.demand_interval,
        help="seconds between reads of the gateways' demand",
    )
    parser.add_argument(
        "--min-residency",
        type=float,
        default=PlacementConfig.min_residency_seconds,
        help="seconds a model used that recently is never swapped out for another's demand",
    )
    parser.add_argument(
        "--swap-order",
        choices=("cost", "lru2"),
        default=OperatorConfig.swap_order,
        help="what a model requests wait for swaps out (with --gateway-demand-url): cost, the "
        "settled models whose eviction costs least in loads to come (the agents' default "
        "eviction rule), or lru2, lowest priority first, then asked for least recently before "
        "the last request",
    )
    parser.add_argument(
        "--gpu-node-selector",
        type=label_selector,
        default=None,
        metavar="KEY=VALUE,...",
        help="create the GPUNode of every Node with these labels ('' for every Node), as the "
        "agent DaemonSet selects them, so agents need no right to create GPUNodes; unset, "
        "each agent creates its own",
    )
    add_metrics_arguments(parser, port=9300)
    parser.add_argument("--log-level", default="INFO")
    return parser


def label_selector(text: str) -> dict[str, str]:
    """`key=value,key2=value2` (a Node selector of equalities) as a dict; '' selects all."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's login handler reads it too
    # Every Kubernetes call runs in a thread (the client blocks): enough threads and pooled
    # connections for every worker, event sender and housekeeping loop to wait on the API
    # server at once, not the default pool's cores + 4.
    calls = max(1, args.workers) + EVENT_SENDERS + 4
    loop.set_default_executor(ThreadPoolExecutor(calls, thread_name_prefix="kubernetes"))
    client = api_client(args.kubeconfig, connections=calls)
    metrics = OperatorMetrics()
    runner = None
    if args.metrics_port:
        runner = await serve_metrics(metrics.registry, args.metrics_address, args.metrics_port)
    elector = LeaderElector(client, args.namespace, args.lease_name, args.identity)
    try:
        if not await elector.acquire(stop):
            return 0
        config = OperatorConfig(
            placement=PlacementConfig(
                strategy=args.strategy,
                max_temperature_celsius=args.max_temperature,
                heartbeat_grace_seconds=args.heartbeat_grace,
                allow_preemption=not args.no_preemption,
                min_residency_seconds=args.min_residency,
            ),
            default_vram_bytes=parse_bytes(args.default_vram),
            gpu_reserve_bytes=parse_bytes(args.gpu_reserve),
            workers=max(1, args.workers),
            demand_interval=args.demand_interval,
            gpu_node_selector=args.gpu_node_selector,
            swap_order=args.swap_order,
        )
        demand = DemandReader(args.gateway_demand_url) if args.gateway_demand_url else None
        store = ClusterStore(client)
        service = OperatorService(store, config, metrics, demand=demand)
        await service.start()
        stopping = asyncio.Event()
        # No stop_flag for kopf: it stops itself on SIGTERM and SIGINT (it takes those signals
        # over) and is cancelled otherwise. Given a flag, kopf waits 5 s at a signal for its own
        # still-pending waiter on that flag before it returns.
        handlers = asyncio.create_task(
            kopf.operator(
                registry=registry,
                clusterwide=True,
                standalone=True,
                memo=kopf.Memo(service=service),
            )
        )
        workers = [asyncio.create_task(service.work(stopping)) for _ in range(config.workers)]
        workers.append(asyncio.create_task(service.watch_heartbeats(stopping)))
        workers += [asyncio.create_task(store.send_events()) for _ in range(EVENT_SENDERS)]
        if demand is not None:  # a task that ends would end the operator (FIRST_COMPLETED)
            workers.append(asyncio.create_task(service.watch_demand(stopping)))
        tasks = [handlers, *workers, asyncio.create_task(elector.keep(stopping))]
        lost = asyncio.create_task(elector.lost.wait())
        halted = asyncio.create_task(stop.wait())
        await asyncio.wait([lost, halted, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopping.set()
        # Stopping, or no longer the leader: write nothing more (state lives in the API server).
        for task in (handlers, *workers, lost, halted):
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("operator task failed: %r", result)
        if elector.lost.is_set():
            return 1
        await elector.release()
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        client.close()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().level > logging.DEBUG:
        # kopf logs every handled event at INFO; agent heartbeats would drown everything else.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args))
    return 130
