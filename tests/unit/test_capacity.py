"""Capacity simulator: hand-computed replays per policy, invariants under hypothesis, I/O."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_operator.api import Backend, ModelState, Priority
from vram_operator.capacity import simulator
from vram_operator.capacity.cluster import (
    ClusterSpec,
    DescriptionError,
    NodeSpec,
    SimModel,
    catalog,
    models_from_documents,
    parse_cluster,
)
from vram_operator.capacity.live import from_objects
from vram_operator.capacity.main import main
from vram_operator.capacity.report import SweepPoint, smallest, table
from vram_operator.capacity.simulator import (
    EPOCH,
    POLICY_NAMES,
    Result,
    Simulation,
    SimulationError,
)
from vram_operator.capacity.trace import (
    Trace,
    TraceError,
    Workload,
    convert_azure,
    generate,
    read_trace,
    write_trace,
)
from vram_operator.node_agent.main import build_parser
from vram_operator.policy.eviction import (
    EvictionConfig,
    Resident,
    coldest_first,
    is_evictable,
    keep_value,
    plan_room,
    price,
)

pytestmark = pytest.mark.unit

GI = 2**30
MI = 2**20
PROPERTY = settings(max_examples=40, deadline=None)


def cluster(
    *gpu_gib: float,
    min_residency: float = 0.0,
    nodes: int = 1,
    request_seconds: float = 0.0,
    gateway_demand: bool = True,
) -> ClusterSpec:
    """GPUs whose room (total minus the 64 MiB placement slack) is exactly the given GiB;
    requests take no time unless told."""
    gpus = tuple(int(g * GI) + 64 * MI for g in gpu_gib)
    return ClusterSpec(
        nodes=tuple(
            NodeSpec(name=f"n{i}", gpu_bytes=gpus, disk_bytes_per_second=GI) for i in range(nodes)
        ),
        start_seconds={Backend.OLLAMA: 0.0, Backend.VLLM: 0.0},
        min_free_bytes=0,
        min_residency_seconds=min_residency,
        request_seconds=request_seconds,
        gateway_demand=gateway_demand,
    )


def ollama(
    name: str, gib: float, priority: Priority = Priority.NORMAL, keep: float = 300
) -> SimModel:
    return SimModel(f"default.{name}", f"{name}:1b", Backend.OLLAMA, priority, int(gib * GI), keep)


def trace(*requests: tuple[float, str]) -> Trace:
    return Trace.from_requests((t, f"default.{m}", None) for t, m in requests)


# --- hand-computed replays ------------------------------------------------------------------

# One 10 GiB GPU, three 4 GiB models loading at 1 GiB/s (4 s each). a and b fit; c at 30 s
# must displace one of them; b comes back at 40 s.
#   lru: b (idle 25 s) goes; at 40 s a (idle 20 s) goes for b: 4 loads, 16 s.
#   priority: a is low, so a goes; b is warm at 40 s: 3 loads, 12 s.
#   hybrid: a 10 s / weight 1 = 10 < b 25 s / 2 = 12.5, so b goes; at 40 s a (20/1) before
#     c (6/2): 16 s.
#   cost: same sizes and load times, so weight x decayed count decides (half-life 600 s,
#     tau 865.6 s): at 30 s a 1 x (e^(-30/tau) + e^(-10/tau)) = 1.954, b 2 x e^(-25/tau) = 1.943,
#     so b goes; at 40 s a 1.932 against c 2 x e^(-10/tau) = 1.977: a goes: 16 s.
#   ollama: a's keep-alive (10m) is shorter than b's (1h): a goes: 12 s.
#   oracle-rate: the cost rule with the trace's true rates (40 s long: a and b 2/40, c 1/40):
#     at 30 s a 1 x 0.05 x 4 s / 4 GiB = 0.05 against b 2 x 0.05 = 0.1: a goes; b is warm
#     at 40 s: 12 s.
#   oracle-lfu: true rates alone: at 30 s a and b tie at 2/40, b idle longer goes; at 40 s
#     c (1/40) goes for b: 16 s.
#   offline: a is never asked for again: a goes: 12 s.
#   operator: place, as demanded, with the cost swap order: the same prices as cost (the load
#     time the agent reports is the 4 s each), so the same victims: 16 s.
#   operator-lru2: place, as demanded, displaces the lowest priority first: a goes: 12 s.
TINY_MODELS = [
    ollama("a", 4, Priority.LOW, keep=600),
    ollama("b", 4, keep=3600),
    ollama("c", 4),
]
TINY_TRACE = trace((0, "a"), (5, "b"), (20, "a"), (30, "c"), (40, "b"))


@pytest.mark.parametrize(
    ("policy", "loads", "warm"),
    [
        ("lru", 4, 1),
        ("priority", 3, 2),
        ("hybrid", 4, 1),
        ("cost", 4, 1),
        ("ollama", 3, 2),
        ("oracle-rate", 3, 2),
        ("oracle-lfu", 4, 1),
        ("offline", 3, 2),
        ("operator", 4, 1),
        ("operator-lru2", 3, 2),
    ],
)
def test_each_policy_on_a_tiny_trace(policy: str, loads: int, warm: int) -> None:
    result = Simulation(cluster(10), TINY_MODELS, TINY_TRACE, policy).run()
    assert (result.cold_starts, result.warm) == (loads, warm)
    assert result.cold_load_seconds == pytest.approx(4.0 * loads)
    assert result.latencies == [pytest.approx(4.0)] * loads
    assert (result.unserved, result.critical_evictions, result.overcommits) == (0, 0, 0)


def test_a_request_during_a_load_waits_for_the_rest_of_it() -> None:
    result = Simulation(cluster(10), TINY_MODELS, trace((0, "a"), (1, "a"), (3, "a")), "lru").run()
    assert (result.cold_starts, result.waited, result.warm) == (1, 2, 0)
    assert sorted(result.latencies) == pytest.approx([1.0, 3.0, 4.0])
    assert result.latency(0.5) == pytest.approx(3.0)


def test_a_young_model_makes_the_next_request_wait_until_it_may_go() -> None:
    # 60 s minimum residency, no demand figures: c at 30 s waits until a (loaded at 4 s) may go
    # at 64 s.
    fixed = cluster(10, min_residency=60, gateway_demand=False)
    result = Simulation(fixed, TINY_MODELS, TINY_TRACE, "offline").run()
    assert result.cold_starts == 3
    assert max(result.latencies) == pytest.approx(64 - 30 + 4)


@pytest.mark.parametrize(("policy", "loads"), [("offline", 3), ("operator", 4)])
def test_with_demand_figures_a_model_that_served_its_requests_may_go_at_once(
    policy: str, loads: int
) -> None:
    # The same, read by agents (or the operator's cost swap order) that see the gateways'
    # demand: a and b served their requests (a at 4 s and 20 s, b at 9 s, 5 s each), so c at
    # 30 s displaces one of them then, and nothing waits longer than its own load. (offline
    # evicts a, never asked for again; the operator's cost order b, then a for b at 40 s.)
    served = cluster(10, min_residency=60, request_seconds=5)
    result = Simulation(served, TINY_MODELS, TINY_TRACE, policy).run()
    assert result.cold_starts == loads
    assert result.latencies == [pytest.approx(4.0)] * loads


def test_a_model_with_a_request_running_stays_until_it_ends() -> None:
    # Requests run 30 s: a's (from 4 s and from 20 s) to 50 s, b's (loaded at 9 s) to 39 s.
    # c at 30 s waits for the first to end, b's at 39 s, then loads until 43 s.
    models = [ollama("a", 4), ollama("b", 4), ollama("c", 4)]
    busy = cluster(10, min_residency=60, request_seconds=30)
    result = Simulation(busy, models, trace((0, "a"), (5, "b"), (20, "a"), (30, "c")), "lru").run()
    assert result.cold_starts == 3
    assert max(result.latencies) == pytest.approx(43 - 30)


def test_critical_models_are_resident_from_the_start_and_never_leave() -> None:
    models = [ollama("k", 6, Priority.CRITICAL), ollama("x", 4), ollama("y", 4)]
    result = Simulation(
        cluster(10), models, trace((0, "k"), (1, "x"), (9, "y"), (20, "k")), "lru"
    ).run()
    assert (result.warm, result.cold_starts, result.critical_evictions) == (2, 2, 0)


def test_a_parked_model_wakes_on_its_gpu() -> None:
    spec = cluster(20)
    models = [
        SimModel("default.v", "org/v", Backend.VLLM, Priority.NORMAL, 12 * GI, can_park=True),
        ollama("o", 12),
    ]
    result = Simulation(spec, models, trace((0, "v"), (100, "o"), (200, "v")), "lru").run()
    assert (result.cold_starts, result.parks, result.wakes) == (2, 1, 1)
    wake = spec.wake_seconds + 12 * GI / spec.nodes[0].host_bytes_per_second
    assert result.latencies[-1] == pytest.approx(wake)


def test_the_operator_swaps_out_the_model_asked_for_once_before_one_asked_for_again() -> None:
    # Three normal 4 GiB models on the 10 GiB GPU; z at 30 s must displace x (last used at
    # 10 s, and at 0 s before that) or y (used once, at 20 s). LRU takes x, which comes back at
    # 40 s; the operator's LRU-2 takes y, and x is warm.
    models = [ollama("x", 4), ollama("y", 4), ollama("z", 4)]
    requests = trace((0, "x"), (10, "x"), (20, "y"), (30, "z"), (40, "x"))
    lru = Simulation(cluster(10), models, requests, "lru", record_events=True).run()
    operator = Simulation(cluster(10), models, requests, "operator-lru2", record_events=True).run()
    assert [(e.time, e.key) for e in lru.events if e.kind == "unload"] == [
        (30, "default.x"),
        (40, "default.y"),
    ]
    assert [(e.time, e.key) for e in operator.events if e.kind == "unload"] == [(30, "default.y")]
    assert (operator.cold_starts, operator.warm) == (3, 2)


def test_the_operator_parks_what_can_sleep_and_wakes_it_where_it_sleeps() -> None:
    spec = cluster(20)
    models = [
        SimModel("default.v", "org/v", Backend.VLLM, Priority.NORMAL, 12 * GI, can_park=True),
        ollama("o", 12),
    ]
    requests = trace((0, "v"), (100, "o"), (200, "v"))
    result = Simulation(spec, models, requests, "operator", record_events=True).run()
    assert [(e.time, e.kind, e.key) for e in result.events] == [
        (0, "load", "default.v"),
        (100, "park", "default.v"),
        (100, "load", "default.o"),
        (200, "unload", "default.o"),
        (200, "wake", "default.v"),
    ]
    assert (result.cold_starts, result.parks, result.wakes) == (2, 1, 1)


def test_the_operator_waits_until_a_model_was_last_used_the_minimum_residency_ago() -> None:
    # 60 s minimum residency from the last use: x (used at 25 s) may go at 85 s, y (used at
    # 5 s, loaded at 9 s) at 69 s: z at 30 s waits for y, 39 s plus its 4 s load.
    models = [ollama("x", 4), ollama("y", 4), ollama("z", 4)]
    requests = trace((0, "x"), (5, "y"), (25, "x"), (30, "z"))
    result = Simulation(cluster(10, min_residency=60), models, requests, "operator-lru2").run()
    assert result.latencies[-1] == pytest.approx(69 - 30 + 4)


def test_a_low_model_that_may_displace_nothing_is_unserved_and_named() -> None:
    # n (normal, 8 GiB) holds the 10 GiB GPU; l (low, 4 GiB) may not displace it: both of its
    # requests wait 600 s and are given up, whatever the policy.
    models = [ollama("n", 8), ollama("l", 4, Priority.LOW)]
    result = Simulation(cluster(10), models, trace((0, "n"), (10, "l"), (20, "l")), "cost").run()
    assert (result.cold_starts, result.unserved) == (1, 2)
    assert result.unserved_by_model == {"default.l": 2}


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(SimulationError, match="not one of"):
        Simulation(cluster(10), TINY_MODELS, TINY_TRACE, "fifo")


# --- the cost policy in the agent's eviction ------------------------------------------------


def test_cost_policy_evicts_the_cheapest_to_bring_back_per_byte() -> None:
    now = 10_000.0
    common: dict[str, Any] = {"state": ModelState.LOADED, "loaded_at": 0.0, "last_access": now}
    hot_small = Resident(
        "s", Priority.NORMAL, 2 * GI, reload_seconds=10, request_rate=0.1, **common
    )
    big = Resident("b", Priority.NORMAL, 20 * GI, reload_seconds=12, request_rate=0.1, **common)
    parked = Resident(
        "p", Priority.NORMAL, 8 * GI, can_park=True, reload_seconds=30, wake_seconds=1,
        request_rate=0.1, **common,
    )  # fmt: skip
    config = EvictionConfig(policy="cost")
    # values: s 2*0.1*10/2 = 1.0, b 2*0.1*12/20 = 0.12, p 2*0.1*1/8 = 0.025
    assert [r.key for r in coldest_first([hot_small, big, parked], now, config)] == ["p", "b", "s"]
    assert keep_value(hot_small, now, config) == pytest.approx(1.0)
    critical = Resident("c", Priority.CRITICAL, GI, **common)
    assert keep_value(critical, now, config) == float("inf")


def test_cost_policy_prices_a_victim_host_ram_cannot_take_at_its_reload() -> None:
    now = 10_000.0
    common: dict[str, Any] = {"state": ModelState.LOADED, "loaded_at": 0.0, "last_access": now}
    parkable = Resident(
        "p", Priority.NORMAL, 8 * GI, can_park=True, host_bytes=8 * GI, reload_seconds=30,
        wake_seconds=1, request_rate=0.1, **common,
    )  # fmt: skip
    other = Resident("o", Priority.NORMAL, 8 * GI, reload_seconds=12, request_rate=0.1, **common)
    config = EvictionConfig(policy="cost")

    def plan(**host: Any) -> list[tuple[str, str]]:
        room = plan_room(
            [parkable, other], 8 * GI, 0, now, config, incoming_priority=Priority.NORMAL, **host
        )
        return [(a.key, a.kind) for a in room.actions]

    # with room in host RAM p comes back in 1 s: 2 x 0.1 x 1 / 8 = 0.025 < o's 0.3, p is parked
    assert plan() == [("p", "park")]
    # without it p would be unloaded, 30 s to reload: 0.75 > 0.3, so o goes instead
    assert plan(host_available_bytes=4 * GI) == [("o", "unload")]
    assert plan(host_under_pressure=True) == [("o", "unload")]


def test_cost_policy_frees_room_at_the_least_summed_price() -> None:
    # 10 GiB needed, none free. Prices (2 x rate x 10 s): a 0.05, b 0.125, c 0.2; per GiB
    # a 0.01, c 0.02, b 0.025. Coldest first would take a, then c, and drop a as not needed:
    # c alone, 0.2. The cheapest cover is a and b, 0.175.
    now = 10_000.0
    common: dict[str, Any] = {"state": ModelState.LOADED, "loaded_at": 0.0, "last_access": now}
    a = Resident("a", Priority.NORMAL, 5 * GI, reload_seconds=10, request_rate=0.0025, **common)
    b = Resident("b", Priority.NORMAL, 5 * GI, reload_seconds=10, request_rate=0.00625, **common)
    c = Resident("c", Priority.NORMAL, 10 * GI, reload_seconds=10, request_rate=0.01, **common)
    config = EvictionConfig(policy="cost")
    assert price(a, now, config) == pytest.approx(0.05)
    assert [r.key for r in coldest_first([a, b, c], now, config)] == ["a", "c", "b"]
    plan = plan_room([a, b, c], 10 * GI, 0, now, config, incoming_priority=Priority.NORMAL)
    assert sorted(action.key for action in plan.actions) == ["a", "b"]
    assert plan.price == pytest.approx(0.175)
    # the other policies keep to their order: lru takes the longest idle and no more
    idle = [replace(r, last_access=now - t) for r, t in ((a, 30), (b, 10), (c, 20))]
    lru = plan_room(
        idle, 10 * GI, 0, now, EvictionConfig(policy="lru"), incoming_priority=Priority.NORMAL
    )
    assert [action.key for action in lru.actions] == ["c"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 12), st.floats(0.001, 1.0)), min_size=1, max_size=9),
    st.integers(1, 40),
)
def test_the_cost_policys_cover_is_the_cheapest_and_irreducible(
    models: list[tuple[int, float]], needed: int
) -> None:
    """Against every subset: no cheaper set frees the room, and dropping any victim would no
    longer free it."""
    now = 10_000.0
    common: dict[str, Any] = {"state": ModelState.LOADED, "loaded_at": 0.0, "last_access": now}
    residents = [
        Resident(f"m{i}", Priority.NORMAL, gib * GI, reload_seconds=10, request_rate=rate, **common)
        for i, (gib, rate) in enumerate(models)
    ]
    config = EvictionConfig(policy="cost")
    plan = plan_room(residents, needed * GI, 0, now, config, incoming_priority=Priority.NORMAL)
    total = sum(gib for gib, _ in models)
    assert plan.feasible == (total >= needed)
    if not plan.feasible:
        return
    sizes = {a.key: a.freed_bytes for a in plan.actions}
    assert sum(sizes.values()) >= needed * GI
    assert all(sum(sizes.values()) - size < needed * GI for size in sizes.values())
    prices = [price(r, now, config) for r in residents]
    cheapest = min(
        sum(p for i, p in enumerate(prices) if mask >> i & 1)
        for mask in range(1, 2 ** len(residents))
        if sum(g for i, (g, _) in enumerate(models) if mask >> i & 1) >= needed
    )
    assert plan.price == pytest.approx(cheapest)


def test_the_cost_policy_makes_room_on_the_gpu_where_it_costs_least() -> None:
    # Two 10 GiB GPUs, full: g0 holds x (10 GiB, asked for 3 times), g1 y (asked for 4 times)
    # and z (10 times), 5 GiB each; loads take 1 s per GiB. w (5 GiB) at 100 s. Per GiB x is
    # the coldest (3 requests' worth against y's 4), so the plan whose hottest victim is
    # coldest evicts x (hybrid, the longest idle, too); but x's eviction costs 10 GiB of
    # loading at its rate, y's 5 GiB at a rate a third higher: under cost y goes.
    models = [ollama("x", 10), ollama("y", 5), ollama("z", 5), ollama("w", 5)]
    requests = trace(
        *((t, "x") for t in (0, 11, 12)),
        *((t, "y") for t in (20, 26, 27, 28)),
        *((t, "z") for t in (40, *range(46, 55))),
        (100, "w"),
    )
    for policy, victim in (("cost", "default.y"), ("hybrid", "default.x")):
        result = Simulation(cluster(10, 10), models, requests, policy, record_events=True).run()
        assert [e.key for e in result.events if e.kind == "unload"] == [victim], policy


@pytest.mark.parametrize("policy", ["cost", "operator"])
def test_reading_rates_at_a_moved_base_changes_no_decision(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rates are read at a base moment, moved on every REBASE_SECONDS; moved every 50 s instead
    # of every 30000 s, every figure of a busy hour comes out the same.
    models = models_from_documents(catalog(30, seed=3))
    requests = generate([m.key for m in models], Workload(alpha=0.9, rate=0.5, duration=3600), 3)
    spec = cluster(40, 40, request_seconds=5)
    before = Simulation(spec, models, requests, policy, record_events=True).run()
    monkeypatch.setattr(simulator, "REBASE_SECONDS", 50.0)
    after = Simulation(spec, models, requests, policy, record_events=True).run()
    assert before.cold_starts > 10
    assert after.events == before.events
    assert (after.cold_load_seconds, after.unserved) == (before.cold_load_seconds, before.unserved)


def test_oracle_rate_reads_the_true_rates_and_the_cost_rule() -> None:
    sim = Simulation(cluster(10), TINY_MODELS, TINY_TRACE, "oracle-rate")
    assert sim.config.policy == "cost"
    assert sim.config.victim_order is None
    assert sim.true_rate == pytest.approx([2 / 40, 2 / 40, 1 / 40])


def test_cost_policy_without_rates_reads_recency() -> None:
    now = 10_000.0
    older = Resident("o", Priority.NORMAL, GI, ModelState.LOADED, 0.0, now - 1000)
    newer = Resident("n", Priority.NORMAL, GI, ModelState.LOADED, 0.0, now - 10)
    assert coldest_first([newer, older], now, EvictionConfig(policy="cost"))[0].key == "o"


def test_the_agent_takes_the_cost_policy_under_both_flag_names() -> None:
    assert build_parser().parse_args(["--eviction-policy", "cost"]).policy == "cost"
    assert build_parser().parse_args(["--policy", "cost"]).policy == "cost"


# --- invariants -----------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ClusterSpec, list[SimModel], Trace]:
    gpus = draw(st.lists(st.sampled_from([8, 16, 24]), min_size=1, max_size=2))
    spec = cluster(
        *gpus,
        nodes=draw(st.integers(1, 2)),
        min_residency=draw(st.sampled_from([0, 30])),
        request_seconds=draw(st.sampled_from([0, 5, 60])),
        gateway_demand=draw(st.booleans()),
    )
    models = []
    for i in range(draw(st.integers(1, 6))):
        backend = draw(st.sampled_from(Backend))
        models.append(
            SimModel(
                f"default.m{i}",
                f"org/m{i}" if backend is Backend.VLLM else f"m{i}:1b",
                backend,
                draw(st.sampled_from(Priority)),
                draw(st.integers(1, 10)) * GI,
                keep_alive_seconds=draw(st.sampled_from([60, 300, 3600])),
                can_park=backend is Backend.VLLM and draw(st.booleans()),
            )
        )
    times = draw(st.lists(st.floats(0, 600), min_size=1, max_size=30))
    names = draw(
        st.lists(st.sampled_from([m.key for m in models]), min_size=len(times), max_size=len(times))
    )
    return (
        spec,
        models,
        Trace.from_requests((t, n, None) for t, n in zip(times, names, strict=True)),
    )


@PROPERTY
@given(scenarios(), st.sampled_from(POLICY_NAMES), st.lists(st.floats(0, 900), max_size=5))
def test_the_quick_room_test_agrees_with_the_agents_eviction_rule(
    scenario: tuple[ClusterSpec, list[SimModel], Trace], policy: str, moments: list[float]
) -> None:
    # `_reclaimable` and `_next_change` read a copy's `free_at`; the agents' plans read
    # `is_evictable`: for every copy left on a GPU, at any later moment, they say the same.
    spec, models, requests = scenario
    sim = Simulation(spec, models, requests, policy)
    sim.run()
    end = requests.times[-1]
    for now in (end + m for m in moments):
        for copy in (c for copies in sim.on_gpu.values() for c in copies.values()):
            if policy == "operator-lru2" or sim.models[copy.model].priority is Priority.CRITICAL:
                continue
            resident = sim._resident(copy, now)
            assert (copy.free_at <= now) is is_evictable(resident, EPOCH + now, sim.config)


@PROPERTY
@given(scenarios(), st.sampled_from(POLICY_NAMES))
def test_no_state_overcommits_a_gpu_or_evicts_a_critical_model(
    scenario: tuple[ClusterSpec, list[SimModel], Trace], policy: str
) -> None:
    spec, models, requests = scenario
    sim = Simulation(spec, models, requests, policy, record_events=True)
    result = sim.run()
    critical = {m.key for m in models if m.priority is Priority.CRITICAL}
    by_key = {m.key: m for m in models}
    held: dict[str, dict[str, int]] = {}
    for event in result.events:
        on_gpu = held.setdefault(event.gpu, {})
        if event.kind in ("load", "wake"):
            assert event.key not in on_gpu
            on_gpu[event.key] = event.hold_bytes
            assert sum(on_gpu.values()) <= sim.room[event.gpu], "over-committed"
        else:
            assert event.key not in critical, f"{event.key} is critical and was evicted"
            del on_gpu[event.key]
    assert (result.overcommits, result.critical_evictions) == (0, 0)
    assert sum(result.unserved_by_model.values()) == result.unserved
    # every request is counted once: warm, waiting on a load, the one that started it, unserved
    assert (
        result.warm + result.waited + result.cold_starts + result.wakes + result.unserved
        == result.requests
    )
    # and the cold-load seconds are those of its loads and wakes; the critical models placed
    # before the trace (the first events, not cold starts) took none
    preloaded = sum(e.kind == "load" for e in result.events) - result.cold_starts
    assert result.cold_load_seconds == pytest.approx(
        sum(
            spec.load_seconds(spec.nodes[0], by_key[e.key])
            if e.kind == "load"
            else spec.wake_seconds_for(spec.nodes[0], by_key[e.key])
            for e in result.events[preloaded:]
            if e.kind in ("load", "wake")
        )
    )


# --- traces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_traces_round_trip(tmp_path: Path, suffix: str) -> None:
    original = Trace([0.0, 1.5, 2.25], ["a", "b", "a"], [None, 7, None])
    write_trace(original, tmp_path / f"t{suffix}")
    assert read_trace(tmp_path / f"t{suffix}") == original


def test_trace_times_may_be_iso_timestamps_and_are_sorted(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"time": "2024-05-01T10:00:05Z", "model": "b"},
        {"time": "2024-05-01T10:00:00Z", "model": "a", "tokens": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_trace(path)
    assert (read.times, read.models, read.tokens) == ([-5.0, 0.0], ["a", "b"], [3, None])


def test_a_bad_trace_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("time,model\nsoon,a\n")
    with pytest.raises(TraceError, match=r"t.csv:2"):
        read_trace(path)


def test_generated_traces_are_seeded_and_zipf_skewed() -> None:
    names = [f"m{i}" for i in range(50)]
    steep = generate(names, Workload(alpha=1.1, rate=20, duration=600), seed=3)
    assert steep == generate(names, Workload(alpha=1.1, rate=20, duration=600), seed=3)
    assert 10_000 < len(steep) < 14_000
    counts = sorted((steep.models.count(n) for n in names), reverse=True)
    assert counts[0] > 5 * counts[25]
    assert steep.times == sorted(steep.times)


def test_bursts_and_diurnal_swing_shape_the_rate() -> None:
    names = [f"m{i}" for i in range(20)]
    swing = generate(names, Workload(rate=10, duration=2000, diurnal_amplitude=1, period=2000), 1)
    first = sum(1 for t in swing.times if t < 1000)
    # 10/s x (1 + sin): 1000 + 2000/pi = 1637 s worth over the first half, 363 s over the second
    assert 4 < first / (len(swing) - first) < 5
    bursty = generate(names, Workload(rate=1, duration=1000, burst_every=100, burst_rate=5), 1)
    assert len(bursty) > 2 * len(generate(names, Workload(rate=1, duration=1000), 1))


def test_azure_functions_counts_map_to_models_by_rank(tmp_path: Path) -> None:
    path = tmp_path / "invocations_per_function_md.anon.d01.csv"
    header = ["HashOwner", "HashApp", "HashFunction", "Trigger", *map(str, range(1, 1441))]
    rare = ["o", "a", "rare", "http", "1", *["0"] * 1439]
    busy = ["o", "a", "busy", "timer", "2", "3", *["0"] * 1438]
    path.write_text("\n".join(",".join(row) for row in (header, rare, busy)) + "\n")
    converted = convert_azure([path], ["popular", "second"], seed=1)
    assert converted.models.count("popular") == 5
    assert converted.models.count("second") == 1
    assert all(0 <= t < 120 for t in converted.times)
    assert (
        sum(
            1
            for t, m in zip(converted.times, converted.models, strict=True)
            if m == "popular" and t >= 60
        )
        == 3
    )
    assert len(convert_azure([path], ["only"], seed=1)) == 5


# --- descriptions and the command -----------------------------------------------------------


def test_cluster_files_expand_counts_and_name_bad_fields() -> None:
    spec = parse_cluster({"nodes": [{"name": "h", "count": 2, "gpus": ["80Gi", "80Gi"]}]})
    assert [n.name for n in spec.nodes] == ["h-0", "h-1"]
    assert spec.gpu_count == 4
    assert spec.with_gpus(3).gpu_count == 3
    assert [len(n.gpu_bytes) for n in spec.with_gpus(3).nodes] == [2, 1]
    with pytest.raises(DescriptionError, match=r"nodes\[0\].gpus"):
        parse_cluster({"nodes": [{"name": "h"}]})
    with pytest.raises(DescriptionError, match="strategy"):
        parse_cluster({"nodes": [{"gpus": ["8Gi"]}], "strategy": "random"})


def test_model_deployments_need_vram_and_are_validated() -> None:
    objects = catalog(20, seed=2)
    models = models_from_documents(objects)
    assert len(models) == 20
    assert all(0.5 * GI <= m.vram_bytes <= 40 * GI for m in models)
    assert [m.priority for m in models[:2]] == [Priority.CRITICAL, Priority.CRITICAL]
    del objects[0]["spec"]["vram"]
    with pytest.raises(DescriptionError, match=r"spec.vram is required"):
        models_from_documents(objects)


def test_a_live_cluster_becomes_a_description() -> None:
    gpus = [
        {
            "index": 0,
            "uuid": "GPU-0",
            "name": "H100",
            "totalBytes": 80 * GI,
            "usedBytes": 0,
            "freeBytes": 80 * GI,
        },
    ]
    gpunode = {"metadata": {"name": "n1"}, "spec": {}, "status": {"gpus": gpus}}
    mdep = catalog(1, seed=1)[0]
    spec, models = from_objects([mdep], [gpunode], {"n1": {"labels": {"zone": "a"}}})
    assert spec.nodes[0].gpu_bytes == (80 * GI,)
    assert spec.nodes[0].labels == {"zone": "a"}
    assert [m.key for m in models] == ["default.m000-3b"] or len(models) == 1


def test_the_smallest_cluster_meeting_the_target() -> None:
    def point(gpus: int, warm: int) -> SweepPoint:
        return SweepPoint(gpus, Result("lru", requests=100, warm=warm))

    points = [point(1, 50), point(2, 98), point(3, 99), point(4, 100)]
    assert smallest(points, 0.99, None) == points[2]
    assert smallest(points, 1.01, None) is None


def test_simulate_run_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cluster.yaml").write_text(
        yaml.safe_dump({"minResidencySeconds": 0, "nodes": [{"name": "n", "gpus": ["24Gi"]}]})
    )
    with open(tmp_path / "models.yaml", "w") as handle:
        yaml.safe_dump_all(catalog(8, seed=1), handle)
    args = ["--models", str(tmp_path / "models.yaml")]
    assert (
        main(["trace", *args, "--rate", "0.2", "--duration", "600", "-o", str(tmp_path / "t.csv")])
        == 0
    )
    run = ["run", "--cluster", str(tmp_path / "cluster.yaml"), "--trace", str(tmp_path / "t.csv")]
    code = main(
        [*run, *args, "--policy", "lru", "--policy", "cost", "--json", str(tmp_path / "r.json")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| lru " in out
    assert "| cost " in out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert [f["policy"] for f in figures] == ["lru", "cost"]
    assert main(["run", "--trace", "missing.csv"]) == 2


def test_the_table_compares_with_lru_and_offline() -> None:
    results = [Result("lru", cold_load_seconds=100.0), Result("offline", cold_load_seconds=50.0)]
    text = table(results)
    assert "| 2.00 " in text
    assert "| 0.50 " in text
