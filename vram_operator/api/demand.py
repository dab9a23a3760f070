"""The gateway's demand figures per deployment: the shape of `GET /demand`, shared by its writer
(the gateway, `vram_operator.gateway.demand`) and its readers (the operator's autoscaler).

It lives with the API models rather than in the gateway because the operator may import the API
models only: the gateway's modules reach the agent's Ollama naming rule, and the operator and the
agent stay independent (the import-linter contracts). One class, one schema string, no copy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEMAND_SCHEMA = "vram.dev/gateway-demand/v1"
"""Identifies the JSON a gateway's /demand returns, so a reader can refuse a shape it does not
know."""


@dataclass
class ModelDemand:
    """One deployment's figures at one gateway replica, or summed over all of them."""

    namespace: str
    name: str
    backend: str
    model: str
    requests: int = 0
    in_flight: int = 0
    waiting: int = 0
    cold_waits: int = 0
    last_request: dt.datetime | None = None

    @property
    def key(self) -> str:
        """namespace.name, the assignment key."""
        return f"{self.namespace}.{self.name}"

    @property
    def busy(self) -> int:
        """Requests running or waiting for a ready replica."""
        return self.in_flight + self.waiting

    def to_json(self) -> dict[str, Any]:
        """One entry of the snapshot's `models`."""
        return {
            "namespace": self.namespace,
            "name": self.name,
            "key": self.key,
            "backend": self.backend,
            "model": self.model,
            "requests": self.requests,
            "inFlight": self.in_flight,
            "waiting": self.waiting,
            "coldWaits": self.cold_waits,
            "lastRequestTime": iso(self.last_request) if self.last_request else None,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ModelDemand:
        """An entry of `models` back; raises ValueError (or KeyError) on a malformed one."""
        text = entry.get("lastRequestTime")
        moment = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")) if text else None
        return cls(
            namespace=str(entry["namespace"]),
            name=str(entry["name"]),
            backend=str(entry.get("backend", "")),
            model=str(entry.get("model", "")),
            requests=_count(entry, "requests"),
            in_flight=_count(entry, "inFlight"),
            waiting=_count(entry, "waiting"),
            cold_waits=_count(entry, "coldWaits"),
            last_request=moment,
        )


def _count(entry: dict[str, Any], field: str) -> int:
    value = entry.get(field, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{field} is {value!r}, not a count")
    return value


def snapshot(gateway: str, now: dt.datetime, models: Iterable[ModelDemand]) -> dict[str, Any]:
    """What GET /demand answers."""
    return {
        "schema": DEMAND_SCHEMA,
        "gateway": gateway,
        "time": iso(now),
        "models": [m.to_json() for m in sorted(models, key=lambda m: m.key)],
    }


def combine(snapshots: Iterable[dict[str, Any]]) -> dict[str, ModelDemand]:
    """Every replica's figures per key: counts summed, the latest request time. Snapshots of
    another schema, and malformed entries, are skipped."""
    total: dict[str, ModelDemand] = {}
    for answer in snapshots:
        if answer.get("schema") != DEMAND_SCHEMA:
            continue
        for raw in answer.get("models") or []:
            try:
                entry = ModelDemand.from_json(raw)
            except (KeyError, TypeError, ValueError):
                continue
            seen = total.get(entry.key)
            if seen is None:
                total[entry.key] = entry
                continue
            seen.requests += entry.requests
            seen.in_flight += entry.in_flight
            seen.waiting += entry.waiting
            seen.cold_waits += entry.cold_waits
            if entry.last_request and (
                not seen.last_request or seen.last_request < entry.last_request
            ):
                seen.last_request = entry.last_request
    return total


def iso(moment: dt.datetime) -> str:
    """UTC with a Z, as the API server writes times."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
