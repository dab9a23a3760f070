"""Fold what the agents report into ModelDeployment status, and say which changes deserve Events.

Pure functions: the same inputs give the same status, so a level-based reconcile can fold on every
wake-up and write only when something changed; `events_between` compares two statuses so Events
are emitted once per transition, not once per reconcile.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from vram_operator.api import (
    Assignment,
    Condition,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ModelState,
    Placement,
    ResidentModel,
    SpecError,
    format_bytes,
    set_condition,
)
from vram_operator.api.modeldeployment import Tier
from vram_operator.api.modelpolicy import PolicyError

SCHEDULED = "Scheduled"
LOADED = "Loaded"
READY = "Ready"

MEASURED = "measured"
SPEC = "spec"

# Kubernetes caps Event messages at 1 KiB; conditions get the same bound to stay readable.
MESSAGE_LIMIT = 1024


class Reason(StrEnum):
    """Condition reasons besides the PendingReason ones placement gives."""

    SCHEDULED = "Scheduled"
    SCHEDULING = "Scheduling"
    LOADED = "Loaded"
    LOADING = "Loading"
    SLEEPING = "Sleeping"
    EVICTED = "Evicted"
    BACKEND_ERROR = "BackendError"
    INVALID_SPEC = "InvalidSpec"
    POLICY_VIOLATION = "PolicyViolation"
    SCALED_TO_ZERO = "ScaledToZero"
    SWAPPED_OUT = "SwappedOut"
    READY = "Ready"
    DELETING = "Deleting"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to record on the ModelDeployment."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class _Verdict:
    ok: bool
    reason: str
    message: str


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def fold_status(
    *,
    spec: ModelDeploymentSpec | None,
    spec_error: SpecError | PolicyError | None,
    generation: int,
    assigned_nodes: Mapping[str, Assignment],
    reports: Mapping[str, ResidentModel | None],
    pending_reason: str | None,
    pending_message: str | None,
    previous: ModelDeploymentStatus | None,
    now: dt.datetime,
    scale: Scale | None = None,
    name: str = "",
) -> ModelDeploymentStatus:
    """The status for one ModelDeployment.

    `assigned_nodes` are the nodes whose GPUNode holds its assignment; `reports` what each node's
    agent says about it (None or absent: nothing yet; reports from other nodes are ignored).
    `pending_reason`/`pending_message` come from the last placement when replicas are missing.
    A replica counts as ready only when Loaded: a Sleeping one is parked in host RAM and must be
    woken before it serves, so it is not. An assignment marked parked (swapped out for demand)
    counts neither as scheduled nor as ready; its placement shows where it is. An invalid spec
    (`spec_error`, or no spec) yields InvalidSpec on every condition and no new placements; a
    spec a ModelPolicy refuses (a PolicyError) the same with PolicyViolation. `scale` is the
    count placement worked towards when it is not spec.replicas (autoscaling, or idle past
    keepAlive) and why; `name` the object's, for the scale subresource's selector.
    """
    conditions = list(previous.conditions) if previous is not None else []

    def record(kind: str, verdict: _Verdict) -> None:
        nonlocal conditions
        condition = Condition(
            type=kind,
            status="True" if verdict.ok else "False",
            reason=str(verdict.reason),
            message=_clip(verdict.message),
            last_transition_time=now,
            observed_generation=generation,
        )
        conditions = set_condition(conditions, condition)

    if spec is None or spec_error is not None:
        # Nothing new is placed for an invalid spec, but replicas of the last valid one keep
        # serving (no half-applied change); the status still shows where they are.
        kept = [
            _placement(node, assigned_nodes[node], reports.get(node))
            for node in sorted(assigned_nodes)
        ]
        message = str(spec_error or "spec: is required")
        refused = isinstance(spec_error, PolicyError)
        if kept:
            message += f"; keeping the {len(kept)} replica(s) of the last "
            message += "admitted spec" if refused else "valid spec"
        why = Reason.POLICY_VIOLATION if refused else Reason.INVALID_SPEC
        invalid = _Verdict(False, why, message)
        for kind in (SCHEDULED, LOADED, READY):
            record(kind, invalid)
        return ModelDeploymentStatus(
            observed_generation=generation,
            conditions=conditions,
            ready_replicas=sum(p.state is ModelState.LOADED for p in kept),
            replicas=len(kept),
            selector=previous.selector if previous is not None else None,
            placements=kept,
            tiers=_tiers(kept),
        )

    nodes = sorted(assigned_nodes)
    mine = {node: reports.get(node) for node in nodes}
    placements = [_placement(node, assigned_nodes[node], mine[node]) for node in nodes]
    # A replica parked for demand is shown where it is, but neither scheduled on a GPU nor
    # ready, even in the moment before it has gone to sleep.
    active = [node for node in nodes if not assigned_nodes[node].parked]
    ready = sum(p.state is ModelState.LOADED for p in placements if p.node in active)
    desired = spec.replicas if scale is None else scale.desired
    zero = scale.why if scale is not None and scale.why else "0 replicas requested"
    scheduled = _scheduled(desired, active, pending_reason, pending_message, zero)
    loaded = _loaded(desired, ready, placements, mine, scheduled, zero)
    record(SCHEDULED, scheduled)
    record(LOADED, loaded)
    record(READY, _ready(scheduled, loaded))
    vram_bytes, vram_source = _vram(spec, mine.values())
    return ModelDeploymentStatus(
        observed_generation=generation,
        conditions=conditions,
        ready_replicas=ready,
        replicas=len(active),
        desired_replicas=desired,
        selector=scale_selector(name) if name else None,
        last_scale_time=None if scale is None else scale.changed_at,
        ready=f"{ready}/{desired}",
        vram=None if vram_bytes is None else format_bytes(vram_bytes),
        vram_bytes=vram_bytes,
        vram_source=vram_source,
        placements=placements,
        tiers=_tiers(placements),
    )


def fold_deleting(
    *,
    generation: int,
    holding: Mapping[str, ResidentModel],
    previous: ModelDeploymentStatus | None,
    now: dt.datetime,
) -> ModelDeploymentStatus:
    """The status of a ModelDeployment being deleted: every assignment is withdrawn, so no
    replica is ready, and `holding` (node to what its agent reports) shows what is still
    being unloaded."""
    conditions = list(previous.conditions) if previous is not None else []
    where = ", ".join(sorted(holding))
    message = f"deleting: waiting for {where} to unload" if holding else "deleting"
    for kind in (SCHEDULED, LOADED, READY):
        condition = Condition(
            type=kind,
            status="False",
            reason=Reason.DELETING,
            message=message,
            last_transition_time=now,
            observed_generation=generation,
        )
        conditions = set_condition(conditions, condition)
    placements = [
        Placement(
            node=node,
            gpu_uuid=report.gpu_uuid,
            state=report.state,
            vram_bytes=report.vram_bytes,
        )
        for node, report in sorted(holding.items())
    ]
    wanted = previous.ready.split("/", 1)[-1] if previous is not None and previous.ready else None
    return ModelDeploymentStatus(
        observed_generation=generation,
        conditions=conditions,
        ready_replicas=0,
        ready=None if wanted is None else f"0/{wanted}",
        vram=previous.vram if previous is not None else None,
        vram_bytes=previous.vram_bytes if previous is not None else None,
        vram_source=previous.vram_source if previous is not None else None,
        placements=placements,
    )


@dataclass(frozen=True)
class Scale:
    """The replica count placement works towards when it is not spec.replicas, and why."""

    desired: int
    why: str = ""
    changed_at: dt.datetime | None = None


SELECTOR_LABEL = "vram.dev/model-deployment"


def scale_selector(name: str) -> str:
    """status.selector: the label selector the scale subresource reports (HPA requires one)."""
    return f"{SELECTOR_LABEL}={name}"


TIERS: dict[ModelState, Tier] = {
    ModelState.LOADING: "GPU",
    ModelState.LOADED: "GPU",
    ModelState.UNLOADING: "GPU",
    ModelState.SLEEPING: "HostRAM",
}
"""Where a replica's weights are, by its state; any other state: on disk only."""


def tier(state: ModelState) -> Tier:
    return TIERS.get(state, "Disk")


def _tiers(placements: Iterable[Placement]) -> str | None:
    return ",".join(p.tier or tier(p.state) for p in placements) or None


def _placement(node: str, assignment: Assignment, report: ResidentModel | None) -> Placement:
    if report is None:
        return Placement(
            node=node, gpu_uuid=assignment.gpu_uuid, state=ModelState.PENDING, tier="Disk"
        )
    return Placement(
        node=node,
        gpu_uuid=report.gpu_uuid or assignment.gpu_uuid,
        state=report.state,
        vram_bytes=report.vram_bytes,
        progress=report.progress,
        last_error=report.message if report.state is ModelState.FAILED else None,
        load_seconds=report.load_seconds,
        tier=tier(report.state),
    )


def _scheduled(
    replicas: int,
    nodes: list[str],
    pending_reason: str | None,
    pending_message: str | None,
    zero: str = "0 replicas requested",
) -> _Verdict:
    if replicas == 0:
        return _Verdict(True, Reason.SCALED_TO_ZERO, zero)
    if len(nodes) >= replicas:
        where = ", ".join(nodes)
        return _Verdict(True, Reason.SCHEDULED, f"{len(nodes)}/{replicas} assigned: {where}")
    return _Verdict(
        False,
        pending_reason or Reason.SCHEDULING,
        pending_message or f"{len(nodes)}/{replicas} replicas assigned; waiting for placement",
    )


def _loaded(
    replicas: int,
    ready: int,
    placements: list[Placement],
    reports: Mapping[str, ResidentModel | None],
    scheduled: _Verdict,
    zero: str = "0 replicas requested",
) -> _Verdict:
    """Loaded, or the most telling reason it is not: a failure, an eviction, progress, sleep."""
    if replicas == 0:
        return _Verdict(True, Reason.SCALED_TO_ZERO, zero)
    count = f"{ready}/{replicas} replicas loaded"
    if ready >= replicas:
        return _Verdict(True, Reason.LOADED, count)
    by_state: dict[ModelState, list[Placement]] = {}
    for placement in placements:
        by_state.setdefault(placement.state, []).append(placement)
    if failed := by_state.get(ModelState.FAILED):
        errors = "; ".join(f"{p.node}: {p.last_error or 'failed'}" for p in failed)
        return _Verdict(False, Reason.BACKEND_ERROR, f"{count}; {errors}")
    if evicted := by_state.get(ModelState.EVICTED):
        details = []
        for p in evicted:
            report = reports[p.node]
            why = report.message if report is not None and report.message else "evicted"
            details.append(f"{p.node}: {why}")
        return _Verdict(False, Reason.EVICTED, f"{count}; {'; '.join(details)}")
    loading = by_state.get(ModelState.LOADING, []) + by_state.get(ModelState.PENDING, [])
    if loading:
        steps = ", ".join(
            p.node + (f" {p.progress}%" if p.progress is not None else f" {p.state.lower()}")
            for p in sorted(loading, key=lambda p: p.node)
        )
        return _Verdict(False, Reason.LOADING, f"{count}; loading on {steps}")
    if sleeping := by_state.get(ModelState.SLEEPING):
        where = ", ".join(p.node for p in sleeping)
        return _Verdict(False, Reason.SLEEPING, f"{count}; parked in host RAM on {where}")
    return _Verdict(False, scheduled.reason, f"{count}; {scheduled.message}")


def _ready(scheduled: _Verdict, loaded: _Verdict) -> _Verdict:
    """True only when both are; otherwise the reason that matters most to a person.

    A backend error first (it needs a fix), then a scheduling problem (it needs capacity), then
    whatever loading is doing (it needs time).
    """
    if scheduled.ok and loaded.ok:
        reason = Reason.SCALED_TO_ZERO if loaded.reason == Reason.SCALED_TO_ZERO else Reason.READY
        return _Verdict(True, reason, loaded.message)
    if loaded.reason == Reason.BACKEND_ERROR or scheduled.ok:
        return _Verdict(False, loaded.reason, loaded.message)
    return _Verdict(False, scheduled.reason, scheduled.message)


def _vram(
    spec: ModelDeploymentSpec, reports: Iterable[ResidentModel | None]
) -> tuple[int | None, str | None]:
    """VRAM per replica: measured on a loaded replica, else the spec, else the agent's estimate.

    Only Loaded replicas give a measurement: one still loading holds part of it, a sleeping one
    has handed most of it back. The largest figure wins, erring on the side of fitting.
    """
    present = [r for r in reports if r is not None and r.vram_bytes is not None]
    measured = [
        r.vram_bytes
        for r in present
        if r.vram_bytes is not None and r.state is ModelState.LOADED and r.vram_source == MEASURED
    ]
    if measured:
        return max(measured), MEASURED
    if spec.vram_bytes is not None:
        return spec.vram_bytes, SPEC
    estimates = [
        (r.vram_bytes, r.vram_source)
        for r in present
        if r.vram_bytes is not None and r.vram_source not in (None, MEASURED, SPEC)
    ]
    if estimates:
        return max(estimates)
    return None, None


def _condition(status: ModelDeploymentStatus | None, kind: str) -> Condition | None:
    if status is None:
        return None
    return next((c for c in status.conditions if c.type == kind), None)


def events_between(
    previous: ModelDeploymentStatus | None, current: ModelDeploymentStatus
) -> list[Event]:
    """The Events the change from `previous` to `current` deserves; none when nothing changed.

    Per replica: placed, loaded (or woken), parked, evicted, failed (again when the error
    changes) and withdrawn. Per model: a Scheduled condition that turns False or changes its
    reason (a Warning, as FailedScheduling is: SwappedOut among them), Ready turning True, and
    the desired replica count changing (Scaled).
    """
    events: list[Event] = []
    before = {p.node: p for p in previous.placements} if previous is not None else {}
    after = {p.node: p for p in current.placements}
    for node in sorted(before.keys() | after.keys()):
        old, new = before.get(node), after.get(node)
        if new is None:
            events.append(Event("Normal", "Withdrawn", f"replica on {node} withdrawn"))
            continue
        if old is None:
            where = f"{node} ({new.gpu_uuid})" if new.gpu_uuid else node
            events.append(Event("Normal", "Placed", f"placed on {where}"))
        event = _state_event(node, old, new)
        if event is not None:
            events.append(event)
    was = previous.desired_replicas if previous is not None else None
    if was is not None and current.desired_replicas is not None and was != current.desired_replicas:
        verb = "up" if current.desired_replicas > was else "down"
        why = _condition(current, SCHEDULED)
        detail = f": {why.message}" if why is not None and current.desired_replicas == 0 else ""
        message = f"scaled {verb} from {was} to {current.desired_replicas} replicas{detail}"
        events.append(Event("Normal", "Scaled", _clip(message)))
    scheduled_was, scheduled = _condition(previous, SCHEDULED), _condition(current, SCHEDULED)
    if scheduled is not None and scheduled.status == "False" and _changed(scheduled_was, scheduled):
        events.append(Event("Warning", scheduled.reason, scheduled.message))
    ready_was, ready = _condition(previous, READY), _condition(current, READY)
    if ready is not None and ready.status == "True" and _changed(ready_was, ready):
        events.append(Event("Normal", ready.reason, ready.message))
    return events


def _changed(old: Condition | None, new: Condition) -> bool:
    return old is None or (old.status, old.reason) != (new.status, new.reason)


def _state_event(node: str, old: Placement | None, new: Placement) -> Event | None:
    old_state = None if old is None else old.state
    if new.state is ModelState.FAILED:
        if old_state is ModelState.FAILED and old is not None and old.last_error == new.last_error:
            return None
        error = new.last_error or "no message from the backend"
        return Event("Warning", "Failed", _clip(f"failed on {node}: {error}"))
    if new.state is old_state:
        return None
    if new.state is ModelState.LOADED:
        size = f" ({format_bytes(new.vram_bytes)})" if new.vram_bytes is not None else ""
        if old_state is ModelState.SLEEPING:
            return Event("Normal", "Loaded", f"woke on {node}")  # from host RAM
        took = f", a cold start of {new.load_seconds:.1f}s" if new.load_seconds is not None else ""
        return Event("Normal", "Loaded", f"loaded on {node}{size}{took}")
    if new.state is ModelState.SLEEPING:
        return Event("Normal", "Sleeping", f"parked in host RAM on {node}")
    if new.state is ModelState.EVICTED:
        return Event("Warning", "Evicted", f"evicted from {node}")
    return None
