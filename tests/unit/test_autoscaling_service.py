"""The operator's service acting on gateway demand, over the in-memory store: scale to zero and
back, a swap-out for a model requests wait for, and a model idle past keepAlive coming back."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import pytest
from test_operator_service import GI, T0, Clock, MemoryStore, condition, drain

from vram_operator.api import ModelState
from vram_operator.api.demand import ModelDemand
from vram_operator.operator.demand import DemandReader
from vram_operator.operator.metrics import OperatorMetrics
from vram_operator.operator.placement import PlacementConfig
from vram_operator.operator.service import OperatorConfig, OperatorService
from vram_operator.simulation.cluster import TRUSTED_POLICY

pytestmark = pytest.mark.unit


async def demand_service(
    store: MemoryStore,
    clock: Clock,
    swap_order: Literal["cost", "lru2"] = OperatorConfig.swap_order,
) -> OperatorService:
    placement = PlacementConfig(heartbeat_grace_seconds=1e9, min_residency_seconds=30)
    config = OperatorConfig(placement=placement, gpu_reserve_bytes=0, swap_order=swap_order)
    reader = DemandReader("http://gateway.invalid:8080")  # never read: figures are handed in
    svc = OperatorService(store, config, OperatorMetrics(), clock=clock, demand=reader)
    await svc.start()
    return svc


def wanted(
    name: str, waiting: int = 0, in_flight: int = 0, last: float | None = None, requests: int = 0
) -> ModelDemand:
    moment = None if last is None else T0 + dt.timedelta(seconds=last)
    return ModelDemand(
        "ns",
        name,
        "ollama",
        f"{name}:1b",
        requests=requests,
        in_flight=in_flight,
        waiting=waiting,
        last_request=moment,
    )


async def full_node(
    clock: Clock, swap_order: Literal["cost", "lru2"] = OperatorConfig.swap_order
) -> tuple[MemoryStore, OperatorService]:
    """A 24 GiB node holding ns.a and ns.b (10 GiB each, reported Loaded); ns.c, as large,
    applied and waiting for room."""
    store = MemoryStore()
    store.add_node("n1", total=24 * GI)
    for name in ("a", "b", "c"):
        store.apply(name, vram="10Gi")
    svc = await demand_service(store, clock, swap_order)
    await drain(svc)
    for name in ("a", "b"):
        svc.observe_gpunode(store.report("n1", f"ns.{name}", ModelState.LOADED), "n1")
    await drain(svc)
    return store, svc


async def test_scale_to_zero_after_the_delay_and_back_on_a_held_request() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("n1", total=24 * GI)
    store.apply("auto")
    spec = store.deployments[("ns", "auto")]["spec"]
    spec["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2, "scaleDownDelay": "60s"}
    svc = await demand_service(store, clock)
    await drain(svc)
    assert store.assigned("n1") == {"ns.auto"}
    assert store.status("auto")["desiredReplicas"] == 1

    clock.now = T0 + dt.timedelta(seconds=61)
    await svc.apply_demand({})
    await drain(svc)
    status = store.status("auto")
    assert store.assigned("n1") == set()
    assert (status["desiredReplicas"], status["replicas"], status["ready"]) == (0, 0, "0/0")
    assert condition(status, "Ready")["reason"] == "ScaledToZero"
    assert ("auto", "Scaled") in store.events

    clock.now = T0 + dt.timedelta(seconds=70)
    await svc.apply_demand({"ns.auto": wanted("auto", waiting=1, last=70)})
    await drain(svc)
    assert store.assigned("n1") == {"ns.auto"}
    assert store.status("auto")["desiredReplicas"] == 1
    zero = svc.metrics.wake_requests.labels("zero")._value.get()
    assert zero == 1

    # Nobody answers: the count holds however long.
    clock.now = T0 + dt.timedelta(seconds=1000)
    await svc.apply_demand(None)
    await drain(svc)
    assert store.assigned("n1") == {"ns.auto"}


async def test_a_request_for_a_model_that_does_not_fit_swaps_out_the_coldest() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("n1", total=24 * GI)
    for name in ("a", "b", "c"):
        store.apply(name, vram="10Gi")
    svc = await demand_service(store, clock)
    await drain(svc)
    assert store.assigned("n1") == {"ns.a", "ns.b"}
    for name in ("a", "b"):
        svc.observe_gpunode(store.report("n1", f"ns.{name}", ModelState.LOADED), "n1")
    await drain(svc)
    assert condition(store.status("c"), "Scheduled")["reason"] == "InsufficientVRAM"

    clock.now = T0 + dt.timedelta(seconds=100)
    await svc.apply_demand(
        {
            "ns.a": wanted("a", last=20),
            "ns.b": wanted("b", last=50),
            "ns.c": wanted("c", waiting=1, last=100),
        }
    )
    await drain(svc)
    assert store.assigned("n1") == {"ns.b", "ns.c"}
    swapped = condition(store.status("a"), "Scheduled")
    assert swapped["reason"] == "SwappedOut"
    assert "for c, which requests were waiting for" in swapped["message"]
    assert ("a", "SwappedOut") in store.events
    assert svc.metrics.swap_outs.labels("demand")._value.get() == 1

    # b served a request a moment ago: a request for a waits rather than evict it.
    svc.observe_gpunode(store.report("n1", "ns.c", ModelState.LOADING), "n1")
    clock.now = T0 + dt.timedelta(seconds=110)
    await svc.apply_demand(
        {
            "ns.a": wanted("a", waiting=1, last=110),
            "ns.b": wanted("b", last=105),
            "ns.c": wanted("c", in_flight=1, last=100),
        }
    )
    await drain(svc)
    assert store.assigned("n1") == {"ns.b", "ns.c"}


async def test_a_model_idle_past_keep_alive_is_withdrawn_and_its_next_request_brings_it_back() -> (
    None
):
    store, clock = MemoryStore(), Clock()
    store.add_node("n1")
    store.apply("idle")
    store.deployments[("ns", "idle")]["spec"]["keepAlive"] = "1m"
    svc = await demand_service(store, clock)
    await drain(svc)
    assert store.assigned("n1") == {"ns.idle"}
    gpunode = store.report("n1", "ns.idle", ModelState.EVICTED, reason="KeepAliveExpired")
    svc.observe_gpunode(gpunode, "n1")
    await drain(svc)
    assert store.assigned("n1") == set()
    ready = condition(store.status("idle"), "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ScaledToZero")
    assert "the next request brings it back" in ready["message"]

    clock.now = T0 + dt.timedelta(seconds=5)
    await svc.apply_demand({"ns.idle": wanted("idle", waiting=1, last=5)})
    await drain(svc)
    assert store.assigned("n1") == {"ns.idle"}
    assert store.status("idle")["desiredReplicas"] == 1


async def test_an_autoscaled_model_is_charged_its_max_replicas_against_the_quota() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("n1", total=24 * GI)
    store.apply("wide", vram="4Gi")
    spec = store.deployments[("ns", "wide")]["spec"]
    spec["autoscaling"] = {"minReplicas": 0, "maxReplicas": 3}
    svc = await demand_service(store, clock)
    quota = TRUSTED_POLICY["spec"] | {"vramQuota": "10Gi"}
    svc.observe_policy({**TRUSTED_POLICY, "spec": quota}, "trusted-namespaces")
    await drain(svc)
    refused = condition(store.status("wide"), "Ready")
    assert refused["reason"] == "PolicyViolation"
    assert store.assigned("n1") == set()
