"""How the fake servers listen and stop: shared by the fake Ollama and the fake vLLM.

Kept apart from both so that a fake vLLM, started once per model, imports only aiohttp here.
"""

from __future__ import annotations

import asyncio
import signal
import socket

from aiohttp import web


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket, bound first so a port-0 server knows its port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so the servers shut down through their cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve(app: web.Application, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve on `sock` until `stop` is set, announcing the URL as the first stdout line.

    Stopping runs the application's cleanup, which frees the simulated VRAM.
    """
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"listening on http://{shown}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
