"""Eviction policy: victim order per policy, the rules every plan keeps, and their proofs."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_operator.api import (
    Backend,
    MemoryPressure,
    ModelState,
    Priority,
    PSIFigures,
    ResidentModel,
)
from vram_operator.policy.eviction import (
    FITS,
    HOST_MEMORY_PRESSURE,
    INSUFFICIENT_VRAM,
    MAKE_ROOM,
    NO_PRESSURE,
    POLICIES,
    PSI_UNAVAILABLE,
    VRAM_PRESSURE,
    EvictionConfig,
    Resident,
    coldest_first,
    coldness,
    is_evictable,
    plan_host_pressure,
    plan_room,
    plan_vram_pressure,
    reclaimable_bytes,
    under_host_pressure,
)

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_000_000.0
LOW, NORMAL, HIGH, CRITICAL = Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL
LOADED, LOADING, SLEEPING = ModelState.LOADED, ModelState.LOADING, ModelState.SLEEPING
PROPERTY = settings(max_examples=60, deadline=None)


def model(
    key: str,
    priority: Priority = NORMAL,
    gib: float = 1,
    *,
    idle: float = 600,
    age: float = 3600,
    state: ModelState = LOADED,
    can_park: bool = False,
    host_gib: float = 0,
) -> Resident:
    """A resident loaded `age` seconds and last used `idle` seconds before NOW."""
    return Resident(
        key=key,
        priority=priority,
        vram_bytes=int(gib * GI),
        state=state,
        loaded_at=NOW - age,
        last_access=NOW - idle,
        can_park=can_park,
        host_bytes=int(host_gib * GI),
    )


def psi(some: float, full: float = 0.0) -> MemoryPressure:
    return MemoryPressure(
        available=True,
        some=PSIFigures(avg10=some, avg60=some, avg300=some, total=1),
        full=PSIFigures(avg10=full, avg60=full, avg300=full, total=1),
    )


def keys(actions: Any) -> list[str]:
    return [action.key for action in actions]


# --- order --------------------------------------------------------------------------------

TABLE = [
    model("a", LOW, idle=300),
    model("b", HIGH, idle=2400),
    model("c", NORMAL, idle=500),
    model("d", NORMAL, idle=100),
]


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        ("lru", ["b", "c", "a", "d"]),
        ("priority", ["a", "c", "d", "b"]),
        ("hybrid", ["b", "a", "c", "d"]),  # 2400/4=600, 300/1, 500/2=250, 100/2=50
    ],
)
def test_each_policy_orders_victims(policy: Any, order: list[str]) -> None:
    assert keys(coldest_first(TABLE, NOW, EvictionConfig(policy=policy))) == order


@pytest.mark.parametrize(("high_idle", "colder"), [(40 * 60, "high"), (15 * 60, "low")])
def test_hybrid_weighs_idle_time_by_priority(high_idle: float, colder: str) -> None:
    pair = [model("high", HIGH, idle=high_idle), model("low", LOW, idle=5 * 60)]
    assert coldest_first(pair, NOW)[0].key == colder


def test_hybrid_weights_are_configurable_and_merge_with_defaults() -> None:
    config = EvictionConfig(weights={HIGH: 100.0})
    assert config.weights[NORMAL] == 2.0
    pair = [model("high", HIGH, idle=2400), model("low", LOW, idle=300)]
    assert coldest_first(pair, NOW, config)[0].key == "low"


def test_ties_go_to_the_lower_priority_then_the_key() -> None:
    config = EvictionConfig(policy="lru")
    tied = [model("z", HIGH), model("y", LOW), model("x", LOW)]
    assert keys(coldest_first(tied, NOW, config)) == ["x", "y", "z"]


def test_recency_counts_from_the_load_when_never_used_since() -> None:
    reloaded = Resident("m", LOW, GI, LOADED, loaded_at=NOW - 10, last_access=NOW - 9999)
    assert coldness(reloaded, NOW, EvictionConfig(policy="lru"))[0] == 10


def test_a_critical_model_is_never_cold() -> None:
    critical = model("c", CRITICAL, idle=10**9)
    assert coldness(critical, NOW, EvictionConfig(policy="hybrid"))[0] == 0.0
    assert coldness(critical, NOW, EvictionConfig(policy="cost"))[0] == float("-inf")
    assert not is_evictable(critical, NOW)


@pytest.mark.parametrize(
    ("settings_", "field_name"),
    [
        ({"policy": "fifo"}, "policy"),
        ({"min_residency_seconds": -1}, "minResidencySeconds"),
        ({"min_residency_seconds": float("inf")}, "minResidencySeconds"),
        ({"host_step_seconds": -5}, "hostStepSeconds"),
        ({"psi_some_threshold": 0}, "psiSomeThreshold"),
        ({"psi_full_threshold": 101}, "psiFullThreshold"),
        ({"weights": {HIGH: 0.0}}, "weights.high"),
        ({"weights": {LOW: float("nan")}}, "weights.low"),
        ({"weights": {CRITICAL: 9.0}}, "weights: critical"),
        ({"weights": {"urgent": 9.0}}, "weights: unknown priority 'urgent'"),
    ],
)
def test_invalid_config_names_the_field(settings_: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        EvictionConfig(**settings_)


def test_config_accepts_priority_names_from_yaml() -> None:
    config = EvictionConfig(weights={"low": 0.5})  # type: ignore[dict-item]
    assert config.weights[LOW] == 0.5


# --- making room --------------------------------------------------------------------------


def test_nothing_is_evicted_when_the_model_already_fits() -> None:
    plan = plan_room([model("a")], 2 * GI, 3 * GI, NOW, incoming_priority=NORMAL)
    assert (plan.feasible, plan.reason, plan.actions) == (True, FITS, ())
    assert plan.message == "2Gi needed, 3Gi free"


def test_room_goes_to_the_coldest_and_drops_victims_not_needed() -> None:
    residents = [
        model("cold-small", LOW, 1, idle=9000),
        model("cool-small", LOW, 1, idle=8000),
        model("warm-big", LOW, 10, idle=7000),
        model("hot", LOW, 10, idle=1),
    ]
    plan = plan_room(residents, 10 * GI, 0, NOW, incoming_priority=NORMAL)
    assert (plan.feasible, plan.reason) == (True, MAKE_ROOM)
    assert keys(plan.actions) == ["warm-big"]
    assert plan.freed_bytes == 10 * GI
    assert plan.actions[0].kind == "unload"
    assert "room for a normal model (10Gi needed, 0 free)" in plan.actions[0].message


def test_when_the_fit_is_impossible_nothing_is_evicted_and_the_message_says_why() -> None:
    residents = [
        model("critical", CRITICAL, 20, idle=99999),
        model("loading", LOW, 20, state=LOADING),
        model("young", LOW, 3, age=30),
        model("old", LOW, 2),
        model("higher", HIGH, 20),
        model("parked", LOW, 20, state=SLEEPING),
    ]
    plan = plan_room(residents, 8 * GI, 1 * GI, NOW, incoming_priority=NORMAL)
    assert (plan.feasible, plan.reason, plan.actions) == (False, INSUFFICIENT_VRAM, ())
    assert plan.message == (
        "8Gi needed, 1Gi free, 2Gi held by models a normal model may evict, "
        "3Gi more once recently loaded models serve their requests or pass the 120s minimum"
        " residency"
    )


def test_minimum_residency_ends_and_the_model_becomes_a_victim() -> None:
    residents = [model("m", LOW, 4, age=119)]
    assert not plan_room(residents, 4 * GI, 0, NOW, incoming_priority=LOW).feasible
    later = plan_room(residents, 4 * GI, 0, NOW + 1, incoming_priority=LOW)
    assert keys(later.actions) == ["m"]
    no_wait = plan_room(
        residents, 4 * GI, 0, NOW, EvictionConfig(min_residency_seconds=0), incoming_priority=LOW
    )
    assert keys(no_wait.actions) == ["m"]


@pytest.mark.parametrize(
    ("incoming", "victims"),
    [
        (LOW, ["low"]),
        (NORMAL, ["normal", "low"]),
        (HIGH, ["high", "normal", "low"]),
        (CRITICAL, ["high", "normal", "low"]),
    ],
)
def test_an_incoming_model_displaces_only_its_own_priority_or_lower(
    incoming: Priority, victims: list[str]
) -> None:
    residents = [
        model("high", HIGH, idle=9000, age=99999),
        model("normal", NORMAL, idle=5000, age=99999),
        model("low", LOW, idle=100, age=99999),
        model("critical", CRITICAL, idle=9999, age=99999),
    ]
    config = EvictionConfig(policy="lru")
    plan = plan_room(residents, 10 * GI, 0, NOW, config, incoming_priority=incoming)
    assert not plan.feasible
    assert (
        reclaimable_bytes(residents, NOW, config, incoming_priority=incoming) == len(victims) * GI
    )
    enough = plan_room(residents, len(victims) * GI, 0, NOW, config, incoming_priority=incoming)
    assert keys(enough.actions) == victims


def test_a_vllm_model_is_parked_unless_the_host_is_under_pressure() -> None:
    residents = [model("v", LOW, 4, can_park=True, host_gib=4)]
    parked = plan_room(residents, 4 * GI, 0, NOW, incoming_priority=LOW)
    assert [(a.key, a.kind, a.freed_bytes) for a in parked.actions] == [("v", "park", 4 * GI)]
    assert parked.actions[0].message.startswith("parked in host RAM: room for a low model")
    pressed = plan_room(residents, 4 * GI, 0, NOW, incoming_priority=LOW, host_under_pressure=True)
    assert [a.kind for a in pressed.actions] == ["unload"]


def test_host_ram_parks_the_hottest_victims_first() -> None:
    residents = [
        model("colder", LOW, 4, idle=900, can_park=True, host_gib=4),
        model("warmer", LOW, 4, idle=800, can_park=True, host_gib=4),
    ]
    plan = plan_room(residents, 8 * GI, 0, NOW, incoming_priority=LOW, host_available_bytes=5 * GI)
    assert [(a.key, a.kind) for a in plan.actions] == [("colder", "unload"), ("warmer", "park")]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="needed_bytes"):
        plan_room([], -1, 0, NOW, incoming_priority=LOW)
    with pytest.raises(ValueError, match="appears twice"):
        plan_room([model("a"), model("a")], GI, 0, NOW, incoming_priority=LOW)
    with pytest.raises(ValueError, match="must be >= 0"):
        model("a", gib=-1)


def test_a_status_entry_converts_with_conservative_gaps() -> None:
    loaded = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    used = loaded + dt.timedelta(minutes=5)
    entry = ResidentModel(
        key="ns.m",
        model="m",
        backend=Backend.VLLM,
        priority=HIGH,
        state=LOADED,
        vram_bytes=GI,
        loaded_at=loaded,
        last_access=used,
    )
    resident = Resident.from_status(entry, can_park=True, host_bytes=2 * GI)
    assert resident == Resident(
        "ns.m", HIGH, GI, LOADED, loaded.timestamp(), used.timestamp(), True, 2 * GI
    )
    bare = Resident.from_status(
        ResidentModel(key="a", model="a", backend=Backend.OLLAMA, state=LOADED)
    )
    assert (bare.vram_bytes, bare.loaded_at, bare.last_access, bare.can_park) == (0, 0, 0, False)


# --- pressure -----------------------------------------------------------------------------


def test_host_pressure_needs_psi_past_a_threshold() -> None:
    assert not under_host_pressure(None)
    assert not under_host_pressure(MemoryPressure(available=False))
    assert not under_host_pressure(psi(9.9, 4.9))
    assert under_host_pressure(psi(10.0))
    assert under_host_pressure(psi(0, 5.0))
    assert under_host_pressure(MemoryPressure(available=True, some=psi(50).some))
    assert not under_host_pressure(psi(50), EvictionConfig(psi_some_threshold=60))


def test_host_pressure_without_psi_or_below_threshold_demotes_nothing() -> None:
    residents = [model("a", state=SLEEPING)]
    unknown = plan_host_pressure(residents, MemoryPressure(available=False), NOW)
    assert (unknown.under_pressure, unknown.reason, unknown.actions) == (False, PSI_UNAVAILABLE, ())
    calm = plan_host_pressure(residents, psi(1.5, 0.25), NOW)
    assert (calm.under_pressure, calm.reason, calm.actions) == (False, NO_PRESSURE, ())
    assert calm.message == "memory PSI some avg10 1.5%, full avg10 0.25%"


def test_host_pressure_empties_the_host_ram_tier_first() -> None:
    residents = [
        model("gpu", LOW, 4, idle=99999),
        model("parked-warm", NORMAL, 4, idle=10, state=SLEEPING),
        model("parked-cold", NORMAL, 4, idle=5000, state=SLEEPING),
        model("parked-young", NORMAL, 4, age=10, state=SLEEPING),
    ]
    plan = plan_host_pressure(residents, psi(25), NOW)
    assert (plan.under_pressure, plan.reason) == (True, HOST_MEMORY_PRESSURE)
    assert [(a.key, a.kind, a.freed_bytes) for a in plan.actions] == [
        ("parked-cold", "unload", 0),
        ("parked-warm", "unload", 0),
    ]
    assert plan.message.endswith("emptying the host-RAM tier")


def test_host_pressure_then_unloads_one_coldest_model_per_step() -> None:
    residents = [
        model("warm", LOW, 4, idle=10, can_park=True),
        model("cold", LOW, 6, idle=5000, can_park=True),
        model("critical", CRITICAL, 8, idle=99999),
    ]
    plan = plan_host_pressure(residents, psi(0, 7), NOW)
    assert [(a.key, a.kind, a.freed_bytes) for a in plan.actions] == [("cold", "unload", 6 * GI)]
    too_soon = plan_host_pressure(residents, psi(0, 7), NOW, last_step_at=NOW - 10)
    assert (too_soon.under_pressure, too_soon.actions) == (True, ())
    assert too_soon.message.endswith("next demotion in 20s at the earliest")
    later = plan_host_pressure(residents, psi(0, 7), NOW, last_step_at=NOW - 30)
    assert keys(later.actions) == ["cold"]


def test_host_pressure_with_nothing_evictable_says_so() -> None:
    plan = plan_host_pressure([model("c", CRITICAL), model("l", state=LOADING)], psi(80), NOW)
    assert (plan.under_pressure, plan.actions) == (True, ())
    assert plan.message.endswith("no model may be evicted")


def test_vram_pressure_yields_the_excess_to_other_processes() -> None:
    residents = [
        model("cold", LOW, 4, idle=9000, can_park=True, host_gib=4),
        model("warm", LOW, 8, idle=100, can_park=True, host_gib=8),
        model("loading", LOW, 10, state=LOADING),
    ]
    calm = plan_vram_pressure(residents, 80 * GI, 58 * GI, NOW)
    assert (calm.under_pressure, calm.reason, calm.actions) == (False, NO_PRESSURE, ())
    assert calm.message == "other processes use 58Gi, models are budgeted 22Gi of 80Gi"
    pressed = plan_vram_pressure(residents, 80 * GI, 61 * GI, NOW)
    assert (pressed.under_pressure, pressed.reason) == (True, VRAM_PRESSURE)
    assert [(a.key, a.kind) for a in pressed.actions] == [("cold", "park")]
    assert pressed.message.endswith("3Gi over, freeing 4Gi")
    host_pressed = plan_vram_pressure(residents, 80 * GI, 61 * GI, NOW, host_under_pressure=True)
    assert [(a.key, a.kind) for a in host_pressed.actions] == [("cold", "unload")]


def test_vram_pressure_beyond_what_may_be_evicted_demotes_all_it_may() -> None:
    residents = [model("a", LOW, 4), model("b", HIGH, 4), model("c", CRITICAL, 4)]
    plan = plan_vram_pressure(residents, 16 * GI, 14 * GI, NOW)
    assert sorted(keys(plan.actions)) == ["a", "b"]
    assert plan.freed_bytes == 8 * GI
    assert plan.message.endswith("10Gi over, freeing 8Gi, all that may be evicted")


# --- properties ---------------------------------------------------------------------------


@st.composite
def residents_(draw: st.DrawFn) -> list[Resident]:
    """Up to six residents on one GPU, in every state, with some too young to evict."""
    residents = []
    for index in range(draw(st.integers(0, 6))):
        host_bytes = draw(st.integers(0, 40))  # parked RAM; 0 stands for a backend that cannot
        residents.append(
            Resident(
                key=f"m{index}",
                priority=draw(st.sampled_from(Priority)),
                vram_bytes=draw(st.integers(0, 40)),
                state=draw(st.sampled_from(ModelState)),
                loaded_at=NOW - draw(st.integers(0, 300)),
                last_access=NOW - draw(st.integers(0, 3600)),
                can_park=host_bytes > 0,
                host_bytes=host_bytes,
                in_use=draw(st.sampled_from([None, 0, 2])),
                served=draw(st.booleans()),
            )
        )
    return residents


configs = st.builds(
    EvictionConfig,
    policy=st.sampled_from(POLICIES),
    min_residency_seconds=st.sampled_from([0.0, 120.0]),
    weights=st.fixed_dictionaries({p: st.floats(0.1, 10) for p in (LOW, NORMAL, HIGH)}),
)


def may_go(resident: Resident, config: EvictionConfig, incoming: Priority) -> bool:
    """The eligibility rule, restated independently of the module."""
    return (
        resident.priority is not CRITICAL
        and resident.state is LOADED
        and resident.vram_bytes > 0
        and not resident.in_use
        and (
            (resident.served and resident.in_use is not None)
            or NOW - resident.loaded_at >= config.min_residency_seconds
        )
        and resident.priority.rank <= incoming.rank
    )


@PROPERTY
@given(
    residents_(),
    st.integers(0, 150),
    st.integers(-10, 60),
    configs,
    st.sampled_from(Priority),
    st.booleans(),
    st.none() | st.integers(0, 80),
)
def test_room_plans_keep_every_rule(
    residents: list[Resident],
    needed: int,
    free: int,
    config: EvictionConfig,
    incoming: Priority,
    pressured: bool,
    host_free: int | None,
) -> None:
    plan = plan_room(
        residents,
        needed,
        free,
        NOW,
        config,
        incoming_priority=incoming,
        host_under_pressure=pressured,
        host_available_bytes=host_free,
    )
    by_key = {r.key: r for r in residents}
    victims = [by_key[a.key] for a in plan.actions]

    # Only eligible victims, each once: never critical, loading, too young or higher priority.
    assert len(set(keys(plan.actions))) == len(plan.actions)
    assert all(v.priority is not CRITICAL for v in victims)
    assert all(v.state is not LOADING for v in victims)
    assert all(may_go(v, config, incoming) for v in victims)
    assert all(a.freed_bytes == by_key[a.key].vram_bytes for a in plan.actions)

    # Parked only when the backend can sleep, the host is calm and its RAM holds them.
    parked = [by_key[a.key] for a in plan.actions if a.kind == "park"]
    assert all(v.can_park for v in parked)
    assert not (pressured and parked)
    assert host_free is None or sum(v.host_bytes for v in parked) <= host_free

    # Feasible exactly when everything that may go covers the need; if not, nothing goes.
    evictable = sum(v.vram_bytes for v in by_key.values() if may_go(v, config, incoming))
    assert plan.feasible == (free + evictable >= needed)
    if not plan.feasible:
        assert (plan.actions, plan.reason) == ((), INSUFFICIENT_VRAM)
        return

    # Enough is freed whenever it is possible.
    assert free + plan.freed_bytes >= needed
    deficit = needed - free
    if deficit <= 0:
        assert plan.actions == ()
        return

    # Irreducible: without any one victim the room would no longer suffice, hence the
    # excess is smaller than every victim: never more than needed plus one model.
    for action in plan.actions:
        assert plan.freed_bytes - action.freed_bytes < deficit
    assert plan.freed_bytes - deficit < min(a.freed_bytes for a in plan.actions)


@PROPERTY
@given(residents_(), configs, st.integers(0, 100), st.integers(0, 100), st.integers(0, 200))
def test_pressure_plans_keep_the_same_rules(
    residents: list[Resident], config: EvictionConfig, some: int, full: int, unmanaged: int
) -> None:
    by_key = {r.key: r for r in residents}
    host = plan_host_pressure(residents, psi(some, full), NOW, config)
    assert host.actions == () or host.under_pressure
    for action in host.actions:
        assert action.kind == "unload"
        assert is_evictable(by_key[action.key], NOW, config)
        assert by_key[action.key].priority is not CRITICAL

    vram = plan_vram_pressure(residents, 100, unmanaged, NOW, config)
    budgets = sum(r.vram_bytes for r in residents if r.state in (LOADED, LOADING))
    excess = unmanaged + budgets - 100
    assert vram.under_pressure == (excess > 0)
    assert len(set(keys(vram.actions))) == len(vram.actions)
    assert all(may_go(by_key[a.key], config, CRITICAL) for a in vram.actions)
    if excess > 0:
        everything = sum(r.vram_bytes for r in residents if may_go(r, config, CRITICAL))
        assert vram.freed_bytes >= min(excess, everything)
        for action in vram.actions:
            assert vram.freed_bytes - action.freed_bytes < excess


def test_a_model_that_served_its_requests_may_go_before_its_minimum_residency() -> None:
    fresh = replace(model("fresh", age=10), in_use=0, served=True)
    busy = replace(model("busy", age=3600), in_use=1, served=True)
    unasked = replace(model("unasked", age=10), in_use=0)
    blind = replace(model("blind", age=10), served=True)  # no demand figures: the fixed rule
    assert [is_evictable(r, NOW) for r in (fresh, busy, unasked, blind)] == [
        True,
        False,
        False,
        False,
    ]
