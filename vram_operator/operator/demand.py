"""The gateways' demand, read by the operator: per deployment, requests in flight and waiting
summed over every gateway replica, and the latest request time.

Given `--gateway-demand-url` (the chart's headless Service for the gateway, as the agent gets),
the operator resolves its host to every replica's address and reads each one's GET /demand once
per poll; `vram_operator.gateway.demand` says why the gateway never writes demand to the API
server. The figures' shape is `vram_operator.api.demand`, the one the gateway writes with.
"""

from __future__ import annotations

import asyncio
import datetime as dt
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


def request_before_last(
    before: ModelDemand | None, after: ModelDemand, known: dt.datetime | None
) -> dt.datetime | None:
    """When a model was asked for before its latest request, as two successive reads tell
    (`before`, `after`; `known` the answer so far): what makes a model asked for again and
    again outrank one asked for once (LRU-2) when the operator chooses what to swap out by
    `--swap-order lru2`.

    Several new requests in one read: the one before the last is as recent as the last. At
    first sight (the operator just started), a model asked for more than once counts as asked
    for again now. A gateway that restarted counts from zero: its count is all new.
    """
    if after.last_request is None:
        return known
    if before is None:
        return after.last_request if after.requests >= 2 else known
    if before.last_request is not None and after.last_request <= before.last_request:
        return known  # nothing new
    new = after.requests - before.requests if after.requests >= before.requests else after.requests
    if new >= 2:
        return after.last_request
    return before.last_request or known


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
