"""The operator's logic between the kopf handlers and the API: what to place, withdraw and report.

Handlers only mark ModelDeployments dirty; one worker drains the dirty set, so every reconcile
is level-based (it reads the object afresh) and a burst of events costs one pass per object.
Placement runs under one lock against an in-memory picture of every assignment (rebuilt from
the GPUNode specs at start and updated on each write), so concurrent reconciles never promise
the same VRAM twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from vram_operator.api import (
    Assignment,
    GPUNode,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ModelState,
    ResidentModel,
    SpecError,
    assignment_key,
    now,
    parse_bytes,
    parse_spec,
)

from .folding import Reason, events_between, fold_status
from .metrics import OperatorMetrics
from .placement import (
    NodeView,
    PendingReason,
    PlacementConfig,
    PlacementRequest,
    Reservations,
)
from .storage import ClusterStore

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)

_HOLDING = (ModelState.LOADING, ModelState.LOADED, ModelState.SLEEPING)


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings; defaults are what the chart ships."""

    placement: PlacementConfig = dataclasses.field(default_factory=PlacementConfig)
    default_vram_bytes: int = parse_bytes("4Gi")
    """Budget for a model with no spec.vram until an agent has measured or estimated it."""
    gpu_reserve_bytes: int = parse_bytes("256Mi")
    """VRAM per GPU the agents keep free (their --min-free); never promised to a model, or the
    agent would refuse the last model placed on a full GPU."""
    stale_check_seconds: float = 2.0


@dataclass
class _NodeObject:
    labels: dict[str, str]
    taints: list[dict[str, Any]]


class OperatorService:
    """Keeps ModelDeployments placed on GPUNodes and their status true."""

    def __init__(
        self,
        store: ClusterStore,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        clock: Callable[[], dt.datetime] = now,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.reservations = Reservations()
        self._gpunodes: dict[str, GPUNode] = {}
        self._nodes: dict[str, _NodeObject] = {}
        self._assigned: dict[str, dict[str, Assignment]] = defaultdict(dict)
        self._names: dict[str, Key] = {}
        self._pending: dict[Key, str] = {}
        self._preempted: dict[str, str] = {}
        self._stale: set[str] = set()
        self._dirty: set[Key] = set()
        self._wake = asyncio.Event()
        self._place_lock = asyncio.Lock()

    # ---- start and inputs ------------------------------------------------------------------

    async def start(self) -> None:
        """Load every GPUNode and Node, rebuild assignments and reservations, queue every model."""
        for gpunode in await self.store.list_gpunodes():
            self._gpunodes[_name(gpunode)] = gpunode
        for name, node in (await self.store.list_nodes()).items():
            self._nodes[name] = _node_object(node)
        for name, gpunode in self._gpunodes.items():
            for key, assignment in gpunode.spec.assignments.items():
                self._assigned[key][name] = assignment
                # Queued too: one whose ModelDeployment went while no operator ran is withdrawn.
                self.mark(assignment.namespace, assignment.name)
        self.reservations.rebuild(self._views())
        for item in await self.store.list_deployments():
            meta = item["metadata"]
            self.mark(meta["namespace"], meta["name"])
        log.info(
            "operator state rebuilt: %d GPUNodes, %d assignments",
            len(self._gpunodes),
            sum(len(v) for v in self._assigned.values()),
        )

    def mark(self, namespace: str, name: str) -> None:
        """Queue a ModelDeployment for a reconcile."""
        self._names[assignment_key(namespace, name)] = (namespace, name)
        self._dirty.add((namespace, name))
        self._wake.set()

    def observe_gpunode(self, raw: dict[str, Any] | None, name: str) -> None:
        """A GPUNode changed: fold its reports into the models it holds; capacity may be free."""
        old = self._gpunodes.get(name)
        if raw is None:
            self._gpunodes.pop(name, None)
        else:
            try:
                self._gpunodes[name] = GPUNode.model_validate(raw)
            except ValidationError as exc:
                log.warning("ignoring GPUNode %s with an unreadable status: %s", name, exc)
                return
        keys: set[str] = set()
        for gpunode in (old, self._gpunodes.get(name)):
            if gpunode is not None:
                keys.update(gpunode.spec.assignments)
                if gpunode.status is not None:
                    keys.update(m.key for m in gpunode.status.models)
        keys.update(k for k, nodes in self._assigned.items() if name in nodes)
        for key in keys:
            if key in self._names:
                self.mark(*self._names[key])
        self._mark_pending()

    def observe_node(self, raw: dict[str, Any] | None, name: str) -> None:
        """A Node changed (labels, taints) or went away."""
        if raw is None:
            self._nodes.pop(name, None)
        else:
            spec = raw.get("spec") or {}
            labels = (raw.get("metadata") or {}).get("labels") or {}
            self._nodes[name] = _NodeObject(dict(labels), list(spec.get("taints") or []))
        self._mark_pending()
        for key, nodes in self._assigned.items():
            if name in nodes and key in self._names:
                self.mark(*self._names[key])

    async def node_deleted(self, name: str) -> None:
        """The Node object is gone: its GPUNode goes too, and its models move elsewhere."""
        self.observe_node(None, name)
        if name in self._gpunodes:
            log.info("Node %s was deleted; deleting its GPUNode", name)
            await self.store.delete_gpunode(name)

    def _mark_pending(self) -> None:
        for (namespace, name), reason in list(self._pending.items()):
            if reason != Reason.INVALID_SPEC:  # capacity cannot fix a spec; an edit re-queues it
                self.mark(namespace, name)

    # ---- the worker ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Drain the dirty set until stopped (seen within stale_check_seconds, or cancel the
        task); also notice nodes whose heartbeat went stale."""
        while not stop.is_set():
            self._check_staleness()
            batch, self._dirty = self._dirty, set()
            self._wake.clear()
            for namespace, name in sorted(batch):
                await self._guarded(self.reconcile, namespace, name)
            if self._dirty:
                continue
            # Waiting spawns no task: kopf takes every task made after its start for its own and
            # holds its shutdown up to 5 s for those still pending.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.stale_check_seconds):
                    await self._wake.wait()

    async def _guarded(
        self, func: Callable[[str, str], Awaitable[None]], namespace: str, name: str
    ) -> None:
        started = time.monotonic()
        try:
            await func(namespace, name)
        except Exception:
            # Never let one object stop the others; it is retried on the next change or timer.
            log.exception("reconcile of %s/%s failed", namespace, name)
            self.metrics.reconciles.labels("error").inc()
        else:
            self.metrics.reconciles.labels("ok").inc()
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    def _check_staleness(self) -> None:
        stale = {view.name for view in self._views() if self._is_stale(view)}
        for name in stale - self._stale:
            log.warning("GPUNode %s heartbeat is stale: treating the node as lost", name)
            for key, nodes in self._assigned.items():
                if name in nodes and key in self._names:
                    self.mark(*self._names[key])
        self._stale = stale

    def _is_stale(self, view: NodeView) -> bool:
        if view.heartbeat is None:
            return True
        age = (self.clock() - view.heartbeat).total_seconds()
        return age > self.config.placement.heartbeat_grace_seconds

    # ---- reconcile -------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring one ModelDeployment's assignments and status in line with its spec."""
        key = assignment_key(namespace, name)
        body = await self.store.get_deployment(namespace, name)
        if body is None:
            # Deleted without our finalizer running (force-deleted, or while no operator ran):
            # nothing else would ever withdraw what it still holds.
            if await self._withdraw_all(key):
                self._mark_pending()  # freed capacity
            self._forget(key, (namespace, name))
            self._names.pop(key, None)
            return
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return  # the delete handler withdraws; nothing to place
        generation = int(meta.get("generation") or 0)
        previous = _previous_status(body)
        spec: ModelDeploymentSpec | None = None
        error: SpecError | None = None
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as invalid:
            error = invalid  # keep what the last valid spec placed; place nothing new
        reason: str | None = Reason.INVALID_SPEC
        message: str | None = None
        if spec is not None:
            reason, message = await self._place(key, body, spec)
        if reason is None:
            self._pending.pop((namespace, name), None)
            self._preempted.pop(key, None)
        else:
            self._pending[(namespace, name)] = reason
        assigned = dict(self._assigned.get(key, {}))
        status = fold_status(
            spec=spec,
            spec_error=error,
            generation=generation,
            assigned_nodes=assigned,
            reports={node: self._report(node, key) for node in assigned},
            pending_reason=None if error else reason,
            pending_message=message,
            previous=previous,
            now=self.clock(),
        )
        await self._publish(body, previous, status)

    async def _place(
        self, key: str, body: dict[str, Any], spec: ModelDeploymentSpec
    ) -> tuple[str | None, str | None]:
        """Write the assignments the placement decides; return why replicas are missing."""
        async with self._place_lock:
            views = [
                dataclasses.replace(v, exists=False) if self._is_stale(v) else v
                for v in self._views()
            ]
            desired = self._assignment(body, spec, gpu_uuid=None)
            current = self._assigned.get(key, {})
            for node, old in list(current.items()):
                if _replaced(old, desired):
                    await self._withdraw(key, node)  # model or size changed: place afresh
            request = PlacementRequest.from_spec(
                key,
                spec,
                vram_bytes=self._vram_bytes(key, spec),
                existing=self._assigned.get(key, {}).keys(),
            )
            decision = self.reservations.place_and_reserve(
                request, views, self.config.placement, self.clock()
            )
            for victim in decision.preempted:
                await self._withdraw(victim.key, victim.node)
                self._preempted[victim.key] = f"displaced from {victim.node} by {key}"
                self.metrics.placements.labels("preempted").inc()
                if victim.key in self._names:
                    self.mark(*self._names[victim.key])
            for node in decision.remove:
                await self._withdraw(key, node)
                self.metrics.placements.labels("withdrawn").inc()
            for choice in decision.chosen:
                assignment = desired.model_copy(update={"gpu_uuid": choice.gpu_uuid})
                if await self.store.set_assignment(choice.node, key, assignment):
                    self._assigned[key][choice.node] = assignment
                    self.metrics.placements.labels("placed").inc()
                    log.info("placed %s on %s (%s)", key, choice.node, choice.gpu_uuid)
                else:
                    self.reservations.release(key, choice.node)
            for node in decision.keep:
                kept = self._assigned[key].get(node)
                if kept is not None:
                    updated = desired.model_copy(update={"gpu_uuid": kept.gpu_uuid})
                    if updated != kept and await self.store.set_assignment(node, key, updated):
                        self._assigned[key][node] = updated
        if decision.reason is not None:
            self.metrics.placements.labels("pending").inc()
            if key in self._preempted:
                message = f"{self._preempted[key]}; {decision.message}"
                return PendingReason.PREEMPTED.value, message
            return decision.reason.value, decision.message
        return None, None

    async def _withdraw(self, key: str, node: str) -> None:
        await self.store.set_assignment(node, key, None)
        log.info("withdrew %s from %s", key, node)
        self._assigned.get(key, {}).pop(node, None)
        self.reservations.release(key, node)

    def _assignment(
        self, body: dict[str, Any], spec: ModelDeploymentSpec, gpu_uuid: str | None
    ) -> Assignment:
        meta = body["metadata"]
        return Assignment(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid"),
            generation=meta.get("generation"),
            model=spec.model,
            backend=spec.backend,
            priority=spec.priority,
            gpu_uuid=gpu_uuid,
            vram_bytes=spec.vram_bytes,
            keep_alive_seconds=spec.keep_alive_seconds,
            vllm=spec.vllm,
            ollama=spec.ollama,
        )

    def _vram_bytes(self, key: str, spec: ModelDeploymentSpec) -> int:
        """spec.vram, else what an agent measured or estimated, else the default budget."""
        if spec.vram_bytes is not None:
            return spec.vram_bytes
        figures = [
            m.vram_bytes
            for g in self._gpunodes.values()
            if g.status is not None
            for m in g.status.models
            if m.key == key and m.vram_bytes
        ]
        return max(figures, default=self.config.default_vram_bytes)

    def _report(self, node: str, key: str) -> ResidentModel | None:
        gpunode = self._gpunodes.get(node)
        if gpunode is None or gpunode.status is None:
            return None
        return next((m for m in gpunode.status.models if m.key == key), None)

    async def _publish(
        self,
        body: dict[str, Any],
        previous: ModelDeploymentStatus | None,
        status: ModelDeploymentStatus,
    ) -> None:
        meta = body["metadata"]
        changed = previous is None or previous.to_k8s() != status.to_k8s()
        if changed and not await self.store.write_status(meta["namespace"], meta["name"], status):
            # Deleted since we read it, perhaps after placing it: the next pass withdraws.
            self.mark(meta["namespace"], meta["name"])
            return
        for event in events_between(previous, status):
            await self.store.post_event(body, event.type, event.reason, event.message)
        self._update_pending_gauge()

    def _update_pending_gauge(self) -> None:
        self.metrics.pending.clear()
        counts: dict[str, int] = defaultdict(int)
        for reason in self._pending.values():
            counts[reason] += 1
        for reason, count in counts.items():
            self.metrics.pending.labels(reason).set(count)

    def _forget(self, key: str, name: Key) -> None:
        self._pending.pop(name, None)
        self._preempted.pop(key, None)
        self._update_pending_gauge()

    # ---- delete ----------------------------------------------------------------------------

    async def finalize(self, namespace: str, name: str) -> list[str]:
        """Withdraw every assignment; return the nodes still holding the model (empty: done).

        A node whose GPUNode is gone or whose heartbeat is stale cannot unload anything, so it
        does not hold the deletion up.
        """
        key = assignment_key(namespace, name)
        await self._withdraw_all(key)
        holding = [
            node
            for node, gpunode in sorted(self._gpunodes.items())
            if gpunode.status is not None
            and not self._is_stale(self._view(gpunode))
            and any(m.key == key and m.state in _HOLDING for m in gpunode.status.models)
        ]
        if not holding:
            self._forget(key, (namespace, name))
            self._names.pop(key, None)
            self._mark_pending()  # freed capacity
        return holding

    async def _withdraw_all(self, key: str) -> bool:
        """Withdraw `key` from every node that holds or may hold it; False when none did."""
        async with self._place_lock:
            nodes = set(self._assigned.get(key, {}))
            nodes.update(n for n, g in self._gpunodes.items() if key in g.spec.assignments)
            for node in sorted(nodes):
                await self._withdraw(key, node)
            self._assigned.pop(key, None)
            self.reservations.release(key)
        return bool(nodes)

    # ---- views -----------------------------------------------------------------------------

    def _view(self, gpunode: GPUNode) -> NodeView:
        name = _name(gpunode)
        node = self._nodes.get(name)
        view = NodeView.from_objects(
            gpunode, node.labels if node else None, node.taints if node else ()
        )
        # Our own writes reach the watch later; until then the in-memory picture is the truth.
        assignments = {k: nodes[name] for k, nodes in self._assigned.items() if name in nodes}
        reserve = self.config.gpu_reserve_bytes
        gpus = tuple(
            g.model_copy(update={"total_bytes": max(0, g.total_bytes - reserve)}) for g in view.gpus
        )
        return dataclasses.replace(view, assignments=assignments, gpus=gpus)

    def _views(self) -> list[NodeView]:
        return [self._view(g) for g in self._gpunodes.values()]


def _name(gpunode: GPUNode) -> str:
    return str(gpunode.metadata.get("name", ""))


def _node_object(node: Any) -> _NodeObject:
    taints = [t.to_dict() for t in (node.spec.taints or [])] if node.spec else []
    return _NodeObject(dict(node.metadata.labels or {}), taints)


def _replaced(old: Assignment, desired: Assignment) -> bool:
    """A different model, backend or VRAM size needs a fresh placement, not an edit."""
    return (old.model, old.backend, old.vram_bytes) != (
        desired.model,
        desired.backend,
        desired.vram_bytes,
    )


def _previous_status(body: dict[str, Any]) -> ModelDeploymentStatus | None:
    raw = body.get("status")
    if not raw:
        return None
    try:
        return ModelDeploymentStatus.model_validate(raw)
    except ValidationError:
        return None  # a hand-edited status is simply rewritten
