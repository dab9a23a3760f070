"""The gateways' demand, read by the operator: per deployment, requests in flight and waiting
summed over every gateway replica, and the latest request time.

Given `--gateway-demand-url` (the chart's headless Service for the gateway, as the agent gets),
the operator resolves its host to every replica's address and reads each one's GET /demand once
per poll; `vram_operator.gateway.demand` says why the gateway never writes demand to the API
server. The figures' shape is `vram_operator.api.demand`, the one the gateway writes with.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from vram_operator.api.demand import ModelDemand, combine

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Sequence[str]]


def resolve_all(host: str, port: int) -> list[str]:
    """Every address `host` resolves to: one per gateway pod for a headless Service."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class DemandReader:
    """Reads every gateway replica's /demand; `read()` returns the figures, or None when no
    replica answered (unknown demand is not zero demand)."""

    def __init__(self, url: str, resolver: Resolver = resolve_all, timeout: float = 2.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self._scheme = parts.scheme
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 8080
        self._path = parts.path if parts.path not in ("", "/") else "/demand"
        self._resolver = resolver
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def read(self) -> dict[str, ModelDemand] | None:
        try:
            addresses = await asyncio.to_thread(self._resolver, self._host, self._port)
        except OSError as err:
            log.debug("cannot resolve gateway %s: %s", self._host, err)
            return None
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        answers = await asyncio.gather(*(self._read(a) for a in addresses))
        read = [a for a in answers if a is not None]
        return combine(read) if read else None

    async def _read(self, address: str) -> dict[str, Any] | None:
        host = f"[{address}]" if ":" in address else address
        url = f"{self._scheme}://{host}:{self._port}{self._path}"
        assert self._session is not None
        try:
            async with self._session.get(url) as response:
                body: dict[str, Any] = await response.json()
                return body if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            log.debug("cannot read gateway demand at %s: %s", url, err)
            return None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
