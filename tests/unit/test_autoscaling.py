"""Demand-driven residency as pure decisions: the autoscaler's count, the demand figures'
shape, demand-aware placement (swap out the coldest), tiers and the scale subresource."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from vram_operator.api import GPU, Assignment, Backend, ModelState, Priority, ResidentModel
from vram_operator.api.crd import custom_resource_definitions
from vram_operator.api.demand import DEMAND_SCHEMA, ModelDemand, combine, snapshot
from vram_operator.api.modeldeployment import Autoscaling, SpecError, parse_spec
from vram_operator.operator.autoscaling import ScaleState, next_scale, recommend
from vram_operator.operator.folding import Scale, events_between, fold_status
from vram_operator.operator.placement import (
    NodeView,
    PlacementConfig,
    PlacementRequest,
    place,
)

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
GI = 2**30


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def figures(in_flight: int = 0, waiting: int = 0, last: float | None = None) -> ModelDemand:
    return ModelDemand(
        "ns",
        "m",
        "ollama",
        "m:1b",
        in_flight=in_flight,
        waiting=waiting,
        last_request=None if last is None else at(last),
    )


# ---- the autoscaler --------------------------------------------------------------------------


POLICY = Autoscaling(min_replicas=0, max_replicas=3, target_in_flight=2, scale_down_delay="60s")


def run(policy: Autoscaling, polls: list[tuple[float, ModelDemand | None]]) -> list[int]:
    state = ScaleState.initial(policy, T0)
    counts = []
    for seconds, demand in polls:
        state = next_scale(policy, state, demand, demand is not None, at(seconds))
        counts.append(state.desired)
    return counts


def test_a_new_model_loads_once_then_scales_to_zero_after_the_delay_without_requests() -> None:
    assert ScaleState.initial(POLICY, T0).desired == 1
    counts = run(POLICY, [(10, figures()), (59, figures()), (61, figures())])
    assert counts == [1, 1, 0]


def test_a_held_request_brings_it_back_from_zero_at_once() -> None:
    state = ScaleState.initial(POLICY, T0, previous=0)
    assert state.desired == 0
    state = next_scale(POLICY, state, figures(), True, at(5))
    assert state.desired == 0
    state = next_scale(POLICY, state, figures(waiting=1, last=6), True, at(7))
    assert (state.desired, state.changed_at) == (1, at(7))


def test_requests_too_short_to_be_seen_in_flight_keep_one_replica() -> None:
    state = ScaleState.initial(POLICY, T0, previous=1)
    for second in range(10, 300, 10):
        state = next_scale(POLICY, state, figures(last=second - 5), True, at(second))
        assert state.desired == 1
    state = next_scale(POLICY, state, figures(last=295), True, at(356))
    assert state.desired == 0
    assert "scaled to zero after 60s" in state.why


def test_up_at_once_and_down_only_after_the_stabilization_window() -> None:
    counts = run(
        POLICY,
        [
            (1, figures(in_flight=5, last=1)),  # ceil(5/2) = 3
            (2, figures(in_flight=9, last=2)),  # capped at maxReplicas
            (30, figures(in_flight=1, last=30)),  # 1, but 3 within the window
            (62, figures(in_flight=1, last=62)),  # window slid past the peak
        ],
    )
    assert counts == [3, 3, 3, 1]


def test_unknown_demand_never_scales_down() -> None:
    state = ScaleState.initial(POLICY, T0, previous=2)
    for second in (100, 200, 300):
        state = next_scale(POLICY, state, None, False, at(second))
    assert state.desired == 2


def test_bounds_are_kept_and_checked() -> None:
    floor = Autoscaling(min_replicas=2, max_replicas=4)
    assert recommend(floor, None) == 2
    assert recommend(floor, figures(in_flight=100)) == 4
    with pytest.raises(SpecError, match="minReplicas"):
        parse_spec(
            {
                "model": "m:1b",
                "backend": "ollama",
                "autoscaling": {"minReplicas": 3, "maxReplicas": 2},
            }
        )
    spec = parse_spec({"model": "m:1b", "backend": "ollama", "autoscaling": {"minReplicas": 0}})
    assert spec.autoscaling is not None
    assert (spec.autoscaling.max_replicas, spec.autoscaling.scale_down_delay_seconds) == (1, 300)


# ---- the demand figures ----------------------------------------------------------------------


def test_replicas_figures_are_summed_and_the_latest_time_kept() -> None:
    one = figures(in_flight=1, waiting=2, last=5)
    two = figures(in_flight=3, last=9)
    merged = combine(
        [
            snapshot("gw-0", at(10), [one]),
            snapshot("gw-1", at(10), [two]),
            {"schema": "other/v9", "models": [figures(in_flight=50).to_json()]},
            {"schema": DEMAND_SCHEMA, "models": [{"namespace": "ns"}, {"inFlight": -1}]},
        ]
    )
    assert list(merged) == ["ns.m"]
    entry = merged["ns.m"]
    assert (entry.in_flight, entry.waiting, entry.busy, entry.last_request) == (4, 2, 6, at(9))
    assert ModelDemand.from_json(one.to_json()) == one


# ---- demand-aware placement ------------------------------------------------------------------


def gpu(total: int = 24 * GI) -> GPU:
    return GPU(
        index=0, uuid="GPU-0", name="Simulated", total_bytes=total, used_bytes=0, free_bytes=total
    )


def view(holds: dict[str, Priority]) -> NodeView:
    assignments = {
        key: Assignment(
            namespace="ns",
            name=key.partition(".")[2],
            model=f"{key}:1b",
            backend=Backend.OLLAMA,
            priority=priority,
            gpu_uuid="GPU-0",
            vram_bytes=10 * GI,
        )
        for key, priority in holds.items()
    }
    resident = tuple(
        ResidentModel(
            key=key,
            model=f"{key}:1b",
            backend=Backend.OLLAMA,
            gpu_uuid="GPU-0",
            state=ModelState.LOADED,
        )
        for key in holds
    )
    return NodeView(
        name="n1", heartbeat=T0, gpus=(gpu(),), assignments=assignments, resident=resident
    )


def wanted(key: str, demanded: bool = True, priority: Priority = Priority.NORMAL) -> Any:
    return PlacementRequest(key=key, vram_bytes=10 * GI, priority=priority, demanded=demanded)


CONFIG = PlacementConfig(min_residency_seconds=30)


def test_a_request_swaps_out_the_coldest_model_of_its_priority() -> None:
    node = view({"ns.a": Priority.NORMAL, "ns.b": Priority.NORMAL})
    recency = {"ns.a": T0 - dt.timedelta(seconds=50), "ns.b": T0 - dt.timedelta(seconds=40)}
    decision = place(wanted("ns.c"), [node], CONFIG, T0, recency=recency)
    assert [v.key for v in decision.preempted] == ["ns.a"]
    assert decision.reason is None
    recency = {"ns.a": T0 - dt.timedelta(seconds=35), "ns.b": T0 - dt.timedelta(seconds=40)}
    decision = place(wanted("ns.c"), [node], CONFIG, T0, recency=recency)
    assert [v.key for v in decision.preempted] == ["ns.b"]


def test_without_demand_equal_priorities_wait() -> None:
    node = view({"ns.a": Priority.NORMAL, "ns.b": Priority.NORMAL})
    decision = place(wanted("ns.c", demanded=False), [node], CONFIG, T0, recency={})
    assert decision.preempted == ()
    assert decision.reason is not None


def test_nothing_used_within_the_minimum_residency_is_swapped_out() -> None:
    node = view({"ns.a": Priority.NORMAL, "ns.b": Priority.NORMAL})
    recency = {"ns.a": T0 - dt.timedelta(seconds=10), "ns.b": T0 - dt.timedelta(seconds=29)}
    decision = place(wanted("ns.c"), [node], CONFIG, T0, recency=recency)
    assert decision.preempted == ()
    assert decision.reason is not None


def test_a_critical_or_higher_priority_model_is_never_swapped_out_for_demand() -> None:
    node = view({"ns.crit": Priority.CRITICAL, "ns.hi": Priority.HIGH})
    decision = place(wanted("ns.c"), [node], CONFIG, T0, recency={})
    assert decision.preempted == ()
    node = view({"ns.crit": Priority.CRITICAL, "ns.low": Priority.LOW})
    decision = place(wanted("ns.c"), [node], CONFIG, T0, recency={})
    assert [v.key for v in decision.preempted] == ["ns.low"]


def test_lower_priority_goes_before_a_colder_equal_one() -> None:
    node = view({"ns.low": Priority.LOW, "ns.b": Priority.NORMAL})
    recency = {"ns.low": T0 - dt.timedelta(seconds=31), "ns.b": T0 - dt.timedelta(seconds=900)}
    decision = place(wanted("ns.c"), [node], CONFIG, T0, recency=recency)
    assert [v.key for v in decision.preempted] == ["ns.low"]


def test_waiting_requests_leave_a_high_model_its_preemption() -> None:
    # ns.low was used a moment ago (not settled) and ns.hi2 is settled: a high request, waited
    # for or not, may displace the low one; only waited for, the settled high one as well.
    node = view({"ns.low": Priority.LOW, "ns.hi2": Priority.HIGH})
    recency = {"ns.low": T0 - dt.timedelta(seconds=1), "ns.hi2": T0 - dt.timedelta(seconds=900)}
    for demanded in (False, True):
        decision = place(
            wanted("ns.c", demanded=demanded, priority=Priority.HIGH),
            [node],
            CONFIG,
            T0,
            recency=recency,
        )
        assert [v.key for v in decision.preempted] == ["ns.low"]
    node = view({"ns.hi2": Priority.HIGH, "ns.hi3": Priority.HIGH})
    decision = place(
        wanted("ns.c", priority=Priority.HIGH), [node], CONFIG, T0, recency={"ns.hi3": T0}
    )
    assert [v.key for v in decision.preempted] == ["ns.hi2"]


# ---- status: scale, tiers, events ------------------------------------------------------------


def assignment(key: str = "ns.m") -> Assignment:
    return Assignment(namespace="ns", name="m", model="m:1b", backend=Backend.OLLAMA)


def report(state: ModelState) -> ResidentModel:
    return ResidentModel(key="ns.m", model="m:1b", backend=Backend.OLLAMA, state=state)


def status(scale: Scale | None, nodes: dict[str, ModelState], previous: Any = None) -> Any:
    spec = parse_spec({"model": "m:1b", "backend": "ollama", "autoscaling": {"minReplicas": 0}})
    return fold_status(
        spec=spec,
        spec_error=None,
        generation=1,
        assigned_nodes={n: assignment() for n in nodes},
        reports={n: report(s) for n, s in nodes.items()},
        pending_reason=None,
        pending_message=None,
        previous=previous,
        now=T0,
        scale=scale,
        name="m",
    )


def test_status_carries_the_scale_the_selector_and_each_replica_tier() -> None:
    one = status(Scale(2, "busy", at(3)), {"n1": ModelState.LOADED, "n2": ModelState.SLEEPING})
    assert (one.replicas, one.desired_replicas, one.ready) == (2, 2, "1/2")
    assert one.selector == "vram.dev/model-deployment=m"
    assert one.last_scale_time == at(3)
    assert [p.tier for p in one.placements] == ["GPU", "HostRAM"]
    assert one.tiers == "GPU,HostRAM"
    zero = status(Scale(0, "no request since then; scaled to zero after 5m"), {}, one)
    ready = next(c for c in zero.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "ScaledToZero")
    assert "scaled to zero after 5m" in ready.message
    assert zero.ready == "0/0"
    scaled = [e for e in events_between(one, zero) if e.reason == "Scaled"]
    assert [e.message.split(":")[0] for e in scaled] == ["scaled down from 2 to 0 replicas"]


def test_the_crd_has_the_scale_subresource_and_a_tier_column() -> None:
    mdep = next(
        c for c in custom_resource_definitions() if c["spec"]["names"]["kind"] == "ModelDeployment"
    )
    version = mdep["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Tier"]["jsonPath"] == ".status.tiers"
    assert columns["Desired"]["priority"] == 1
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["autoscaling"]["properties"]["minReplicas"]["minimum"] == 0


def test_the_gateway_holds_requests_for_an_autoscaled_model_at_zero() -> None:
    from vram_operator.api import ModelDeployment
    from vram_operator.gateway.routing import admit, build_targets

    deployment = ModelDeployment.model_validate(
        {
            "metadata": {"namespace": "ns", "name": "m"},
            "spec": {
                "model": "m:1b",
                "backend": "ollama",
                "replicas": 0,
                "autoscaling": {"minReplicas": 0, "maxReplicas": 2},
            },
        }
    )
    (target,) = build_targets([deployment], [], T0).values()
    assert target.replicas == 2
    assert admit(0, 10, target, 60).wait


def test_a_cold_start_event_says_how_long_it_took() -> None:
    pending = status(None, {"n1": ModelState.LOADING})
    loaded_report = report(ModelState.LOADED).model_copy(update={"load_seconds": 2.04})
    spec = parse_spec({"model": "m:1b", "backend": "ollama"})
    loaded = fold_status(
        spec=spec,
        spec_error=None,
        generation=1,
        assigned_nodes={"n1": assignment()},
        reports={"n1": loaded_report},
        pending_reason=None,
        pending_message=None,
        previous=pending,
        now=T0,
    )
    assert loaded.placements[0].load_seconds == 2.04
    messages = [e.message for e in events_between(pending, loaded) if e.reason == "Loaded"]
    assert messages == ["loaded on n1, a cold start of 2.0s"]
