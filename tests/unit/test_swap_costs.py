"""The operator's `cost` swap order: a model requests wait for displaces the settled models
whose eviction costs least in loads to come (the agents' `cost` rule), on the GPU where that
costs least, and never a young one; the operator prices each replica from its assignment, its
agent's report and the gateways' request counts."""

from __future__ import annotations

import datetime as dt

import pytest
from test_autoscaling_service import demand_service, full_node, wanted
from test_operator_service import GI, T0, Clock, MemoryStore, condition, drain

from vram_operator.api import GPU, Assignment, Backend, ModelState, ResidentModel
from vram_operator.api.demand import ModelDemand
from vram_operator.api.modeldeployment import VLLMOptions
from vram_operator.operator.placement import (
    NodeView,
    PlacementConfig,
    PlacementRequest,
    ReplicaDemand,
    SwapCosts,
    place,
    replica_resident,
    swap_figures,
)
from vram_operator.policy.eviction import EvictionConfig

STAMP = T0.timestamp()


def replica_figures(
    key: str,
    assignment: Assignment,
    report: ResidentModel | None,
    demand: ReplicaDemand,
    now: dt.datetime,
    config: EvictionConfig,
) -> tuple[float, bool]:
    return swap_figures(replica_resident(key, assignment, report, demand, now), STAMP, config)


pytestmark = pytest.mark.unit

CONFIG = PlacementConfig(min_residency_seconds=30)


def node(gpus: dict[str, dict[str, int]]) -> NodeView:
    """One node; per GPU UUID, the keys it holds and their GiB (each GPU 20 GiB, full)."""
    assignments = {
        key: Assignment(
            namespace="ns",
            name=key.partition(".")[2],
            model=f"{key}:1b",
            backend=Backend.OLLAMA,
            gpu_uuid=uuid,
            vram_bytes=gib * GI,
        )
        for uuid, holds in gpus.items()
        for key, gib in holds.items()
    }
    units = tuple(
        GPU(index=i, uuid=uuid, name="Simulated", total_bytes=20 * GI, used_bytes=0, free_bytes=0)
        for i, uuid in enumerate(gpus)
    )
    return NodeView(name="n1", heartbeat=T0, gpus=units, assignments=assignments)


def request(gib: int) -> PlacementRequest:
    return PlacementRequest(key="ns.new", vram_bytes=gib * GI, demanded=True)


def test_the_cheapest_cover_goes_on_the_gpu_where_it_costs_least() -> None:
    view = node({"GPU-0": {"ns.a": 5, "ns.b": 5, "ns.c": 10}, "GPU-1": {"ns.d": 20}})
    # 10 GiB wanted. On GPU-0, a and b (0.05 + 0.125) cost less than c (0.2), though c is
    # colder per GiB than b; GPU-1 must give up d, dearer still.
    prices = {"ns.a": 0.05, "ns.b": 0.125, "ns.c": 0.2, "ns.d": 0.5}
    decision = place(request(10), [view], CONFIG, T0, costs=SwapCosts(prices))
    assert sorted(v.key for v in decision.preempted) == ["ns.a", "ns.b"]
    assert decision.chosen[0].gpu_uuid == "GPU-0"
    # d cheaper than a and b together: GPU-1 it is.
    prices["ns.d"] = 0.1
    decision = place(request(10), [view], CONFIG, T0, costs=SwapCosts(prices))
    assert [v.key for v in decision.preempted] == ["ns.d"]
    assert decision.chosen[0].gpu_uuid == "GPU-1"


def test_a_young_model_stays_however_cheap() -> None:
    view = node({"GPU-0": {"ns.a": 10, "ns.b": 10}})
    costs = SwapCosts({"ns.a": 0.01, "ns.b": 1.0}, young=frozenset({"ns.a"}))
    decision = place(request(10), [view], CONFIG, T0, costs=costs)
    assert [v.key for v in decision.preempted] == ["ns.b"]
    costs = SwapCosts({"ns.a": 0.01, "ns.b": 1.0}, young=frozenset({"ns.a", "ns.b"}))
    decision = place(request(10), [view], CONFIG, T0, costs=costs)
    assert decision.preempted == ()
    assert decision.reason is not None


def test_a_replica_is_priced_as_the_agents_cost_policy_prices_it() -> None:
    config = EvictionConfig(min_residency_seconds=60)
    ollama = Assignment(
        namespace="ns", name="m", model="m:1b", backend=Backend.OLLAMA, vram_bytes=8 * GI
    )
    loaded = ResidentModel(
        key="ns.m",
        model="m:1b",
        backend=Backend.OLLAMA,
        state=ModelState.LOADED,
        vram_bytes=8 * GI,
        loaded_at=T0 - dt.timedelta(seconds=100),
        load_seconds=12.0,
    )
    # normal (weight 2) x 0.1 requests/s x its load, estimated from its size (2 s + 8 GiB at
    # 1 GiB/s), not the 12 s its agent measured (which counts waiting behind other loads)
    price, young = replica_figures(
        "ns.m", ollama, loaded, ReplicaDemand(rate=0.1, in_use=0, served=True), T0, config
    )
    assert (price, young) == (pytest.approx(2 * 0.1 * 10), False)
    # a request on it, or loaded 100 s ago for none yet within a 200 s minimum residency: young
    assert replica_figures("ns.m", ollama, loaded, ReplicaDemand(0.1, 1, True), T0, config)[1]
    longer = EvictionConfig(min_residency_seconds=200)
    assert replica_figures("ns.m", ollama, loaded, ReplicaDemand(0.1, 0, False), T0, longer)[1]
    # still loading, or not reported: never settled
    loading = loaded.model_copy(update={"state": ModelState.LOADING})
    assert replica_figures("ns.m", ollama, loading, ReplicaDemand(0.1, 0, True), T0, config)[1]
    assert replica_figures("ns.m", ollama, None, ReplicaDemand(0.1, 0, True), T0, config)[1]
    # a vLLM model with sleep mode comes back by waking: 8 GiB at the assumed 8 GiB/s
    vllm = Assignment(
        namespace="ns",
        name="m",
        model="org/m",
        backend=Backend.VLLM,
        vram_bytes=8 * GI,
        vllm=VLLMOptions(sleep_mode=True),
    )
    price, _ = replica_figures("ns.m", vllm, loaded, ReplicaDemand(0.1, 0, True), T0, config)
    assert price == pytest.approx(2 * 0.1 * 1.0)
    # no rate (no gateway counted it): 1 / idle seconds, from the gateway's last request
    idle = ReplicaDemand(last_request=T0 - dt.timedelta(seconds=50))
    price, _ = replica_figures("ns.m", ollama, loaded, idle, T0, config)
    assert price == pytest.approx(2 * (1 / 50) * 10)


async def test_the_operator_swaps_out_what_is_asked_for_least_by_the_gateways_counts() -> None:
    clock = Clock()
    store, svc = await full_node(clock, swap_order="cost")

    def asked(name: str, requests: int, last: float, waiting: int = 0) -> ModelDemand:
        return wanted(name, waiting=waiting, last=last, requests=requests)

    # The first read is a starting point; then a is asked for 6 times, b twice, more recently.
    for moment, reads in (
        (0, {"ns.a": asked("a", 0, 0)}),
        (30, {"ns.a": asked("a", 6, 30)}),
        (40, {"ns.a": asked("a", 6, 30), "ns.b": asked("b", 2, 40)}),
    ):
        clock.now = T0 + dt.timedelta(seconds=moment)
        await svc.apply_demand(reads)
        await drain(svc)
    assert store.assigned("n1") == {"ns.a", "ns.b"}
    # c waits at 100 s: b, the least asked for, goes, though a was used less recently (and
    # asked for again less recently: LRU-2 would take a).
    clock.now = T0 + dt.timedelta(seconds=100)
    reads = {
        "ns.a": asked("a", 6, 30),
        "ns.b": asked("b", 2, 40),
        "ns.c": asked("c", 1, 100, waiting=1),
    }
    await svc.apply_demand(reads)
    await drain(svc)
    assert store.assigned("n1") == {"ns.a", "ns.c"}
    assert condition(store.status("b"), "Scheduled")["reason"] == "SwappedOut"


async def test_a_model_with_requests_in_flight_is_not_swapped_out() -> None:
    clock = Clock()
    store, svc = await full_node(clock, swap_order="cost")
    clock.now = T0 + dt.timedelta(seconds=100)
    reads = {
        "ns.a": wanted("a", in_flight=1, last=90),
        "ns.b": wanted("b", in_flight=2, last=95),
        "ns.c": wanted("c", waiting=1, last=100),
    }
    await svc.apply_demand(reads)
    await drain(svc)
    assert store.assigned("n1") == {"ns.a", "ns.b"}
    assert condition(store.status("c"), "Scheduled")["reason"] == "InsufficientVRAM"
    # Once a's request ends, it may go.
    clock.now = T0 + dt.timedelta(seconds=110)
    reads["ns.a"] = wanted("a", last=90)
    await svc.apply_demand(reads)
    await drain(svc)
    assert store.assigned("n1") == {"ns.b", "ns.c"}


async def test_a_model_nobody_asked_for_goes_before_one_asked_for_once() -> None:
    # a and b were placed before any traffic; a has been asked for once since, b never. Once
    # a gateway has answered, b's rate is 0: it goes, however recently it loaded (the recency
    # an agent without demand figures reads would price it above a's single request).
    store, clock = MemoryStore(), Clock()
    store.add_node("n1", total=24 * GI)
    for name in ("a", "b", "c"):
        store.apply(name, vram="10Gi")
    svc = await demand_service(store, clock, swap_order="cost")
    await drain(svc)
    for name in ("b", "a"):
        body = store.report("n1", f"ns.{name}", ModelState.LOADED)
        for model in body["status"]["models"]:
            model["loadedAt"] = (T0 + dt.timedelta(seconds=50)).isoformat()
        svc.observe_gpunode(body, "n1")
    await drain(svc)
    await svc.apply_demand({})
    clock.now = T0 + dt.timedelta(seconds=60)
    once = wanted("a", last=60, requests=1)
    await svc.apply_demand({"ns.a": once})
    clock.now = T0 + dt.timedelta(seconds=100)
    await svc.apply_demand({"ns.a": once, "ns.c": wanted("c", waiting=1, last=100)})
    await drain(svc)
    assert store.assigned("n1") == {"ns.a", "ns.c"}
