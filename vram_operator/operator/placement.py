"""Where models go: filter nodes and GPUs, fit VRAM, bin-pack or spread, displace lower priorities.

Everything here is a pure function of plain values (GPUNode and Node data, a request, a clock
reading), so the kopf handlers stay thin and every decision is testable without a cluster. The one
piece of state is the `Reservations` ledger: it lets placements that run at the same time see each
other before their assignments have reached the API server and come back through the watch.

How much a GPU can still take (see `NodeView.budgets`)::

    charge(a)   = max(footprint(a), VRAM measured for a on this GPU)   for each assignment a
    unexplained = max(0, usedBytes - sum(VRAM measured for the assignments on this GPU))
    room        = totalBytes - unexplained - reserve
    free        = room - sum(charge(a))

`footprint` is the accounting rule of `vram_operator.api.budget`, the same the agent loads by
(vLLM's rounded-up utilization and per-instance overhead included); `reserve` is the agents'
minimum free memory plus slack, so the agent never refuses what was placed.

`unexplained` covers processes the agent does not manage, models it adopted, and models still
unloading after their assignment was withdrawn. An assignment that has not loaded yet is charged in
full although `freeBytes` does not show it yet: that is what keeps two placements from promising
the same memory.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal, NamedTuple

from vram_operator.api import (
    GPU,
    Assignment,
    Backend,
    GPUNode,
    ModelDeploymentSpec,
    ModelState,
    Priority,
    ResidentModel,
    format_bytes,
    name_in,
)
from vram_operator.api.budget import footprint_bytes
from vram_operator.api.modeldeployment import Toleration
from vram_operator.policy.eviction import (
    GIB,
    EvictionConfig,
    Resident,
    cheapest_cover,
    is_young,
    price,
)


class PendingReason(StrEnum):
    """Why a ModelDeployment is not (fully) scheduled; the reason of its Scheduled condition.

    `place` answers InsufficientVRAM or NoMatchingNodes; Preempted is set by the handler on a
    model whose replica was displaced and that could not be placed elsewhere.
    """

    INSUFFICIENT_VRAM = "InsufficientVRAM"
    NO_MATCHING_NODES = "NoMatchingNodes"
    PREEMPTED = "Preempted"
    SWAPPED_OUT = "SwappedOut"
    """Displaced by a model that requests were waiting for (demand-aware placement); it comes
    back on its own next request."""


class Taint(NamedTuple):
    """A Node taint; NoSchedule and NoExecute keep models off, PreferNoSchedule does not."""

    key: str
    value: str | None
    effect: str

    @classmethod
    def from_k8s(cls, raw: Mapping[str, Any]) -> Taint:
        """From an entry of a Node's spec.taints as the API server returns it."""
        return cls(str(raw["key"]), raw.get("value"), str(raw["effect"]))


class Hold(NamedTuple):
    """VRAM counted against a GPU for one assignment key, and the priority it was placed with."""

    vram_bytes: int
    priority: Priority


class Choice(NamedTuple):
    """A GPU chosen for a new replica."""

    node: str
    gpu_uuid: str


class Victim(NamedTuple):
    """A replica displaced to make room: the handler withdraws `key`'s assignment on `node`."""

    node: str
    key: str


@dataclass(frozen=True)
class GPUBudget:
    """One GPU (or MIG instance) with the VRAM held on it; see the module docstring."""

    node: str
    gpu: GPU
    room: int
    """Total memory minus what no assignment explains."""
    holds: Mapping[str, Hold]
    """Assignment key to its charge."""

    def free(self, excluding: str | None = None) -> int:
        """Room left, not counting `excluding` (a model is never in its own way)."""
        return self.room - sum(h.vram_bytes for k, h in self.holds.items() if k != excluding)

    def merged(self, extra: Mapping[str, Hold]) -> GPUBudget:
        """This budget with ledger holds added; a key in both is charged the larger figure."""
        if not extra:
            return self
        holds = dict(self.holds)
        for key, hold in extra.items():
            seen = holds.get(key)
            if seen is not None:
                hold = seen._replace(vram_bytes=max(seen.vram_bytes, hold.vram_bytes))
            holds[key] = hold
        return replace(self, holds=holds)


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one GPU node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    heartbeat: dt.datetime | None = None
    gpus: tuple[GPU, ...] = ()
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    """GPUNode.spec.assignments, keyed by namespace.name."""
    resident: tuple[ResidentModel, ...] = ()
    """GPUNode.status.models: what the agent reports present."""
    exists: bool = True
    """Whether the Node object exists; a GPUNode can outlive its Node."""
    reserve_bytes: int = 0
    """VRAM per GPU never promised (`vram_operator.api.budget.reserve_bytes`)."""
    max_models: Mapping[Backend, int] = field(default_factory=dict)
    """Per backend, the models its server holds at once at most (Ollama's
    OLLAMA_MAX_LOADED_MODELS); one more would make it unload another by itself."""
    host_available_bytes: int | None = None
    """Host RAM available, as the agent last measured it (MemAvailable); None: not reported."""
    host_under_pressure: bool = False
    """The agent reports MemoryPressure=True (host PSI above its threshold)."""
    _budgets: tuple[GPUBudget, ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """`budgets()` once worked out: a view is a snapshot, and one is asked for every model placed
    while it is current (the capacity simulator keeps a node's view until its assignments
    change). `dataclasses.replace` starts a copy without it."""

    @classmethod
    def from_objects(
        cls,
        gpunode: GPUNode,
        node_labels: Mapping[str, str] | None,
        node_taints: Iterable[Mapping[str, Any]] = (),
    ) -> NodeView:
        """Combine a GPUNode with its Node's labels and spec.taints; labels None: no Node."""
        name = gpunode.metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("GPUNode has no metadata.name")
        status = gpunode.status
        return cls(
            name=name,
            labels=dict(node_labels or {}),
            taints=tuple(Taint.from_k8s(raw) for raw in node_taints),
            heartbeat=status.last_heartbeat_time if status else None,
            gpus=tuple(status.gpus) if status else (),
            assignments=dict(gpunode.spec.assignments),
            resident=tuple(status.models) if status else (),
            exists=node_labels is not None,
            max_models={
                b.name: b.max_models for b in (status.backends if status else ()) if b.max_models
            },
            host_available_bytes=(
                status.host_memory.available_bytes if status and status.host_memory else None
            ),
            host_under_pressure=any(
                c.type == "MemoryPressure" and c.status == "True"
                for c in (status.conditions if status else ())
            ),
        )

    def budgets(self) -> tuple[GPUBudget, ...]:
        """One budget per GPU that can take a model.

        A physical GPU whose MIG instances are listed is left out: its memory is theirs. An
        assignment without a GPU is charged where the agent reports it, or, before that, against
        every GPU of the node, since it may land on any; one naming a GPU that is gone is charged
        nowhere. A parked assignment is charged nowhere: its weights are in host RAM, and what
        it still holds on the GPU (the context of a sleeping vLLM, or all of it until it has
        gone to sleep) is measured as used memory no assignment explains.
        """
        budgets = self._budgets
        if budgets is None:
            budgets = self._work_out_budgets()
            object.__setattr__(self, "_budgets", budgets)
        return budgets

    def _work_out_budgets(self) -> tuple[GPUBudget, ...]:
        parents = {g.parent_uuid for g in self.gpus if g.parent_uuid}
        units = [g for g in self.gpus if g.uuid not in parents]
        by_uuid = {g.uuid: g for g in units}
        uuids = set(by_uuid)
        measured: Counter[tuple[str, str]] = Counter()
        reported_gpu: dict[str, str] = {}
        for model in self.resident:
            if model.gpu_uuid is not None:
                reported_gpu.setdefault(model.key, model.gpu_uuid)
                measured[(model.gpu_uuid, model.key)] += model.vram_bytes or 0
        holds: dict[str, dict[str, Hold]] = {uuid: {} for uuid in uuids}
        for key, assignment in self.assignments.items():
            if assignment.parked:
                continue
            gpu = assignment.gpu_uuid or reported_gpu.get(key)
            targets = sorted(uuids) if gpu is None else [gpu] if gpu in uuids else []
            for uuid in targets:
                figure = assignment.vram_bytes or 0
                total = by_uuid[uuid].total_bytes
                planned = footprint_bytes(assignment.backend, figure, total) if figure else 0
                charge = max(planned, measured[(uuid, key)])
                holds[uuid][key] = Hold(charge, assignment.priority)
        budgets = []
        for gpu_ in sorted(units, key=lambda g: g.index):
            explained = sum(measured[(gpu_.uuid, key)] for key in holds[gpu_.uuid])
            unexplained = max(0, gpu_.used_bytes - explained)
            room = gpu_.total_bytes - unexplained - self.reserve_bytes
            budgets.append(GPUBudget(self.name, gpu_, room, holds[gpu_.uuid]))
        return tuple(budgets)

    def state_of(self, key: str) -> ModelState | None:
        """The state the agent reports for `key` here, or None before it reports one."""
        return next((m.state for m in self.resident if m.key == key), None)

    def report_of(self, key: str) -> ResidentModel | None:
        """What the agent reports for `key` here, or None before it reports it."""
        return next((m for m in self.resident if m.key == key), None)

    def host_room(self) -> int | None:
        """Host RAM a model parked now may take: what the agent last measured available, less
        what parked assignments it does not report Sleeping yet are about to take (none under
        host memory pressure); None when the node reports no host memory."""
        if self.host_available_bytes is None:
            return None
        if self.host_under_pressure:
            return 0
        coming = sum(
            host_bytes(a, self.report_of(key))
            for key, a in self.assignments.items()
            if a.parked and self.state_of(key) is not ModelState.SLEEPING
        )
        return max(0, self.host_available_bytes - coming)


def host_bytes(assignment: Assignment, report: ResidentModel | None) -> int:
    """Host RAM a parked replica takes: at most what it held on the GPU (vLLM's level-1 sleep
    moves the weights to host RAM and drops the KV cache), the larger of the measured and the
    assigned figure; 0 when neither is known."""
    measured = report.vram_bytes if report is not None and report.vram_bytes else 0
    return max(measured, assignment.vram_bytes or 0)


@dataclass(frozen=True)
class SwapCosts:
    """The `cost` swap order's figures for a demanded request (`place`)."""

    prices: Mapping[str, float]
    """Assignment key to what swapping it out costs (`replica_figures`); a key left out costs
    nothing."""
    young: frozenset[str] = frozenset()
    """Keys not to swap out: requests run on them or wait for them, or they have served none
    since their load and are within the minimum residency (`eviction.is_young`)."""


class ReplicaDemand(NamedTuple):
    """The gateways' figures for one model, as `replica_figures` reads them."""

    rate: float | None = None
    """Requests per second lately (`eviction.DecayedRates`); None where no gateway counted."""
    in_use: int | None = None
    """Requests running on it or waiting for it; None without gateway figures."""
    served: bool = False
    """Requests have run on it since its load."""
    last_request: dt.datetime | None = None


def replica_resident(
    key: str,
    assignment: Assignment,
    report: ResidentModel | None,
    demand: ReplicaDemand,
    now: dt.datetime,
) -> Resident:
    """One replica as the eviction rules see it, from its assignment, its agent's report
    (priority, size, sleep mode) and the gateways' figures. Unknown times read as
    `Resident.from_status` reads them: a model reported with no load time loaded long ago; one
    not reported yet is loading now.

    What bringing it back costs is estimated from its size (`EvictionConfig`'s load speed),
    not taken from the load time its agent reported: that one counts the wait behind other
    loads (a backend loads one model at a time), so the models loaded first, the ones asked
    for first, looked cheapest to bring back and were swapped out first (bench/residency.py
    measured it: 27% warm hits against LRU-2's 51%)."""
    if report is None:
        loaded, state, measured = now.timestamp(), ModelState.PENDING, 0
    else:
        loaded = report.loaded_at.timestamp() if report.loaded_at else 0.0
        state, measured = report.state, report.vram_bytes or 0
    used = [loaded]
    if report is not None and report.last_access is not None:
        used.append(report.last_access.timestamp())
    if demand.last_request is not None:
        used.append(demand.last_request.timestamp())
    return Resident(
        key=key,
        priority=assignment.priority,
        vram_bytes=max(measured, assignment.vram_bytes or 0),
        state=state,
        loaded_at=loaded,
        last_access=max(used),
        can_park=assignment.sleeps,
        request_rate=demand.rate,
        in_use=demand.in_use,
        served=demand.served,
    )


def swap_figures(replica: Resident, now: float, config: EvictionConfig) -> tuple[float, bool]:
    """A replica's figures under the `cost` swap order: its `eviction.price` and whether it is
    young (`swap_young`). Without a rate its recency stands in."""
    return price(replica, now, config), swap_young(replica, now, config)


def swap_young(replica: Resident, now: float, config: EvictionConfig) -> bool:
    """Whether the `cost` swap order keeps it: still loading, or `eviction.is_young` under
    `config`'s minimum residency (without the gateways' figures the minimum residency runs from
    its load, as for an agent without demand figures)."""
    settling = replica.state not in (ModelState.LOADED, ModelState.SLEEPING)
    return settling or is_young(replica, now, config)


def plan_parking(victims: Iterable[Victim], nodes: Iterable[NodeView]) -> frozenset[Victim]:
    """The victims of a swap-out for demand to park in host RAM rather than unload.

    A victim is parked when its assignment runs with sleep mode (vLLM), its agent reports it
    Loaded (there is something to park), its size is known, and its node's host RAM
    (`NodeView.host_room`) takes it; victims on one node share that room, in order. The others
    are unloaded, as before.
    """
    views = {v.name: v for v in nodes}
    room: dict[str, float] = {}
    parked: set[Victim] = set()
    for victim in victims:
        view = views.get(victim.node)
        assignment = view.assignments.get(victim.key) if view is not None else None
        if view is None or assignment is None or not assignment.sleeps:
            continue
        report = view.report_of(victim.key)
        if report is None or report.state is not ModelState.LOADED:
            continue
        size = host_bytes(assignment, report)
        if victim.node not in room:
            known = view.host_room()
            room[victim.node] = math.inf if known is None else known
        if 0 < size <= room[victim.node]:
            room[victim.node] -= size
            parked.add(victim)
    return frozenset(parked)


@dataclass(frozen=True)
class PlacementRequest:
    """A ModelDeployment as placement sees it."""

    key: str
    """namespace.name, the assignment key."""
    vram_bytes: int
    """VRAM one replica needs (requested or estimated); what it holds on a given GPU is
    `footprint` of this."""
    backend: Backend = Backend.OLLAMA
    priority: Priority = Priority.NORMAL
    replicas: int = 1
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    existing: frozenset[str] = frozenset()
    """Nodes whose GPUNode already holds an assignment for it."""
    avoid: Mapping[str, str] = field(default_factory=dict)
    """Nodes not to place a new replica on, with why: it just failed to load there."""
    demanded: bool = False
    """Requests wait for it at the gateway and it has no resident replica: it may take the
    place of the coldest settled model of its own priority or lower (see `_displaceable`)."""
    parked: Mapping[str, str] = field(default_factory=dict)
    """Nodes holding a replica of it parked in host RAM (swapped out for demand), each with
    the GPU it sleeps on; not in `existing`. A new replica wakes one of these where its GPU
    has room, before any cold start elsewhere."""

    def footprint(self, gpu: GPU) -> int:
        """What one replica holds on `gpu`, by the accounting rule the agent loads by."""
        return footprint_bytes(self.backend, self.vram_bytes, gpu.total_bytes)

    def __post_init__(self) -> None:
        if self.vram_bytes <= 0:
            raise ValueError(f"vram_bytes must be positive, got {self.vram_bytes}")
        if self.replicas < 0:
            raise ValueError(f"replicas must not be negative, got {self.replicas}")

    @classmethod
    def from_spec(
        cls,
        key: str,
        spec: ModelDeploymentSpec,
        *,
        vram_bytes: int,
        existing: Iterable[str] = (),
        avoid: Mapping[str, str] | None = None,
        replicas: int | None = None,
        demanded: bool = False,
        parked: Mapping[str, str] | None = None,
    ) -> PlacementRequest:
        """From a validated spec; `vram_bytes` is spec.vram or the estimate when it is absent,
        `replicas` the count to place when it is not spec.replicas (autoscaling)."""
        return cls(
            key=key,
            vram_bytes=vram_bytes,
            backend=spec.backend,
            avoid=dict(avoid or {}),
            priority=spec.priority,
            replicas=spec.replicas if replicas is None else replicas,
            demanded=demanded,
            parked=dict(parked or {}),
            node_selector=dict(spec.node_selector),
            tolerations=tuple(spec.tolerations),
            existing=frozenset(existing),
        )


@dataclass(frozen=True)
class PlacementConfig:
    """Operator-wide placement settings."""

    strategy: Literal["binpack", "spread"] = "binpack"
    """binpack fills the fullest GPU that fits, keeping whole GPUs free for large models;
    spread picks the emptiest, leaving headroom on each."""
    max_temperature_celsius: int = 85
    heartbeat_grace_seconds: float = 60.0
    allow_preemption: bool = True
    min_residency_seconds: float = 60.0
    """A model used (requested, accessed or loaded) more recently than this is never swapped
    out for demand: no thrashing between models that are all in use."""


@dataclass(frozen=True)
class PlacementDecision:
    """What the handler writes: new assignments, withdrawn ones, and why replicas are missing."""

    keep: tuple[str, ...] = ()
    """Nodes that go on holding a replica."""
    chosen: tuple[Choice, ...] = ()
    """New replicas, each on a node of its own; one on a node of `request.parked`, on the GPU
    it sleeps on, is that replica woken."""
    preempted: tuple[Victim, ...] = ()
    """Lower-priority replicas to withdraw so the chosen ones fit."""
    remove: tuple[str, ...] = ()
    """Nodes whose assignment for this model is to be withdrawn (lost node or scale-down, or a
    parked replica no longer needed)."""
    reason: PendingReason | None = None
    """Set when fewer than `replicas` are kept or chosen."""
    message: str = ""
    """For a person: where it went, or why not, in the kube-scheduler's manner."""


_BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
_EVICTING_EFFECTS = frozenset({"NoExecute"})

# Order in which surplus replicas are dropped on scale-down: the least useful first.
_USEFULNESS = {
    ModelState.LOADED: 3,
    ModelState.SLEEPING: 2,
    ModelState.LOADING: 1,
}


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """Kubernetes' matching rule: empty key with Exists matches all, empty effect any effect."""
    if toleration.effect is not None and toleration.effect != taint.effect:
        return False
    if toleration.operator == "Exists":
        return toleration.key in (None, "", taint.key)
    return toleration.key == taint.key and (toleration.value or "") == (taint.value or "")


def _untolerated(
    taints: Iterable[Taint], tolerations: Iterable[Toleration], effects: frozenset[str]
) -> Taint | None:
    tolerations = tuple(tolerations)
    for taint in taints:
        if taint.effect in effects and not any(tolerates(t, taint) for t in tolerations):
            return taint
    return None


def _node_problem(
    view: NodeView, request: PlacementRequest, config: PlacementConfig, now: dt.datetime
) -> str | None:
    """The first filter a node fails, phrased for the count in a message, or None."""
    if not view.exists:
        return "had no Node object"
    if any(view.labels.get(k) != v for k, v in request.node_selector.items()):
        return "didn't match nodeSelector"
    taint = _untolerated(view.taints, request.tolerations, _BLOCKING_EFFECTS)
    if taint is not None:
        return f"had untolerated taint {{{taint.key}: {taint.value or ''}}}"
    grace = config.heartbeat_grace_seconds
    if view.heartbeat is None or (now - view.heartbeat).total_seconds() > grace:
        return f"had no agent heartbeat in the last {grace:g}s"
    if not view.gpus:
        return "had no GPUs"
    limit = view.max_models.get(request.backend)
    if limit is not None:
        held = sum(
            1
            for key, a in view.assignments.items()
            if a.backend is request.backend and key != request.key
        )
        if held >= limit:
            return f"held the {limit} {request.backend} models its server takes at most"
    return None


class _Option(NamedTuple):
    """A GPU that can take the replica; `left` is the free VRAM after it."""

    budget: GPUBudget
    left: int
    victims: tuple[str, ...]
    price: float = 0.0
    """The victims' summed swap-out price, where prices were given."""


def _displaceable(
    budget: GPUBudget,
    request: PlacementRequest,
    recency: Mapping[str, dt.datetime] | None = None,
    now: dt.datetime | None = None,
    min_residency: float = 0.0,
    earlier: Mapping[str, dt.datetime] | None = None,
    costs: SwapCosts | None = None,
) -> list[tuple[str, Hold]]:
    """Holds the request may displace, least first; never critical.

    Preemption: strictly lower priorities, lowest first, then largest first (fewer victims),
    then by key for determinism. Demand (`request.demanded`): its own priority or lower, each
    settled (last used, by `recency`, at least `min_residency` seconds before `now`; a key with
    no recency is cold), lowest priority first, then, among equal priorities, by the request
    before the last (`earlier`, as LRU-2 does: a model asked for once, or never, goes before
    one asked for again and again, however recent that one request), then the coldest (least
    recently used) first. Waiting requests never take from a high or critical model what its
    priority gives it: demanded, it may still displace any strictly lower priority, settled
    or not. With `costs` (the `cost` swap order) a model is settled unless `costs.young` names
    it (the agents' rule, `eviction.is_young`), and the settled ones go cheapest per byte first
    (priority weighs in the price), equal prices the least recently used first.
    """
    if request.demanded and now is not None:
        used = recency or {}
        settled_before = now - dt.timedelta(seconds=min_residency)
        preempts = request.priority.rank >= Priority.HIGH.rank

        def settled(key: str) -> bool:
            if costs is not None:
                return key not in costs.young
            return key not in used or used[key] <= settled_before

        cold = [
            (key, hold)
            for key, hold in budget.holds.items()
            if key != request.key
            and hold.priority.evictable
            and hold.priority.rank <= request.priority.rank
            and (settled(key) or (preempts and hold.priority.rank < request.priority.rank))
        ]
        epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
        if costs is not None:
            prices = costs.prices
            return sorted(
                cold,
                key=lambda item: (
                    prices.get(item[0], 0.0) * GIB / max(item[1].vram_bytes, 1),
                    used.get(item[0], epoch),
                    item[0],
                ),
            )
        before = earlier or {}
        return sorted(
            cold,
            key=lambda item: (
                item[1].priority.rank,
                before.get(item[0], epoch),
                used.get(item[0], epoch),
                -item[1].vram_bytes,
                item[0],
            ),
        )
    return sorted(
        (
            (key, hold)
            for key, hold in budget.holds.items()
            if key != request.key
            and hold.priority.evictable
            and hold.priority.rank < request.priority.rank
        ),
        key=lambda item: (item[1].priority.rank, -item[1].vram_bytes, item[0]),
    )


def _victims(
    free: int,
    candidates: list[tuple[str, Hold]],
    need: int,
    costs: SwapCosts | None = None,
) -> tuple[tuple[str, ...], int] | None:
    """The candidates to displace so `need` fits in `free`, and the VRAM left after.

    Candidates are taken in order until the request fits (with `costs`: the set that makes
    room at the least summed price, `eviction.cheapest_cover`, the agents' `cost` rule); then,
    most important first, any victim that turns out not to be needed is spared, so no victim
    could be left in place. None when displacing every candidate would not make room.
    """
    if costs is not None and free < need:
        chosen = cheapest_cover(
            [hold.vram_bytes for _, hold in candidates],
            [costs.prices.get(key, 0.0) for key, _ in candidates],
            need - free,
        )
        candidates = [candidates[i] for i in chosen]
    taken: list[tuple[str, int]] = []
    for key, hold in candidates:
        if free >= need:
            break
        taken.append((key, hold.vram_bytes))
        free += hold.vram_bytes
    if free < need:
        return None
    for key, size in reversed(list(taken)):
        if free - size >= need:
            taken.remove((key, size))
            free -= size
    return tuple(key for key, _ in taken), free - need


@dataclass
class _Tally:
    """Why no GPU could take a replica, counted for the message."""

    nodes: Counter[str] = field(default_factory=Counter)
    hot_gpus: int = 0
    small_gpus: int = 0
    largest_free: int = 0
    largest_reclaimable: int = 0

    def message(self, request: PlacementRequest, config: PlacementConfig, node_count: int) -> str:
        size = format_bytes(request.vram_bytes)
        head = f"0/{node_count} nodes can hold {size}"
        if node_count == 0:
            return f"{head}: no GPUNode has been reported (is the node agent running?)"
        counted = sorted(self.nodes.items(), key=lambda item: (-item[1], item[0]))
        parts = [f"{count} node(s) {why}" for why, count in counted]
        if self.hot_gpus:
            limit = config.max_temperature_celsius
            parts.append(f"{self.hot_gpus} GPU(s) were above {limit}°C")
        if self.small_gpus:
            detail = f"largest free {format_bytes(max(0, self.largest_free))}"
            if self.largest_reclaimable > self.largest_free:
                reclaimable = format_bytes(self.largest_reclaimable)
                detail += f", {reclaimable} counting lower-priority models"
            parts.append(f"{self.small_gpus} GPU(s) had less than {size} free ({detail})")
        return f"{head}: {', '.join(parts)}"


def _strategy_key(option: _Option, config: PlacementConfig) -> tuple[int, str, int]:
    left = option.left if config.strategy == "binpack" else -option.left
    return left, option.budget.node, option.budget.gpu.index


def _displacement_cost(
    option: _Option, config: PlacementConfig
) -> tuple[float, int, int, int, tuple[int, str, int]]:
    """The cheapest victims first where they were priced, then the least important, then the
    fewest, then the fewest bytes, then the strategy."""
    holds = option.budget.holds
    return (
        option.price,
        max(holds[k].priority.rank for k in option.victims),
        len(option.victims),
        sum(holds[k].vram_bytes for k in option.victims),
        _strategy_key(option, config),
    )


def _pick(
    request: PlacementRequest,
    nodes: Iterable[NodeView],
    budgets: Mapping[str, tuple[GPUBudget, ...]],
    taken: set[str],
    config: PlacementConfig,
    now: dt.datetime,
    recency: Mapping[str, dt.datetime] | None = None,
    earlier: Mapping[str, dt.datetime] | None = None,
    costs: SwapCosts | None = None,
) -> _Option | _Tally:
    """The best GPU for one more replica on a node not in `taken`, or why there is none."""
    tally = _Tally()
    fits: list[_Option] = []
    displacing: list[_Option] = []
    may_preempt = config.allow_preemption and (
        request.priority.rank >= Priority.HIGH.rank or request.demanded
    )
    for view in nodes:
        problem = "already held a replica" if view.name in taken else None
        if problem is None and view.name in request.avoid:
            problem = f"could not load it a moment ago ({request.avoid[view.name]})"
        problem = problem or _node_problem(view, request, config, now)
        if problem is not None:
            tally.nodes[problem] += 1
            continue
        for budget in budgets[view.name]:
            temperature = budget.gpu.temperature_celsius
            if temperature is not None and temperature > config.max_temperature_celsius:
                tally.hot_gpus += 1
                continue
            free = budget.free(excluding=request.key)
            need = request.footprint(budget.gpu)
            if free >= need:
                fits.append(_Option(budget, free - need, ()))
                continue
            tally.small_gpus += 1
            tally.largest_free = max(tally.largest_free, free)
            if not may_preempt:
                continue
            priced = costs if request.demanded else None
            candidates = _displaceable(
                budget, request, recency, now, config.min_residency_seconds, earlier, priced
            )
            reclaimable = free + sum(hold.vram_bytes for _, hold in candidates)
            tally.largest_reclaimable = max(tally.largest_reclaimable, reclaimable)
            found = _victims(free, candidates, need, priced)
            if found is not None:
                cost = sum(priced.prices.get(k, 0.0) for k in found[0]) if priced else 0.0
                displacing.append(_Option(budget, found[1], found[0], cost))
    if fits:
        return min(fits, key=lambda option: _strategy_key(option, config))
    if displacing:
        return min(displacing, key=lambda option: _displacement_cost(option, config))
    return tally


def _drop_order(view: NodeView, key: str, budgets: tuple[GPUBudget, ...]) -> tuple[int, int, str]:
    state = view.state_of(key)
    usefulness = _USEFULNESS.get(state, 0) if state is not None else 0
    return usefulness, sum(b.free() for b in budgets), view.name


def place(
    request: PlacementRequest,
    nodes: Iterable[NodeView],
    config: PlacementConfig,
    now: dt.datetime,
    reserved: Mapping[str, Mapping[str, Hold]] | None = None,
    recency: Mapping[str, dt.datetime] | None = None,
    earlier: Mapping[str, dt.datetime] | None = None,
    costs: SwapCosts | None = None,
) -> PlacementDecision:
    """Decide which replicas to keep, add and withdraw.

    Existing replicas stay where they are as long as their node exists and carries no NoExecute
    taint the model does not tolerate (a changed label or a stale heartbeat does not move a
    loaded model, as with Pods); the others are withdrawn and replaced. On scale-down the
    replicas dropped first are those not loaded yet (not reported, Pending, Failed or Evicted,
    then Loading, then Sleeping, Loaded last), then those on the node with the least free VRAM,
    then by node name. New replicas go, one per node, to eligible GPUs that fit (`binpack` or
    `spread`); when none fits and the request is high or critical, to the GPU where displacing
    strictly lower, never critical, priorities costs least (lowest victim priority, then fewest
    victims, then fewest bytes). `reserved` is the ledger of `Reservations`, GPU UUID to holds.
    A `demanded` request (requests wait for it) may also displace settled models of its own
    priority, the coldest by `recency` (key to last use) first, a model asked for once before one
    asked for again (`earlier`: key to the request before the last): demand-aware placement when
    full. Given `costs` (the `cost` swap order: what swapping each key out costs and which keys
    are young, `SwapCosts`), a demanded request displaces instead the settled models whose
    summed price is least, on the GPU where that sum is least: the agents' `cost` rule.
    A replica parked in host RAM (`request.parked`) is woken on the GPU it sleeps on, where
    that GPU has room (or is given room by those rules), before any other replica is placed;
    parked replicas left over once every replica is placed are withdrawn.
    """
    views = sorted(nodes, key=lambda v: v.name)
    by_name = {v.name: v for v in views}
    ledger = reserved or {}
    budgets = {
        v.name: tuple(b.merged(ledger.get(b.gpu.uuid, {})) for b in v.budgets()) for v in views
    }
    keep: list[str] = []
    lost: list[str] = []
    for name in sorted(request.existing):
        view = by_name.get(name)
        if (
            view is not None
            and view.exists
            and not _untolerated(view.taints, request.tolerations, _EVICTING_EFFECTS)
        ):
            keep.append(name)
        else:
            lost.append(name)
    parked = {n: g for n, g in request.parked.items() if n not in request.existing}
    for name in sorted(parked):
        view = by_name.get(name)
        if view is None or not view.exists:
            del parked[name]  # its node is gone: nothing sleeps there any more
            lost.append(name)
    if len(keep) >= request.replicas and (len(keep) > request.replicas or parked):
        order = sorted(keep, key=lambda n: _drop_order(by_name[n], request.key, budgets[n]))
        surplus = order[: len(keep) - request.replicas] + sorted(parked)
        kept = tuple(n for n in keep if n not in surplus)
        message = f"scaled down: withdrawing from {', '.join(sorted(lost + surplus))}"
        return PlacementDecision(keep=kept, remove=tuple(lost + sorted(surplus)), message=message)
    chosen: list[Choice] = []
    preempted: list[Victim] = []
    taken = set(keep)
    tally: _Tally | None = None
    for _ in range(request.replicas - len(keep)):
        waking = _wake(
            request, by_name, budgets, parked, taken, config, now, recency, earlier, costs
        )
        pick = waking or _pick(request, views, budgets, taken, config, now, recency, earlier, costs)
        if isinstance(pick, _Tally):
            tally = pick
            break
        node = pick.budget.node
        chosen.append(Choice(node, pick.budget.gpu.uuid))
        preempted.extend(Victim(node, key) for key in pick.victims)
        taken.add(node)
    # Every replica placed: one still parked elsewhere is not needed (its host RAM goes back).
    dropped = sorted(n for n in parked if n not in taken) if tally is None else []
    reason: PendingReason | None = None
    if tally is None:
        woken = [c for c in chosen if parked.get(c.node) == c.gpu_uuid]
        fresh = [c for c in chosen if c not in woken]
        message = _success_message(request.key, keep, fresh, preempted, lost, woken, dropped)
    else:
        # InsufficientVRAM only when memory is what is missing; otherwise no node qualifies.
        short_of_memory = tally.small_gpus > 0
        reason = (
            PendingReason.INSUFFICIENT_VRAM if short_of_memory else PendingReason.NO_MATCHING_NODES
        )
        message = tally.message(request, config, len(views))
        have = len(keep) + len(chosen)
        if have:
            message = f"{have}/{request.replicas} replicas placed; {message}"
    return PlacementDecision(
        keep=tuple(keep),
        chosen=tuple(chosen),
        preempted=tuple(preempted),
        remove=tuple(lost + dropped),
        reason=reason,
        message=message,
    )


def _wake(
    request: PlacementRequest,
    by_name: Mapping[str, NodeView],
    budgets: Mapping[str, tuple[GPUBudget, ...]],
    parked: Mapping[str, str],
    taken: set[str],
    config: PlacementConfig,
    now: dt.datetime,
    recency: Mapping[str, dt.datetime] | None,
    earlier: Mapping[str, dt.datetime] | None = None,
    costs: SwapCosts | None = None,
) -> _Option | None:
    """A parked replica to wake, on the GPU it sleeps on, where that GPU has room (or, for a
    demanded request, can be given room by the same rule as a new replica); None if none."""
    for name in sorted(parked):
        if name in taken:
            continue
        own = {name: tuple(b for b in budgets[name] if b.gpu.uuid == parked[name])}
        pick = _pick(request, [by_name[name]], own, taken, config, now, recency, earlier, costs)
        if isinstance(pick, _Option):
            return pick
    return None


def _success_message(
    key: str,
    keep: list[str],
    chosen: list[Choice],
    preempted: list[Victim],
    lost: list[str],
    woken: Sequence[Choice] = (),
    dropped: Sequence[str] = (),
) -> str:
    namespace = key.partition(".")[0]
    parts = []
    if woken:
        parts.append("waking on " + ", ".join(f"{c.node} ({c.gpu_uuid})" for c in woken))
    if chosen:
        parts.append("placed on " + ", ".join(f"{c.node} ({c.gpu_uuid})" for c in chosen))
    if keep:
        parts.append("kept on " + ", ".join(keep))
    if preempted:
        parts.append(
            "displacing " + ", ".join(f"{name_in(v.key, namespace)} on {v.node}" for v in preempted)
        )
    if lost:
        parts.append("withdrawing from lost node(s) " + ", ".join(lost))
    if dropped:
        parts.append("withdrawing the replica parked on " + ", ".join(dropped))
    return "; ".join(parts) or "no replicas requested"


class Reservations:
    """The VRAM promised per GPU, held in memory so concurrent placements never overcommit.

    Assignments written by one handler reach the others only when the watch delivers the updated
    GPUNode; until then this ledger is what they see. It is rebuilt from the GPUNode specs when the
    operator starts, which makes it disposable: a crash loses nothing the API server lacks.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ledger: dict[str, dict[str, Hold]] = {}
        self._node_of: dict[str, str] = {}

    def rebuild(self, nodes: Iterable[NodeView]) -> None:
        """Replace the ledger with the assignments the GPUNodes carry."""
        with self._lock:
            self._ledger = {}
            self._node_of = {}
            for view in nodes:
                for budget in view.budgets():
                    self._node_of[budget.gpu.uuid] = view.name
                    self._ledger[budget.gpu.uuid] = dict(budget.holds)

    def snapshot(self) -> dict[str, dict[str, Hold]]:
        """A copy of the ledger: GPU UUID to assignment key to hold."""
        with self._lock:
            return {uuid: dict(holds) for uuid, holds in self._ledger.items()}

    def try_reserve(self, budget: GPUBudget, key: str, vram_bytes: int, priority: Priority) -> bool:
        """Hold `vram_bytes` for `key` on the budget's GPU if it fits; False leaves all unchanged.

        The check counts the ledger and the budget's own holds (a model measured above its
        reservation), so it also serves to resize an existing replica in place: a key's new hold
        replaces its old one.
        """
        with self._lock:
            current = budget.merged(self._ledger.get(budget.gpu.uuid, {}))
            if current.free(excluding=key) < vram_bytes:
                return False
            self._hold(budget.node, budget.gpu.uuid, key, Hold(vram_bytes, priority))
            return True

    def release(self, key: str, node: str | None = None) -> None:
        """Forget `key`'s holds on `node`, or everywhere."""
        with self._lock:
            self._release(key, node)

    def place_and_reserve(
        self,
        request: PlacementRequest,
        nodes: Iterable[NodeView],
        config: PlacementConfig,
        now: dt.datetime,
        recency: Mapping[str, dt.datetime] | None = None,
        earlier: Mapping[str, dt.datetime] | None = None,
        costs: SwapCosts | None = None,
    ) -> PlacementDecision:
        """`place` against the ledger, and record its outcome, as one atomic step."""
        nodes = list(nodes)
        gpus = {g.uuid: g for view in nodes for g in view.gpus}
        with self._lock:
            decision = place(
                request,
                nodes,
                config,
                now,
                reserved=self._ledger,
                recency=recency,
                earlier=earlier,
                costs=costs,
            )
            for victim in decision.preempted:
                self._release(victim.key, victim.node)
            for node in decision.remove:
                self._release(request.key, node)
            for choice in decision.chosen:
                hold = Hold(request.footprint(gpus[choice.gpu_uuid]), request.priority)
                self._hold(choice.node, choice.gpu_uuid, request.key, hold)
            return decision

    def _hold(self, node: str, gpu_uuid: str, key: str, hold: Hold) -> None:
        self._node_of[gpu_uuid] = node
        self._ledger.setdefault(gpu_uuid, {})[key] = hold

    def _release(self, key: str, node: str | None) -> None:
        for uuid, holds in self._ledger.items():
            if node is None or self._node_of.get(uuid) == node:
                holds.pop(key, None)
