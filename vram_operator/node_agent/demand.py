"""The gateway's demand, read by the agent: each model's last request time, for eviction recency,
its request rate lately, for the `cost` policy's frequency, and the requests running on it or
waiting for it, which end its minimum residency once served (`eviction.is_young`).

The gateway keeps per-deployment figures in memory and serves them at GET /demand on every
replica (vram_operator.gateway.demand says why it never writes them to the API server). The
agent, given `--gateway-demand-url` (the chart passes the gateway's headless Service), resolves
the host to every replica's address, reads each one at most once per `interval`, and keeps the
latest request time per deployment key and per (backend, model).

`DemandAwareBackend` wraps a backend so that `list_resident` reports as a model's last access
the later of the backend's own guess (Ollama's moving expires_at, vLLM's counters) and the
gateway's last request for it: the agent's eviction then sees real traffic, with no change to
the agent itself. A gateway that cannot be read leaves the backends' own times in place.

This module imports nothing of the gateway: the JSON shape (`vram_operator.api.demand`, which
the gateway writes with) is the contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from vram_operator.api import Backend, BackendHealth
from vram_operator.api.demand import DEMAND_SCHEMA
from vram_operator.policy.eviction import DecayedRates

from .backends.base import LoadRequest, ModelBackend, ProgressCallback, ResidentInfo
from .backends.ollama_names import normalize_model_name
from .estimate import Estimate

log = logging.getLogger(__name__)

SCHEMA = DEMAND_SCHEMA
"""The /demand shape this reader understands (`vram_operator.api.demand`)."""

Resolver = Callable[[str, int], Sequence[str]]


def resolve_all(host: str, port: int) -> list[str]:
    """Every address `host` resolves to: one per gateway pod for a headless Service."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _model_key(backend: str, model: str) -> tuple[str, str]:
    return backend, normalize_model_name(model) if backend == Backend.OLLAMA.value else model


def merge(snapshots: Sequence[dict[str, Any]]) -> dict[Any, dt.datetime]:
    """The latest request time per deployment key and per (backend, model), over replicas.
    Snapshots of another schema are skipped."""
    latest: dict[Any, dt.datetime] = {}
    for snapshot in snapshots:
        if snapshot.get("schema") != SCHEMA:
            continue
        for entry in snapshot.get("models") or []:
            text = entry.get("lastRequestTime")
            if not text:
                continue
            moment = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
            for key in (entry.get("key"), _model_key(entry["backend"], entry["model"])):
                if key is not None and (key not in latest or latest[key] < moment):
                    latest[key] = moment
    return latest


def request_totals(snapshot: dict[str, Any]) -> dict[Any, int]:
    """One replica's request counts, per deployment key and per (backend, model); none for a
    snapshot of another schema."""
    totals: dict[Any, int] = {}
    if snapshot.get("schema") != SCHEMA:
        return totals
    for entry in snapshot.get("models") or []:
        count = entry.get("requests")
        if not isinstance(count, int) or count < 0:
            continue
        for key in (entry.get("key"), _model_key(entry["backend"], entry["model"])):
            if key is not None:
                totals[key] = totals.get(key, 0) + count
    return totals


def in_use(snapshots: Sequence[dict[str, Any]]) -> dict[Any, int]:
    """Requests running or waiting, per deployment key and per (backend, model), summed over
    replicas. Snapshots of another schema are skipped."""
    busy: dict[Any, int] = {}
    for snapshot in snapshots:
        if snapshot.get("schema") != SCHEMA:
            continue
        for entry in snapshot.get("models") or []:
            count = sum(
                value
                for value in (entry.get("inFlight"), entry.get("waiting"))
                if isinstance(value, int) and not isinstance(value, bool) and value > 0
            )
            for key in (entry.get("key"), _model_key(entry["backend"], entry["model"])):
                if key is not None:
                    busy[key] = busy.get(key, 0) + count
    return busy


class GatewayDemand:
    """The gateways' last request times and request rates, refreshed at most once per
    `interval`."""

    def __init__(self, url: str, interval: float = 5.0, resolver: Resolver = resolve_all) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self._scheme = parts.scheme
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 8080
        self._path = parts.path if parts.path not in ("", "/") else "/demand"
        self.interval = interval
        self._resolver = resolver
        self._latest: dict[Any, dt.datetime] = {}
        self._in_use: dict[Any, int] = {}
        """Requests running or waiting at the last read, by key; a key no gateway listed is
        unknown."""
        self._totals: dict[tuple[str, Any], int] = {}
        """The last request count per (gateway address, key): rates come from its growth."""
        self._counted: set[Any] = set()
        """Keys some gateway has counted: only they have a rate above 0."""
        self._answered = False
        """Whether a gateway replica has answered a read."""
        self._rates = DecayedRates()
        self._read_at = -float("inf")
        self._session: aiohttp.ClientSession | None = None

    async def refresh(self) -> None:
        """Read every replica if `interval` has passed since the last read."""
        if time.monotonic() - self._read_at < self.interval:
            return
        self._read_at = time.monotonic()
        try:
            addresses = await asyncio.to_thread(self._resolver, self._host, self._port)
        except OSError as err:
            log.debug("cannot resolve gateway %s: %s", self._host, err)
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        snapshots = await asyncio.gather(*(self._read(a) for a in addresses))
        read = [s for s in snapshots if s is not None]
        self._latest = merge(read)
        self._answered = self._answered or bool(read)
        self._in_use = in_use(read)
        now = time.monotonic()
        for address, snapshot in zip(addresses, snapshots, strict=True):
            if snapshot is not None:
                self._count(address, request_totals(snapshot), now)

    def _count(self, address: str, totals: dict[Any, int], now: float) -> None:
        """Add what one replica's counts grew by since its last read. Its first read is only a
        starting point (when those requests came is unknown); a count that went down is a
        restarted gateway, counting from zero again."""
        for key, total in totals.items():
            seen = self._totals.get((address, key))
            self._totals[(address, key)] = total
            self._counted.add(key)
            if seen is None:
                continue
            grown = total - seen if total >= seen else total
            if grown:
                self._rates.add(key, grown, now)

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

    def last_request(self, info: ResidentInfo, backend: Backend) -> dt.datetime | None:
        """The latest gateway request for the model `info` reports."""
        by_key = self._latest.get(info.key) if info.key else None
        by_model = self._latest.get(_model_key(backend.value, info.model))
        times = [t for t in (by_key, by_model) if t is not None]
        return max(times) if times else None

    def request_rate(self, info: ResidentInfo, backend: Backend) -> float | None:
        """Requests per second lately for the model `info` reports: 0 if no gateway has counted
        it since one answered (nobody asked for it: the `cost` policy must not price it by
        recency above models that were asked for); None while no gateway has answered."""
        now = time.monotonic()
        for key in (info.key, _model_key(backend.value, info.model)):
            if key is not None and key in self._counted:
                return self._rates.rate(key, now)
        return 0.0 if self._answered else None

    def requests_in_use(self, info: ResidentInfo, backend: Backend) -> int | None:
        """Requests running on the model `info` reports or waiting for it, at the last read;
        None if no gateway listed it."""
        for key in (info.key, _model_key(backend.value, info.model)):
            if key is not None and key in self._in_use:
                return self._in_use[key]
        return None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class DemandAwareBackend:
    """A backend whose resident models' last access includes the gateway's requests, and whose
    request rates are the gateway's."""

    def __init__(self, inner: ModelBackend, demand: GatewayDemand) -> None:
        self.inner = inner
        self.demand = demand

    @property
    def kind(self) -> Backend:
        return self.inner.kind

    @property
    def can_park(self) -> bool:
        return self.inner.can_park

    @property
    def lays_out_itself(self) -> bool:
        return self.inner.lays_out_itself

    async def health(self) -> BackendHealth:
        return await self.inner.health()

    async def list_resident(self) -> list[ResidentInfo]:
        resident = await self.inner.list_resident()
        await self.demand.refresh()
        result = []
        for info in resident:
            requested = self.demand.last_request(info, self.inner.kind)
            if requested is not None and (info.last_access is None or info.last_access < requested):
                info = dataclasses.replace(info, last_access=requested)
            rate = self.demand.request_rate(info, self.inner.kind)
            if rate is not None:
                info = dataclasses.replace(info, request_rate=rate)
            busy = self.demand.requests_in_use(info, self.inner.kind)
            if busy is not None:
                info = dataclasses.replace(info, in_use=busy)
            result.append(info)
        return result

    async def pull(self, model: str, on_progress: ProgressCallback) -> None:
        await self.inner.pull(model, on_progress)

    async def load(self, request: LoadRequest) -> ResidentInfo:
        return await self.inner.load(request)

    async def unload(self, key: str, model: str) -> None:
        await self.inner.unload(key, model)

    async def park(self, key: str, model: str) -> None:
        await self.inner.park(key, model)

    async def wake(self, key: str, model: str) -> None:
        await self.inner.wake(key, model)

    async def estimate(
        self, model: str, context_length: int | None = None, *, args: Sequence[str] = ()
    ) -> Estimate | None:
        return await self.inner.estimate(model, context_length, args=args)

    async def aclose(self) -> None:
        await self.inner.aclose()
        await self.demand.aclose()
