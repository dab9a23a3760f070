"""The operator's logic between the kopf handlers and the API: what to place, withdraw and report.

Handlers only mark ModelDeployments; a bounded pool of workers drains the work queue (one
object is never reconciled by two workers at once), so every reconcile is level-based (it reads
the object afresh) and a burst of events costs one pass per object. Placement decides under one
lock against an in-memory picture of every assignment (rebuilt from the GPUNode specs at start
and updated at each decision), so concurrent reconciles never promise the same VRAM twice; the
writes happen after the lock, coalesced per GPUNode.

Status follows residency at once: a reconcile that withdraws or displaces replicas of other
models queues those models ahead of all other work, a GPUNode report re-queues only the models
whose reported state changed, and a node whose heartbeat is older than the grace period is
marked Ready=Unknown (HeartbeatLost) and loses all its assignments in one write.

Demand (with `--gateway-demand-url`): a loop reads every gateway replica's /demand each
`demand_interval` and acts on the figures in memory, so traffic costs no API write of its own:
autoscaled models get their count from `autoscaling.next_scale` (queued only when it changes);
a model requests wait for, with no ready replica, is queued and placed as `demanded` (it may
swap out settled models of its priority or lower, by the default `swap_order` those whose
eviction costs least in loads to come, which then report SwappedOut); a replica the agent
unloaded for idleness (keepAlive) is withdrawn and counted idle until the next request, which
brings it back instead of leaving it Evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from vram_operator.api import (
    RELOCATABLE_FAILURES,
    STAYING_EVICTIONS,
    Assignment,
    Condition,
    GPUNode,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ModelState,
    ResidentModel,
    SpecError,
    assignment_key,
    name_in,
    now,
    parse_bytes,
    parse_spec,
    set_condition,
)
from vram_operator.api.budget import reserve_bytes
from vram_operator.api.demand import ModelDemand
from vram_operator.api.modeldeployment import Autoscaling
from vram_operator.api.modelpolicy import (
    ModelPolicy,
    ModelPolicyStatus,
    NamespaceUsage,
    PolicyError,
    check_quota,
    check_spec,
    policies_for,
)
from vram_operator.api.quantity import format_bytes, parse_positive_bytes
from vram_operator.policy.eviction import DecayedRates, EvictionConfig

from .assignment_writer import AssignmentWriter
from .autoscaling import ScaleState, next_scale
from .demand import DemandReader, request_before_last
from .folding import Reason, Scale, events_between, fold_deleting, fold_status
from .metrics import OperatorMetrics
from .placement import (
    NodeView,
    PendingReason,
    PlacementConfig,
    PlacementRequest,
    ReplicaDemand,
    Reservations,
    SwapCosts,
    Victim,
    plan_parking,
    replica_resident,
    swap_figures,
)
from .storage import Store
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)

_HOLDING = (ModelState.LOADING, ModelState.LOADED, ModelState.SLEEPING, ModelState.UNLOADING)
_PARKING = (ModelState.LOADED, ModelState.UNLOADING, ModelState.SLEEPING)
"""States a replica told to park reports on its way to host RAM and once there."""

HEARTBEAT_LOST = "HeartbeatLost"
POLICY_USAGE_SECONDS = 5.0
GPUNODE_CREATE_SECONDS = 10.0
"""A GPUNode asked for is not asked for again sooner (its watch event normally comes first)."""
"""How often ModelPolicy usage is written at most."""
MAX_CLOCK_SKEW = 30.0
"""Seconds a heartbeat may lie ahead of the operator's clock and still count."""


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings; defaults are what the chart ships."""

    placement: PlacementConfig = dataclasses.field(default_factory=PlacementConfig)
    default_vram_bytes: int = parse_bytes("4Gi")
    """Budget for a model with no spec.vram until an agent has measured or estimated it."""
    gpu_reserve_bytes: int = parse_bytes("256Mi")
    """The agents' --min-free; the operator never promises that, plus slack, on any GPU
    (`vram_operator.api.budget.reserve_bytes`)."""
    stale_check_seconds: float = 1.0
    workers: int = 16
    """Reconciles running at once (different objects; one object is never run twice at once)."""
    avoid_seconds: float = 30.0
    """How long a node that could not load a replica is not offered that model again."""
    demand_interval: float = 2.0
    """Seconds between reads of the gateways' /demand (with a demand source)."""
    gpu_node_selector: dict[str, str] | None = None
    """Nodes (by label, all of them when empty) that run an agent: the operator creates their
    GPUNodes, so agents need no right to create one. None: the agents create their own."""
    swap_order: Literal["cost", "lru2"] = "cost"
    """What a model requests wait for swaps out, among the settled models its priority may
    displace: `cost`, the agents' default eviction rule (the set whose summed
    `policy.eviction.price` is least, on the GPU where that is least), or `lru2` (lowest
    priority first, then the one asked for least recently before its last request). `cost`
    had fewer cold-load seconds in the capacity simulator (BENCHMARKS.md, "Capacity") and kept
    more requests warm on the local control plane (BENCHMARKS.md, "Residency")."""
    pricing: EvictionConfig = dataclasses.field(default_factory=EvictionConfig)
    """The load and wake speeds `price` assumes: a replica's load time is estimated from its
    size (`placement.replica_resident`), never taken from its agent's report."""


@dataclass
class _NodeObject:
    labels: dict[str, str]
    taints: list[dict[str, Any]]


class OperatorService:
    """Keeps ModelDeployments placed on GPUNodes and their status true."""

    def __init__(
        self,
        store: Store,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        clock: Callable[[], dt.datetime] = now,
        demand: DemandReader | None = None,
    ) -> None:
        self.store = store
        self.demand = demand
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.reservations = Reservations()
        self.queue: WorkQueue[Key] = WorkQueue()
        self.writer = AssignmentWriter(store.set_assignments)
        self._gpunodes: dict[str, GPUNode] = {}
        self._nodes: dict[str, _NodeObject] = {}
        self._assigned: dict[str, dict[str, Assignment]] = defaultdict(dict)
        self._names: dict[str, Key] = {}
        self._pending: dict[Key, str] = {}
        self._preempted: dict[str, tuple[str, str]] = {}
        """Keys that lost a replica to another model: the reason (Preempted or SwappedOut)
        and what took the room."""
        self._figures: dict[str, ModelDemand] = {}
        """The gateways' demand per key, summed over replicas, from the last read that worked."""
        self._earlier: dict[str, dt.datetime] = {}
        """Per key, when it was asked for before its latest request (`request_before_last`)."""
        self._rates = DecayedRates()
        """Per key, the gateways' requests lately (the `cost` swap order's frequency), from
        the growth of their request counts between reads."""
        self._counting = False
        """Whether a read of the gateways' figures has worked: later ones count growth."""
        self._autoscaled: dict[str, Autoscaling] = {}
        self._scale: dict[str, ScaleState] = {}
        self._idle: dict[str, dict[str, dt.datetime]] = defaultdict(dict)
        """Keys to the nodes whose replica was unloaded for idleness (keepAlive) and withdrawn,
        and when; the next request brings them back."""
        self._avoid: dict[str, dict[str, tuple[float, str]]] = defaultdict(dict)
        self._stale: set[str] = set()
        self._place_lock = asyncio.Lock()
        self._policies: dict[str, ModelPolicy] = {}
        self._namespaces: dict[str, dict[str, str]] = {}
        self._demand: dict[str, int] = {}
        """Admitted keys to the VRAM they ask for (replicas x VRAM), for namespace quotas."""
        self._policy_status: dict[str, ModelPolicyStatus] = {}
        self._policy_usage_due = 0.0
        self._foreign: set[str] = set()
        """GPUNodes whose assignments someone other than us changed."""
        self._measured: dict[str, int] = {}
        """The last size an assigned node reported per key, kept after it is withdrawn."""
        self._created: dict[str, float] = {}
        """GPUNodes asked for, to when the ask may be repeated (its watch event is due)."""
        self._bodies: dict[Key, dict[str, Any]] = {}
        """The newest version of each ModelDeployment the watch or our own status write
        gave, so a reconcile reads no object it already has (a burst re-checks every pending
        model each time a GPU gains room). Filled from the watch only: without one, every
        reconcile reads the object."""

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
                # By the key (namespaces have no dots), not the fields an editor could forge;
                # the reconcile then rewrites what differs from the ModelDeployment's spec.
                namespace, _, object_name = key.partition(".")
                self.mark(namespace, object_name)
        self.reservations.rebuild(self._views())
        self._policies = {p.name: p for p in await self.store.list_policies()}
        self._namespaces = await self.store.list_namespaces()
        for item in await self.store.list_deployments():
            meta = item["metadata"]
            self.mark(meta["namespace"], meta["name"])
            # What holds replicas now was admitted before: it keeps its share of the quota
            # ahead of objects that were waiting, whatever order the queue takes them in.
            key = assignment_key(meta["namespace"], meta["name"])
            if self._assigned.get(key) and not meta.get("deletionTimestamp"):
                with contextlib.suppress(SpecError):
                    spec = parse_spec(item.get("spec"))
                    self._demand[key] = _most_replicas(spec) * self._vram_bytes(key, spec)
        await self._ensure_gpunodes()
        log.info(
            "operator state rebuilt: %d GPUNodes, %d assignments",
            len(self._gpunodes),
            sum(len(v) for v in self._assigned.values()),
        )

    def observe_deployment(self, raw: dict[str, Any] | None, namespace: str, name: str) -> None:
        """The watch saw a ModelDeployment version (None: deleted). Queues nothing: the
        change handlers do that."""
        if raw is None:
            self._bodies.pop((namespace, name), None)
        else:
            self._remember(raw, watched=True)

    def _remember(self, raw: dict[str, Any], watched: bool = False) -> None:
        meta = raw.get("metadata") or {}
        name: Key = (meta.get("namespace") or "", meta.get("name") or "")
        held = self._bodies.get(name)
        if held is None and not watched:
            return  # not watched: a read is the only way to be current
        if held is not None and _older(meta, held.get("metadata") or {}):
            return  # a watch event behind our own write's answer
        self._bodies[name] = raw

    async def _deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ModelDeployment as last seen, else read."""
        held = self._bodies.get((namespace, name))
        if held is not None:
            return held
        return await self.store.get_deployment(namespace, name)

    def mark(self, namespace: str, name: str, urgent: bool = False) -> None:
        """Queue a ModelDeployment for a reconcile; urgent ones go before all others."""
        self._names[assignment_key(namespace, name)] = (namespace, name)
        self.queue.add((namespace, name), urgent)

    def _mark_key(self, key: str, urgent: bool = False) -> None:
        if key in self._names:
            self.mark(*self._names[key], urgent=urgent)

    def observe_gpunode(self, raw: dict[str, Any] | None, name: str) -> None:
        """A GPUNode changed: re-queue the models whose report or assignment changed there, and
        the pending ones when it has more room than before. A heartbeat alone queues nothing."""
        old = self._gpunodes.get(name)
        new: GPUNode | None = None
        if raw is None:
            self._gpunodes.pop(name, None)
        else:
            try:
                new = GPUNode.model_validate(raw)
            except ValidationError as exc:
                log.warning("ignoring GPUNode %s with an unreadable status: %s", name, exc)
                return
            self._gpunodes[name] = new
        before, after = _reports(old), _reports(new)
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        # Assignments that changed to something other than what we decided: someone else's
        # edit, or the node's deletion (our own writes come back as we made them).
        was = old.spec.assignments if old is not None else {}
        now_ = new.spec.assignments if new is not None else {}
        for key in was.keys() | now_.keys():
            if was.get(key) != now_.get(key) and self._assigned.get(key, {}).get(name) != now_.get(
                key
            ):
                changed.add(key)
                if new is not None:
                    # Only the operator writes assignments: anyone else's edit (an agent's
                    # token, a hand) is put back to what we decided by the housekeeping loop.
                    self._foreign.add(name)
        if new is None:
            changed |= {k for k, nodes in self._assigned.items() if name in nodes}
        for key in changed:
            self._mark_key(key)
        if self._room_grew(old, new):
            self._mark_pending()

    def _room_grew(self, old: GPUNode | None, new: GPUNode | None) -> bool:
        if new is None or new.status is None:
            return False
        if old is None or old.status is None:
            return True
        was_stale, is_stale = self._is_stale(old), self._is_stale(new)
        if was_stale and not is_stale:
            return True
        free_before = {b.gpu.uuid: b.free() for b in self._view(old).budgets()}
        return any(b.free() > free_before.get(b.gpu.uuid, -1) for b in self._view(new).budgets())

    def observe_node(self, raw: dict[str, Any] | None, name: str) -> None:
        """A Node changed (labels, taints) or went away."""
        if raw is None:
            self._nodes.pop(name, None)
        else:
            spec = raw.get("spec") or {}
            labels = (raw.get("metadata") or {}).get("labels") or {}
            node = _NodeObject(dict(labels), list(spec.get("taints") or []))
            if self._nodes.get(name) == node:
                return
            self._nodes[name] = node
        self._mark_pending()
        for key, nodes in self._assigned.items():
            if name in nodes:
                self._mark_key(key)

    async def _ensure_gpunodes(self) -> None:
        """Create the missing GPUNode of every Node `gpu_node_selector` selects (level-based:
        one deleted while its Node lives comes back within a housekeeping pass)."""
        selector = self.config.gpu_node_selector
        if selector is None:
            return
        moment = time.monotonic()
        for name, node in list(self._nodes.items()):
            if name in self._gpunodes or self._created.get(name, 0.0) > moment:
                continue
            if any(node.labels.get(k) != v for k, v in selector.items()):
                continue
            self._created[name] = moment + GPUNODE_CREATE_SECONDS
            try:
                await self.store.create_gpunode(name)
            except Exception as exc:
                log.warning("could not create GPUNode %s: %s", name, exc)
            else:
                log.info("created GPUNode %s for its agent", name)

    def observe_policy(self, raw: dict[str, Any] | None, name: str) -> None:
        """A ModelPolicy changed or went: every model is checked again (a policy may select
        any namespace; re-checking an unchanged model writes nothing)."""
        if raw is None:
            if self._policies.pop(name, None) is None:
                return
        else:
            try:
                policy = ModelPolicy.model_validate(raw)
            except ValidationError as exc:
                log.warning("ignoring ModelPolicy %s: %s", name, exc)
                return
            if self._policies.get(name) == policy:
                return
            self._policies[name] = policy
        self._policy_status.pop(name, None)
        self._mark_all()

    def observe_namespace(self, raw: dict[str, Any] | None, name: str) -> None:
        """A Namespace's labels changed: its models may fall under other policies."""
        labels = None if raw is None else dict((raw.get("metadata") or {}).get("labels") or {})
        if self._namespaces.get(name) == labels:
            return
        if labels is None:
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = labels
        self._mark_all(namespace=name)

    def _mark_all(self, namespace: str | None = None) -> None:
        for ns, name in list(self._names.values()):
            if namespace is None or ns == namespace:
                self.mark(ns, name)

    async def node_deleted(self, name: str) -> None:
        """The Node object is gone: its GPUNode goes too, and its models move elsewhere."""
        self.observe_node(None, name)
        if name in self._gpunodes:
            log.info("Node %s was deleted; deleting its GPUNode", name)
            await self.store.delete_gpunode(name)

    def _mark_pending(self) -> None:
        for (namespace, name), reason in list(self._pending.items()):
            # Capacity fixes neither a spec nor a policy; an edit, a policy or quota re-queues.
            if reason not in (Reason.INVALID_SPEC, Reason.POLICY_VIOLATION):
                self.mark(namespace, name)

    # ---- the workers -----------------------------------------------------------------------

    async def work(self, stop: asyncio.Event) -> None:
        """One worker: reconcile queued objects until stopped. Run `config.workers` of these."""
        while not stop.is_set():
            item = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    item = await self.queue.get()
            if item is None:
                continue
            try:
                await self._guarded(*item)
            finally:
                self.queue.done(item)

    async def watch_heartbeats(self, stop: asyncio.Event) -> None:
        """Notice nodes whose heartbeat went stale, and avoidances that expired, every second."""
        while not stop.is_set():
            try:
                await self._check_staleness()
                await self._ensure_gpunodes()
                self._expire_avoidances()
                await self._restore_foreign()
                await self.publish_policy_usage()
            except Exception:
                log.exception("heartbeat check failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.stale_check_seconds):
                    await stop.wait()

    async def watch_demand(self, stop: asyncio.Event) -> None:
        """Read the gateways' demand every `demand_interval` and act on it (see the module
        docstring); returns at once without a demand source."""
        if self.demand is None:
            return
        try:
            while not stop.is_set():
                try:
                    await self.apply_demand(await self.demand.read())
                except Exception:
                    log.exception("reading gateway demand failed; trying again")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.demand_interval):
                        await stop.wait()
        finally:
            await self.demand.aclose()

    async def apply_demand(self, figures: dict[str, ModelDemand] | None) -> None:
        """One read's figures (None: no gateway answered): rescale, wake idle models, and
        queue those requests wait for."""
        known = figures is not None
        if figures is not None:
            stamp = self.clock().timestamp()
            for key, read in figures.items():
                before = self._figures.get(key)
                earlier = request_before_last(before, read, self._earlier.get(key))
                if earlier is not None:
                    self._earlier[key] = earlier
                # The first read is only a starting point (when its counts came is unknown);
                # after it, a key first seen is all new, and a count that fell is a gateway
                # that restarted, counting from zero again.
                if before is None and not self._counting:
                    continue
                grown = read.requests - (before.requests if before is not None else 0)
                grown = grown if grown >= 0 else read.requests
                if grown:
                    self._rates.add(key, grown, stamp)
            self._figures = figures
            self._counting = True
        moment = self.clock()
        for key, policy in list(self._autoscaled.items()):
            state = self._scale.get(key)
            if state is None:
                continue
            entry = self._figures.get(key) if known else None
            new = next_scale(policy, state, entry, known, moment)
            self._scale[key] = new
            if new.desired != state.desired:
                if state.desired == 0:
                    self.metrics.wake_requests.labels("zero").inc()
                log.info("autoscaling %s: %d -> %d (%s)", key, state.desired, new.desired, new.why)
                self._mark_key(key, urgent=True)
        if not known:
            return
        for key, entry in self._figures.items():
            idle = self._idle.get(key)
            if idle and (
                entry.busy > 0
                or (entry.last_request is not None and entry.last_request > min(idle.values()))
            ):
                log.info("%s was idle past keepAlive and is asked for again", key)
                self._idle.pop(key, None)
                self.metrics.wake_requests.labels("idle").inc()
                self._mark_key(key, urgent=True)
            elif entry.waiting > 0 and self._names.get(key) in self._pending:
                self._mark_key(key)

    async def _guarded(self, namespace: str, name: str) -> None:
        started = time.monotonic()
        try:
            await self.reconcile(namespace, name)
        except Exception:
            # Never let one object stop the others; it is retried on the next change or timer.
            log.exception("reconcile of %s/%s failed", namespace, name)
            self.metrics.reconciles.labels("error").inc()
        else:
            self.metrics.reconciles.labels("ok").inc()
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    # ---- node lifecycle --------------------------------------------------------------------

    async def _check_staleness(self) -> None:
        stale = {name for name, gpunode in self._gpunodes.items() if self._is_stale(gpunode)}
        for name in sorted(stale - self._stale):
            await self._node_lost(name)
        if self._stale - stale:
            self._mark_pending()  # a node came back: room again
        self._stale = stale

    async def _restore_foreign(self) -> None:
        """Put back what we decided on GPUNodes whose assignments someone else edited: an
        injected assignment is withdrawn, a changed or removed one written again."""
        while self._foreign:
            name = self._foreign.pop()
            async with self._place_lock:
                gpunode = self._gpunodes.get(name)
                if gpunode is None:
                    continue
                ours = {k: nodes[name] for k, nodes in self._assigned.items() if name in nodes}
                theirs = gpunode.spec.assignments
                changes: dict[str, Assignment | None] = {
                    k: ours.get(k)
                    for k in ours.keys() | theirs.keys()
                    if ours.get(k) != theirs.get(k)
                }
                future = self.writer.submit(name, changes) if changes else None
            if future is not None:
                log.warning(
                    "GPUNode %s carried assignments the operator did not write; restored %d",
                    name,
                    len(changes),
                )
                await self._write({name: future}, {name: changes})

    async def _node_lost(self, name: str) -> None:
        """Withdraw everything a node whose agent stopped reporting holds, in one write, queue
        those models first, and mark the node Ready=Unknown."""
        gpunode = self._gpunodes.get(name)
        if gpunode is None or gpunode.status is None:
            return  # never reported: nothing was placed there
        grace = self.config.placement.heartbeat_grace_seconds
        log.warning(
            "GPUNode %s heartbeat is older than %gs: treating the node as lost", name, grace
        )
        async with self._place_lock:
            changes: dict[str, Assignment | None] = {}
            for key, nodes in self._assigned.items():
                if name in nodes:
                    self._unassign(key, name, changes)
            for key in gpunode.spec.assignments:
                changes.setdefault(key, None)
            future = self.writer.submit(name, changes) if changes else None
        if future is not None:
            await self.writer.wait(name, future)
        # Their statuses first, then the node's condition: once the node reads Ready=Unknown,
        # no ModelDeployment still claims a replica there.
        why = (Reason.SCHEDULING.value, f"withdrawn from {name}, whose agent stopped reporting")
        shown = await asyncio.gather(
            *(self._show_displaced(key, why) for key in changes), return_exceptions=True
        )
        for key, outcome in zip(changes, shown, strict=True):
            if isinstance(outcome, Exception):
                log.warning("could not show %s withdrawn from %s: %s", key, name, outcome)
            self._mark_key(key, urgent=True)
        heartbeat = gpunode.status.last_heartbeat_time
        since = heartbeat.isoformat() if heartbeat else "?"
        lost = Condition(
            type="Ready",
            status="Unknown",
            reason=HEARTBEAT_LOST,
            message=(
                f"the node agent has not reported since {since} (grace {grace:g}s); "
                f"its {len(changes)} replica(s) were withdrawn"
            ),
            last_transition_time=self.clock(),
        )
        current = list(gpunode.status.conditions)
        ready = next((c for c in current if c.type == "Ready"), None)
        if ready is None or (ready.status, ready.reason) != ("Unknown", HEARTBEAT_LOST):
            await self.store.set_gpunode_conditions(name, set_condition(current, lost))

    def _is_stale(self, gpunode: GPUNode) -> bool:
        heartbeat = gpunode.status.last_heartbeat_time if gpunode.status else None
        if heartbeat is None:
            return True
        age = (self.clock() - heartbeat).total_seconds()
        # A heartbeat from the future is no evidence of life: a node (or its stolen token)
        # could otherwise freeze itself "fresh" for ever. Clocks may differ by a little.
        return age > self.config.placement.heartbeat_grace_seconds or age < -MAX_CLOCK_SKEW

    def _expire_avoidances(self) -> None:
        moment = time.monotonic()
        for key, nodes in list(self._avoid.items()):
            for node, (until, _) in list(nodes.items()):
                if until <= moment:
                    del nodes[node]
                    self._mark_key(key)
            if not nodes:
                del self._avoid[key]

    # ---- reconcile -------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring one ModelDeployment's assignments and status in line with its spec."""
        key = assignment_key(namespace, name)
        body = await self._deployment(namespace, name)
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
            await self._publish_deleting(body)  # the delete handler withdraws
            return
        generation = int(meta.get("generation") or 0)
        previous = _previous_status(body)
        spec: ModelDeploymentSpec | None = None
        error: SpecError | PolicyError | None = None
        reason: str | None = Reason.INVALID_SPEC
        try:
            spec = parse_spec(body.get("spec"))
            self._admit(key, namespace, spec)
        except SpecError as invalid:
            error = invalid  # keep what the last valid spec placed; place nothing new
        except PolicyError as refused:
            error, reason = refused, Reason.POLICY_VIOLATION  # the same, for a policy
            self._demand.pop(key, None)
        message: str | None = None
        scale: Scale | None = None
        if error is None and spec is not None:
            wanted = self._wanted(key, spec, previous)
            reason, message = await self._place(key, body, spec, wanted.desired)
            scale = self._with_idle(key, spec, wanted)  # placing may have found it idle
        if reason is None:
            self._pending.pop((namespace, name), None)
            self._preempted.pop(key, None)
        else:
            self._pending[(namespace, name)] = reason
        assigned = dict(self._assigned.get(key, {}))
        status = fold_status(
            spec=None if error else spec,
            spec_error=error,
            generation=generation,
            assigned_nodes=assigned,
            reports={node: self._fresh_report(node, key) for node in assigned},
            pending_reason=None if error else reason,
            pending_message=message,
            previous=previous,
            now=self.clock(),
            scale=scale,
            name=name,
        )
        self._count_starts(namespace, name, previous, status, assigned)
        await self._publish(body, previous, status)

    def _wanted(
        self, key: str, spec: ModelDeploymentSpec, previous: ModelDeploymentStatus | None
    ) -> Scale:
        """The count asked for: spec.replicas, or autoscaling's (seeded, after a restart, from
        status.desiredReplicas)."""
        if spec.autoscaling is None:
            self._autoscaled.pop(key, None)
            self._scale.pop(key, None)
            return Scale(spec.replicas)
        state = self._scale.get(key)
        if state is None or self._autoscaled.get(key) != spec.autoscaling:
            was = previous.desired_replicas if previous is not None else None
            held = state.desired if state is not None else was
            state = ScaleState.initial(spec.autoscaling, self.clock(), held)
            self._scale[key] = state
        self._autoscaled[key] = spec.autoscaling
        why = state.why
        if self.demand is None:
            why = "no --gateway-demand-url: autoscaling holds its first count"
        return Scale(state.desired, why, state.changed_at)

    def _with_idle(self, key: str, spec: ModelDeploymentSpec, wanted: Scale) -> Scale | None:
        """What status reports: the count asked for less replicas idle past keepAlive; None
        when that is plain spec.replicas."""
        idle = self._idle.get(key)
        if not idle:
            return None if spec.autoscaling is None else wanted
        where = ", ".join(sorted(idle))
        why = f"idle past keepAlive (withdrawn from {where}); the next request brings it back"
        return Scale(max(0, wanted.desired - len(idle)), why, wanted.changed_at)

    def _count_starts(
        self,
        namespace: str,
        name: str,
        previous: ModelDeploymentStatus | None,
        status: ModelDeploymentStatus,
        assigned: dict[str, Assignment],
    ) -> None:
        """Cold starts (and their load time) and wake-ups from host RAM, as replicas turn
        Loaded."""
        before = {p.node: p.state for p in previous.placements} if previous is not None else {}
        key = assignment_key(namespace, name)
        for placement in status.placements:
            was = before.get(placement.node)
            if placement.state is not ModelState.LOADED or was is ModelState.LOADED:
                continue
            if was is ModelState.SLEEPING:
                self.metrics.wake_ups.labels(namespace, name).inc()
                continue
            self.metrics.cold_starts.labels(namespace, name).inc()
            report = self._fresh_report(placement.node, key)
            backend = assigned[placement.node].backend if placement.node in assigned else None
            if report is not None and report.load_seconds is not None and backend is not None:
                self.metrics.cold_start_seconds.labels(backend.value).observe(report.load_seconds)

    def _admit(self, key: str, namespace: str, spec: ModelDeploymentSpec) -> None:
        """Check `spec` against every policy selecting its namespace and the namespace's quota,
        and count what it asks against that quota; raise PolicyError naming field and policy.

        Synchronous, so no other reconcile runs between the check and the count: two models
        cannot both take the last of a quota.
        """
        policies = policies_for(self._namespaces.get(namespace, {}), self._policies.values())
        check_spec(spec, policies)
        asked = _most_replicas(spec) * self._vram_bytes(key, spec)
        others = sum(
            v for k, v in self._demand.items() if k != key and k.partition(".")[0] == namespace
        )
        check_quota(asked, others, namespace, policies)
        if self._demand.get(key) != asked:
            self._demand[key] = asked
            self._mark_refused(namespace)  # less asked: room for one refused before

    def _mark_refused(self, namespace: str) -> None:
        for (ns, name), reason in list(self._pending.items()):
            if ns == namespace and reason == Reason.POLICY_VIOLATION:
                self.mark(ns, name)

    async def publish_policy_usage(self) -> None:
        """Write each ModelPolicy's usage (what its namespaces ask against its quota) when it
        changed; called from the housekeeping loop, at most every POLICY_USAGE_SECONDS, so
        usage costs no write per reconcile and little during a burst."""
        moment = time.monotonic()
        if moment < self._policy_usage_due:
            return
        self._policy_usage_due = moment + POLICY_USAGE_SECONDS
        for name, policy in list(self._policies.items()):
            selected = sorted(
                ns
                for ns, labels in self._namespaces.items()
                if policy.spec.namespace_selector.matches(labels)
            )
            used: dict[str, int] = defaultdict(int)
            for key, asked in self._demand.items():
                ns = key.partition(".")[0]
                if ns in selected:
                    used[ns] += asked
            rows = [
                NamespaceUsage(namespace=ns, used_bytes=b, used=format_bytes(b))
                for ns, b in sorted(used.items())
            ]
            top = max(rows, key=lambda r: r.used_bytes, default=None)
            quota = policy.spec.vram_quota
            summary = None
            if top is not None:
                limit = f"/{format_bytes(parse_positive_bytes(quota))}" if quota else ""
                summary = f"{top.used}{limit} {top.namespace}"
            status = ModelPolicyStatus(
                observed_generation=_int_or_none(policy.metadata.get("generation")),
                namespaces=rows,
                namespace_count=len(selected),
                used=summary,
            )
            if self._policy_status.get(name) != status:
                await self.store.write_policy_status(name, status)
                self._policy_status[name] = status

    async def _place(
        self, key: str, body: dict[str, Any], spec: ModelDeploymentSpec, replicas: int
    ) -> tuple[str | None, str | None]:
        """Decide and write `replicas` assignments; return why replicas are missing."""
        changes: dict[str, dict[str, Assignment | None]] = defaultdict(dict)
        async with self._place_lock:
            self._release_unloadable(key, changes)
            views = [
                dataclasses.replace(self._view(g), exists=False)
                if self._is_stale(g)
                else self._view(g)
                for g in self._gpunodes.values()
            ]
            desired = self._assignment(body, spec, gpu_uuid=None)
            for node, old in list(self._assigned.get(key, {}).items()):
                if _replaced(old, desired):
                    self._unassign(key, node, changes[node])  # model or size changed
            mine = self._assigned.get(key, {})
            parked = {n: a.gpu_uuid or "" for n, a in mine.items() if a.parked}
            existing = [n for n in mine if n not in parked]
            # A replica withdrawn from a node that still holds it (unloading) counts until it
            # is gone, so a model is never held on more nodes than it asks for; the report
            # that drops it queues this model again.
            lingering = [n for n in self._holding(key) if n not in mine]
            # Less any replica just found idle past keepAlive: it is not placed again.
            count = max(0, replicas - len(self._idle.get(key, {})))
            deferred = bool(lingering) and count > len(existing)
            if deferred:
                count = max(len(existing), count - len(lingering))
            request = PlacementRequest.from_spec(
                key,
                spec,
                vram_bytes=self._vram_bytes(key, spec),
                existing=existing,
                avoid={node: why for node, (_, why) in self._avoid.get(key, {}).items()},
                replicas=count,
                demanded=self._waited_for(key),
                parked=parked,
            )
            costs = self._swap_costs() if request.demanded else None
            decision = self.reservations.place_and_reserve(
                request,
                views,
                self.config.placement,
                self.clock(),
                self._recency(),
                self._earlier,
                costs,
            )
            to_park = plan_parking(decision.preempted, views) if request.demanded else frozenset()
            displaced = []
            for victim in decision.preempted:
                by = name_in(key, victim.key.partition(".")[0])
                if victim in to_park:
                    self._park(victim, changes[victim.node])
                else:
                    self._unassign(victim.key, victim.node, changes[victim.node])
                if request.demanded:
                    where = "parked in host RAM" if victim in to_park else "unloaded"
                    why = (
                        f"swapped out of {victim.node} for {by}, which requests were waiting "
                        f"for; {where}"
                    )
                    self._preempted[victim.key] = (PendingReason.SWAPPED_OUT.value, why)
                    self.metrics.swap_outs.labels("demand").inc()
                    priced = f"; price {costs.prices.get(victim.key, 0.0):.3g}" if costs else ""
                    log.info(
                        "swapping %s out of %s for %s (%s%s)",
                        victim.key,
                        victim.node,
                        key,
                        where,
                        priced,
                    )
                else:
                    why = f"displaced from {victim.node} by {by}"
                    self._preempted[victim.key] = (PendingReason.PREEMPTED.value, why)
                    self.metrics.swap_outs.labels("priority").inc()
                self.metrics.placements.labels("preempted").inc()
                displaced.append(victim.key)
            for node in decision.remove:
                self._unassign(key, node, changes[node])
                self.metrics.placements.labels("withdrawn").inc()
            for choice in decision.chosen:
                assignment = desired.model_copy(update={"gpu_uuid": choice.gpu_uuid})
                self._assigned[key][choice.node] = assignment
                changes[choice.node][key] = assignment
                if parked.get(choice.node) == choice.gpu_uuid:
                    self.metrics.placements.labels("woken").inc()
                    log.info("waking %s parked on %s (%s)", key, choice.node, choice.gpu_uuid)
                    continue
                self.metrics.placements.labels("placed").inc()
                log.info("placed %s on %s (%s)", key, choice.node, choice.gpu_uuid)
            for node in parked.keys() - {c.node for c in decision.chosen} - set(decision.remove):
                # Still parked: kept in step with the spec, as a kept replica is.
                old = self._assigned[key][node]
                updated = desired.model_copy(update={"gpu_uuid": old.gpu_uuid, "parked": True})
                if updated != old:
                    self._assigned[key][node] = updated
                    changes[node][key] = updated
            for node in decision.keep:
                kept = self._assigned[key].get(node)
                if kept is not None:
                    updated = desired.model_copy(update={"gpu_uuid": kept.gpu_uuid})
                    if updated != kept:
                        self._assigned[key][node] = updated
                        changes[node][key] = updated
            futures = {node: self.writer.submit(node, c) for node, c in changes.items() if c}
            held = sorted({victim.node for victim in decision.preempted})
            for node in held:
                self.writer.hold(node)
        # Whoever lost a replica shows it before the withdrawal is written (an operator killed
        # in between must not leave a status claiming what the agent is about to unload), and
        # is reconciled before anything else to find a new place.
        try:
            for victim_key in displaced:
                await self._show_displaced(victim_key)
                self._mark_key(victim_key, urgent=True)
        finally:
            for node in held:
                await self.writer.release(node)
        await self._write(futures, changes)
        if decision.reason is not None:
            self.metrics.placements.labels("pending").inc()
            if key in self._preempted:
                why, displaced_by = self._preempted[key]
                return why, f"{displaced_by}; {decision.message}"
            still = sorted(n for n, a in self._assigned.get(key, {}).items() if a.parked)
            if still:
                # Parked before this operator started: what displaced it is not known now.
                where = f"swapped out and parked in host RAM on {', '.join(still)}"
                return PendingReason.SWAPPED_OUT.value, f"{where}; {decision.message}"
            return decision.reason.value, decision.message
        if deferred:
            if key in self._preempted:
                return self._preempted[key]
            return (
                Reason.SCHEDULING.value,
                f"waiting for {', '.join(sorted(lingering))} to finish unloading it",
            )
        return None, None

    async def _show_displaced(self, key: str, why: tuple[str, str] | None = None) -> None:
        """Publish `key`'s status from memory, its displaced replica already gone, without
        placing anything (its own reconcile, queued next, does that). `why` is the pending
        reason and message; by default what displaced it."""
        name = self._names.get(key)
        body = await self._deployment(*name) if name else None
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError:
            return
        assigned = dict(self._assigned.get(key, {}))
        previous = _previous_status(body)
        reason, message = why or self._preempted.get(key, (PendingReason.PREEMPTED.value, ""))
        status = fold_status(
            spec=spec,
            spec_error=None,
            generation=int(body["metadata"].get("generation") or 0),
            assigned_nodes=assigned,
            reports={node: self._fresh_report(node, key) for node in assigned},
            pending_reason=reason,
            pending_message=message,
            previous=previous,
            now=self.clock(),
            scale=self._with_idle(key, spec, self._wanted(key, spec, previous)),
            name=body["metadata"]["name"],
        )
        await self._publish(body, previous, status)

    def _release_unloadable(
        self, key: str, changes: dict[str, dict[str, Assignment | None]]
    ) -> None:
        """Withdraw replicas that could not load for want of memory, or that were evicted while
        assigned, so they are placed afresh (elsewhere for a while) with their budget released.
        Called under the placement lock."""
        for node, assignment in list(self._assigned.get(key, {}).items()):
            report = self._fresh_report(node, key)
            if assignment.parked:
                if report is None or report.state not in _PARKING:
                    # Not (or no longer) in host RAM: the agent could not park it or let it
                    # go under host pressure. Withdrawn, as a swap-out that unloads is.
                    why = report.state if report is not None else "not reported"
                    log.info("%s parked on %s is %s: withdrawn", key, node, why)
                    self._unassign(key, node, changes[node])
                continue
            if report is not None and self.demand is not None and _idled(report):
                # Unloaded for idleness: withdrawn so the next request, which the gateway
                # holds, brings it back (an Evicted assignment is never reloaded as it is).
                log.info("%s idle past keepAlive on %s: withdrawn until asked for", key, node)
                self._idle[key][node] = self.clock()
                self._unassign(key, node, changes[node])
                continue
            if report is None or not _unloadable(report):
                continue
            why = f"{report.reason or report.state}: {report.message or report.state}"
            log.info("withdrawing %s from %s to place it afresh (%s)", key, node, why)
            self._avoid[key][node] = (time.monotonic() + self.config.avoid_seconds, why)
            self._unassign(key, node, changes[node])
            self.metrics.placements.labels("replaced").inc()

    def _waited_for(self, key: str) -> bool:
        """Requests wait at a gateway for `key` (it has no ready replica)."""
        entry = self._figures.get(key)
        return entry is not None and entry.waiting > 0

    def _recency(self) -> dict[str, dt.datetime]:
        """Each assigned key's last use: the gateways' last request, the agents' last access
        and load time; now for one in flight, loading or not reported yet (not settled)."""
        moment = self.clock()
        used: dict[str, dt.datetime] = {}
        for key, nodes in self._assigned.items():
            times: list[dt.datetime] = []
            entry = self._figures.get(key)
            if entry is not None:
                if entry.in_flight > 0:
                    times.append(moment)
                if entry.last_request is not None:
                    times.append(entry.last_request)
            for node in nodes:
                report = self._fresh_report(node, key)
                if report is None or report.state in (ModelState.PENDING, ModelState.LOADING):
                    times.append(moment)
                else:
                    times.extend(t for t in (report.last_access, report.loaded_at) if t)
            if times:
                used[key] = max(times)
        return used

    def _swap_costs(self) -> SwapCosts | None:
        """The `cost` swap order's figures for every assigned key (`swap_figures`: priority
        weight x the gateways' request rate x the seconds to bring it back, and whether it is
        young by the agents' rule); None under `lru2` or without the gateways' figures. A key
        with replicas on several nodes takes the dearest price, and is young if any is."""
        if self.config.swap_order != "cost" or self.demand is None:
            return None
        moment = self.clock()
        stamp = moment.timestamp()
        rules = dataclasses.replace(
            self.config.pricing,
            min_residency_seconds=self.config.placement.min_residency_seconds,
        )
        prices: dict[str, float] = {}
        young: set[str] = set()
        for key, nodes in self._assigned.items():
            entry = self._figures.get(key)
            # Once a read has worked, a model no gateway counted was asked for by nobody:
            # rate 0, not the recency an agent without any demand figures reads instead.
            rate = self._rates.rate(key, stamp) if self._counting else None
            for node, assignment in nodes.items():
                report = self._fresh_report(node, key)
                last = entry.last_request if entry is not None else None
                loaded = report.loaded_at if report is not None else None
                figures = ReplicaDemand(
                    rate=rate,
                    in_use=entry.busy if entry is not None else None,
                    served=last is not None and (loaded is None or last >= loaded),
                    last_request=last,
                )
                replica = replica_resident(key, assignment, report, figures, moment)
                cost, is_young = swap_figures(replica, stamp, rules)
                prices[key] = max(prices.get(key, 0.0), cost)
                if is_young:
                    young.add(key)
        return SwapCosts(prices, frozenset(young))

    def _park(self, victim: Victim, changes: dict[str, Assignment | None]) -> None:
        """Keep `victim`'s assignment, marked parked: its agent puts it to sleep in host RAM,
        and its VRAM is no longer counted on the GPU (the ledger released it already)."""
        old = self._assigned[victim.key][victim.node]
        parked = old.model_copy(update={"parked": True})
        self._assigned[victim.key][victim.node] = parked
        changes[victim.key] = parked
        log.info("parking %s on %s in host RAM", victim.key, victim.node)

    def _unassign(self, key: str, node: str, changes: dict[str, Assignment | None]) -> None:
        """Forget `key` on `node` in memory and the ledger now; `changes` carries the write."""
        self._assigned.get(key, {}).pop(node, None)
        self.reservations.release(key, node)
        changes[key] = None
        log.info("withdrew %s from %s", key, node)

    async def _write(
        self,
        futures: dict[str, asyncio.Future[bool]],
        changes: dict[str, dict[str, Assignment | None]],
    ) -> None:
        """Wait for the submitted writes; a node that is gone or refused gets its picture
        re-read, so memory never keeps an assignment the API server does not have."""
        failed: BaseException | None = None
        for node, future in futures.items():
            try:
                ok = await self.writer.wait(node, future)
            except Exception as exc:
                ok, failed = False, exc
            if not ok:
                await self._resync(node, changes[node])
        if failed is not None:
            raise failed

    async def _resync(self, node: str, keys: Iterable[str]) -> None:
        """Make the in-memory assignments of `node` what its GPUNode says; queue `keys`."""
        gpunode = await self.store.get_gpunode(node)
        async with self._place_lock:
            for key, nodes in self._assigned.items():
                if node in nodes and (gpunode is None or key not in gpunode.spec.assignments):
                    nodes.pop(node)
            if gpunode is None:
                self._gpunodes.pop(node, None)
            else:
                self._gpunodes[node] = gpunode
                for key, assignment in gpunode.spec.assignments.items():
                    self._assigned[key][node] = assignment
            self.reservations.rebuild(self._views())
        for key in keys:
            self._mark_key(key)

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
            diffusers=spec.diffusers,
            ollama=spec.ollama,
        )

    def _vram_bytes(self, key: str, spec: ModelDeploymentSpec) -> int:
        """spec.vram, else what an agent measured or estimated, else the default budget."""
        if spec.vram_bytes is not None:
            return spec.vram_bytes
        # Only from nodes we assigned it to: any node may write any figure into its own
        # report, and one inflated size there must not make the model fit nowhere.
        figures = [
            m.vram_bytes
            for name in self._assigned.get(key, {})
            if (g := self._gpunodes.get(name)) is not None and g.status is not None
            for m in g.status.models
            if m.key == key and m.vram_bytes
        ]
        if figures:
            self._measured[key] = max(figures)
        return self._measured.get(key, self.config.default_vram_bytes)

    def _report(self, node: str, key: str) -> ResidentModel | None:
        gpunode = self._gpunodes.get(node)
        if gpunode is None or gpunode.status is None:
            return None
        return next((m for m in gpunode.status.models if m.key == key), None)

    def _fresh_report(self, node: str, key: str) -> ResidentModel | None:
        """What a node's agent reports for `key`, if its heartbeat is fresh: a lost node's last
        word is no evidence that a replica is ready there."""
        gpunode = self._gpunodes.get(node)
        if gpunode is None or self._is_stale(gpunode):
            return None
        return self._report(node, key)

    async def _publish(
        self,
        body: dict[str, Any],
        previous: ModelDeploymentStatus | None,
        status: ModelDeploymentStatus,
    ) -> None:
        meta = body["metadata"]
        if previous is None or previous.to_k8s() != status.to_k8s():
            written = await self.store.write_status(meta["namespace"], meta["name"], status)
            if written is None:
                # Deleted since we read it, perhaps after placing it: the next pass withdraws.
                self._bodies.pop((meta["namespace"], meta["name"]), None)
                self.mark(meta["namespace"], meta["name"])
                return
            self._remember(written)
        for event in events_between(previous, status):
            await self.store.post_event(body, event.type, event.reason, event.message)
        self._update_pending_gauge()

    async def _publish_deleting(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = assignment_key(meta["namespace"], meta["name"])
        previous = _previous_status(body)
        status = fold_deleting(
            generation=int(meta.get("generation") or 0),
            holding=self._holding(key),
            previous=previous,
            now=self.clock(),
        )
        await self._publish(body, previous, status)

    def _holding(self, key: str) -> dict[str, ResidentModel]:
        """Fresh nodes whose agent still reports `key` on a GPU or in host RAM."""
        held = {}
        for node in sorted(self._gpunodes):
            report = self._fresh_report(node, key)
            if report is not None and report.state in _HOLDING:
                held[node] = report
        return held

    def _update_pending_gauge(self) -> None:
        self.metrics.pending.clear()
        counts: dict[str, int] = defaultdict(int)
        for reason in self._pending.values():
            counts[reason] += 1
        for reason, count in counts.items():
            self.metrics.pending.labels(reason).set(count)

    def _forget(self, key: str, name: Key) -> None:
        self._bodies.pop(name, None)
        self._measured.pop(key, None)
        if self._demand.pop(key, None) is not None:
            self._mark_refused(name[0])  # its share of the quota is free
        self._pending.pop(name, None)
        self._preempted.pop(key, None)
        self._avoid.pop(key, None)
        self._idle.pop(key, None)
        self._earlier.pop(key, None)
        self._autoscaled.pop(key, None)
        self._scale.pop(key, None)
        self._update_pending_gauge()

    # ---- delete ----------------------------------------------------------------------------

    async def finalize(self, namespace: str, name: str) -> list[str]:
        """Withdraw every assignment; return the nodes still holding the model (empty: done).

        A node whose GPUNode is gone or whose heartbeat is stale cannot unload anything, so it
        does not hold the deletion up. The status says so from the first pass.
        """
        key = assignment_key(namespace, name)
        await self._withdraw_all(key)
        holding = sorted(self._holding(key))
        if not holding:
            self._forget(key, (namespace, name))
            self._names.pop(key, None)
            self._mark_pending()  # freed capacity
        else:
            body = await self.store.get_deployment(namespace, name)
            if body is not None:
                await self._publish_deleting(body)
        return holding

    async def _withdraw_all(self, key: str) -> bool:
        """Withdraw `key` from every node that holds or may hold it; False when none did."""
        changes: dict[str, dict[str, Assignment | None]] = defaultdict(dict)
        async with self._place_lock:
            nodes = set(self._assigned.get(key, {}))
            nodes.update(n for n, g in self._gpunodes.items() if key in g.spec.assignments)
            for node in sorted(nodes):
                self._unassign(key, node, changes[node])
            self._assigned.pop(key, None)
            self.reservations.release(key)
            futures = {node: self.writer.submit(node, c) for node, c in changes.items()}
        await self._write(futures, changes)
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
        return dataclasses.replace(
            view,
            assignments=assignments,
            reserve_bytes=reserve_bytes(self.config.gpu_reserve_bytes),
        )

    def _views(self) -> list[NodeView]:
        return [self._view(g) for g in self._gpunodes.values()]


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _name(gpunode: GPUNode) -> str:
    return str(gpunode.metadata.get("name", ""))


def _older(meta: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether an object version is older than another, by resourceVersion. Opaque to
    clients by convention, but etcd's revisions grow with every write; anything that does not
    read as a number counts as newer, so the cache then follows what arrived last."""
    try:
        return int(meta.get("resourceVersion") or "") < int(than.get("resourceVersion") or "")
    except ValueError:
        return False


def _node_object(node: Any) -> _NodeObject:
    taints = [t.to_dict() for t in (node.spec.taints or [])] if node.spec else []
    return _NodeObject(dict(node.metadata.labels or {}), taints)


def _reports(gpunode: GPUNode | None) -> dict[str, tuple[Any, ...]]:
    """What a GPUNode reports per key, in the fields a ModelDeployment status shows."""
    if gpunode is None or gpunode.status is None:
        return {}
    return {
        m.key: (m.state, m.gpu_uuid, m.vram_bytes, m.vram_source, m.progress, m.message, m.reason)
        for m in gpunode.status.models
    }


def _unloadable(report: ResidentModel) -> bool:
    """A replica its node could not load for want of memory, or evicted while assigned."""
    if report.state is ModelState.FAILED:
        return report.reason in RELOCATABLE_FAILURES
    if report.state is ModelState.EVICTED:
        return report.reason not in STAYING_EVICTIONS
    return False


def _most_replicas(spec: ModelDeploymentSpec) -> int:
    """The replicas a spec may come to hold: what a namespace's VRAM quota is charged (an
    autoscaled model up to maxReplicas, whatever spec.replicas says)."""
    return spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.replicas


def _idled(report: ResidentModel) -> bool:
    """A replica its agent unloaded because it was idle past keepAlive."""
    return report.state is ModelState.EVICTED and report.reason in STAYING_EVICTIONS


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
