"""Demand per model, aggregated in memory, for the agents and the operator to read.

Why a read endpoint (`GET /demand` on each gateway replica) rather than a write to the API
server: a write per request would make API-server load grow with traffic, and even a periodic
write from every gateway replica into every GPUNode or ModelDeployment would contend with the
agent's and the operator's own status writes (they own those objects). Instead each gateway
keeps, per deployment, the last request time, counts and in-flight figures here, and whoever
needs them polls: the node agent reads every gateway replica (the chart's headless Service
names them all) each report interval and takes the latest time per model for its eviction
recency (`vram_operator.node_agent.demand`). Polling costs one small GET per agent per interval,
whatever the traffic; a gateway replica that restarts loses only times the other replicas or
the backends' own access times (Ollama's expires_at, vLLM's counters) still cover.

Pure bookkeeping, no I/O; the clock is passed in.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from vram_operator.api.demand import DEMAND_SCHEMA, ModelDemand, snapshot

from .routing import Target

__all__ = ["DEMAND_SCHEMA", "DemandLedger", "ModelDemand"]
"""`ModelDemand` and the snapshot's shape live in `vram_operator.api.demand`, where the operator
reads them too."""


class DemandLedger:
    """Counts requests per deployment as they arrive, wait, run and finish."""

    def __init__(self) -> None:
        self._models: dict[str, ModelDemand] = {}

    def _entry(self, target: Target) -> ModelDemand:
        entry = self._models.get(target.key)
        if entry is None:
            entry = ModelDemand(target.namespace, target.name, target.backend.value, target.model)
            self._models[target.key] = entry
        return entry

    def arrived(self, target: Target, now: dt.datetime) -> None:
        entry = self._entry(target)
        entry.requests += 1
        entry.last_request = now

    def waiting(self, target: Target, change: int) -> int:
        """Add `change` to the requests waiting for `target`; the new count."""
        entry = self._entry(target)
        entry.waiting += change
        if change > 0:
            entry.cold_waits += change
        return entry.waiting

    def waiting_for(self, target: Target) -> int:
        entry = self._models.get(target.key)
        return entry.waiting if entry else 0

    def in_flight(self, target: Target, change: int) -> None:
        self._entry(target).in_flight += change

    def get(self, key: str) -> ModelDemand | None:
        return self._models.get(key)

    def snapshot(self, gateway: str, now: dt.datetime) -> dict[str, Any]:
        """What GET /demand answers."""
        return snapshot(gateway, now, self._models.values())
