"""Replay a request trace against a described cluster, with the real placement and eviction.

Each model is kept in at most one copy, loaded on demand, the way the gateway's serving flow
asks for it (a request for a model with no ready replica waits while residency catches up).
For every request, in time order:

- on a GPU and loaded: a warm hit, no added latency;
- on a GPU and still loading (or waking): it waits for the rest of that load;
- parked in host RAM (vLLM sleep level 1): it is woken on its GPU, making room there with the
  agent's `plan_room` under the policy; the wake time is added;
- otherwise a cold load: the operator's `place` picks a GPU among those it fits on now; when
  none has room, `plan_room` (the agent's eviction, under the policy) is asked on every GPU the
  model may go to, and the GPU whose plan evicts the coldest set wins (its hottest victim is
  the coldest, in the policy's order over the whole cluster; under `cost`, the plan with the
  least price); `place` then places it there.
  A high or critical model that no plan makes room for (young models, higher priorities) is
  placed with the operator's priority preemption. If nothing works the request waits, as the
  gateway holds it, and is tried again whenever room may have appeared (a load ends, a model
  passes the minimum residency); after `max_wait` seconds it is given up (unserved).
- under the `operator` policies the operator alone decides, as in a cluster whose gateway
  reports demand: `place` with the request `demanded` picks the GPU and the models to swap out
  (see OPERATOR, OPERATOR_LRU2), for a cold load and for waking a parked model alike.

The GPU memory accounting is `NodeView.budgets` (the operator's: footprints with vLLM's
rounding, the agents' reserve), so what the simulator holds is what the operator would
promise; a load that would over-commit a GPU is counted (and must never happen).

A request keeps its model in use for `ClusterSpec.request_duration` from the moment it runs
(its arrival, or the end of the load it waited for); with the gateways' demand
(`ClusterSpec.gateway_demand`) the agents' eviction sees that (`Resident.in_use`, `served`),
so a model's minimum residency ends once it has served its requests.

Simplifications, stated: loads do not share disk or PCIe bandwidth; requests on a model run
side by side without slowing each other (only residency is modelled, not compute); a parked
model stays parked until woken (the agent's host-pressure relief needs PSI, which is not
simulated); keepAlive expiry does not unload (in this system it only permits unloading); one
copy per model.
"""

from __future__ import annotations

import datetime as dt
import math
import time as wallclock
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from vram_operator.api import GPU, Assignment, Backend, ModelState, Priority, ResidentModel
from vram_operator.api.budget import reserve_bytes
from vram_operator.api.modeldeployment import VLLMOptions
from vram_operator.operator.placement import (
    NodeView,
    PlacementConfig,
    PlacementDecision,
    PlacementRequest,
    ReplicaDemand,
    SwapCosts,
    Victim,
    place,
    plan_parking,
    replica_resident,
    swap_figures,
    swap_young,
)
from vram_operator.policy.eviction import (
    POLICIES,
    RATE_HALF_LIFE_SECONDS,
    DecayedRates,
    EvictionConfig,
    Resident,
    RoomPlan,
    coldest_first,
    is_evictable,
    last_used,
    plan_room,
    price,
)

from .cluster import ClusterSpec, SimModel
from .trace import Trace, resolve

BASELINES = ("ollama", "oracle-rate", "oracle-lfu", "offline")
"""Policies only the simulator can run. `ollama` and `offline` are orders it supplies through
EvictionConfig.victim_order: Ollama's own rule (shortest keep-alive first, ties by name, blind
to size and recency; server/sched.go findRunnerToUnload) and the offline reference (the model
needed furthest ahead first). `oracle-rate` is the agent's `cost` policy told each model's true
mean request rate over the whole trace instead of the decayed online figure: what the cost
rule could do with perfect knowledge of popularity but none of the future's order, which
bounds what a better rate estimate could win. `oracle-lfu` evicts the model with the lowest
true rate (ties: longest idle), blind to size and cost: on independent requests with known
popularity that is the classic best online order (A0) for equal sizes."""

OPERATOR = "operator"
"""What the operator does when requests wait at a gateway for a model that fits nowhere (the
gateway's demand), with its default `--swap-order cost`: `place` with the request `demanded`
and each replica's `swap_price` (from the decayed request rate and its load time, as the
operator reads them), which displaces, among the settled models of its priority or lower
(last used at least the minimum residency ago), the set whose summed price is least, on the
GPU where that is least; `plan_parking` parks a victim in host RAM when it can sleep and the
RAM takes it. A parked model is woken by `place` too. The agents' eviction policy plays no
part in it."""

OPERATOR_LRU2 = "operator-lru2"
"""The same with `--swap-order lru2`: lowest priority first, then the one asked for least
recently before its last request (LRU-2), then the least recently used."""

OPERATORS = (OPERATOR, OPERATOR_LRU2)

POLICY_NAMES: tuple[str, ...] = (*POLICIES, *OPERATORS, *BASELINES)

REBASE_SECONDS = 50 * RATE_HALF_LIFE_SECONDS
"""How far the moment rates are read at (`Simulation._rate_base`) may fall behind the trace
before it moves on: a rate read 50 half-lives early is about 1e15 times the rate now, far from
overflowing."""

EPOCH = 1_700_000_000.0
"""Trace time 0 in epoch seconds, for the placement's heartbeat check."""

EventKind = Literal["load", "wake", "unload", "park", "preempt"]


class SimulationError(ValueError):
    """A simulation that cannot run as asked (unknown policy, models the trace lacks, ...)."""


@dataclass(frozen=True)
class Event:
    """One change of residency, recorded when asked (tests replay them)."""

    time: float
    kind: EventKind
    key: str
    gpu: str
    hold_bytes: int


@dataclass
class Result:
    """The figures of one policy on one trace."""

    policy: str
    requests: int = 0
    unmatched: int = 0
    """Requests naming a model that is not described; skipped."""
    warm: int = 0
    waited: int = 0
    """Requests that arrived while their model was loading or waking."""
    cold_starts: int = 0
    wakes: int = 0
    cold_load_seconds: float = 0.0
    """Seconds spent loading from disk and waking from host RAM, summed over loads."""
    evictions: int = 0
    parks: int = 0
    preemptions: int = 0
    critical_evictions: int = 0
    unserved: int = 0
    unserved_by_model: dict[str, int] = field(default_factory=dict)
    """The unserved requests by model key."""
    overcommits: int = 0
    latencies: list[float] = field(default_factory=list)
    """Non-zero added latencies of served requests (the rest added none)."""
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(trace seconds, GPU bytes held) at even intervals."""
    capacity_bytes: int = 0
    gpus: int = 0
    wall_seconds: float = 0.0
    events: list[Event] = field(default_factory=list)

    @property
    def served(self) -> int:
        return self.requests - self.unserved

    @property
    def warm_ratio(self) -> float:
        return self.warm / self.requests if self.requests else 1.0

    def latency(self, quantile: float) -> float:
        """Added latency at `quantile` (nearest rank) over served requests, zeros included."""
        served = self.served
        if served <= 0:
            return 0.0
        rank = max(1, math.ceil(quantile * served))
        zeros = served - len(self.latencies)
        if rank <= zeros:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered), rank - zeros) - 1]


@dataclass
class _Copy:
    model: int
    node: int
    gpu: str
    state: ModelState
    ready_at: float
    loaded_at: float
    hold: int
    served_from: float = math.inf
    """When a request first ran on it."""
    free_at: float = math.inf
    """When it stops being young, by what is known now (`Simulation._evictable_at`)."""


class Simulation:
    """One policy over one trace; `run()` returns its Result."""

    def __init__(
        self,
        cluster: ClusterSpec,
        models: Sequence[SimModel],
        trace: Trace,
        policy: str,
        *,
        rate_half_life: float = RATE_HALF_LIFE_SECONDS,
        max_wait: float = 600.0,
        samples: int = 300,
        record_events: bool = False,
    ) -> None:
        if policy not in POLICY_NAMES:
            raise SimulationError(f"policy {policy!r} is not one of {', '.join(POLICY_NAMES)}")
        if not models:
            raise SimulationError("no models to simulate")
        self.cluster = cluster
        self.models = list(models)
        self.trace = trace
        self.policy = policy
        self.operator = policy in OPERATORS
        """Whether the operator alone decides swap-outs (`OPERATORS`)."""
        self.record_events = record_events
        self.max_wait = max_wait
        self.pending: dict[int, list[float]] = {}
        """Requests waiting for room, by model: their arrival times."""
        self.pending_work: dict[int, float] = {}
        """The longest those waiting requests run once served, by model."""
        self.busy_end = [0.0] * len(models)
        """When the requests on each model end, by model."""
        tokens = trace.tokens if len(trace.tokens) == len(trace.times) else None
        self.durations = (
            [cluster.request_duration(t) for t in tokens]
            if tokens is not None and any(t is not None for t in tokens)
            else None
        )
        """Each request's run time, where the trace gives tokens; else all run
        `cluster.request_seconds`."""
        self.retry_at = math.inf
        self.index = {m.key: i for i, m in enumerate(self.models)}
        self.requests, self.unknown = resolve(
            trace, [m.key for m in self.models], [m.ref for m in self.models]
        )
        self.demand = DecayedRates(rate_half_life)
        self.true_rate = self._true_rates() if policy.startswith("oracle-") else None
        self.next_use = self._first_uses()
        self.next_time = self._next_times() if policy == "offline" else []
        self.config = self._config(policy)
        self.placement = PlacementConfig(strategy=cluster.strategy, allow_preemption=False)  # type: ignore[arg-type]
        self._pricing = EvictionConfig(min_residency_seconds=cluster.min_residency_seconds)
        """The operator's pricing and minimum residency under `operator` (`OperatorConfig`)."""
        self._replicas: dict[
            int, tuple[_Copy, tuple[bool, float, int | None, bool], Resident, float]
        ] = {}
        """Under `operator`, each copy's view for the swap order and its price, with the figures
        they were built from (`_swap_costs`)."""
        self.swapping = PlacementConfig(
            strategy=cluster.strategy,  # type: ignore[arg-type]
            min_residency_seconds=cluster.min_residency_seconds,
        )
        """The operator's placement under the `operator` policies: preemption and demand swaps,
        settled after the same minimum residency as every other policy here."""
        self._previous_request: dict[int, float] = {}
        self._earlier: dict[str, dt.datetime] = {}
        """The request before the last, by key (the operator's LRU-2 figure)."""
        self._recency: dict[str, dt.datetime] = {}
        """Under the `operator` policies, each copy's last use or load, whichever is later, by
        key (the LRU-2 order reads it)."""
        self.preempting = PlacementConfig(strategy=cluster.strategy, allow_preemption=True)  # type: ignore[arg-type]
        reserve = reserve_bytes(cluster.min_free_bytes)
        self.gpus = [
            tuple(
                GPU(
                    index=g,
                    uuid=f"GPU-{node.name}-{g}",
                    name="simulated",
                    total_bytes=size,
                    used_bytes=0,
                    free_bytes=size,
                )
                for g, size in enumerate(node.gpu_bytes)
            )
            for node in cluster.nodes
        ]
        self.reserve = reserve
        self.node_of_gpu = {g.uuid: n for n, gpus in enumerate(self.gpus) for g in gpus}
        self.room = {g.uuid: g.total_bytes - reserve for gpus in self.gpus for g in gpus}
        self.assignments: list[dict[str, Assignment]] = [{} for _ in cluster.nodes]
        self._assignment_cache: dict[tuple[int, str], Assignment] = {}
        self._footprints: dict[tuple[int, str], int] = {}
        self.where: dict[int, _Copy] = {}
        self.on_gpu: dict[str, dict[int, _Copy]] = {uuid: {} for uuid in self.room}
        self.host_used = [0] * len(cluster.nodes)
        self.last_access = [0.0] * len(self.models)
        self.held = 0
        self.used = dict.fromkeys(self.room, 0)
        """Bytes held per GPU, kept with on_gpu."""
        self._rate_base = trace.times[0] if trace.times else 0.0
        """The moment request rates are read at (`_rate`), moved on as the trace goes on."""
        self._residents: dict[int, tuple[_Copy, tuple[bool, ...], Resident]] = {}
        """The agent's view of each resident copy, by model, with whether it had loaded, was in
        use and had served (see `_resident`); a request drops its model's entry."""
        self._node_views: dict[int, tuple[float, NodeView]] = {}
        """Per node, when its current view was built and the view (see `_views`)."""
        self._reclaim: dict[str, tuple[float, dict[int, int]]] = {}
        """Per GPU, until when its `_reclaimable` figures hold, and the figures."""
        self.result = Result(
            policy=policy,
            capacity_bytes=sum(g.total_bytes for gpus in self.gpus for g in gpus),
            gpus=cluster.gpu_count,
        )
        self.sample_every = max(trace.duration / samples, 1e-9) if samples else math.inf
        self.eligible = [self._eligible(m) for m in self.models]
        self._fits_in = [
            sorted(((g, self._footprint(m, g)) for g in gpus), key=lambda item: item[1])
            or [("", 2**62)]
            for m, gpus in enumerate(self.eligible)
        ]
        """Per model, its eligible GPUs with its footprint there, smallest footprint first (a
        model with none gets one GPU it never fits)."""

    # ---- set-up ------------------------------------------------------------------------------

    def _config(self, policy: str) -> EvictionConfig:
        minimum = self.cluster.min_residency_seconds
        if policy == "ollama":
            keep = {m.key: m.keep_alive_seconds for m in self.models}
            return EvictionConfig(
                min_residency_seconds=minimum, victim_order=lambda r, _now: (-keep[r.key],)
            )
        if policy == "oracle-rate":
            return EvictionConfig(policy="cost", min_residency_seconds=minimum)
        if policy in OPERATORS:  # never asked: the operator's swap-out does not use it
            return EvictionConfig(policy="lru", min_residency_seconds=minimum)
        if policy == "oracle-lfu" and self.true_rate is not None:
            index, rate = self.index, self.true_rate
            return EvictionConfig(
                min_residency_seconds=minimum,
                victim_order=lambda r, now: (-rate[index[r.key]], now - last_used(r)),
            )
        if policy == "offline":
            index, next_use = self.index, self.next_use
            return EvictionConfig(
                min_residency_seconds=minimum,
                victim_order=lambda r, now: (next_use[index[r.key]] - now, float(r.vram_bytes)),
            )
        return EvictionConfig(policy=policy, min_residency_seconds=minimum)  # type: ignore[arg-type]

    def _first_uses(self) -> list[float]:
        first = [math.inf] * len(self.models)
        for time, model in zip(self.trace.times, self.requests, strict=True):
            if model >= 0 and math.isinf(first[model]):
                first[model] = time
        return first

    def _true_rates(self) -> list[float]:
        """Each model's requests over the whole trace per second of it (for oracle-rate)."""
        counts = [0] * len(self.models)
        for model in self.requests:
            if model >= 0:
                counts[model] += 1
        duration = max(self.trace.duration, 1.0)
        return [count / duration for count in counts]

    def _next_times(self) -> list[float]:
        following = [math.inf] * len(self.requests)
        seen = [math.inf] * len(self.models)
        for i in range(len(self.requests) - 1, -1, -1):
            model = self.requests[i]
            if model >= 0:
                following[i] = seen[model]
                seen[model] = self.trace.times[i]
        return following

    def _eligible(self, model: SimModel) -> tuple[str, ...]:
        """GPUs `place` would ever put it on: it asks one replica per node of an empty cluster."""
        request = self._request(model, replicas=len(self.cluster.nodes))
        now = self._now(0.0)
        views = [self._view(n, now, {}) for n in range(len(self.cluster.nodes))]
        decision = place(request, views, self.placement, now)
        nodes = {self.cluster.nodes[n].name: n for n in range(len(self.cluster.nodes))}
        return tuple(
            g.uuid
            for choice in decision.chosen
            for g in self.gpus[nodes[choice.node]]
            if request.footprint(g) <= self.room[g.uuid]
        )

    # ---- views for the real placement and eviction ------------------------------------------

    @staticmethod
    def _now(time: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(EPOCH + time, dt.UTC)

    def _request(self, model: SimModel, replicas: int = 1) -> PlacementRequest:
        return PlacementRequest(
            key=model.key,
            vram_bytes=model.vram_bytes,
            backend=model.backend,
            priority=model.priority,
            replicas=replicas,
            node_selector=model.node_selector,
            tolerations=model.tolerations,
        )

    def _view(self, node: int, now: dt.datetime, assignments: dict[str, Assignment]) -> NodeView:
        spec = self.cluster.nodes[node]
        return NodeView(
            name=spec.name,
            labels=spec.labels,
            taints=spec.taints,
            heartbeat=now,
            gpus=self.gpus[node],
            assignments=assignments,
            reserve_bytes=self.reserve,
            host_available_bytes=spec.host_bytes - self.host_used[node],
        )

    def _assignment(self, model: int, gpu: str) -> Assignment:
        cached = self._assignment_cache.get((model, gpu))
        if cached is None:
            spec = self.models[model]
            namespace, _, name = spec.key.partition(".")
            cached = Assignment(
                namespace=namespace,
                name=name or namespace,
                model=spec.ref,
                backend=spec.backend,
                priority=spec.priority,
                gpu_uuid=gpu,
                vram_bytes=spec.vram_bytes,
                vllm=(
                    VLLMOptions(sleep_mode=spec.can_park) if spec.backend is Backend.VLLM else None
                ),
            )
            self._assignment_cache[(model, gpu)] = cached
        return cached

    def _resident(self, copy: _Copy, now: float) -> Resident:
        """The agent's view of `copy` at `now`, rebuilt only when a figure in it changes: the
        copy, its last use and request rate (a request drops the entry), and whether it has
        loaded, is in use and has served."""
        loaded = copy.ready_at <= now
        # Demand figures: whether requests run on it (or wait for it) and whether any has.
        use = (now < self.busy_end[copy.model], copy.served_from <= now)
        known = self._residents.get(copy.model)
        if known is not None and known[0] is copy and known[1] == (loaded, *use):
            return known[2]
        resident = self._new_resident(copy, loaded, use)
        self._residents[copy.model] = (copy, (loaded, *use), resident)
        return resident

    def _rebase(self, now: float) -> None:
        """Move the moment rates are read at up to `now` when it has fallen far behind, and drop
        every view built on the old one. Called only between decisions, so that the figures one
        decision compares are all read at the same moment."""
        if now - self._rate_base > REBASE_SECONDS:
            self._rate_base = now
            self._residents.clear()
            self._replicas.clear()

    def _rate(self, model: int) -> float:
        """The gateways' decayed request rate of `model` read at `_rate_base`
        (`DecayedRates.rate`): the rate now times a factor common to every model, so every
        order, sum and comparison the policies make of rates comes out as with the rates now,
        and a figure holds until the model's next request."""
        return self.demand.rate(model, self._rate_base)

    def _new_resident(self, copy: _Copy, loaded: bool, use: tuple[bool, bool]) -> Resident:
        model = self.models[copy.model]
        node = self.cluster.nodes[copy.node]
        demand = self.cluster.gateway_demand
        rate = None
        if self.policy == "oracle-rate" and self.true_rate is not None:
            rate = self.true_rate[copy.model]
        elif demand and self.config.policy == "cost":
            rate = self._rate(copy.model)
        in_use = int(use[0]) if demand else None
        return Resident(
            key=model.key,
            priority=model.priority,
            vram_bytes=copy.hold,
            state=ModelState.LOADED if loaded else ModelState.LOADING,
            loaded_at=EPOCH + copy.loaded_at,
            last_access=EPOCH + self.last_access[copy.model],
            can_park=model.can_park,
            host_bytes=model.vram_bytes,
            reload_seconds=self.cluster.load_seconds(node, model),
            wake_seconds=self.cluster.wake_seconds_for(node, model) if model.can_park else None,
            request_rate=rate,
            in_use=in_use,
            served=demand and use[1],
        )

    def _free(self, gpu: str, excluding: int | None = None) -> int:
        free = self.room[gpu] - self.used[gpu]
        copy = self.on_gpu[gpu].get(excluding) if excluding is not None else None
        return free if copy is None else free + copy.hold

    # ---- residency changes ------------------------------------------------------------------

    def _event(self, time: float, kind: EventKind, copy: _Copy) -> None:
        if self.record_events:
            key = self.models[copy.model].key
            self.result.events.append(Event(time, kind, key, copy.gpu, copy.hold))

    def _leave_gpu(self, copy: _Copy) -> None:
        self._node_views.pop(copy.node, None)
        self._reclaim.pop(copy.gpu, None)
        del self.on_gpu[copy.gpu][copy.model]
        del self.assignments[copy.node][self.models[copy.model].key]
        self.held -= copy.hold
        self.used[copy.gpu] -= copy.hold

    def _occupy(self, copy: _Copy, time: float, kind: EventKind) -> None:
        self._node_views.pop(copy.node, None)
        self._reclaim.pop(copy.gpu, None)
        if copy.hold > self._free(copy.gpu):
            self.result.overcommits += 1
        self.on_gpu[copy.gpu][copy.model] = copy
        self.assignments[copy.node][self.models[copy.model].key] = self._assignment(
            copy.model, copy.gpu
        )
        self.held += copy.hold
        self.used[copy.gpu] += copy.hold
        self.where[copy.model] = copy
        self._event(time, kind, copy)

    def _evict(self, key: str, kind: str, time: float) -> None:
        model = self.index[key]
        copy = self.where[model]
        self._leave_gpu(copy)
        self.result.evictions += 1
        if self.models[model].priority is Priority.CRITICAL:
            self.result.critical_evictions += 1
        if kind == "park":
            copy.state = ModelState.SLEEPING
            self.host_used[copy.node] += self.models[model].vram_bytes
            self._node_views.pop(copy.node, None)
            self.result.parks += 1
            self._event(time, "park", copy)
        else:
            del self.where[model]
            self._event(time, "preempt" if kind == "preempt" else "unload", copy)

    def _unpark(self, copy: _Copy) -> None:
        self.host_used[copy.node] -= self.models[copy.model].vram_bytes
        self._node_views.pop(copy.node, None)

    def _footprint(self, model: int, gpu: str) -> int:
        """What it holds on `gpu` by the operator's accounting rule (api/budget.py)."""
        cached = self._footprints.get((model, gpu))
        if cached is None:
            unit = next(g for g in self.gpus[self.node_of_gpu[gpu]] if g.uuid == gpu)
            cached = self._request(self.models[model]).footprint(unit)
            self._footprints[(model, gpu)] = cached
        return cached

    def _plan_on(
        self, gpu: str, model: int, now: float, residents: dict[int, Resident] | None = None
    ) -> RoomPlan:
        """The agent's plan_room on one GPU for `model`, under the policy."""
        node = self.node_of_gpu[gpu]
        on_gpu = self.on_gpu[gpu].values()
        return plan_room(
            [residents[c.model] if residents else self._resident(c, now) for c in on_gpu],
            self._footprint(model, gpu),
            self._free(gpu, excluding=model),
            EPOCH + now,
            self.config,
            incoming_priority=self.models[model].priority,
            host_available_bytes=self.cluster.nodes[node].host_bytes - self.host_used[node],
        )

    def _apply(self, plan: RoomPlan, now: float) -> None:
        for action in plan.actions:
            self._evict(action.key, action.kind, now)

    # ---- one request -------------------------------------------------------------------------

    def run(self) -> Result:
        """Replay the whole trace; the Result also has the wall-clock seconds it took."""
        started = wallclock.perf_counter()
        result = self.result
        times = self.trace.times
        origin = times[0] if times else 0.0
        if times:
            self._preload_critical(origin)
        next_sample = origin
        offline = self.policy == "offline"
        for i, model in enumerate(self.requests):
            now = times[i]
            self._rebase(now)
            if self.retry_at <= now:
                self._retry(now)
            while now >= next_sample:
                result.samples.append((next_sample - origin, self.held))
                next_sample += self.sample_every
            if model < 0:
                result.unmatched += 1
                continue
            result.requests += 1
            self.demand.add(model, 1.0, now)
            if offline:
                self.next_use[model] = self.next_time[i]
            self.last_access[model] = now
            self._residents.pop(model, None)
            copy = self.where.get(model)
            if self.operator:
                self._used(model, copy, now)
            runs = self.durations[i] if self.durations else self.cluster.request_seconds
            if copy is not None and copy.state is not ModelState.SLEEPING:
                if copy.ready_at <= now:
                    result.warm += 1
                else:
                    result.waited += 1
                    result.latencies.append(copy.ready_at - now)
                self._serve(copy, now, max(now, copy.ready_at), runs)
                continue
            waiting = self.pending.get(model)
            if waiting is not None:
                waiting.append(now)
                self.pending_work[model] = max(self.pending_work[model], runs)
                continue
            if self._bring(model, now):
                copy = self.where[model]
                result.latencies.append(copy.ready_at - now)
                self._serve(copy, now, copy.ready_at, runs)
            else:
                self.pending[model] = [now]
                self.pending_work[model] = runs
                self.retry_at = min(self.retry_at, self._next_change(now))
        end = (times[-1] if times else 0.0) + self.max_wait
        self._retry(end)
        for model, arrivals in self.pending.items():
            self._give_up(model, len(arrivals))
        self.pending.clear()
        self.pending_work.clear()
        result.samples.append((self.trace.duration, self.held))
        result.wall_seconds = wallclock.perf_counter() - started
        return result

    def _bring(self, model: int, now: float) -> bool:
        """Wake or load `model` at `now`; False when no room can be made for it."""
        if self.operator:
            return self._swap_in(model, now)
        copy = self.where.get(model)
        return (copy is not None and self._wake(copy, now)) or self._cold(model, now)

    def _serve(self, copy: _Copy, now: float, start: float, seconds: float) -> None:
        """A request served at `now` runs on `copy` from `start` for `seconds`: the agents'
        demand figures see it in use until then, and served from then on."""
        model = copy.model
        self.busy_end[model] = max(self.busy_end[model], start + seconds)
        copy.served_from = min(copy.served_from, start)
        if self.cluster.gateway_demand and self.policy != OPERATOR_LRU2:
            self._residents.pop(model, None)
            self._settle(copy, now)

    def _settle(self, copy: _Copy, now: float) -> None:
        """Work out `copy.free_at` again after its figures changed at `now`: the GPU's
        reclaimable figures go when they no longer hold, and waiting requests are tried again
        when it comes free."""
        was, copy.free_at = copy.free_at, self._evictable_at(copy)
        known = self._reclaim.get(copy.gpu)
        if known is not None and ((was <= now) != (copy.free_at <= now) or copy.free_at < known[0]):
            del self._reclaim[copy.gpu]
        if self.pending and copy.free_at > now:
            self.retry_at = min(self.retry_at, copy.free_at)

    def _evictable_at(self, copy: _Copy) -> float:
        """When `copy` stops being young (`eviction.is_young`), by what is known now."""
        minimum = self.cluster.min_residency_seconds
        if self.policy == OPERATOR_LRU2:
            return self._settled_from(copy) + minimum
        fixed = copy.loaded_at + minimum
        if not self.cluster.gateway_demand:
            return fixed
        return max(self.busy_end[copy.model], min(copy.served_from, fixed))

    def _next_change(self, now: float) -> float:
        """The next moment room could appear (a loaded model stops being young and becomes
        evictable) or a waiting request gives up."""
        moments = [
            c.free_at for copies in self.on_gpu.values() for c in copies.values() if c.free_at > now
        ]
        moments.extend(a[0] + self.max_wait for a in self.pending.values())
        return min(moments, default=math.inf)

    def _used(self, model: int, copy: _Copy | None, now: float) -> None:
        """Keep the operator's figures of a request: its LRU-2 time, the recency of a copy on
        a GPU, and that GPU's reclaimable bytes, which its settling moment changed."""
        key = self.models[model].key
        previous = self._previous_request.get(model)
        if previous is not None:
            self._earlier[key] = self._now(previous)
        self._previous_request[model] = now
        if copy is not None and copy.state is not ModelState.SLEEPING:
            self._recency[key] = self._now(self._settled_from(copy))
            self._settle(copy, now)

    def _settled_from(self, copy: _Copy) -> float:
        """When the operator's minimum residency of a copy starts (`OPERATOR_LRU2`): at its last use
        or its load, whichever is later."""
        return max(copy.loaded_at, self.last_access[copy.model])

    def _reclaimable(self, gpu: str, now: float) -> dict[int, int]:
        """VRAM on `gpu` the eviction rules let go now, by the lowest incoming rank that may
        displace it (low and normal; high may preempt, so `_may_fit` does not ask).

        Kept until the GPU's models change (`_occupy`, `_leave_gpu`) or one of them stops being
        young, the moments `_next_change` also counts on, or a request changes when one does
        (`_settle`). A model may go once past its `free_at`: placement's rule for a demanded
        request under `operator-lru2`, `eviction.is_evictable` otherwise, which the `operator`
        policy's cost order also follows (`SwapCosts.young`; a unit test holds the two
        to the same answer).
        """
        known = self._reclaim.get(gpu)
        if known is not None and now < known[0]:
            return known[1]
        by_rank = dict.fromkeys(range(Priority.HIGH.rank), 0)
        until = math.inf
        for c in self.on_gpu[gpu].values():
            if c.free_at > now:
                until = min(until, c.free_at)
            elif self.models[c.model].priority.evictable:
                for taker in range(self.models[c.model].priority.rank, Priority.HIGH.rank):
                    by_rank[taker] += c.hold
        self._reclaim[gpu] = (until, by_rank)
        return by_rank

    def _most_room(self, now: float) -> dict[int, int]:
        """The most VRAM any one GPU has free or reclaimable now, by incoming rank."""
        most = dict.fromkeys(range(Priority.HIGH.rank), 0)
        for gpu, room in self.room.items():
            free = room - self.used[gpu]
            for rank, reclaimable in self._reclaimable(gpu, now).items():
                most[rank] = max(most[rank], free + reclaimable)
        return most

    def _may_fit(self, model: int, now: float, most: dict[int, int]) -> bool:
        """Whether some GPU could take it, counting what its priority may displace there (a
        quick test before asking placement and eviction, which decide). `most` is
        `_most_room` from earlier at `now`: it may only have shrunk since."""
        rank = self.models[model].priority.rank
        if rank >= Priority.HIGH.rank:
            return True
        fits = self._fits_in[model]
        if most[rank] < fits[0][1]:
            return False
        used, room, reclaimable = self.used, self.room, self._reclaimable
        return any(
            room[gpu] - used[gpu] + reclaimable(gpu, now)[rank] >= footprint
            for gpu, footprint in fits
        )

    def _give_up(self, model: int, count: int) -> None:
        if count:
            key = self.models[model].key
            self.result.unserved += count
            self.result.unserved_by_model[key] = self.result.unserved_by_model.get(key, 0) + count

    def _retry(self, until: float) -> None:
        """Serve waiting requests at each moment room may have appeared, up to `until`."""
        while self.pending and self.retry_at <= until:
            now = self.retry_at
            self._rebase(now)
            most = self._most_room(now)
            for model in list(self.pending):
                arrivals = self.pending[model]
                live = [a for a in arrivals if a + self.max_wait > now]
                self._give_up(model, len(arrivals) - len(live))
                if not live:
                    del self.pending[model], self.pending_work[model]
                    continue
                self.pending[model] = live
                # A parked model wakes by the agents' plan on its own GPU, which the quick test
                # does not see; the operator wakes it by placement, which the test does.
                parked = model in self.where and not self.operator
                if not parked and not self._may_fit(model, now, most):
                    continue
                if self._bring(model, now):
                    copy = self.where[model]
                    self.result.latencies.extend(copy.ready_at - a for a in live)
                    self.result.waited += len(live) - 1
                    del self.pending[model]
                    self._serve(copy, now, copy.ready_at, self.pending_work.pop(model))
            self.retry_at = self._next_change(now) if self.pending else math.inf

    def _preload_critical(self, start: float) -> None:
        """Critical models are resident before the trace starts, as the operator placed them."""
        for model, spec in enumerate(self.models):
            if spec.priority is not Priority.CRITICAL:
                continue
            decision = place(
                self._request(spec), self._views(start), self.placement, self._now(start)
            )
            if decision.chosen:
                self._load(model, decision.chosen[0].gpu_uuid, start, seconds=0.0, kind="load")

    def _views(self, now: float) -> list[NodeView]:
        """Each node's view, kept until its assignments change (`_occupy`, `_leave_gpu`) or its
        heartbeat is half the grace old, so placement works out a node's budgets only then."""
        fresh_since = now - self.placement.heartbeat_grace_seconds / 2
        views = []
        for node in range(len(self.cluster.nodes)):
            known = self._node_views.get(node)
            if known is None or known[0] < fresh_since:
                view = self._view(node, self._now(now), dict(self.assignments[node]))
                known = self._node_views[node] = (now, view)
            views.append(known[1])
        return views

    def _load(self, model: int, gpu: str, now: float, *, seconds: float, kind: EventKind) -> None:
        node = self.node_of_gpu[gpu]
        copy = _Copy(
            model=model,
            node=node,
            gpu=gpu,
            state=ModelState.LOADED,
            ready_at=now + seconds,
            loaded_at=now + seconds,
            hold=self._footprint(model, gpu),
        )
        copy.free_at = self._evictable_at(copy)
        self._occupy(copy, now, kind)
        if self.operator:
            self._recency[self.models[model].key] = self._now(self._settled_from(copy))
        self.result.cold_load_seconds += seconds

    def _wake(self, copy: _Copy, now: float) -> bool:
        """Wake a parked model on its own GPU; False when no room can be made there."""
        plan = self._plan_on(copy.gpu, copy.model, now)
        self._unpark(copy)
        if not plan.feasible:
            del self.where[copy.model]
            return False
        self._apply(plan, now)
        seconds = self.cluster.wake_seconds_for(
            self.cluster.nodes[copy.node], self.models[copy.model]
        )
        self.result.wakes += 1
        self._load(copy.model, copy.gpu, now, seconds=seconds, kind="wake")
        return True

    def _cold(self, model: int, now: float) -> bool:
        spec = self.models[model]
        request = self._request(spec)
        decision = PlacementDecision()
        if any(self._free(g, model) >= self._footprint(model, g) for g in self.eligible[model]):
            decision = place(request, self._views(now), self.placement, self._now(now))
        if not decision.chosen:
            plan = self._coldest_plan(model, now)
            if plan is not None:
                self._apply(plan, now)
                decision = place(request, self._views(now), self.placement, self._now(now))
            elif spec.priority.rank >= Priority.HIGH.rank:
                decision = place(request, self._views(now), self.preempting, self._now(now))
                for victim in decision.preempted:
                    self.result.preemptions += 1
                    self._evict(victim.key, "preempt", now)
        if not decision.chosen:
            return False
        gpu = decision.chosen[0].gpu_uuid
        node = self.cluster.nodes[self.node_of_gpu[gpu]]
        self.result.cold_starts += 1
        self._load(model, gpu, now, seconds=self.cluster.load_seconds(node, spec), kind="load")
        return True

    def _swap_in(self, model: int, now: float) -> bool:
        """The `operator` policies: `place` the model as demanded (waking it where it is parked),
        swap out what it chose, parking what `plan_parking` parks; False when it placed nothing."""
        spec = self.models[model]
        copy = self.where.get(model)
        parked = {}
        if copy is not None:  # parked: only a copy on no GPU waits for this
            parked = {self.cluster.nodes[copy.node].name: copy.gpu}
        request = replace(self._request(spec), demanded=True, parked=parked)
        views = self._views(now)
        decision = place(
            request,
            views,
            self.swapping,
            self._now(now),
            recency=self._recency,
            earlier=self._earlier,
            costs=self._swap_costs(model, now) if self.policy == OPERATOR else None,
        )
        if not decision.chosen:
            return False
        to_park = plan_parking(decision.preempted, self._parking_views(decision.preempted, now))
        for victim in decision.preempted:
            self._evict(victim.key, "park" if victim in to_park else "unload", now)
        gpu = decision.chosen[0].gpu_uuid
        node = self.cluster.nodes[self.node_of_gpu[gpu]]
        if copy is not None:
            self._unpark(copy)
            del self.where[model]
        kind: EventKind
        if copy is not None and copy.gpu == gpu:
            self.result.wakes += 1
            seconds, kind = self.cluster.wake_seconds_for(node, spec), "wake"
        else:
            self.result.cold_starts += 1
            seconds, kind = self.cluster.load_seconds(node, spec), "load"
        self._load(model, gpu, now, seconds=seconds, kind=kind)
        return True

    def _swap_costs(self, model: int, now: float) -> SwapCosts:
        """Each replica `model` may displace on a GPU it may go to, as the operator's `cost`
        swap order sees it (`swap_figures`): its assignment, its agent's report (state, size,
        times) and the gateways' figures (decayed rate, requests running or waiting, served
        since its load). The others are never asked for. A replica's view is rebuilt only when
        one of those changes (its rate only with a request, `_rate`), and its price with it: a
        rate read at the base moment makes the price independent of the moment asked."""
        stamp = EPOCH + now
        demanded = self.cluster.gateway_demand
        rank = self.models[model].priority.rank
        prices, young = {}, set()
        for gpu in self.eligible[model]:
            for c in self.on_gpu[gpu].values():
                if self.models[c.model].priority.rank > rank:
                    continue
                in_use = int(now < self.busy_end[c.model]) if demanded else None
                served = c.served_from <= now
                figures = (c.ready_at <= now, self.last_access[c.model], in_use, served)
                known = self._replicas.get(c.model)
                if known is None or known[0] is not c or known[1] != figures:
                    replica = self._replica(c, now, figures)
                    cost, _ = swap_figures(replica, stamp, self._pricing)
                    known = (c, figures, replica, cost)
                    self._replicas[c.model] = known
                replica = known[2]
                prices[replica.key] = known[3]
                if swap_young(replica, stamp, self._pricing):
                    young.add(replica.key)
        return SwapCosts(prices, frozenset(young))

    def _replica(
        self, c: _Copy, now: float, figures: tuple[bool, float, int | None, bool]
    ) -> Resident:
        """`replica_resident` for a copy: the report its agent would give and the gateways'
        figures."""
        loaded, last_access, in_use, served = figures
        spec = self.models[c.model]
        report = ResidentModel.model_construct(
            key=spec.key,
            model=spec.ref,
            backend=spec.backend,
            gpu_uuid=c.gpu,
            state=ModelState.LOADED if loaded else ModelState.LOADING,
            vram_bytes=c.hold,
            loaded_at=self._now(c.loaded_at),
            last_access=self._now(last_access),
        )
        demand = ReplicaDemand(self._rate(c.model), in_use, served and in_use is not None)
        assignment = self._assignment(c.model, c.gpu)
        return replica_resident(spec.key, assignment, report, demand, self._now(now))

    def _parking_views(self, victims: Sequence[Victim], now: float) -> list[NodeView]:
        """The victims' nodes as `plan_parking` reads them, with each victim's reported state
        (the simulator keeps no parked assignment in a view, so nothing else is asked)."""
        nodes = {self.cluster.nodes[n].name: n for n in range(len(self.cluster.nodes))}
        views = []
        for name in sorted({v.node for v in victims}):
            node = nodes[name]
            view = self._view(node, self._now(now), dict(self.assignments[node]))
            reports = []
            for victim in (v for v in victims if v.node == name):
                c = self.where[self.index[victim.key]]
                reports.append(
                    ResidentModel.model_construct(
                        key=victim.key,
                        model=self.models[c.model].ref,
                        backend=self.models[c.model].backend,
                        gpu_uuid=c.gpu,
                        state=ModelState.LOADED if c.ready_at <= now else ModelState.LOADING,
                        vram_bytes=c.hold,
                    )
                )
            views.append(replace(view, resident=tuple(reports)))
        return views

    def _coldest_plan(self, model: int, now: float) -> RoomPlan | None:
        """The feasible plan whose hottest victim is coldest in the policy's cluster-wide order;
        under `cost` (which prices its plans, `RoomPlan.price`) the cheapest plan.

        Ties go to fewer victims, then fewer bytes freed, then the GPU's name. A GPU's plan takes
        its victims coldest first, so its hottest victim is no colder than its coldest
        displaceable resident: GPUs are tried in that order, and the search stops once no GPU
        left can beat the best plan found. Under `cost` the order and the stop are by a lower
        bound of each GPU's price instead: its displaceable models taken cheapest per byte
        first, the last one only in the part the room still needs (a cover can cost no less).
        A GPU whose displaceable models hold too little to make the room is not tried (the
        result is that of trying every GPU).
        """
        gpus = self.eligible[model]
        stamp = EPOCH + now
        residents = {c.model: self._resident(c, now) for g in gpus for c in self.on_gpu[g].values()}
        incoming = self.models[model].priority.rank
        # Only a model the incoming one may displace can be a victim: rank those alone.
        displaceable = [
            r
            for r in residents.values()
            if r.priority.rank <= incoming and is_evictable(r, stamp, self.config)
        ]
        rank = {r.key: i for i, r in enumerate(coldest_first(displaceable, stamp, self.config))}
        priced = self.config.policy == "cost" and self.config.victim_order is None
        bound: dict[str, float] = {}
        for gpu in gpus:
            candidates, freeable = [], 0
            for c in self.on_gpu[gpu].values():
                at = rank.get(self.models[c.model].key)
                if at is not None:
                    candidates.append((at, c))
                    freeable += c.hold
            deficit = self._footprint(model, gpu) - self._free(gpu, excluding=model)
            if freeable < deficit:
                continue
            if not priced:
                bound[gpu] = min((at for at, _ in candidates), default=len(rank))
                continue
            least = 0.0
            for _, c in sorted(candidates, key=lambda item: item[0]):
                if deficit <= 0:
                    break
                share = 1.0 if c.hold <= deficit else deficit / c.hold
                least += share * price(residents[c.model], stamp, self.config)
                deficit -= c.hold
            bound[gpu] = least
        best: tuple[tuple[float, int, int, str], RoomPlan] | None = None
        for gpu in sorted(bound, key=lambda g: (bound[g], g)):
            if best is not None and bound[gpu] > best[0][0]:
                break
            plan = self._plan_on(gpu, model, now, residents)
            if not plan.feasible:
                continue
            hottest = max((rank[a.key] for a in plan.actions), default=-1)
            first = plan.price if priced else float(hottest)
            score = (first, len(plan.actions), plan.freed_bytes, gpu)
            if best is None or score < best[0]:
                best = (score, plan)
        return None if best is None else best[1]


def simulate(
    cluster: ClusterSpec,
    models: Sequence[SimModel],
    trace: Trace,
    policies: Sequence[str] = POLICY_NAMES,
    *,
    rate_half_life: float = RATE_HALF_LIFE_SECONDS,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Every policy over the same trace, in the order given."""
    results = []
    for policy in policies:
        result = Simulation(cluster, models, trace, policy, rate_half_life=rate_half_life).run()
        if progress is not None:
            progress(result)
        results.append(result)
    return results
