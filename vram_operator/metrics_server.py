"""A /metrics endpoint on aiohttp, shared by the operator and the agent."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

LOOPBACK = "127.0.0.1"


def default_metrics_address(environ: Mapping[str, str] | None = None) -> str:
    """Where /metrics listens unless told: the pod IP (POD_IP, from the downward API) in a
    pod, so only that interface is reachable and the kubelet's probes still are; loopback
    outside one, so a process started by hand is private to its machine. Never every
    address."""
    env = os.environ if environ is None else environ
    return env.get("POD_IP", "").strip() or LOOPBACK


def add_metrics_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """--metrics-port and --metrics-address (alias --metrics-host) for a component."""
    parser.add_argument("--metrics-port", type=int, default=port, help="0 disables /metrics")
    parser.add_argument(
        "--metrics-address",
        "--metrics-host",
        dest="metrics_address",
        default=default_metrics_address(),
        help="address /metrics and /healthz listen on (default $POD_IP, else 127.0.0.1; "
        "0.0.0.0 or :: for every address)",
    )


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """Serve /metrics (and /healthz) until the returned runner is cleaned up."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
