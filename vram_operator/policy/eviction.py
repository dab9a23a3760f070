"""Which models leave a GPU, and how: the agent's eviction policy as pure functions.

Nothing here reads a clock, a GPU, /proc or the network. Callers pass `now`, the residents
and the measured figures and get back a plan to carry out. That keeps every decision
testable (tests/unit/test_eviction.py proves the invariants with hypothesis), and lets the
operator count reclaimable VRAM with exactly the rules the agent applies.

Residency tiers: on the GPU (Loaded) → parked in host RAM (vLLM sleep level 1, Sleeping)
→ on disk only (unloaded). A victim is parked when its backend can sleep, the host is not
under memory pressure and host RAM can take it; otherwise it is unloaded.

Rules every plan keeps:
- critical models are never evicted or parked;
- a model still loading stays, and so does one with requests running on it or waiting for it
  (where the gateways' demand says so: `Resident.in_use`); once it has served requests since
  its load and none is left, it is free to go; one that has not (loaded for a replica nobody
  asked for yet, or with no demand figures at all) stays `min_residency_seconds` from its load.
  Each load so serves what it was loaded for, and loads cannot thrash each other;
- an incoming model displaces only models of its own priority or lower (a critical one may
  displace any non-critical model), so a low model never pushes out a high one while equal
  priorities still behave as a cache;
- room is made with an irreducible set of victims: dropping any one of them would no longer
  make room, so at most one model's worth more than needed is freed. Under `cost` it is the
  set whose summed `price` is least (a minimum-cost cover of the bytes needed); under the
  other policies the coldest victims in the policy's order;
- when even every eligible victim would not make room, nothing is evicted (InsufficientVRAM).

The cost-aware policy (`cost`) is GreedyDual-Size-Frequency (Cherkasova 1998) made a pure
function. GDSF keeps the object with the largest `L + frequency * cost / size`, where the
clock `L` rises with each eviction so that what was not used for a while ages out. Here the
frequency is a request rate that decays with time (the caller's `request_rate`, or 1/idle when
it has none), which does the clock's ageing without any state kept between calls; the cost
is what bringing the model back costs (its wake time when it can be parked and host RAM can
take it now, else its load time), and the priority weights it as for `hybrid`. The model with
the smallest `weight * rate * cost / size` goes first: rarely used, cheap to bring back, and
large. A model's `price` (the same figure times its GiB: weight x rate x comeback seconds)
is what its eviction costs per second in loads to come, so a plan's price is the sum of its
victims' and the cheapest plan wins: one 20 GiB model asked for now and then goes before two
10 GiB models asked for as often, though each of the two is as cold per byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, get_args

from vram_operator.api import MemoryPressure, ModelState, Priority, ResidentModel, format_bytes

Policy = Literal["lru", "priority", "hybrid", "cost"]
"""lru: longest idle first; priority: lowest priority first, then longest idle;
hybrid: idle time divided by the priority's weight, largest first; cost: the smallest
priority weight x request rate x cost of bringing back / VRAM first (GDSF, see above)."""

POLICIES: tuple[Policy, ...] = get_args(Policy)

ActionKind = Literal["park", "unload"]
"""park: move to host RAM (vLLM sleep level 1); unload: drop to disk only."""

FITS = "Fits"
MAKE_ROOM = "MakeRoom"
INSUFFICIENT_VRAM = "InsufficientVRAM"
HOST_MEMORY_PRESSURE = "HostMemoryPressure"
VRAM_PRESSURE = "VRAMPressure"
NO_PRESSURE = "NoPressure"
PSI_UNAVAILABLE = "PSIUnavailable"

DEFAULT_WEIGHTS: Mapping[Priority, float] = MappingProxyType(
    {Priority.LOW: 1.0, Priority.NORMAL: 2.0, Priority.HIGH: 4.0}
)
"""Hybrid weights: a high model must sit idle four times as long as a low one to be as cold."""

_ON_GPU = (ModelState.LOADED, ModelState.LOADING)

GIB = 2**30

VictimOrder = Callable[["Resident", float], tuple[float, ...]]
"""A coldness function (resident, now) -> tuple, larger sooner gone; see EvictionConfig."""


@dataclass(frozen=True)
class EvictionConfig:
    """The agent's eviction settings; invalid values raise ValueError naming the field."""

    policy: Policy = "cost"
    """Victim order: lru, priority, hybrid (priority-weighted recency) or cost (the default:
    it had the fewest cold-load seconds of the four in BENCHMARKS.md, "Capacity")."""

    min_residency_seconds: float = 120.0
    """A model loaded more recently than this is never evicted, so loads cannot thrash, unless
    it has already served requests since and none runs or waits (`Resident.served`)."""

    weights: Mapping[Priority, float] = field(default_factory=lambda: DEFAULT_WEIGHTS, hash=False)
    """Hybrid weight per evictable priority; entries left out keep their DEFAULT_WEIGHTS value."""

    psi_some_threshold: float = 10.0
    """Host pressure when PSI `some` avg10 reaches this percent. Evicting a cache should start
    well before systemd-oomd would kill processes (60% for 30 s by default)."""

    psi_full_threshold: float = 5.0
    """Host pressure when PSI `full` avg10 reaches this percent: every task stalling at once is
    far worse than some stalling, hence the lower bar."""

    host_step_seconds: float = 30.0
    """Wait between host-pressure demotions: PSI avg10 needs about this long to show the
    relief of the last one, and acting sooner would evict more than the pressure called for."""

    load_bytes_per_second: float = 1.0 * GIB
    """For `cost`: disk to GPU speed assumed for a resident whose `reload_seconds` is unknown."""

    wake_bytes_per_second: float = 8.0 * GIB
    """For `cost`: host RAM to GPU speed assumed for a parkable resident whose
    `wake_seconds` is unknown."""

    load_overhead_seconds: float = 2.0
    """For `cost`: the fixed part of a load (server start, CUDA context) when not given."""

    victim_order: VictimOrder | None = field(default=None, compare=False, hash=False)
    """Replaces the policy's order, keeping every rule above. Only for the capacity
    simulator's baselines (Ollama's own rule, an offline reference that knows the future);
    the agent never sets it."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not (math.isfinite(self.min_residency_seconds) and self.min_residency_seconds >= 0):
            raise ValueError(
                f"minResidencySeconds: must be a finite number >= 0, "
                f"got {self.min_residency_seconds}"
            )
        if not (math.isfinite(self.host_step_seconds) and self.host_step_seconds >= 0):
            raise ValueError(
                f"hostStepSeconds: must be a finite number >= 0, got {self.host_step_seconds}"
            )
        for name, value in (
            ("psiSomeThreshold", self.psi_some_threshold),
            ("psiFullThreshold", self.psi_full_threshold),
        ):
            if not 0 < value <= 100:
                raise ValueError(f"{name}: must be a percentage in (0, 100], got {value}")
        for name, value in (
            ("loadBytesPerSecond", self.load_bytes_per_second),
            ("wakeBytesPerSecond", self.wake_bytes_per_second),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value}")
        if not (math.isfinite(self.load_overhead_seconds) and self.load_overhead_seconds >= 0):
            raise ValueError(
                f"loadOverheadSeconds: must be a finite number >= 0, "
                f"got {self.load_overhead_seconds}"
            )
        object.__setattr__(self, "weights", _checked_weights(self.weights))


def _checked_weights(given: Mapping[Priority, float]) -> Mapping[Priority, float]:
    weights = dict(DEFAULT_WEIGHTS)
    for name, value in given.items():
        try:
            priority = Priority(name)
        except ValueError:
            raise ValueError(f"weights: unknown priority {name!r}") from None
        if not priority.evictable:
            raise ValueError("weights: critical takes no weight, it is never evicted")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"weights.{priority}: must be a finite number > 0, got {value}")
        weights[priority] = float(value)
    return MappingProxyType(weights)


DEFAULT_CONFIG = EvictionConfig()


@dataclass(frozen=True)
class Resident:
    """A model on one GPU (or parked from it), as the eviction policy sees it.

    Times are epoch seconds. `vram_bytes` is the model's VRAM budget, what leaving the GPU
    frees; `host_bytes` is the host RAM it takes while parked. The last three figures are
    read by the `cost` policy only, and estimated from the config when None.
    """

    key: str
    priority: Priority
    vram_bytes: int
    state: ModelState
    loaded_at: float
    last_access: float
    can_park: bool = False
    host_bytes: int = 0
    reload_seconds: float | None = None
    """Seconds to load it again from disk once unloaded."""
    wake_seconds: float | None = None
    """Seconds to wake it from host RAM once parked (only read when it can park)."""
    request_rate: float | None = None
    """Requests per second lately, as demand figures report them (decaying with time)."""
    in_use: int | None = None
    """Requests running on it or waiting for it, as demand figures report them; None where
    none do."""
    served: bool = False
    """Requests have run on it since its load (demand figures saw it in use once loaded)."""

    def __post_init__(self) -> None:
        if self.vram_bytes < 0 or self.host_bytes < 0:
            raise ValueError(f"{self.key}: vram_bytes and host_bytes must be >= 0")
        if self.in_use is not None and self.in_use < 0:
            raise ValueError(f"{self.key}: in_use must be >= 0")
        for name in ("reload_seconds", "wake_seconds", "request_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{self.key}: {name} must be a finite number >= 0")

    @classmethod
    def from_status(
        cls, model: ResidentModel, *, can_park: bool = False, host_bytes: int = 0
    ) -> Resident:
        """Build one from a GPUNode status entry, as the operator reads it.

        Unknown figures read conservatively for "how much could be freed": no VRAM, and a model
        with no load time counts as loaded long ago; one never used counts as used at load.
        """
        loaded_at = model.loaded_at.timestamp() if model.loaded_at else 0.0
        last_access = model.last_access.timestamp() if model.last_access else loaded_at
        return cls(
            key=model.key,
            priority=model.priority,
            vram_bytes=model.vram_bytes or 0,
            state=model.state,
            loaded_at=loaded_at,
            last_access=last_access,
            can_park=can_park,
            host_bytes=host_bytes,
        )


@dataclass(frozen=True)
class Action:
    """One model to move down a tier."""

    key: str
    kind: ActionKind
    freed_bytes: int
    """VRAM this frees (0 for a parked model leaving host RAM)."""
    message: str
    """Why, for the model's status entry and the event."""


@dataclass(frozen=True)
class RoomPlan:
    """How to make room for an incoming model; `reason` is Fits, MakeRoom or InsufficientVRAM."""

    feasible: bool
    reason: str
    message: str
    actions: tuple[Action, ...] = ()
    price: float = 0.0
    """The victims' summed `price`: what the plan costs in loads to come, per second; the
    cheapest of several GPUs' plans is the one to carry out under `cost`."""

    @property
    def freed_bytes(self) -> int:
        return sum(action.freed_bytes for action in self.actions)


@dataclass(frozen=True)
class PressurePlan:
    """What to demote under pressure; `reason` suits the MemoryPressure/VRAMPressure condition."""

    under_pressure: bool
    reason: str
    message: str
    actions: tuple[Action, ...] = ()

    @property
    def freed_bytes(self) -> int:
        return sum(action.freed_bytes for action in self.actions)


def last_used(resident: Resident) -> float:
    """When it was last used; a model never used since it loaded counts as used at load."""
    return max(resident.last_access, resident.loaded_at)


def coldness(
    resident: Resident, now: float, config: EvictionConfig = DEFAULT_CONFIG
) -> tuple[float, ...]:
    """How cold a model is under the policy: the larger, the sooner it goes.

    Ties break towards the lower priority. Critical models weigh infinitely, never cold.
    """
    if config.victim_order is not None:
        return config.victim_order(resident, now)
    idle = max(0.0, now - last_used(resident))
    rank = float(resident.priority.rank)
    if config.policy == "lru":
        return (idle, -rank)
    if config.policy == "priority":
        return (-rank, idle)
    if config.policy == "cost":
        return (-keep_value(resident, now, config), idle, -rank)
    return (idle / config.weights.get(resident.priority, math.inf), -rank)


def comeback_seconds(resident: Resident, config: EvictionConfig = DEFAULT_CONFIG) -> float:
    """What evicting it costs when it is wanted again: waking it when it can be parked (and
    that is cheaper), else loading it from disk."""
    reload = resident.reload_seconds
    if reload is None:
        reload = config.load_overhead_seconds + resident.vram_bytes / config.load_bytes_per_second
    if not resident.can_park:
        return reload
    wake = resident.wake_seconds
    if wake is None:
        wake = resident.vram_bytes / config.wake_bytes_per_second
    return min(reload, wake)


RATE_HALF_LIFE_SECONDS = 600.0
"""How fast a request rate forgets: a request counts half as much 10 minutes later."""


class DecayedRates:
    """Request rates that forget exponentially: the `request_rate` the `cost` policy weighs.

    Counts added at a time decay with `half_life`; the rate is the decayed count over the
    decay's time constant, so a steady `r` requests per second reads `r` once the history is
    long enough. One figure, shared by the agent (from the gateways' request counts) and the
    capacity simulator (from the trace).
    """

    def __init__(self, half_life: float = RATE_HALF_LIFE_SECONDS) -> None:
        if not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be a positive number of seconds, got {half_life}")
        self.tau = half_life / math.log(2)
        self._value: dict[object, float] = {}
        self._at: dict[object, float] = {}

    def add(self, key: object, count: float, now: float) -> None:
        """`count` requests for `key` at `now` (seconds on any clock that only goes forward)."""
        value = self._value.get(key, 0.0)
        if value:
            value *= math.exp((self._at[key] - now) / self.tau)
        self._value[key] = value + count
        self._at[key] = now

    def rate(self, key: object, now: float) -> float:
        """Requests per second lately; 0 for a key never counted.

        Read at a fixed `now` that may precede the last count (a base moment), it is every
        key's rate at any later moment times one factor, the same for all keys: orders and
        sums of rates compare alike, and the figure holds until the key's next count (the
        capacity simulator reads it so). A base some hundreds of half-lives before a count
        overflows the figure.
        """
        value = self._value.get(key)
        if not value:
            return 0.0
        return value * math.exp((self._at[key] - now) / self.tau) / self.tau


def keep_value(resident: Resident, now: float, config: EvictionConfig = DEFAULT_CONFIG) -> float:
    """The `cost` policy's worth of keeping it: weight x rate x comeback seconds per GiB.

    Infinite for a critical model. Without a reported rate, recency stands in for it: a model
    idle for `t` seconds counts as asked for once every `t` (at least every second).
    """
    weight = config.weights.get(resident.priority, math.inf)
    if math.isinf(weight):
        return math.inf
    rate = resident.request_rate
    if rate is None:
        rate = 1.0 / max(1.0, now - last_used(resident))
    size = max(resident.vram_bytes, 1) / GIB
    return weight * rate * comeback_seconds(resident, config) / size


def price(resident: Resident, now: float, config: EvictionConfig = DEFAULT_CONFIG) -> float:
    """What evicting it costs under `cost`: weight x request rate x comeback seconds, the
    seconds of loading its eviction is expected to cause per second from now on."""
    return keep_value(resident, now, config) * max(resident.vram_bytes, 1) / GIB


def coldest_first(
    residents: Iterable[Resident], now: float, config: EvictionConfig = DEFAULT_CONFIG
) -> list[Resident]:
    """Residents in eviction order; equal coldness falls back to the key, so plans are stable."""
    return sorted(
        residents,
        key=lambda r: (tuple(-part for part in coldness(r, now, config)), r.key),
    )


def is_young(resident: Resident, now: float, config: EvictionConfig = DEFAULT_CONFIG) -> bool:
    """Whether its load has not yet paid off: requests run on it or wait for it, or it has
    served none since its load and is within the minimum residency."""
    if resident.in_use:
        return True
    paid_off = resident.served and resident.in_use is not None
    return not paid_off and now - resident.loaded_at < config.min_residency_seconds


def is_evictable(resident: Resident, now: float, config: EvictionConfig = DEFAULT_CONFIG) -> bool:
    """Whether it may leave its tier at all: not critical, settled, and not young."""
    return (
        resident.priority.evictable
        and resident.state in (ModelState.LOADED, ModelState.SLEEPING)
        and not is_young(resident, now, config)
    )


def _frees_vram(resident: Resident, now: float, config: EvictionConfig) -> bool:
    return (
        is_evictable(resident, now, config)
        and resident.state is ModelState.LOADED
        and resident.vram_bytes > 0
    )


def _displaceable(
    residents: Iterable[Resident], now: float, config: EvictionConfig, incoming: Priority
) -> list[Resident]:
    return [
        r for r in residents if _frees_vram(r, now, config) and r.priority.rank <= incoming.rank
    ]


def reclaimable_bytes(
    residents: Iterable[Resident],
    now: float,
    config: EvictionConfig = DEFAULT_CONFIG,
    *,
    incoming_priority: Priority,
) -> int:
    """VRAM an incoming model of this priority could have freed for it on this GPU.

    The operator places a model where free VRAM plus this covers it; plan_room then succeeds.
    """
    return sum(r.vram_bytes for r in _displaceable(residents, now, config, incoming_priority))


def _unique(residents: Iterable[Resident]) -> list[Resident]:
    result = list(residents)
    seen: set[str] = set()
    for resident in result:
        if resident.key in seen:
            raise ValueError(f"residents: key {resident.key!r} appears twice")
        seen.add(resident.key)
    return result


def _cover(candidates_coldest_first: list[Resident], deficit: int) -> list[Resident]:
    """The coldest victims that free `deficit`, pruned to an irreducible set.

    Greedy in coldness order, then the hottest chosen are dropped while the rest still cover
    the deficit. One pass suffices: a victim kept stays needed once others are dropped. When
    nothing covers the deficit, every candidate is returned; callers decide what that means.
    """
    chosen: list[Resident] = []
    freed = 0
    for resident in candidates_coldest_first:
        if freed >= deficit:
            break
        chosen.append(resident)
        freed += resident.vram_bytes
    for resident in reversed(list(chosen)):
        if freed - resident.vram_bytes >= deficit:
            chosen.remove(resident)
            freed -= resident.vram_bytes
    return chosen


_FRONTIER = 128
"""The most partial sets `cheapest_cover` carries from one item to the next."""


def cheapest_cover(sizes: Sequence[int], prices: Sequence[float], deficit: int) -> list[int]:
    """The indexes of the items that free `deficit` bytes at the least summed price, in index
    order; every index when even all of them fall short. Shared by the agents' `cost` plans and
    the operator's swap-out for waiting requests, so both pick the same victims.

    A minimum-cost cover (a knapsack turned round) by its Pareto frontier: after each item,
    the partial sets no other beats on both bytes freed (counted up to the deficit) and price.
    Exact while the frontier stays within `_FRONTIER` sets; beyond that an even spread of them
    is kept, the cheapest full cover among them always.
    """
    if sum(sizes) < deficit:
        return list(range(len(sizes)))
    frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for index, (size, cost) in enumerate(zip(sizes, prices, strict=True)):
        grown = [
            (min(deficit, freed + size), paid + cost, (*chosen, index))
            for freed, paid, chosen in frontier
            if freed < deficit
        ]
        frontier = _pareto(frontier + grown)
    # The full cover frees the most bytes of the frontier, so it comes last.
    return list(frontier[-1][2])


def _cheapest_cover(
    candidates_coldest_first: list[Resident], deficit: int, now: float, config: EvictionConfig
) -> list[Resident]:
    """`cheapest_cover` over residents priced by `price`, pruned to an irreducible set (a
    victim priced at nothing could be spare)."""
    chosen = cheapest_cover(
        [r.vram_bytes for r in candidates_coldest_first],
        [price(r, now, config) for r in candidates_coldest_first],
        deficit,
    )
    return _cover([candidates_coldest_first[i] for i in chosen], deficit)


def _pareto(
    sets: list[tuple[int, float, tuple[int, ...]]],
) -> list[tuple[int, float, tuple[int, ...]]]:
    """The sets no other frees as much for less, cheapest first (so freeing more down the
    list); thinned to `_FRONTIER` evenly, the last kept."""
    kept: list[tuple[int, float, tuple[int, ...]]] = []
    for entry in sorted(sets, key=lambda e: (e[1], -e[0], len(e[2]), e[2])):
        if not kept or entry[0] > kept[-1][0]:
            kept.append(entry)
    if len(kept) > _FRONTIER:
        step = (len(kept) - 1) / (_FRONTIER - 1)
        kept = [kept[round(i * step)] for i in range(_FRONTIER)]
    return kept


def _victims_for(
    candidates_coldest_first: list[Resident], deficit: int, now: float, config: EvictionConfig
) -> list[Resident]:
    """The irreducible set of victims the policy picks to free `deficit`."""
    if config.policy == "cost" and config.victim_order is None:
        return _cheapest_cover(candidates_coldest_first, deficit, now, config)
    return _cover(candidates_coldest_first, deficit)


def _as_host_allows(
    residents: list[Resident], *, host_under_pressure: bool, host_available_bytes: int | None
) -> list[Resident]:
    """The residents with `can_park` cleared where host RAM could not take them now, so the
    `cost` policy prices such a victim at its reload, not at a wake it will never get."""

    def parks(resident: Resident) -> bool:
        room = math.inf if host_available_bytes is None else host_available_bytes
        return not host_under_pressure and resident.host_bytes <= room

    return [r if not r.can_park or parks(r) else replace(r, can_park=False) for r in residents]


def _demote(
    victims: list[Resident],
    why: str,
    *,
    host_under_pressure: bool,
    host_available_bytes: int | None,
) -> tuple[Action, ...]:
    """Park what host RAM can take, hottest victims first (they are likeliest to be woken)."""
    budget = math.inf if host_available_bytes is None else host_available_bytes
    parked: set[str] = set()
    for resident in reversed(victims):
        if resident.can_park and not host_under_pressure and resident.host_bytes <= budget:
            parked.add(resident.key)
            budget -= resident.host_bytes
    return tuple(
        Action(r.key, "park", r.vram_bytes, f"parked in host RAM: {why}")
        if r.key in parked
        else Action(r.key, "unload", r.vram_bytes, f"unloaded: {why}")
        for r in victims
    )


def plan_room(
    residents: Iterable[Resident],
    needed_bytes: int,
    free_bytes: int,
    now: float,
    config: EvictionConfig = DEFAULT_CONFIG,
    *,
    incoming_priority: Priority,
    host_under_pressure: bool = False,
    host_available_bytes: int | None = None,
) -> RoomPlan:
    """Make room on one GPU for a model needing `needed_bytes` while `free_bytes` are free.

    `residents` are the models on that GPU. Victims are parked when they can be and host RAM
    (`host_available_bytes`, None for no limit) holds them and the host is not under pressure.
    """
    if needed_bytes < 0:
        raise ValueError(f"needed_bytes: must be >= 0, got {needed_bytes}")
    everyone = _unique(residents)
    need = f"{format_bytes(needed_bytes)} needed, {format_bytes(max(free_bytes, 0))} free"
    deficit = needed_bytes - free_bytes
    if deficit <= 0:
        return RoomPlan(True, FITS, need)
    displaceable = _as_host_allows(
        _displaceable(everyone, now, config, incoming_priority),
        host_under_pressure=host_under_pressure,
        host_available_bytes=host_available_bytes,
    )
    candidates = coldest_first(displaceable, now, config)
    victims = _victims_for(candidates, deficit, now, config)
    freed = sum(r.vram_bytes for r in victims)
    if freed < deficit:
        young = sum(
            r.vram_bytes
            for r in everyone
            if r.priority.evictable
            and r.priority.rank <= incoming_priority.rank
            and r.state is ModelState.LOADED
            and is_young(r, now, config)
        )
        message = (
            f"{need}, {format_bytes(freed)} held by models a {incoming_priority} model may evict"
        )
        if young:
            message += (
                f", {format_bytes(young)} more once recently loaded models serve their requests"
                f" or pass the {config.min_residency_seconds:g}s minimum residency"
            )
        return RoomPlan(False, INSUFFICIENT_VRAM, message)
    why = f"room for a {incoming_priority} model ({need})"
    actions = _demote(
        victims,
        why,
        host_under_pressure=host_under_pressure,
        host_available_bytes=host_available_bytes,
    )
    cost = sum(price(r, now, config) for r in victims)
    return RoomPlan(True, MAKE_ROOM, f"{need}: freeing {format_bytes(freed)}", actions, cost)


def under_host_pressure(
    psi: MemoryPressure | None, config: EvictionConfig = DEFAULT_CONFIG
) -> bool:
    """Whether host PSI is past either threshold; a kernel without PSI is never under pressure."""
    if psi is None or not psi.available:
        return False
    some = psi.some.avg10 if psi.some else 0.0
    full = psi.full.avg10 if psi.full else 0.0
    return some >= config.psi_some_threshold or full >= config.psi_full_threshold


def plan_host_pressure(
    residents: Iterable[Resident],
    psi: MemoryPressure | None,
    now: float,
    config: EvictionConfig = DEFAULT_CONFIG,
    *,
    last_step_at: float | None = None,
) -> PressurePlan:
    """One step of relief for host memory pressure, over every model on the node.

    The host-RAM tier goes first: every evictable sleeping model is unloaded. Only when none is
    left is the coldest evictable model on a GPU unloaded (not parked: that would add to the
    pressure). One step per call, at most one per `host_step_seconds` after `last_step_at`, so
    the agent sees PSI respond before demoting more.
    """
    everyone = _unique(residents)
    if psi is None or not psi.available:
        return PressurePlan(False, PSI_UNAVAILABLE, "the kernel reports no memory PSI")
    some = psi.some.avg10 if psi.some else 0.0
    full = psi.full.avg10 if psi.full else 0.0
    figures = f"memory PSI some avg10 {some:g}%, full avg10 {full:g}%"
    if not under_host_pressure(psi, config):
        return PressurePlan(False, NO_PRESSURE, figures)
    if last_step_at is not None and now - last_step_at < config.host_step_seconds:
        wait = config.host_step_seconds - (now - last_step_at)
        return PressurePlan(
            True, HOST_MEMORY_PRESSURE, f"{figures}; next demotion in {wait:.0f}s at the earliest"
        )
    eligible = coldest_first((r for r in everyone if is_evictable(r, now, config)), now, config)
    sleeping = [r for r in eligible if r.state is ModelState.SLEEPING]
    if sleeping:
        why = f"host memory pressure ({figures}): emptying the host-RAM tier"
        actions = tuple(Action(r.key, "unload", 0, f"unloaded: {why}") for r in sleeping)
        return PressurePlan(
            True, HOST_MEMORY_PRESSURE, f"{figures}: emptying the host-RAM tier", actions
        )
    if not eligible:
        return PressurePlan(True, HOST_MEMORY_PRESSURE, f"{figures}; no model may be evicted")
    coldest = eligible[0]
    why = f"host memory pressure ({figures})"
    return PressurePlan(
        True,
        HOST_MEMORY_PRESSURE,
        f"{figures}: unloading the coldest model, {coldest.key}",
        (Action(coldest.key, "unload", coldest.vram_bytes, f"unloaded: {why}"),),
    )


def plan_vram_pressure(
    residents: Iterable[Resident],
    total_bytes: int,
    unmanaged_bytes: int,
    now: float,
    config: EvictionConfig = DEFAULT_CONFIG,
    *,
    host_under_pressure: bool = False,
    host_available_bytes: int | None = None,
) -> PressurePlan:
    """Yield VRAM on one GPU to processes the agent does not manage.

    The excess is the VRAM those processes use plus the budgets of the models on the GPU
    (loaded or loading) beyond the GPU's total; budgets rather than measured use, so a release
    still in flight is not counted twice. The coldest evictable loaded models are demoted,
    an irreducible set as for plan_room. Unlike a load, partial relief still helps here, so
    when not even all of them cover the excess, all of them go.
    """
    everyone = _unique(residents)
    planned = sum(r.vram_bytes for r in everyone if r.state in _ON_GPU)
    excess = unmanaged_bytes + planned - total_bytes
    figures = (
        f"other processes use {format_bytes(unmanaged_bytes)}, models are budgeted "
        f"{format_bytes(planned)} of {format_bytes(total_bytes)}"
    )
    if excess <= 0:
        return PressurePlan(False, NO_PRESSURE, figures)
    freeing = _as_host_allows(
        [r for r in everyone if _frees_vram(r, now, config)],
        host_under_pressure=host_under_pressure,
        host_available_bytes=host_available_bytes,
    )
    candidates = coldest_first(freeing, now, config)
    victims = _victims_for(candidates, excess, now, config)
    freed = sum(r.vram_bytes for r in victims)
    message = f"{figures}: {format_bytes(excess)} over, freeing {format_bytes(freed)}"
    if freed < excess:
        message += ", all that may be evicted"
    actions = _demote(
        victims,
        f"VRAM pressure ({figures})",
        host_under_pressure=host_under_pressure,
        host_available_bytes=host_available_bytes,
    )
    return PressurePlan(True, VRAM_PRESSURE, message, actions)
