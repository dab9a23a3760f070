"""Placement: capacity arithmetic, filters, bin-packing and spreading, preemption, the ledger."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import random
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_operator.api import (
    GPU,
    Assignment,
    Backend,
    GPUNode,
    ModelDeploymentSpec,
    ModelState,
    Priority,
    ResidentModel,
)
from vram_operator.api.budget import VLLM_INSTANCE_OVERHEAD_BYTES, footprint_bytes, reserve_bytes
from vram_operator.api.modeldeployment import Toleration
from vram_operator.operator.placement import (
    Choice,
    GPUBudget,
    Hold,
    NodeView,
    PendingReason,
    PlacementConfig,
    PlacementDecision,
    PlacementRequest,
    Reservations,
    Taint,
    Victim,
    place,
    tolerates,
)

pytestmark = pytest.mark.unit

GI = 2**30
NOW = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)
CONFIG = PlacementConfig()
SPREAD = PlacementConfig(strategy="spread")


def gpu(
    uuid: str,
    total: float = 80,
    used: float = 0,
    *,
    index: int = 0,
    temperature: int | None = None,
    parent: str | None = None,
) -> GPU:
    return GPU(
        index=index,
        uuid=uuid,
        name="NVIDIA H100 80GB HBM3",
        total_bytes=int(total * GI),
        used_bytes=int(used * GI),
        free_bytes=int((total - used) * GI),
        temperature_celsius=temperature,
        parent_uuid=parent,
    )


def assignment(
    key: str,
    gpu_uuid: str | None,
    vram: float | None,
    priority: Priority = Priority.NORMAL,
) -> Assignment:
    namespace, name = key.split(".", 1)
    return Assignment(
        namespace=namespace,
        name=name,
        model="llama3.2:1b",
        backend=Backend.OLLAMA,
        priority=priority,
        gpu_uuid=gpu_uuid,
        vram_bytes=None if vram is None else int(vram * GI),
    )


def resident(
    key: str, gpu_uuid: str | None, vram: float, state: ModelState = ModelState.LOADED
) -> ResidentModel:
    return ResidentModel(
        key=key,
        model="llama3.2:1b",
        backend=Backend.OLLAMA,
        gpu_uuid=gpu_uuid,
        state=state,
        vram_bytes=int(vram * GI),
    )


def node(
    name: str,
    *gpus: GPU,
    labels: dict[str, str] | None = None,
    taints: tuple[Taint, ...] = (),
    heartbeat: dt.datetime | None = NOW,
    assignments: tuple[Assignment, ...] = (),
    models: tuple[ResidentModel, ...] = (),
    exists: bool = True,
) -> NodeView:
    return NodeView(
        name=name,
        labels=labels or {},
        taints=taints,
        heartbeat=heartbeat,
        gpus=gpus,
        assignments={f"{a.namespace}.{a.name}": a for a in assignments},
        resident=models,
        exists=exists,
    )


def request(
    vram: float = 6,
    *,
    key: str = "team.chat",
    priority: Priority = Priority.NORMAL,
    replicas: int = 1,
    node_selector: dict[str, str] | None = None,
    tolerations: tuple[Toleration, ...] = (),
    existing: frozenset[str] = frozenset(),
) -> PlacementRequest:
    return PlacementRequest(
        key=key,
        vram_bytes=int(vram * GI),
        priority=priority,
        replicas=replicas,
        node_selector=node_selector or {},
        tolerations=tolerations,
        existing=existing,
    )


def free_of(view: NodeView, uuid: str) -> float:
    budget = next(b for b in view.budgets() if b.gpu.uuid == uuid)
    return budget.free() / GI


# --- the capacity formula ----------------------------------------------------------------------


def test_an_assignment_not_loaded_yet_is_charged_in_full() -> None:
    view = node("a", gpu("g", 80, used=0), assignments=(assignment("ns.m", "g", 30),))
    assert free_of(view, "g") == 50


def test_a_model_measured_above_its_reservation_is_charged_what_it_holds() -> None:
    view = node(
        "a",
        gpu("g", 80, used=40),
        assignments=(assignment("ns.m", "g", 30),),
        models=(resident("ns.m", "g", 40),),
    )
    assert free_of(view, "g") == 40


def test_a_sleeping_model_keeps_its_reservation() -> None:
    view = node(
        "a",
        gpu("g", 80, used=1),
        assignments=(assignment("ns.m", "g", 30),),
        models=(resident("ns.m", "g", 1, ModelState.SLEEPING),),
    )
    assert free_of(view, "g") == 50


def test_memory_no_assignment_explains_is_taken() -> None:
    """Foreign processes, adopted models and models still unloading all occupy the GPU."""
    view = node(
        "a",
        gpu("g", 80, used=10 + 20 + 5),
        assignments=(assignment("ns.m", "g", 20),),
        models=(resident("ns.m", "g", 20), resident("ollama:adopted", "g", 5)),
    )
    assert free_of(view, "g") == 80 - 10 - 5 - 20


def test_an_assignment_without_a_gpu_is_charged_where_the_agent_reports_it() -> None:
    view = node(
        "a",
        gpu("g0", 80, used=10, index=0),
        gpu("g1", 80, used=0, index=1),
        assignments=(assignment("ns.m", None, 10),),
        models=(resident("ns.m", "g0", 10),),
    )
    assert (free_of(view, "g0"), free_of(view, "g1")) == (70, 80)


def test_an_unplaced_assignment_without_a_gpu_is_charged_everywhere() -> None:
    view = node(
        "a",
        gpu("g0", 80, index=0),
        gpu("g1", 80, index=1),
        assignments=(assignment("ns.m", None, 10),),
        models=(resident("ns.m", None, 0, ModelState.LOADING),),
    )
    assert (free_of(view, "g0"), free_of(view, "g1")) == (70, 70)


def test_an_assignment_on_a_vanished_gpu_is_charged_nowhere() -> None:
    view = node("a", gpu("g0", 80), assignments=(assignment("ns.m", "gone", 10),))
    assert free_of(view, "g0") == 80


def test_an_assignment_without_size_is_charged_its_measurement() -> None:
    view = node(
        "a",
        gpu("g", 80, used=7),
        assignments=(assignment("ns.m", "g", None),),
        models=(resident("ns.m", "g", 7),),
    )
    assert free_of(view, "g") == 73


def test_mig_instances_are_placement_units_and_their_parent_is_not() -> None:
    view = node(
        "a",
        gpu("GPU-parent", 80, index=0),
        gpu("MIG-1", 40, index=1, parent="GPU-parent"),
        gpu("MIG-2", 40, index=2, parent="GPU-parent"),
    )
    assert [b.gpu.uuid for b in view.budgets()] == ["MIG-1", "MIG-2"]
    decision = place(request(50), [view], CONFIG, NOW)
    assert decision.chosen == ()
    assert decision.reason is PendingReason.INSUFFICIENT_VRAM


def test_budget_free_ignores_the_model_itself_and_merge_keeps_the_larger_charge() -> None:
    budget = GPUBudget(
        node="a",
        gpu=gpu("g", 80),
        room=80 * GI,
        holds={"ns.x": Hold(10 * GI, Priority.LOW), "ns.y": Hold(20 * GI, Priority.HIGH)},
    )
    assert budget.free(excluding="ns.x") == 60 * GI
    merged = budget.merged(
        {"ns.x": Hold(15 * GI, Priority.CRITICAL), "ns.z": Hold(GI, Priority.LOW)}
    )
    assert merged.holds["ns.x"] == Hold(15 * GI, Priority.LOW)
    assert merged.holds["ns.z"] == Hold(GI, Priority.LOW)
    assert merged.holds["ns.y"] == budget.holds["ns.y"]


# --- filters and messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        (Toleration(key="gpu", operator="Equal", value="x"), Taint("gpu", "x", "NoSchedule"), True),
        (
            Toleration(key="gpu", operator="Equal", value="y"),
            Taint("gpu", "x", "NoSchedule"),
            False,
        ),
        (Toleration(key="gpu", operator="Exists"), Taint("gpu", "x", "NoExecute"), True),
        (Toleration(key="gpu", operator="Exists"), Taint("other", "x", "NoSchedule"), False),
        (Toleration(operator="Exists"), Taint("anything", None, "NoSchedule"), True),
        (
            Toleration(key="gpu", operator="Exists", effect="NoSchedule"),
            Taint("gpu", None, "NoExecute"),
            False,
        ),
        (Toleration(key="gpu", operator="Equal"), Taint("gpu", None, "NoSchedule"), True),
    ],
)
def test_toleration_matching_follows_kubernetes(
    toleration: Toleration, taint: Taint, expected: bool
) -> None:
    assert tolerates(toleration, taint) is expected


def test_the_message_counts_every_reason_like_the_kube_scheduler() -> None:
    gpu_pool = {"pool": "gpu"}
    nodes = [
        node("a", gpu("ga", 80), labels={"pool": "cpu"}),
        node("b", gpu("gb", 80), labels=gpu_pool, heartbeat=NOW - dt.timedelta(seconds=61)),
        node("c", gpu("gc", 8, used=3.8), labels=gpu_pool),
        node("d", gpu("gd", 80, temperature=86), labels=gpu_pool),
        node(
            "e",
            gpu("ge", 80),
            labels=gpu_pool,
            taints=(Taint("dedicated", "infra", "NoSchedule"),),
        ),
        node("f", gpu("gf", 80), labels=gpu_pool, exists=False),
        node("g", labels=gpu_pool),
        node("h", gpu("gh", 80), labels=gpu_pool, heartbeat=None),
    ]
    decision = place(request(6, node_selector=gpu_pool), nodes, CONFIG, NOW)
    assert decision.chosen == ()
    assert decision.reason is PendingReason.INSUFFICIENT_VRAM
    assert decision.message == (
        "0/8 nodes can hold 6Gi: "
        "2 node(s) had no agent heartbeat in the last 60s, "
        "1 node(s) didn't match nodeSelector, "
        "1 node(s) had no GPUs, "
        "1 node(s) had no Node object, "
        "1 node(s) had untolerated taint {dedicated: infra}, "
        "1 GPU(s) were above 85°C, "
        "1 GPU(s) had less than 6Gi free (largest free 4.2Gi)"
    )


def test_no_node_passing_the_filters_means_no_matching_nodes() -> None:
    nodes = [node("a", gpu("ga", 80), labels={"pool": "cpu"}), node("b", gpu("gb", 80))]
    decision = place(request(6, node_selector={"pool": "gpu"}), nodes, CONFIG, NOW)
    assert decision.reason is PendingReason.NO_MATCHING_NODES
    assert decision.message == "0/2 nodes can hold 6Gi: 2 node(s) didn't match nodeSelector"


def test_no_gpunodes_at_all_points_at_the_agent() -> None:
    decision = place(request(), [], CONFIG, NOW)
    assert decision.reason is PendingReason.NO_MATCHING_NODES
    assert "no GPUNode has been reported" in decision.message


def test_hot_gpus_alone_mean_no_matching_nodes() -> None:
    decision = place(request(), [node("a", gpu("g", 80, temperature=90))], CONFIG, NOW)
    assert decision.reason is PendingReason.NO_MATCHING_NODES
    assert decision.message == "0/1 nodes can hold 6Gi: 1 GPU(s) were above 85°C"


@pytest.mark.parametrize(
    ("taint", "tolerations", "placed"),
    [
        (Taint("gpu", "x", "NoSchedule"), (), False),
        (Taint("gpu", "x", "NoExecute"), (), False),
        (Taint("gpu", "x", "PreferNoSchedule"), (), True),
        (Taint("gpu", "x", "NoSchedule"), (Toleration(key="gpu", operator="Exists"),), True),
    ],
)
def test_taints_keep_models_off_unless_tolerated(
    taint: Taint, tolerations: tuple[Toleration, ...], placed: bool
) -> None:
    view = node("a", gpu("g", 80), taints=(taint,))
    decision = place(request(tolerations=tolerations), [view], CONFIG, NOW)
    assert bool(decision.chosen) is placed


def test_a_heartbeat_within_the_grace_period_counts_as_alive() -> None:
    view = node("a", gpu("g", 80), heartbeat=NOW - dt.timedelta(seconds=60))
    assert place(request(), [view], CONFIG, NOW).chosen == (Choice("a", "g"),)


# --- strategies --------------------------------------------------------------------------------


def _three_gpus() -> list[NodeView]:
    return [
        node("a", gpu("empty", 80)),
        node("b", gpu("half", 80, used=40)),
        node("c", gpu("nearly", 80, used=70)),
    ]


def test_binpack_fills_the_fullest_gpu_that_fits() -> None:
    assert place(request(6), _three_gpus(), CONFIG, NOW).chosen == (Choice("c", "nearly"),)
    assert place(request(20), _three_gpus(), CONFIG, NOW).chosen == (Choice("b", "half"),)


def test_spread_takes_the_emptiest_gpu() -> None:
    assert place(request(6), _three_gpus(), SPREAD, NOW).chosen == (Choice("a", "empty"),)


def test_binpack_keeps_whole_gpus_free_within_a_node() -> None:
    view = node("a", gpu("g0", 80, index=0), gpu("g1", 80, used=30, index=1))
    assert place(request(10), [view], CONFIG, NOW).chosen == (Choice("a", "g1"),)


def test_replicas_land_on_distinct_nodes_even_when_one_node_has_room_for_all() -> None:
    nodes = [node("a", gpu("a0", 80, index=0), gpu("a1", 80, index=1)), node("b", gpu("b0", 80))]
    decision = place(request(6, replicas=3), nodes, CONFIG, NOW)
    assert [c.node for c in decision.chosen] == ["a", "b"]
    assert decision.reason is PendingReason.NO_MATCHING_NODES
    assert decision.message == (
        "2/3 replicas placed; 0/2 nodes can hold 6Gi: 2 node(s) already held a replica"
    )


def test_success_message_says_where() -> None:
    decision = place(request(6), [node("a", gpu("g", 80))], CONFIG, NOW)
    assert decision.reason is None
    assert decision.message == "placed on a (g)"


# --- existing replicas, scale up and down ------------------------------------------------------


def test_existing_replicas_stay_put_even_when_labels_or_heartbeat_changed() -> None:
    nodes = [
        node("a", gpu("ga", 80), labels={"pool": "old"}, heartbeat=None),
        node("b", gpu("gb", 80), labels={"pool": "gpu"}),
    ]
    req = request(6, replicas=2, node_selector={"pool": "gpu"}, existing=frozenset({"a"}))
    decision = place(req, nodes, CONFIG, NOW)
    assert decision.keep == ("a",)
    assert decision.chosen == (Choice("b", "gb"),)
    assert decision.remove == ()
    assert decision.message == "placed on b (gb); kept on a"


def test_replicas_on_lost_nodes_are_withdrawn_and_replaced() -> None:
    nodes = [
        node("deleted", gpu("g1", 80), exists=False),
        node(
            "drained",
            gpu("g2", 80),
            taints=(Taint("node.kubernetes.io/unreachable", None, "NoExecute"),),
        ),
        node("fresh", gpu("g3", 80)),
    ]
    req = request(6, replicas=1, existing=frozenset({"deleted", "drained", "vanished"}))
    decision = place(req, nodes, CONFIG, NOW)
    assert decision.keep == ()
    assert decision.remove == ("deleted", "drained", "vanished")
    assert decision.chosen == (Choice("fresh", "g3"),)
    assert "withdrawing from lost node(s) deleted, drained, vanished" in decision.message


def test_a_tolerated_noexecute_taint_keeps_the_replica() -> None:
    view = node("a", gpu("g", 80), taints=(Taint("gpu", "x", "NoExecute"),))
    req = request(
        existing=frozenset({"a"}), tolerations=(Toleration(key="gpu", operator="Exists"),)
    )
    assert place(req, [view], CONFIG, NOW).keep == ("a",)


def test_scale_down_drops_unloaded_replicas_then_the_fullest_nodes() -> None:
    key = "team.chat"
    nodes = [
        node("loaded-roomy", gpu("g1", 80), models=(resident(key, "g1", 6),)),
        node("loaded-full", gpu("g2", 80, used=70), models=(resident(key, "g2", 6),)),
        node("loading", gpu("g3", 80), models=(resident(key, "g3", 2, ModelState.LOADING),)),
        node("sleeping", gpu("g4", 80), models=(resident(key, "g4", 1, ModelState.SLEEPING),)),
        node("failed", gpu("g5", 80), models=(resident(key, "g5", 0, ModelState.FAILED),)),
        node("unreported", gpu("g6", 80)),
    ]
    existing = frozenset(v.name for v in nodes)
    dropped: list[str] = []
    for replicas in range(5, -1, -1):
        decision = place(request(6, replicas=replicas, existing=existing), nodes, CONFIG, NOW)
        assert len(decision.keep) == replicas
        assert set(decision.keep) | set(decision.remove) == existing
        assert decision.message.startswith("scaled down: withdrawing from ")
        (newly,) = set(decision.remove) - set(dropped)
        dropped.append(newly)
    assert dropped == ["failed", "unreported", "loading", "sleeping", "loaded-full", "loaded-roomy"]


def test_zero_replicas_and_nothing_placed_is_a_quiet_success() -> None:
    decision = place(request(replicas=0), [node("a", gpu("g", 80))], CONFIG, NOW)
    assert decision == PlacementDecision(message="no replicas requested")


# --- preemption --------------------------------------------------------------------------------


def _crowded(*holders: tuple[str, float, Priority]) -> NodeView:
    return node(
        "a", gpu("g", 40), assignments=tuple(assignment(k, "g", v, p) for k, v, p in holders)
    )


def test_a_high_priority_model_displaces_the_fewest_lowest_priority_models() -> None:
    view = _crowded(
        ("ns.low-small", 4, Priority.LOW),
        ("ns.low-big", 12, Priority.LOW),
        ("ns.normal", 20, Priority.NORMAL),
    )
    decision = place(request(10, priority=Priority.HIGH), [view], CONFIG, NOW)
    assert decision.chosen == (Choice("a", "g"),)
    assert decision.preempted == (Victim("a", "ns.low-big"),)
    assert decision.reason is None
    # The placer is in another namespace: the message must not name the victim.
    assert "displacing a model of another namespace on a" in decision.message
    assert "low-big" not in decision.message
    same = place(request(10, key="ns.chat", priority=Priority.HIGH), [view], CONFIG, NOW)
    assert "displacing low-big on a" in same.message


def test_victims_that_turn_out_unneeded_are_spared() -> None:
    # Lowest priority first takes low-small, then normal-big; normal-big alone makes room, so
    # low-small is spared.
    view = _crowded(
        ("ns.low-small", 2, Priority.LOW),
        ("ns.normal-big", 30, Priority.NORMAL),
        ("ns.high", 8, Priority.HIGH),
    )
    decision = place(request(30, priority=Priority.CRITICAL), [view], CONFIG, NOW)
    assert decision.preempted == (Victim("a", "ns.normal-big"),)


def test_normal_priority_never_displaces() -> None:
    view = _crowded(("ns.low", 40, Priority.LOW))
    decision = place(request(10), [view], CONFIG, NOW)
    assert decision.chosen == ()
    assert decision.reason is PendingReason.INSUFFICIENT_VRAM
    assert (
        decision.message
        == "0/1 nodes can hold 10Gi: 1 GPU(s) had less than 10Gi free (largest free 0)"
    )


def test_preemption_can_be_switched_off() -> None:
    view = _crowded(("ns.low", 40, Priority.LOW))
    config = PlacementConfig(allow_preemption=False)
    assert place(request(10, priority=Priority.HIGH), [view], config, NOW).chosen == ()


def test_critical_and_equal_priority_models_are_never_displaced() -> None:
    view = _crowded(("ns.critical", 20, Priority.CRITICAL), ("ns.peer", 20, Priority.CRITICAL))
    decision = place(request(10, priority=Priority.CRITICAL), [view], CONFIG, NOW)
    assert decision.chosen == ()
    assert decision.preempted == ()
    high = _crowded(("ns.peer", 40, Priority.HIGH))
    assert place(request(10, priority=Priority.HIGH), [high], CONFIG, NOW).preempted == ()


def test_the_message_says_when_even_displacing_would_not_do() -> None:
    view = _crowded(("ns.low", 8, Priority.LOW), ("ns.critical", 30, Priority.CRITICAL))
    decision = place(request(20, priority=Priority.HIGH), [view], CONFIG, NOW)
    assert decision.reason is PendingReason.INSUFFICIENT_VRAM
    assert decision.message == (
        "0/1 nodes can hold 20Gi: 1 GPU(s) had less than 20Gi free "
        "(largest free 2Gi, 10Gi counting lower-priority models)"
    )


def test_a_free_gpu_beats_displacing_anything() -> None:
    nodes = [_crowded(("ns.low", 40, Priority.LOW)), node("b", gpu("gb", 80, used=75))]
    decision = place(request(4, priority=Priority.CRITICAL), nodes, CONFIG, NOW)
    assert (decision.chosen, decision.preempted) == ((Choice("b", "gb"),), ())


def test_displacing_low_priority_is_preferred_over_normal() -> None:
    nodes = [
        node("a", gpu("ga", 40), assignments=(assignment("ns.normal", "ga", 40, Priority.NORMAL),)),
        node(
            "b",
            gpu("gb", 40),
            assignments=(
                assignment("ns.low1", "gb", 20, Priority.LOW),
                assignment("ns.low2", "gb", 20, Priority.LOW),
            ),
        ),
    ]
    decision = place(request(30, priority=Priority.HIGH), nodes, CONFIG, NOW)
    assert decision.chosen == (Choice("b", "gb"),)
    assert set(decision.preempted) == {Victim("b", "ns.low1"), Victim("b", "ns.low2")}


# --- constructors ------------------------------------------------------------------------------


def test_node_view_from_the_kubernetes_objects() -> None:
    gpunode = GPUNode.model_validate(
        {
            "metadata": {"name": "worker-1"},
            "spec": {
                "assignments": {
                    "ns.m": {"namespace": "ns", "name": "m", "model": "x:1", "backend": "ollama"}
                }
            },
            "status": {
                "lastHeartbeatTime": "2025-01-01T11:59:50Z",
                "gpus": [
                    {
                        "index": 0,
                        "uuid": "GPU-1",
                        "name": "L4",
                        "totalBytes": 24 * GI,
                        "usedBytes": 0,
                        "freeBytes": 24 * GI,
                    }
                ],
                "models": [
                    {"key": "ns.m", "model": "x:1", "backend": "ollama", "state": "Loading"}
                ],
            },
        }
    )
    taints = [{"key": "gpu", "value": "shared", "effect": "NoSchedule", "timeAdded": None}]
    view = NodeView.from_objects(gpunode, {"zone": "a"}, taints)
    assert view.name == "worker-1"
    assert view.labels == {"zone": "a"}
    assert view.taints == (Taint("gpu", "shared", "NoSchedule"),)
    assert view.heartbeat == dt.datetime(2025, 1, 1, 11, 59, 50, tzinfo=dt.UTC)
    assert [g.uuid for g in view.gpus] == ["GPU-1"]
    assert set(view.assignments) == {"ns.m"}
    assert view.state_of("ns.m") is ModelState.LOADING
    assert view.state_of("ns.other") is None
    assert view.exists


def test_node_view_without_status_or_node_object() -> None:
    view = NodeView.from_objects(GPUNode.model_validate({"metadata": {"name": "w"}}), None)
    assert (view.exists, view.gpus, view.heartbeat, view.resident) == (False, (), None, ())
    assert "had no Node object" in place(request(), [view], CONFIG, NOW).message


def test_node_view_needs_a_name() -> None:
    with pytest.raises(ValueError, match=r"metadata\.name"):
        NodeView.from_objects(GPUNode(), {})


def test_request_from_a_spec() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": "llama3.2:1b",
            "backend": "ollama",
            "priority": "high",
            "replicas": 2,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
        }
    )
    req = PlacementRequest.from_spec("ns.m", spec, vram_bytes=GI, existing=["a"])
    assert req == PlacementRequest(
        key="ns.m",
        vram_bytes=GI,
        priority=Priority.HIGH,
        replicas=2,
        node_selector={"pool": "gpu"},
        tolerations=(Toleration(key="gpu", operator="Exists"),),
        existing=frozenset({"a"}),
    )


@pytest.mark.parametrize(("vram", "replicas"), [(0, 1), (-1, 1), (GI, -1)])
def test_request_refuses_impossible_sizes(vram: int, replicas: int) -> None:
    with pytest.raises(ValueError, match="must"):
        PlacementRequest(key="ns.m", vram_bytes=vram, replicas=replicas)


# --- the reservation ledger --------------------------------------------------------------------


def test_rebuild_takes_the_assignments_from_the_gpunodes() -> None:
    reservations = Reservations()
    reservations.rebuild([_crowded(("ns.low", 10, Priority.LOW)), node("b", gpu("gb", 80))])
    assert reservations.snapshot() == {"g": {"ns.low": Hold(10 * GI, Priority.LOW)}, "gb": {}}


def test_try_reserve_checks_the_ledger_and_resizes_in_place() -> None:
    reservations = Reservations()
    (budget,) = node("a", gpu("g", 40)).budgets()
    assert reservations.try_reserve(budget, "ns.a", 30 * GI, Priority.NORMAL)
    assert not reservations.try_reserve(budget, "ns.b", 20 * GI, Priority.NORMAL)
    assert reservations.try_reserve(budget, "ns.a", 40 * GI, Priority.NORMAL)
    assert not reservations.try_reserve(budget, "ns.b", 1, Priority.NORMAL)
    assert reservations.snapshot() == {"g": {"ns.a": Hold(40 * GI, Priority.NORMAL)}}


def test_a_view_works_out_its_budgets_once_and_a_replaced_copy_again() -> None:
    view = node("a", gpu("g", 40), assignments=(assignment("ns.m", "g", 10),))
    assert view.budgets() is view.budgets()
    (budget,) = view.budgets()
    assert budget.free() == budget.room - 10 * GI
    (emptied,) = dataclasses.replace(view, assignments={}).budgets()
    assert emptied.free() == emptied.room


def test_try_reserve_counts_what_the_gpunode_shows_beyond_the_ledger() -> None:
    view = node(
        "a",
        gpu("g", 40, used=30),
        assignments=(assignment("ns.m", "g", 10),),
        models=(resident("ns.m", "g", 30),),
    )
    (budget,) = view.budgets()
    assert not Reservations().try_reserve(budget, "ns.b", 20 * GI, Priority.NORMAL)


def test_release_on_one_node_or_everywhere() -> None:
    reservations = Reservations()
    (on_a,) = node("a", gpu("ga", 80)).budgets()
    (on_b,) = node("b", gpu("gb", 80)).budgets()
    for budget in (on_a, on_b):
        assert reservations.try_reserve(budget, "ns.m", GI, Priority.NORMAL)
    reservations.release("ns.m", "a")
    assert reservations.snapshot() == {"ga": {}, "gb": {"ns.m": Hold(GI, Priority.NORMAL)}}
    reservations.release("ns.m")
    assert reservations.snapshot() == {"ga": {}, "gb": {}}


def test_concurrent_placements_see_each_other_before_the_watch_does() -> None:
    nodes = [node("a", gpu("g", 40))]
    reservations = Reservations()
    reservations.rebuild(nodes)
    first = reservations.place_and_reserve(request(30, key="ns.one"), nodes, CONFIG, NOW)
    second = reservations.place_and_reserve(request(30, key="ns.two"), nodes, CONFIG, NOW)
    assert first.chosen == (Choice("a", "g"),)
    assert second.chosen == ()
    assert (
        second.message
        == "0/1 nodes can hold 30Gi: 1 GPU(s) had less than 30Gi free (largest free 10Gi)"
    )


def test_place_and_reserve_releases_victims_and_withdrawn_replicas() -> None:
    nodes = [_crowded(("ns.low", 40, Priority.LOW)), node("old", gpu("go", 80), exists=False)]
    reservations = Reservations()
    reservations.rebuild(nodes)
    assert reservations.try_reserve(nodes[1].budgets()[0], "team.chat", 10 * GI, Priority.HIGH)
    req = request(10, priority=Priority.HIGH, existing=frozenset({"old"}))
    decision = reservations.place_and_reserve(req, nodes, CONFIG, NOW)
    assert decision.preempted == (Victim("a", "ns.low"),)
    assert decision.remove == ("old",)
    assert reservations.snapshot() == {"g": {"team.chat": Hold(10 * GI, Priority.HIGH)}, "go": {}}


@pytest.fixture
def busy_threads() -> Iterator[None]:
    """Switch threads far more often than usual, so races would show."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.usefixtures("busy_threads")
def test_threads_hammering_the_ledger_never_overcommit() -> None:
    reservations = Reservations()
    (budget,) = node("a", gpu("g", 1)).budgets()  # 1 GiB, in bytes
    barrier = threading.Barrier(8)
    peaks: list[int] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for round_ in range(300):
            key = f"ns.m{rng.randrange(24)}"
            if rng.random() < 0.3:
                reservations.release(key)
            else:
                reservations.try_reserve(budget, key, rng.randrange(1, GI // 4), Priority.NORMAL)
            if round_ % 10 == 0:
                held = reservations.snapshot().get("g", {})
                peaks.append(sum(h.vram_bytes for h in held.values()))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = sum(h.vram_bytes for h in reservations.snapshot().get("g", {}).values())
    assert peaks
    assert max([*peaks, final]) <= budget.room


@pytest.mark.usefixtures("busy_threads")
def test_threads_placing_at_once_never_overcommit() -> None:
    nodes = [node(f"n{i}", gpu(f"g{i}", 24, used=i)) for i in range(4)]
    reservations = Reservations()
    reservations.rebuild(nodes)
    barrier = threading.Barrier(6)
    placed: list[Choice] = []

    def worker(worker_id: int) -> None:
        barrier.wait()
        for n in range(15):
            req = request(1 + (worker_id + n) % 5, key=f"ns.w{worker_id}-{n}")
            placed.extend(reservations.place_and_reserve(req, nodes, CONFIG, NOW).chosen)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rooms = {b.gpu.uuid: b.room for v in nodes for b in v.budgets()}
    snapshot = reservations.snapshot()
    assert placed
    assert sum(len(holds) for holds in snapshot.values()) == len(placed)
    for uuid, holds in snapshot.items():
        assert sum(h.vram_bytes for h in holds.values()) <= rooms[uuid]


# --- properties --------------------------------------------------------------------------------

# Strategies are built once: building them inside the composites costs more than drawing.
PRIORITIES = st.sampled_from(list(Priority))
HEARTBEAT_AGES = st.sampled_from([0, 0, 5, 30, 60, 61, 600, None])
FEW = st.integers(0, 3)
GPU_COUNTS = st.sampled_from([0, 1, 1, 2, 3])
GPU_SIZES = st.sampled_from([8, 16, 24, 40, 80])
FOREIGN = st.integers(0, 4)
RESERVED = st.integers(1, 20)
MEASURED = st.none() | st.integers(0, 24)
TEMPERATURES = st.sampled_from([None, 40, 85, 86, 95])
ZONES = st.sampled_from(["a", "b"])
SELECTORS = st.sampled_from([{}, {}, {"zone": "a"}])
SIZES = st.integers(1, 40)
REPLICAS = st.integers(0, 4)
NODE_COUNTS = st.integers(0, 6)
BATCH_SIZES = st.integers(1, 8)
FLAGS = st.booleans()
RARELY = st.sampled_from([True, False, False, False, False])


@st.composite
def gpu_nodes(draw: st.DrawFn, name: str) -> NodeView:
    """A node whose assignments fit its GPUs, with random labels, taints and heartbeat."""
    gpus: list[GPU] = []
    assignments: list[Assignment] = []
    models: list[ResidentModel] = []
    for index in range(draw(GPU_COUNTS)):
        uuid = f"{name}-gpu{index}"
        total = draw(GPU_SIZES)
        foreign = draw(FOREIGN)
        room = total - foreign
        used = foreign
        for number in range(draw(FEW)):
            reserved = draw(RESERVED)
            measured = draw(MEASURED)
            charge = max(reserved, measured or 0)
            if charge > room:
                continue
            room -= charge
            key = f"ns.{uuid}-m{number}"
            assignments.append(assignment(key, uuid, reserved, draw(PRIORITIES)))
            if measured is not None:
                models.append(resident(key, uuid, measured))
                used += measured
        gpus.append(gpu(uuid, total, min(used, total), index=index, temperature=draw(TEMPERATURES)))
    age = draw(HEARTBEAT_AGES)
    return node(
        name,
        *gpus,
        labels={"zone": draw(ZONES)},
        taints=(Taint("dedicated", "batch", "NoSchedule"),) if draw(RARELY) else (),
        heartbeat=None if age is None else NOW - dt.timedelta(seconds=age),
        assignments=tuple(assignments),
        models=tuple(models),
        exists=not draw(RARELY),
    )


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeView]:
    return [draw(gpu_nodes(f"n{i}")) for i in range(draw(NODE_COUNTS))]


@st.composite
def requests(draw: st.DrawFn, key: str) -> PlacementRequest:
    return request(
        draw(SIZES),
        key=key,
        priority=draw(PRIORITIES),
        replicas=draw(REPLICAS),
        node_selector=draw(SELECTORS),
        tolerations=(Toleration(key="dedicated", operator="Exists"),) if draw(FLAGS) else (),
    )


@st.composite
def batches(draw: st.DrawFn) -> list[PlacementRequest]:
    return [draw(requests(f"team.m{i}")) for i in range(draw(BATCH_SIZES))]


def _eligible(view: NodeView, req: PlacementRequest, config: PlacementConfig) -> bool:
    fresh = view.heartbeat is not None and (NOW - view.heartbeat).total_seconds() <= 60
    tainted = bool(view.taints) and not req.tolerations
    selected = all(view.labels.get(k) == v for k, v in req.node_selector.items())
    return view.exists and fresh and selected and not tainted


@settings(max_examples=40, deadline=None)
@given(nodes=clusters(), batch=batches(), spread=FLAGS)
def test_sequential_placements_never_overcommit_and_respect_every_rule(
    nodes: list[NodeView], batch: list[PlacementRequest], spread: bool
) -> None:
    config = SPREAD if spread else CONFIG
    views = {v.name: v for v in nodes}
    rooms = {b.gpu.uuid: b.room for v in nodes for b in v.budgets()}
    temperatures = {g.uuid: g.temperature_celsius for v in nodes for g in v.gpus}
    priority_of = {k: a.priority for v in nodes for k, a in v.assignments.items()}
    priority_of.update({r.key: r.priority for r in batch})
    reservations = Reservations()
    reservations.rebuild(nodes)
    for req in batch:
        decision = reservations.place_and_reserve(req, nodes, config, NOW)
        chosen_nodes = [c.node for c in decision.chosen]
        assert len(set(chosen_nodes)) == len(chosen_nodes)
        assert len(chosen_nodes) <= req.replicas
        for choice in decision.chosen:
            view = views[choice.node]
            assert _eligible(view, req, config)
            temperature = temperatures[choice.gpu_uuid]
            assert temperature is None or temperature <= config.max_temperature_celsius
        for victim in decision.preempted:
            assert victim.node in chosen_nodes
            assert priority_of[victim.key] is not Priority.CRITICAL
            assert priority_of[victim.key].rank < req.priority.rank
        if len(chosen_nodes) < req.replicas:
            assert decision.reason in (
                PendingReason.INSUFFICIENT_VRAM,
                PendingReason.NO_MATCHING_NODES,
            )
            assert decision.message.startswith(("0/", f"{len(chosen_nodes)}/"))
        else:
            assert decision.reason is None
        for uuid, holds in reservations.snapshot().items():
            assert sum(h.vram_bytes for h in holds.values()) <= rooms[uuid]


@settings(max_examples=40, deadline=None)
@given(nodes=clusters(), size=SIZES, spread=FLAGS)
def test_the_strategy_picks_the_fullest_or_emptiest_fitting_gpu(
    nodes: list[NodeView], size: int, spread: bool
) -> None:
    config = SPREAD if spread else CONFIG
    req = request(size, tolerations=(Toleration(operator="Exists"),))
    decision = place(req, nodes, config, NOW)
    left = {
        (b.node, b.gpu.uuid): b.free() - req.vram_bytes
        for v in nodes
        if _eligible(v, req, config)
        for b in v.budgets()
        if (b.gpu.temperature_celsius or 0) <= config.max_temperature_celsius
        and b.free() >= req.vram_bytes
    }
    if not left:
        assert decision.chosen == ()
        return
    (choice,) = decision.chosen
    best = max(left.values()) if spread else min(left.values())
    assert left[(choice.node, choice.gpu_uuid)] == best


# --- one budget: the accounting rule the agent loads by ---------------------------------------


def test_a_vllm_replica_is_charged_its_rounded_utilization_and_instance_overhead() -> None:
    """The reproduction of the over-promise: four 576Mi vLLM models and one 79360Mi Ollama model
    on one 80Gi GPU. Charged at 576Mi each they all 'fit'; by the rule the agent loads by (the
    utilization rounded up to 0.1% and the instance overhead), one of them cannot."""
    mib = 2**20
    view = node("a", gpu("g", 80))
    view = NodeView(
        name=view.name,
        heartbeat=NOW,
        gpus=view.gpus,
        reserve_bytes=reserve_bytes(256 * mib),
    )
    reservations = Reservations()
    big = PlacementRequest(key="ns.big", vram_bytes=79360 * mib)
    assert reservations.place_and_reserve(big, [view], CONFIG, NOW).chosen
    small = [
        PlacementRequest(
            key=f"ns.small-{i}", vram_bytes=576 * mib, backend=Backend.VLLM, priority=Priority.LOW
        )
        for i in range(4)
    ]
    decisions = [reservations.place_and_reserve(r, [view], CONFIG, NOW) for r in small]
    charge = footprint_bytes(Backend.VLLM, 576 * mib, 80 * GI)
    assert charge == math.ceil(0.008 * 80 * GI) + VLLM_INSTANCE_OVERHEAD_BYTES
    # 80Gi - 320Mi reserve - 79360Mi leaves 2240Mi: room for one at ~1167Mi, not four at 576Mi.
    assert [bool(d.chosen) for d in decisions] == [True, False, False, False]
    assert all(d.reason is PendingReason.INSUFFICIENT_VRAM for d in decisions[1:])
    held = sum(h.vram_bytes for h in reservations.snapshot()["g"].values())
    assert held <= 80 * GI - reserve_bytes(256 * mib)


def test_budgets_charge_assignments_by_footprint_and_keep_the_reserve() -> None:
    vllm = assignment("ns.v", "g", 10).model_copy(update={"backend": Backend.VLLM})
    view = NodeView(
        name="a",
        heartbeat=NOW,
        gpus=(gpu("g", 80),),
        assignments={"ns.v": vllm},
        reserve_bytes=GI,
    )
    (budget,) = view.budgets()
    assert budget.room == 79 * GI
    assert budget.holds["ns.v"].vram_bytes == footprint_bytes(Backend.VLLM, 10 * GI, 80 * GI)
    assert budget.free() == 79 * GI - footprint_bytes(Backend.VLLM, 10 * GI, 80 * GI)


def test_a_vllm_budget_beyond_what_vllm_may_take_fits_nowhere() -> None:
    req = PlacementRequest(key="ns.v", vram_bytes=79 * GI, backend=Backend.VLLM)
    decision = place(req, [node("a", gpu("g", 80))], CONFIG, NOW)
    assert decision.reason is PendingReason.INSUFFICIENT_VRAM


def test_a_node_that_just_failed_to_load_is_avoided_and_named() -> None:
    nodes = [node("a", gpu("ga", 80)), node("b", gpu("gb", 80))]
    req = PlacementRequest(
        key="ns.m", vram_bytes=GI, avoid={"a": "InsufficientVRAM: 1Gi needed, 0 free"}
    )
    assert place(req, nodes, CONFIG, NOW).chosen == (Choice("b", "gb"),)
    only_a = place(req, nodes[:1], CONFIG, NOW)
    assert only_a.reason is PendingReason.NO_MATCHING_NODES
    assert "could not load it a moment ago (InsufficientVRAM" in only_a.message


def test_a_node_whose_ollama_holds_its_limit_takes_no_more_ollama_models() -> None:
    """One more than OLLAMA_MAX_LOADED_MODELS would make Ollama unload another by itself."""
    held = tuple(assignment(f"ns.m{i}", "g", 1) for i in range(2))
    full = NodeView(
        name="a",
        heartbeat=NOW,
        gpus=(gpu("g", 80),),
        assignments={f"{a.namespace}.{a.name}": a for a in held},
        max_models={Backend.OLLAMA: 2},
    )
    decision = place(request(1), [full], CONFIG, NOW)
    assert decision.reason is PendingReason.NO_MATCHING_NODES
    assert "held the 2 ollama models its server takes at most" in decision.message
    vllm = PlacementRequest(key="ns.v", vram_bytes=GI, backend=Backend.VLLM)
    assert place(vllm, [full], CONFIG, NOW).chosen == (Choice("a", "g"),)
    again = PlacementRequest(key="ns.m0", vram_bytes=GI, existing=frozenset({"a"}))
    assert place(again, [full], CONFIG, NOW).keep == ("a",)
