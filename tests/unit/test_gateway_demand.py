"""The agent's side of gateway demand: merging replicas' /demand, and recency from it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from vram_operator.api import Backend, ModelState
from vram_operator.node_agent.backends.base import ResidentInfo
from vram_operator.node_agent.demand import SCHEMA, DemandAwareBackend, GatewayDemand, merge
from vram_operator.policy.eviction import DecayedRates

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def snapshot(*entries: tuple[str, str, str, dt.datetime | None]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "models": [
            {
                "key": key,
                "backend": backend,
                "model": model,
                "lastRequestTime": at.isoformat().replace("+00:00", "Z") if at else None,
            }
            for key, backend, model, at in entries
        ],
    }


def test_the_latest_time_over_replicas_wins_by_key_and_by_model() -> None:
    later = T0 + dt.timedelta(seconds=30)
    latest = merge(
        [
            snapshot(("default.chat", "ollama", "Llama3.2:1B", T0)),
            snapshot(
                ("default.chat", "ollama", "llama3.2:1b", later), ("default.q", "vllm", "Q", None)
            ),
            {"schema": "something/else", "models": [{"key": "default.chat"}]},
        ]
    )
    assert latest["default.chat"] == later
    ollama_keys = [k for k in latest if isinstance(k, tuple)]
    assert len(ollama_keys) == 1  # both spellings are one Ollama model
    assert "default.q" not in latest  # never requested


class Inner:
    """A backend that reports what it is told."""

    kind = Backend.OLLAMA
    can_park = False

    def __init__(self, resident: list[ResidentInfo]) -> None:
        self.resident = resident

    async def list_resident(self) -> list[ResidentInfo]:
        return self.resident


class Fixed(GatewayDemand):
    """Demand read from given snapshots instead of the network."""

    def __init__(self, snapshots: list[dict[str, Any]]) -> None:
        super().__init__("http://gateway:8080")
        self.snapshots = snapshots

    async def refresh(self) -> None:
        self._latest = merge(self.snapshots)


def info(model: str, last: dt.datetime | None) -> ResidentInfo:
    return ResidentInfo(
        model=model,
        key=None,
        vram_bytes=None,
        gpu_uuid=None,
        state=ModelState.LOADED,
        last_access=last,
    )


async def test_resident_models_take_the_later_of_backend_and_gateway_times() -> None:
    later = T0 + dt.timedelta(minutes=5)
    inner = Inner([info("llama3.2:1b", T0), info("qwen2.5:7b", later), info("other:1b", None)])
    demand = Fixed(
        [
            snapshot(
                ("default.a", "ollama", "llama3.2:1b", later),
                ("default.b", "ollama", "qwen2.5:7b", T0),
            )
        ]
    )
    wrapped = DemandAwareBackend(inner, demand)  # type: ignore[arg-type]
    reported = await wrapped.list_resident()
    assert [r.last_access for r in reported] == [later, later, None]
    assert wrapped.kind is Backend.OLLAMA


def counted(*entries: tuple[str, str, str, int]) -> dict[str, Any]:
    """A replica's snapshot with request counts."""
    return {
        "schema": SCHEMA,
        "models": [
            {"key": key, "backend": backend, "model": model, "requests": requests}
            for key, backend, model, requests in entries
        ],
    }


class Replicas(GatewayDemand):
    """The real refresh over given replicas: each read answers that address's next snapshot."""

    def __init__(self, reads: dict[str, list[dict[str, Any] | None]]) -> None:
        super().__init__("http://gateway:8080", interval=0, resolver=lambda _h, _p: list(reads))
        self.reads = reads

    async def _read(self, address: str) -> dict[str, Any] | None:
        return self.reads[address].pop(0)


def test_decayed_rates_read_a_steady_rate_and_halve_over_a_half_life() -> None:
    rates = DecayedRates(half_life=60)
    for second in range(6000):
        rates.add("m", 2.0, float(second))
    assert rates.rate("m", 5999.0) == pytest.approx(2.0, rel=0.02)
    assert rates.rate("m", 6059.0) == pytest.approx(rates.rate("m", 5999.0) / 2, rel=1e-9)
    assert rates.rate("never", 10.0) == 0.0
    with pytest.raises(ValueError, match="half_life"):
        DecayedRates(half_life=0)


async def test_request_rates_come_from_the_growth_of_every_replicas_counts() -> None:
    demand = Replicas(
        {
            "10.0.0.1": [
                counted(("default.a", "ollama", "llama3.2:1b", 10)),
                counted(("default.a", "ollama", "llama3.2:1b", 70)),
            ],
            # Restarted between the reads: its count starts again from zero.
            "10.0.0.2": [
                counted(("default.a", "ollama", "llama3.2:1b", 5)),
                counted(("default.a", "ollama", "llama3.2:1b", 2)),
            ],
        }
    )
    wrapped = DemandAwareBackend(Inner([info("llama3.2:1b", T0)]), demand)  # type: ignore[arg-type]
    first = await wrapped.list_resident()
    # The first read is only a starting point: when those 15 requests came is unknown.
    assert first[0].request_rate == 0.0
    (second,) = await wrapped.list_resident()
    assert second.request_rate == pytest.approx(62 / DecayedRates().tau, rel=1e-3)
    by_key = ResidentInfo(
        model="other", key="default.a", vram_bytes=None, gpu_uuid=None, state=ModelState.LOADED
    )
    assert demand.request_rate(by_key, Backend.OLLAMA) == pytest.approx(second.request_rate)
    # nobody asked a gateway for it since they answered: no demand, not an unknown one
    assert demand.request_rate(info("qwen2.5:7b", None), Backend.OLLAMA) == 0.0
    await demand.aclose()


async def test_requests_in_use_sum_running_and_waiting_over_every_replica() -> None:
    def busy(in_flight: int, waiting: int) -> dict[str, Any]:
        entry = {"key": "default.a", "backend": "ollama", "model": "llama3.2:1b"}
        return {"schema": SCHEMA, "models": [{**entry, "inFlight": in_flight, "waiting": waiting}]}

    demand = Replicas(
        {"10.0.0.1": [busy(1, 0), busy(0, 0)], "10.0.0.2": [busy(0, 2), None]},
    )
    resident = [info("llama3.2:1b", T0), info("qwen2.5:7b", T0)]
    wrapped = DemandAwareBackend(Inner(resident), demand)  # type: ignore[arg-type]
    first = await wrapped.list_resident()
    # A model no gateway lists has no figure: the agent keeps the fixed minimum residency.
    assert [r.in_use for r in first] == [3, None]
    # The second replica did not answer: what the first says is all there is.
    assert [r.in_use for r in await wrapped.list_resident()] == [0, None]
    await demand.aclose()
