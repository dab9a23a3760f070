"""Status folding: placements, counts, each condition reason, stable times, and Events on change."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_operator.api import (
    Assignment,
    Backend,
    Condition,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ModelState,
    Placement,
    ResidentModel,
    SpecError,
    parse_spec,
)
from vram_operator.operator.folding import (
    MESSAGE_LIMIT,
    Event,
    events_between,
    fold_deleting,
    fold_status,
)
from vram_operator.operator.placement import PendingReason

pytestmark = pytest.mark.unit

GI = 2**30
T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=5)


def spec(replicas: int = 2, vram: str | None = "6Gi") -> ModelDeploymentSpec:
    body: dict[str, Any] = {"model": "llama3.2:1b", "backend": "ollama", "replicas": replicas}
    if vram is not None:
        body["vram"] = vram
    return parse_spec(body)


def assigned(*nodes: str) -> dict[str, Assignment]:
    return {
        name: Assignment(
            namespace="team",
            name="chat",
            model="llama3.2:1b",
            backend=Backend.OLLAMA,
            gpu_uuid=f"GPU-{name}",
            vram_bytes=6 * GI,
        )
        for name in nodes
    }


def report(
    state: ModelState,
    *,
    vram: int | None = None,
    source: str | None = None,
    progress: int | None = None,
    message: str | None = None,
    gpu_uuid: str | None = None,
) -> ResidentModel:
    return ResidentModel(
        key="team.chat",
        model="llama3.2:1b",
        backend=Backend.OLLAMA,
        gpu_uuid=gpu_uuid,
        state=state,
        vram_bytes=vram,
        vram_source=source,
        progress=progress,
        message=message,
    )


def fold(
    *,
    the_spec: ModelDeploymentSpec | None = None,
    spec_error: SpecError | None = None,
    nodes: tuple[str, ...] = ("a", "b"),
    reports: dict[str, ResidentModel | None] | None = None,
    pending_reason: str | None = None,
    pending_message: str | None = None,
    previous: ModelDeploymentStatus | None = None,
    now: dt.datetime = T0,
    generation: int = 3,
) -> ModelDeploymentStatus:
    return fold_status(
        spec=the_spec if the_spec is not None or spec_error is not None else spec(),
        spec_error=spec_error,
        generation=generation,
        assigned_nodes=assigned(*nodes),
        reports=reports or {},
        pending_reason=pending_reason,
        pending_message=pending_message,
        previous=previous,
        now=now,
    )


def condition(status: ModelDeploymentStatus, kind: str) -> Condition:
    return next(c for c in status.conditions if c.type == kind)


def summary(status: ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


LOADED_A = report(ModelState.LOADED, vram=5 * GI, source="measured", gpu_uuid="GPU-a")
LOADED_B = report(ModelState.LOADED, vram=int(5.5 * GI), source="measured")


def test_all_replicas_loaded_is_ready() -> None:
    status = fold(reports={"a": LOADED_A, "b": LOADED_B})
    assert summary(status) == {
        "Scheduled": ("True", "Scheduled"),
        "Loaded": ("True", "Loaded"),
        "Ready": ("True", "Ready"),
    }
    assert (status.ready_replicas, status.ready, status.observed_generation) == (2, "2/2", 3)
    assert (status.vram, status.vram_bytes, status.vram_source) == (
        "5.5Gi",
        int(5.5 * GI),
        "measured",
    )
    assert condition(status, "Scheduled").message == "2/2 assigned: a, b"
    assert condition(status, "Ready").message == "2/2 replicas loaded"
    assert all(c.observed_generation == 3 for c in status.conditions)
    assert status.placements == [
        Placement(
            node="a", gpu_uuid="GPU-a", state=ModelState.LOADED, vram_bytes=5 * GI, tier="GPU"
        ),
        Placement(
            node="b",
            gpu_uuid="GPU-b",
            state=ModelState.LOADED,
            vram_bytes=int(5.5 * GI),
            tier="GPU",
        ),
    ]


def test_a_replica_the_agent_has_not_reported_is_pending() -> None:
    status = fold(reports={"a": LOADED_A, "b": None})
    assert status.placements[1] == Placement(
        node="b", gpu_uuid="GPU-b", state=ModelState.PENDING, tier="Disk"
    )
    assert summary(status)["Loaded"] == ("False", "Loading")
    assert summary(status)["Ready"] == ("False", "Loading")
    assert condition(status, "Loaded").message == "1/2 replicas loaded; loading on b pending"
    assert status.ready == "1/2"


def test_loading_progress_is_reported() -> None:
    status = fold(reports={"a": report(ModelState.LOADING, progress=40), "b": LOADED_B})
    assert status.placements[0].progress == 40
    assert condition(status, "Ready").message == "1/2 replicas loaded; loading on a 40%"


def test_a_failed_replica_is_a_backend_error_even_when_not_fully_scheduled() -> None:
    failed = report(ModelState.FAILED, message="pull model manifest: file does not exist")
    status = fold(
        the_spec=spec(replicas=3),
        reports={"a": failed, "b": LOADED_B},
        pending_reason=PendingReason.INSUFFICIENT_VRAM,
        pending_message="0/2 nodes can hold 6Gi",
    )
    assert status.placements[0].last_error == "pull model manifest: file does not exist"
    assert summary(status) == {
        "Scheduled": ("False", "InsufficientVRAM"),
        "Loaded": ("False", "BackendError"),
        "Ready": ("False", "BackendError"),
    }
    assert condition(status, "Ready").message == (
        "1/3 replicas loaded; a: pull model manifest: file does not exist"
    )


def test_a_failure_without_a_message_still_says_failed() -> None:
    status = fold(reports={"a": report(ModelState.FAILED), "b": LOADED_B})
    assert condition(status, "Loaded").message == "1/2 replicas loaded; a: failed"


def test_an_evicted_replica_says_why() -> None:
    evicted = report(ModelState.EVICTED, message="made room for team.big (critical)")
    status = fold(reports={"a": evicted, "b": report(ModelState.EVICTED)})
    assert summary(status)["Ready"] == ("False", "Evicted")
    assert condition(status, "Loaded").message == (
        "0/2 replicas loaded; a: made room for team.big (critical); b: evicted"
    )
    assert status.placements[0].last_error is None


def test_a_sleeping_replica_is_not_ready() -> None:
    sleeping = report(ModelState.SLEEPING, vram=GI // 2, source="measured")
    status = fold(reports={"a": sleeping, "b": LOADED_B})
    assert status.ready_replicas == 1
    assert summary(status)["Ready"] == ("False", "Sleeping")
    assert condition(status, "Loaded").message == "1/2 replicas loaded; parked in host RAM on a"


@pytest.mark.parametrize(
    "reason",
    [PendingReason.INSUFFICIENT_VRAM, PendingReason.NO_MATCHING_NODES, PendingReason.PREEMPTED],
)
def test_a_scheduling_problem_outranks_loading(reason: PendingReason) -> None:
    status = fold(
        nodes=("a",),
        reports={"a": report(ModelState.LOADING)},
        pending_reason=reason,
        pending_message="1/2 replicas placed; 0/3 nodes can hold 6Gi more",
    )
    assert summary(status) == {
        "Scheduled": ("False", str(reason)),
        "Loaded": ("False", "Loading"),
        "Ready": ("False", str(reason)),
    }
    assert condition(status, "Ready").message == "1/2 replicas placed; 0/3 nodes can hold 6Gi more"


def test_nothing_assigned_carries_the_scheduling_reason_into_loaded() -> None:
    status = fold(nodes=(), pending_reason="InsufficientVRAM", pending_message="no room")
    assert summary(status)["Loaded"] == ("False", "InsufficientVRAM")
    assert condition(status, "Loaded").message == "0/2 replicas loaded; no room"
    assert status.placements == []


def test_before_the_first_placement_it_is_scheduling() -> None:
    status = fold(nodes=())
    assert summary(status)["Ready"] == ("False", "Scheduling")
    assert condition(status, "Scheduled").message == "0/2 replicas assigned; waiting for placement"


def test_zero_replicas_is_ready_scaled_to_zero() -> None:
    status = fold(the_spec=spec(replicas=0), nodes=())
    assert summary(status) == {
        "Scheduled": ("True", "ScaledToZero"),
        "Loaded": ("True", "ScaledToZero"),
        "Ready": ("True", "ScaledToZero"),
    }
    assert status.ready == "0/0"


def test_an_invalid_spec_names_the_field_and_places_nothing() -> None:
    error = SpecError("spec.vram", "'6GB' is not a quantity")
    status = fold(spec_error=error, generation=7, nodes=())
    assert summary(status) == {
        "Scheduled": ("False", "InvalidSpec"),
        "Loaded": ("False", "InvalidSpec"),
        "Ready": ("False", "InvalidSpec"),
    }
    assert condition(status, "Ready").message == "spec.vram: '6GB' is not a quantity"
    assert (status.placements, status.observed_generation, status.ready) == ([], 7, None)


def test_an_invalid_edit_keeps_showing_the_replicas_of_the_last_valid_spec() -> None:
    error = SpecError("spec.vllm", "only allowed with backend vllm, not ollama")
    status = fold(spec_error=error, reports={"a": LOADED_A, "b": None})
    assert summary(status)["Ready"] == ("False", "InvalidSpec")
    message = condition(status, "Ready").message
    assert message.startswith("spec.vllm: only allowed with backend vllm")
    assert message.endswith("keeping the 2 replica(s) of the last valid spec")
    assert [(p.node, p.state) for p in status.placements] == [
        ("a", ModelState.LOADED),
        ("b", ModelState.PENDING),
    ]
    assert status.ready_replicas == 1


def test_a_missing_spec_is_invalid_too() -> None:
    status = fold_status(
        spec=None,
        spec_error=None,
        generation=1,
        assigned_nodes={},
        reports={},
        pending_reason=None,
        pending_message=None,
        previous=None,
        now=T0,
    )
    assert condition(status, "Ready").message == "spec: is required"


def test_an_invalid_spec_outranks_a_previous_backend_error() -> None:
    broken = fold(reports={"a": report(ModelState.FAILED, message="boom")})
    status = fold(spec_error=SpecError("spec.model", "bad"), previous=broken, now=T1)
    assert summary(status)["Ready"] == ("False", "InvalidSpec")
    # Ready stayed False, so its transition time stays; the reason is what changed.
    assert condition(status, "Ready").last_transition_time == T0


@pytest.mark.parametrize(
    ("reports", "the_spec", "expected"),
    [
        ({"a": LOADED_A}, spec(vram="6Gi"), (5 * GI, "measured")),
        ({"a": report(ModelState.LOADING, vram=GI, source="measured")}, spec(), (6 * GI, "spec")),
        (
            {"a": report(ModelState.LOADING, vram=3 * GI, source="gguf-header")},
            spec(vram=None),
            (3 * GI, "gguf-header"),
        ),
        ({"a": report(ModelState.LOADING)}, spec(vram=None), (None, None)),
    ],
)
def test_vram_is_measured_then_requested_then_estimated(
    reports: dict[str, ResidentModel | None],
    the_spec: ModelDeploymentSpec,
    expected: tuple[int | None, str | None],
) -> None:
    status = fold(the_spec=the_spec, nodes=("a",), reports=reports)
    assert (status.vram_bytes, status.vram_source) == expected


def test_reports_from_nodes_without_an_assignment_are_ignored() -> None:
    status = fold(nodes=("a",), reports={"a": None, "gone": LOADED_B})
    assert [p.node for p in status.placements] == ["a"]
    assert (status.ready_replicas, status.vram_source) == (0, "spec")


def test_long_backend_messages_are_clipped() -> None:
    status = fold(reports={"a": report(ModelState.FAILED, message="x" * 5000)})
    message = condition(status, "Ready").message
    assert len(message) == MESSAGE_LIMIT
    assert message.endswith("…")


def test_transition_times_move_only_when_a_status_flips() -> None:
    loading = fold(reports={"a": report(ModelState.LOADING), "b": LOADED_B})
    still = fold(reports={"a": report(ModelState.LOADING, progress=90)}, previous=loading, now=T1)
    assert [c.last_transition_time for c in still.conditions] == [T0, T0, T0]
    ready = fold(reports={"a": LOADED_A, "b": LOADED_B}, previous=still, now=T1)
    times = {c.type: c.last_transition_time for c in ready.conditions}
    assert times == {"Scheduled": T0, "Loaded": T1, "Ready": T1}


def test_conditions_owned_by_others_are_kept() -> None:
    other = Condition(type="Custom", status="True", reason="Set", last_transition_time=T0)
    previous = ModelDeploymentStatus(conditions=[other])
    status = fold(previous=previous)
    assert status.conditions[0] == other
    assert [c.type for c in status.conditions] == ["Custom", "Scheduled", "Loaded", "Ready"]


STATES = st.sampled_from(list(ModelState))
REPORTS = st.none() | st.builds(
    report,
    STATES,
    vram=st.none() | st.integers(0, 80 * GI),
    source=st.sampled_from([None, "measured", "spec", "ollama-show"]),
    progress=st.none() | st.integers(0, 100),
    message=st.none() | st.text(max_size=20),
)
NODE_SETS = st.sets(st.sampled_from(["a", "b", "c", "d"]), max_size=4)
PENDING = st.sampled_from([None, *PendingReason])


@settings(max_examples=50, deadline=None)
@given(
    nodes=NODE_SETS,
    reports=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), REPORTS),
    replicas=st.integers(0, 4),
    pending=PENDING,
)
def test_folding_is_idempotent_and_counts_agree(
    nodes: set[str],
    reports: dict[str, ResidentModel | None],
    replicas: int,
    pending: PendingReason | None,
) -> None:
    def again(previous: ModelDeploymentStatus | None, now: dt.datetime) -> ModelDeploymentStatus:
        return fold(
            the_spec=spec(replicas=replicas),
            nodes=tuple(nodes),
            reports=reports,
            pending_reason=pending,
            pending_message="why" if pending else None,
            previous=previous,
            now=now,
        )

    first = again(None, T0)
    second = again(first, T1)
    assert second == first
    assert again(second, T1) == second
    assert events_between(first, second) == []
    loaded = sum(p.state is ModelState.LOADED for p in first.placements)
    assert first.ready_replicas == loaded
    assert first.ready == f"{loaded}/{replicas}"
    ready = condition(first, "Ready")
    assert (ready.status == "True") == (loaded >= replicas and len(first.placements) >= replicas)


# --- events ------------------------------------------------------------------------------------


def test_first_fold_announces_placements_and_the_scheduling_problem() -> None:
    status = fold(
        the_spec=spec(replicas=2),
        nodes=("a",),
        pending_reason="InsufficientVRAM",
        pending_message="1/2 replicas placed; 0/3 nodes can hold 6Gi more",
    )
    assert events_between(None, status) == [
        Event("Normal", "Placed", "placed on a (GPU-a)"),
        Event("Warning", "InsufficientVRAM", "1/2 replicas placed; 0/3 nodes can hold 6Gi more"),
    ]


def test_each_transition_is_announced_once() -> None:
    pending = fold(reports={})
    loaded = fold(reports={"a": LOADED_A, "b": LOADED_B}, previous=pending, now=T1)
    assert events_between(pending, loaded) == [
        Event("Normal", "Loaded", "loaded on a (5Gi)"),
        Event("Normal", "Loaded", "loaded on b (5.5Gi)"),
        Event("Normal", "Ready", "2/2 replicas loaded"),
    ]
    assert events_between(loaded, loaded) == []
    parked = fold(
        reports={"a": report(ModelState.SLEEPING), "b": report(ModelState.EVICTED)},
        previous=loaded,
    )
    assert events_between(loaded, parked) == [
        Event("Normal", "Sleeping", "parked in host RAM on a"),
        Event("Warning", "Evicted", "evicted from b"),
    ]
    woken = fold(reports={"a": report(ModelState.LOADED), "b": LOADED_B}, previous=parked)
    assert events_between(parked, woken) == [
        Event("Normal", "Loaded", "woke on a"),
        Event("Normal", "Loaded", "loaded on b (5.5Gi)"),
        Event("Normal", "Ready", "2/2 replicas loaded"),
    ]


def test_failures_are_announced_again_only_when_the_error_changes() -> None:
    first = fold(reports={"a": report(ModelState.FAILED, message="OOM"), "b": LOADED_B})
    assert Event("Warning", "Failed", "failed on a: OOM") in events_between(None, first)
    same = fold(reports={"a": report(ModelState.FAILED, message="OOM"), "b": LOADED_B})
    assert events_between(first, same) == []
    other = fold(reports={"a": report(ModelState.FAILED), "b": LOADED_B})
    assert events_between(same, other) == [
        Event("Warning", "Failed", "failed on a: no message from the backend")
    ]


def test_withdrawn_replicas_and_new_scheduling_reasons_are_announced() -> None:
    before = fold(nodes=("a", "b"), reports={"a": LOADED_A, "b": LOADED_B})
    after = fold(
        nodes=("a",),
        reports={"a": LOADED_A},
        pending_reason="Preempted",
        pending_message="displaced by team.big",
        previous=before,
    )
    assert events_between(before, after) == [
        Event("Normal", "Withdrawn", "replica on b withdrawn"),
        Event("Warning", "Preempted", "displaced by team.big"),
    ]
    retried = fold(
        nodes=("a",),
        reports={"a": LOADED_A},
        pending_reason="InsufficientVRAM",
        pending_message="0/3 nodes can hold 6Gi",
        previous=after,
    )
    assert events_between(after, retried) == [
        Event("Warning", "InsufficientVRAM", "0/3 nodes can hold 6Gi")
    ]


def test_a_placement_on_an_unknown_gpu_is_announced_by_node() -> None:
    previous = ModelDeploymentStatus()
    current = ModelDeploymentStatus(placements=[Placement(node="a", state=ModelState.PENDING)])
    assert events_between(previous, current) == [Event("Normal", "Placed", "placed on a")]


def test_an_invalid_spec_is_one_warning() -> None:
    status = fold(spec_error=SpecError("spec.replicas", "must be at most 64"), nodes=())
    assert events_between(None, status) == [
        Event("Warning", "InvalidSpec", "spec.replicas: must be at most 64")
    ]


def test_a_deleting_model_is_never_ready_and_shows_what_is_still_unloading() -> None:
    ready = fold(reports={"a": LOADED_A, "b": LOADED_B})
    assert ready.ready_replicas == 2
    unloading = report(ModelState.UNLOADING, vram=5 * GI, gpu_uuid="GPU-a")
    status = fold_deleting(generation=3, holding={"a": unloading}, previous=ready, now=T1)
    assert summary(status) == {
        kind: ("False", "Deleting") for kind in ("Scheduled", "Loaded", "Ready")
    }
    assert status.ready_replicas == 0
    assert status.ready == "0/2"
    assert [(p.node, p.state) for p in status.placements] == [("a", ModelState.UNLOADING)]
    assert "waiting for a to unload" in condition(status, "Ready").message
    done = fold_deleting(generation=3, holding={}, previous=status, now=T1)
    assert done.placements == []
    assert condition(done, "Ready").message == "deleting"
