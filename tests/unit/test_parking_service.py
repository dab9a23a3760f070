"""The operator's service parking a vLLM model it swaps out for demand, over the in-memory
store: the assignment stays on its node marked parked, the status says SwappedOut and HostRAM,
the next request wakes it on the same GPU (a wake-up, not a cold start), and where host RAM
cannot take it, or the agent could not park it, it is withdrawn as before."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from test_autoscaling_service import demand_service, wanted
from test_operator_service import GI, T0, Clock, MemoryStore, condition, drain

from vram_operator.api import Backend, HostMemory, ModelState, ResidentModel
from vram_operator.operator.service import OperatorService

pytestmark = pytest.mark.unit


def vllm_node(store: MemoryStore, host: int) -> None:
    store.add_node("n1", total=24 * GI)
    gpunode = store.gpunodes["n1"]
    assert gpunode.status is not None
    memory = HostMemory(total_bytes=host, available_bytes=host)
    status = gpunode.status.model_copy(update={"host_memory": memory})
    store.gpunodes["n1"] = gpunode.model_copy(update={"status": status})


def apply_vllm(store: MemoryStore, name: str) -> None:
    store.apply(name, vram="10Gi")
    spec = store.deployments[("ns", name)]["spec"]
    spec.update(model=f"org/{name}", backend="vllm", vllm={"sleepMode": True})


def report(svc: OperatorService, store: MemoryStore, **states: ModelState) -> None:
    """The agent reports each named model in its state, and the watch delivers it."""
    gpunode = store.gpunodes["n1"]
    assert gpunode.status is not None
    models = {m.key: m for m in gpunode.status.models}
    for name, state in states.items():
        models[f"ns.{name}"] = ResidentModel(
            key=f"ns.{name}",
            model=f"org/{name}",
            backend=Backend.VLLM,
            gpu_uuid="GPU-n1",
            state=state,
            vram_bytes=10 * GI,
            reason="SwappedOut" if state is not ModelState.LOADED else None,
        )
    used = sum(
        m.vram_bytes or 0
        for m in models.values()
        if m.state in (ModelState.LOADED, ModelState.LOADING, ModelState.UNLOADING)
    )
    gpus = [g.model_copy(update={"used_bytes": used}) for g in gpunode.status.gpus]
    status = gpunode.status.model_copy(update={"models": list(models.values()), "gpus": gpus})
    store.gpunodes["n1"] = gpunode.model_copy(update={"status": status})
    svc.observe_gpunode(store.gpunodes["n1"].model_dump(by_alias=True, mode="json"), "n1")


def parked(store: MemoryStore) -> dict[str, bool]:
    return {k: a.parked for k, a in store.gpunodes["n1"].spec.assignments.items()}


def counted(svc: OperatorService, name: str) -> tuple[float, float]:
    """Cold starts and wake-ups of one model."""
    cold = svc.metrics.cold_starts.labels("ns", name)._value.get()
    woken = svc.metrics.wake_ups.labels("ns", name)._value.get()
    return cold, woken


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


async def swapped_out(host: int) -> tuple[MemoryStore, Clock, OperatorService]:
    """a and b loaded on one 24Gi GPU; a request for c swaps a (the coldest) out."""
    store, clock = MemoryStore(), Clock()
    vllm_node(store, host)
    for name in ("a", "b", "c"):
        apply_vllm(store, name)
    svc = await demand_service(store, clock)
    await drain(svc)
    assert set(parked(store)) == {"ns.a", "ns.b"}
    report(svc, store, a=ModelState.LOADED, b=ModelState.LOADED)
    await drain(svc)
    clock.now = at(100)
    demand: dict[str, Any] = {
        "ns.a": wanted("a", last=20),
        "ns.b": wanted("b", last=50),
        "ns.c": wanted("c", waiting=1, last=100),
    }
    await svc.apply_demand(demand)
    await drain(svc)
    return store, clock, svc


async def test_a_vllm_model_swapped_out_for_demand_is_parked_and_woken_when_asked_for() -> None:
    store, clock, svc = await swapped_out(host=64 * GI)
    assert parked(store) == {"ns.a": True, "ns.b": False, "ns.c": False}
    scheduled = condition(store.status("a"), "Scheduled")
    assert scheduled["reason"] == "SwappedOut"
    assert "for c, which requests were waiting for; parked in host RAM" in scheduled["message"]
    assert store.status("a")["readyReplicas"] == 0

    report(svc, store, a=ModelState.SLEEPING, c=ModelState.LOADED)
    await drain(svc)
    status = store.status("a")
    assert (status["tiers"], status["placements"][0]["state"]) == ("HostRAM", "Sleeping")
    assert condition(status, "Ready")["reason"] == "SwappedOut"
    assert counted(svc, "a") == (1, 0)

    # a is asked for again: it wakes on the same GPU, and b (now the coldest) makes room.
    clock.now = at(200)
    await svc.apply_demand(
        {
            "ns.a": wanted("a", waiting=1, last=200),
            "ns.b": wanted("b", last=50),
            "ns.c": wanted("c", last=150),
        }
    )
    await drain(svc)
    assert parked(store) == {"ns.a": False, "ns.b": True, "ns.c": False}
    assert store.gpunodes["n1"].spec.assignments["ns.a"].gpu_uuid == "GPU-n1"
    report(svc, store, a=ModelState.LOADED, b=ModelState.SLEEPING)
    await drain(svc)
    assert counted(svc, "a") == (1, 1)  # a wake-up, not a second cold start
    status = store.status("a")
    assert (status["readyReplicas"], status["tiers"]) == (1, "GPU")
    assert condition(status, "Ready")["status"] == "True"
    assert ("a", "Loaded") in store.events
    assert condition(store.status("b"), "Scheduled")["reason"] == "SwappedOut"


async def test_where_host_ram_cannot_take_it_the_swapped_out_model_is_unloaded() -> None:
    store, _, _ = await swapped_out(host=4 * GI)
    assert parked(store) == {"ns.b": False, "ns.c": False}
    scheduled = condition(store.status("a"), "Scheduled")
    assert (scheduled["reason"], "unloaded" in scheduled["message"]) == ("SwappedOut", True)


async def test_a_parked_model_its_agent_could_not_park_is_withdrawn() -> None:
    store, _, svc = await swapped_out(host=64 * GI)
    report(svc, store, a=ModelState.EVICTED)
    await drain(svc)
    assert "ns.a" not in parked(store)
    assert condition(store.status("a"), "Scheduled")["reason"] == "SwappedOut"


async def test_a_parked_model_is_withdrawn_when_deleted() -> None:
    store, _, svc = await swapped_out(host=64 * GI)
    report(svc, store, a=ModelState.SLEEPING)
    assert await svc.finalize("ns", "a") == ["n1"]  # its agent still holds it in host RAM
    assert "ns.a" not in parked(store)
