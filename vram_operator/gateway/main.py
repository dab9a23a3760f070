"""`vram-operator gateway`: build the gateway from flags, then serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import Sequence

from aiohttp import web

from vram_operator.kubeconfig import api_client

from .server import Gateway, GatewayConfig
from .view import ClusterView, Watcher

log = logging.getLogger(__name__)
_DEFAULTS = GatewayConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator gateway",
        description="One OpenAI- and Ollama-compatible endpoint for every resident model.",
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--queue-size",
        type=int,
        default=_DEFAULTS.queue_size,
        help="requests that may wait per model for a ready replica (%(default)s); more get 429",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=_DEFAULTS.queue_timeout,
        help="seconds a request waits for a ready replica before 503 (%(default)s)",
    )
    parser.add_argument(
        "--heartbeat-grace",
        type=float,
        default=_DEFAULTS.heartbeat_grace,
        help="seconds without an agent report after which its node gets no requests",
    )
    parser.add_argument("--connect-timeout", type=float, default=_DEFAULTS.connect_timeout)
    parser.add_argument("--read-timeout", type=float, default=_DEFAULTS.read_timeout)
    parser.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname())
    parser.add_argument("--log-level", default="INFO")
    return parser


async def _run(args: argparse.Namespace) -> int:
    config = GatewayConfig(
        queue_size=args.queue_size,
        queue_timeout=args.queue_timeout,
        heartbeat_grace=args.heartbeat_grace,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        identity=args.identity,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    view = ClusterView(grace=config.heartbeat_grace)
    client = api_client(args.kubeconfig)
    watcher = Watcher(client, view, loop)
    gateway = Gateway(view, config)
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    # Bound here rather than by TCPSite, so that a port-0 gateway knows and prints its port.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family, reuse_port=False)
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    print(f"listening on http://{args.host}:{port}", flush=True)
    watcher.start()
    ticker = asyncio.create_task(view.tick(1.0, stop))
    try:
        await stop.wait()
    finally:
        ticker.cancel()
        await runner.cleanup()
        await asyncio.to_thread(watcher.stop)
        client.close()
    log.info("gateway stopped")
    return 0


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run(args))
