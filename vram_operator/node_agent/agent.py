"""The node agent: make this node's backends hold what its GPUNode assigns, and report.

One event loop. The watch thread and the report timer only wake it; reconcile decides, and
every load or unload runs as its own task so one slow backend never stalls the others.
Loads onto one GPU are serialised by a per-GPU lock, so two loads never plan against the
same free memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from vram_operator import __version__
from vram_operator.api import (
    GPU,
    RELOCATABLE_FAILURES,
    Assignment,
    Backend,
    BackendHealth,
    Condition,
    GPUNode,
    GPUNodeStatus,
    ModelState,
    Priority,
    format_bytes,
    name_in,
    set_condition,
)
from vram_operator.api.budget import footprint_bytes
from vram_operator.policy.eviction import (
    EvictionConfig,
    Resident,
    plan_host_pressure,
    plan_vram_pressure,
    under_host_pressure,
)

from .backends import BackendError, LoadRequest, ModelBackend, backend_args
from .backends.ollama_names import same_model as same_ollama_model
from .metrics import AgentMetrics
from .monitors import GPUReading, GPUSource, HostMonitor, HostReading
from .registry import ON_GPU, Entry, Registry
from .storage import GPUNodeStore, StoreError
from .system import drop_page_cache, remove_orphaned_shm

log = logging.getLogger(__name__)


def same_model(kind: Backend, a: str, b: str) -> bool:
    """Whether a backend takes two model references for one model (Ollama fills in defaults
    and ignores case, types/model/name.go; vLLM takes the reference as given)."""
    return same_ollama_model(a, b) if kind is Backend.OLLAMA else a == b


GPUNODE_WAIT_SECONDS = 2.0
"""How often an agent that may not create its GPUNode looks for the operator's."""
SWAPPED_OUT = "SwappedOut"
"""The reason of a model the operator swapped out for demand (parked, or evicted)."""

UNLOAD_WAIT_SECONDS = 60.0
"""How long a load waits for the models withdrawn from its GPU to finish unloading."""

_OUT_OF_MEMORY = re.compile(r"out of memory|\bOOM\b|requires more (system|GPU) memory", re.I)
"""How CUDA, vLLM and Ollama word a load that found too little memory."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent can be told; defaults are what the chart ships."""

    node: str
    report_interval: float = 10.0
    report_gap: float = 0.25
    """The least time between two reports: a burst of loads finishing is one status write,
    not one each, and the API server keeps up with many nodes. Well inside one interval."""
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    retry_initial_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    min_free_bytes: int = 256 * 2**20
    drop_page_cache_above: int | None = None
    clean_orphan_shm: bool = False
    proc: str = "/proc"


@dataclass
class _Retry:
    attempts: int = 0
    not_before: float = 0.0


class NodeAgent:
    """Reconciles spec.assignments of one GPUNode against the backends beside it."""

    def __init__(
        self,
        config: AgentConfig,
        store: GPUNodeStore,
        gpus: GPUSource,
        host: HostMonitor,
        backends: Mapping[Backend, ModelBackend],
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.gpus = gpus
        self.host = host
        self.backends = dict(backends)
        self.metrics = metrics or AgentMetrics()
        self.registry = Registry()
        self._clock = clock
        self._desired: dict[str, Assignment] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unloading: set[str] = set()
        """Keys whose task is an unload (the others' are loads)."""
        self._retries: dict[str, _Retry] = {}
        self._gpu_locks: dict[str, asyncio.Lock] = {}
        self._health: dict[Backend, BackendHealth] = {}
        self._conditions: list[Condition] = []
        self._notes: list[str] = []
        self._wake = asyncio.Event()
        self._report_soon = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_gpus: dict[str, GPU] = {}
        self._last_host: HostReading | None = None
        self._last_host_step: float | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def _await_gpunode(self, stop: asyncio.Event) -> GPUNode | None:
        """This node's GPUNode, created here where allowed, else once the operator has
        created it; None when stopped first."""
        waiting = False
        while not stop.is_set():
            node = await asyncio.to_thread(self.store.ensure)
            if node is not None:
                return node
            if not waiting:
                log.info(
                    "no GPUNode %s yet and no right to create one: waiting for the operator "
                    "(its --gpu-node-selector must select this Node)",
                    self.store.node,
                )
                waiting = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GPUNODE_WAIT_SECONDS):
                    await stop.wait()
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Run until stop is set: adopt what is resident, then watch, reconcile and report."""
        self._loop = asyncio.get_running_loop()
        node = await self._await_gpunode(stop)
        if node is None:
            return
        self._desired = dict(node.spec.assignments)
        await self._check_health()
        await self.adopt()
        watch_stop = threading.Event()
        watcher = threading.Thread(
            target=self.store.watch, args=(self._on_node_event, watch_stop), daemon=True
        )
        watcher.start()
        try:
            next_report = quiet_until = 0.0
            while not stop.is_set():
                await self.reconcile()
                moment = time.monotonic()
                if moment >= next_report or (self._report_soon.is_set() and moment >= quiet_until):
                    self._report_soon.clear()
                    try:
                        await self.report()
                    except StoreError as exc:  # the API server is away: report again later
                        log.warning("%s", exc)
                    moment = time.monotonic()
                    next_report = moment + self.config.report_interval
                    quiet_until = moment + min(
                        self.config.report_gap, self.config.report_interval / 2
                    )
                deadline = next_report
                if self._report_soon.is_set():
                    deadline = min(deadline, quiet_until)
                await self._sleep_until_woken(
                    stop,
                    max(0.0, deadline - time.monotonic()),
                    report_wakes=time.monotonic() >= quiet_until,
                )
        finally:
            watch_stop.set()
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await asyncio.to_thread(watcher.join, 10)

    async def _sleep_until_woken(
        self, stop: asyncio.Event, seconds: float, report_wakes: bool = True
    ) -> None:
        """Sleep `seconds` or until there is work; a report wish wakes only when `report_wakes`
        (otherwise the sleep ends when the quiet gap after the last report does)."""
        events = (self._wake, self._report_soon, stop) if report_wakes else (self._wake, stop)
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wake.clear()

    def _on_node_event(self, node: GPUNode | None) -> None:
        """Called from the watch thread: hand the new spec to the loop and wake it."""
        if self._loop is None:
            return
        assignments = {} if node is None else dict(node.spec.assignments)
        self._loop.call_soon_threadsafe(self._set_desired, assignments)

    def _set_desired(self, assignments: dict[str, Assignment]) -> None:
        if assignments != self._desired:
            self._desired = assignments
            self._wake.set()

    def _poke(self, report: bool = True) -> None:
        self._wake.set()
        if report:
            self._report_soon.set()

    # ---- adoption --------------------------------------------------------------------------

    async def adopt(self) -> None:
        """Rebuild the registry from what the backends already hold: no reload, no double load.

        A resident model is matched to its assignment by key (vLLM's supervisor knows it) or
        by backend and model name (Ollama does not); one nobody assigned keeps a
        backend:model key and is unloaded by the next reconcile.
        """

        def assigned_key(kind: Backend, model: str) -> str | None:
            return next(
                (
                    key
                    for key, a in self._desired.items()
                    if a.backend is kind and same_model(kind, a.model, model)
                ),
                None,
            )

        now = self._now()
        for kind, backend in self.backends.items():
            try:
                resident = await backend.list_resident()
            except BackendError as exc:
                log.warning("cannot list %s models to adopt them: %s", kind, exc.message)
                continue
            for info in resident:
                key = info.key or assigned_key(kind, info.model) or f"{kind}:{info.model}"
                assignment = self._desired.get(key)
                self.registry.put(
                    Entry(
                        key=key,
                        model=assignment.model if assignment else info.model,
                        backend=kind,
                        priority=assignment.priority if assignment else Priority.LOW,
                        state=info.state,
                        gpu_uuid=info.gpu_uuid or (assignment.gpu_uuid if assignment else None),
                        vram_bytes=info.vram_bytes,
                        vram_source="measured" if info.vram_bytes is not None else None,
                        progress=100,
                        loaded_at=now,
                        last_access=info.last_access or now,
                        can_park=backend.can_park,
                        generation=assignment.generation if assignment else None,
                        endpoint=info.endpoint,
                    )
                )
                log.info("adopted %s (%s) already resident in %s", key, info.model, kind)

    # ---- reconcile -------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Start the loads and unloads that move the node toward its assignments."""
        now = self._clock()
        for entry in self.registry.snapshot():
            if entry.key in self._desired:
                continue
            task = self._tasks.get(entry.key)
            if task is not None and entry.key not in self._unloading:
                # A load of a withdrawn model: stop it; the next pass unloads. What it may
                # already hold is going, so it is reported Unloading, never still Loading.
                task.cancel()
                self.registry.update(entry.key, state=ModelState.UNLOADING, reason="Unassigned")
                continue
            if task is None:
                # Unloading from this moment: the report must never show it Loaded again.
                self.registry.update(entry.key, state=ModelState.UNLOADING, reason="Unassigned")
                self._unloading.add(entry.key)
                self._start(entry.key, self._unload(entry, reason="unassigned"))
        for key, assignment in self._desired.items():
            if key in self._tasks:
                continue
            current = self.registry.get(key)
            if assignment.parked:
                self._keep_parked(current, assignment)
                continue
            if current is not None and not self._differs(current, assignment):
                entry = current
                if entry.priority is not assignment.priority:
                    self.registry.update(key, priority=assignment.priority)
                if entry.state in (ModelState.LOADED, ModelState.LOADING):
                    continue
                same = entry.generation == assignment.generation
                if entry.state is ModelState.FAILED and (
                    (same and (entry.permanent or entry.reason in RELOCATABLE_FAILURES))
                    or now < self._retry(key).not_before
                ):
                    continue  # permanent, or the operator's to place afresh, or backing off
                if entry.state is ModelState.EVICTED and same:
                    # Where an evicted model goes back is a placement decision: the operator
                    # withdraws it and places it again (idle ones: when the spec changes).
                    continue
                if entry.state is ModelState.SLEEPING and not self._fits(entry, assignment):
                    continue
            self._start(key, self._load(key, assignment, replacing=current))
        await self._expire_idle(now)
        await self._relieve_pressure()

    def _keep_parked(self, entry: Entry | None, assignment: Assignment) -> None:
        """An assignment the operator parked (swapped out for demand): put a loaded model to
        sleep in host RAM; anything else stays as it is (nothing is loaded for it)."""
        if entry is None or entry.state is not ModelState.LOADED:
            return
        if self._differs(entry, assignment):
            return
        # Counted as an unload: a load onto this GPU waits until the memory is handed back.
        self._unloading.add(entry.key)
        self._start(entry.key, self._swap_out(entry.key))

    async def _swap_out(self, key: str) -> None:
        """Park a model swapped out for demand; unload it where the backend cannot park it."""
        await self._demote(key, "park", SWAPPED_OUT, "swapped out for demand")
        entry = self.registry.get(key)
        if entry is not None and entry.state is ModelState.LOADED:
            await self._demote(key, "unload", SWAPPED_OUT, "swapped out for demand (not parked)")

    def _idle_beyond_keep_alive(self, entry: Entry, now: float) -> float | None:
        """Seconds idle when that exceeds the assignment's keepAlive, else None."""
        assignment = self._desired.get(entry.key)
        if assignment is None or assignment.keep_alive_seconds is None:
            return None
        last = entry.last_access or entry.loaded_at
        idle = now - last.timestamp() if last else 0.0
        return idle if idle >= assignment.keep_alive_seconds else None

    async def _expire_idle(self, now: float) -> None:
        """Unload models idle longer than their keepAlive (Ollama does it itself; vLLM not)."""
        for entry in self.registry.snapshot():
            if entry.state is not ModelState.LOADED or entry.key in self._tasks:
                continue
            idle = self._idle_beyond_keep_alive(entry, now)
            if idle is not None:
                await self._demote(
                    entry.key, "unload", "KeepAliveExpired", f"idle for {idle:.0f}s, past keepAlive"
                )
                self.registry.update(entry.key, idle_expired=True)

    def _differs(self, entry: Entry, assignment: Assignment) -> bool:
        """True when the resident model is not what is assigned (model, backend or GPU)."""
        if entry.backend is not assignment.backend or not same_model(
            entry.backend, entry.model, assignment.model
        ):
            return True
        return bool(
            assignment.gpu_uuid and entry.gpu_uuid and assignment.gpu_uuid != entry.gpu_uuid
        )

    def _fits(self, entry: Entry, assignment: Assignment) -> bool:
        """Whether a parked or evicted model can come back without evicting anything.

        Never while a load or unload is in flight, and only against a fresh reading: memory
        still moving looks free when another load is about to take it, and the model would
        then come back by evicting others, a thrash.
        """
        if self._tasks:
            return False
        needed = assignment.vram_bytes or entry.vram_bytes or 0
        gpus = {g.uuid: g for g in self._read_gpus().gpus}
        gpu = gpus.get(entry.gpu_uuid or assignment.gpu_uuid or "")
        return gpu is not None and gpu.free_bytes - self.config.min_free_bytes >= needed

    def _start(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._tasks.get(key) is finished:
                del self._tasks[key]
                self._unloading.discard(key)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("task for %s failed", key, exc_info=finished.exception())
            self._poke()

        task.add_done_callback(done)

    def _retry(self, key: str) -> _Retry:
        return self._retries.setdefault(key, _Retry())

    def _backoff(self, key: str) -> float:
        retry = self._retry(key)
        delay = float(
            min(
                self.config.retry_max_seconds, self.config.retry_initial_seconds * 2**retry.attempts
            )
        )
        retry.attempts += 1
        retry.not_before = self._clock() + delay
        return delay

    # ---- loading ---------------------------------------------------------------------------

    async def _load(self, key: str, assignment: Assignment, replacing: Entry | None) -> None:
        backend = self.backends.get(assignment.backend)
        if replacing is not None and self._differs(replacing, assignment):
            await self._unload(replacing, reason="replaced", keep_entry=False)
            replacing = None
        entry = Entry(
            key=key,
            model=assignment.model,
            backend=assignment.backend,
            priority=assignment.priority,
            state=ModelState.LOADING,
            gpu_uuid=assignment.gpu_uuid,
            vram_bytes=assignment.vram_bytes,
            vram_source="spec" if assignment.vram_bytes else None,
            progress=0,
            can_park=bool(backend and backend.can_park),
            generation=assignment.generation,
        )
        if replacing is not None and replacing.state is ModelState.SLEEPING and backend:
            await self._wake_parked(replacing, backend)
            return
        self.registry.put(entry)
        self._poke()
        if backend is None:
            self._fail(key, "BackendMissing", f"this node runs no {assignment.backend} backend")
            return
        started = time.monotonic()
        try:
            await backend.pull(assignment.model, lambda pct: self._progress(key, pct))
            figure, source = await self._needed_bytes(assignment, backend)
            gpu = self._choose_gpu(assignment, figure)
            if gpu is None:
                self._fail(key, "NoGPU", "this node reports no GPU to load onto")
                return
            # What it will hold there, by the rule the operator reserved it by.
            needed = footprint_bytes(assignment.backend, figure, gpu.total_bytes)
            self.registry.update(key, vram_bytes=needed, vram_source=source)
            # A server that lays models out itself may put this one on any GPU: its loads
            # take their turns node-wide, and each counts the room over every GPU.
            whole_node = backend.lays_out_itself
            lock = f"backend:{backend.kind}" if whole_node else gpu.uuid
            async with self._gpu_locks.setdefault(lock, asyncio.Lock()):
                if not await self._make_room(key, gpu, needed, whole_node):
                    return
                self._maybe_drop_page_cache(needed)
                info = await backend.load(
                    LoadRequest(
                        key=key,
                        model=assignment.model,
                        gpu_uuid=gpu.uuid,
                        gpu_index=gpu.index,
                        gpu_total_bytes=gpu.total_bytes,
                        vram_bytes=figure,
                        keep_alive_seconds=assignment.keep_alive_seconds,
                        options=assignment.ollama.options if assignment.ollama else {},
                        args=backend_args(assignment),
                        sleep_mode=bool(assignment.vllm and assignment.vllm.sleep_mode),
                    )
                )
        except BackendError as exc:
            self._fail_from(key, exc)
            return
        elapsed = time.monotonic() - started
        measured = info.vram_bytes
        self.registry.update(
            key,
            state=ModelState.LOADED,
            gpu_uuid=gpu.uuid,
            progress=100,
            vram_bytes=measured if measured is not None else needed,
            vram_source="measured" if measured is not None else source,
            loaded_at=self._now(),
            served=False,
            last_access=info.last_access or self._now(),
            load_seconds=round(elapsed, 3),
            message=None,
            reason=None,
            endpoint=info.endpoint,
        )
        self._retries.pop(key, None)
        self.metrics.loads.labels(assignment.backend.value, "loaded").inc()
        self.metrics.load_duration.labels(assignment.backend.value).observe(elapsed)
        log.info("loaded %s (%s) on %s in %.1fs", key, assignment.model, gpu.uuid, elapsed)

    async def _needed_bytes(self, assignment: Assignment, backend: ModelBackend) -> tuple[int, str]:
        if assignment.vram_bytes:
            return assignment.vram_bytes, "spec"
        args = backend_args(assignment)
        wanted = LoadRequest(
            key="",
            model=assignment.model,
            options=assignment.ollama.options if assignment.ollama else {},
            args=args,
        )
        estimate = await backend.estimate(assignment.model, wanted.context_length, args=args)
        if estimate is None:
            raise BackendError(
                f"cannot estimate the VRAM of {assignment.model}; set spec.vram",
                retryable=False,
            )
        return estimate.bytes, estimate.method

    def _choose_gpu(self, assignment: Assignment, needed: int) -> GPU | None:
        gpus = self._read_gpus().gpus
        for gpu in gpus:
            if gpu.uuid == assignment.gpu_uuid:
                return gpu
        return max(gpus, key=lambda g: g.free_bytes, default=None)

    async def _make_room(self, key: str, gpu: GPU, needed: int, whole_node: bool = False) -> bool:
        """Wait for the models withdrawn from this GPU to finish unloading; False (and Failed,
        InsufficientVRAM, for the operator to place it afresh) when `needed` still does not fit
        beside what the GPU holds and what the other models here are budgeted to hold.

        `whole_node`: the backend lays the model out itself (`lays_out_itself`), so the GPU
        named is only where it is charged; the room is counted over every GPU of the node, as
        the backend will count it. Checked on the named GPU, a model Ollama had put on another
        GPU left room there that looked taken, and one it had put on this GPU was charged
        elsewhere: the operator's swap-outs made room the load then refused
        (bench/residency.py: 24 to 42 of 168 loads failed InsufficientVRAM, none since).

        Which assigned model gives way to which is the operator's decision (it withdraws the
        ones it displaces): the agent never evicts an assigned model to load another.
        """
        unloading = [
            task
            for other, task in self._tasks.items()
            if other in self._unloading
            and (entry := self.registry.get(other)) is not None
            and (whole_node or entry.gpu_uuid == gpu.uuid)
        ]
        if unloading:
            await asyncio.wait(unloading, timeout=UNLOAD_WAIT_SECONDS)
        reading = self._read_gpus().gpus
        counted = (
            _units(reading)
            if whole_node
            else [next((g for g in reading if g.uuid == gpu.uuid), gpu)]
        )
        # Free is what neither the reading nor the book gives away: memory a resident model
        # may still take (a pipeline's activation peak, a load waiting its turn) looks free.
        # Over the whole node the sums are compared: where a model sits matters no more.
        booked = sum(self.registry.vram_on(g.uuid, excluding=key) for g in counted)
        used = sum(g.used_bytes for g in counted)
        total = sum(g.total_bytes for g in counted)
        free = total - max(used, booked) - self.config.min_free_bytes * len(counted)
        if free >= needed:
            return True
        namespace = key.partition(".")[0]
        uuids = {g.uuid for g in counted}
        holders = [
            f"{name_in(e.key, namespace)} {format_bytes(e.vram_bytes or 0)} {e.state.lower()}"
            for e in self.registry.snapshot()
            if e.key != key and e.gpu_uuid in uuids and e.state is not ModelState.EVICTED
        ]
        held = f"; held by {', '.join(holders)}" if holders else ""
        where = f"over the node's {len(counted)} GPUs" if whole_node else f"on {gpu.uuid}"
        each = " on each" if whole_node else ""
        self._fail(
            key,
            "InsufficientVRAM",
            f"{format_bytes(needed)} needed, {format_bytes(max(free, 0))} free {where}"
            f" after keeping {format_bytes(self.config.min_free_bytes)} free{each}{held}",
        )
        return False

    async def _demote(self, key: str, kind: str, reason: str, detail: str) -> None:
        """Park or unload one model; `reason` labels the metric, `detail` goes to the status."""
        entry = self.registry.get(key)
        if entry is None:
            return
        backend = self.backends[entry.backend]
        try:
            if kind == "park":
                await backend.park(key, entry.model)
                self.registry.update(
                    key, state=ModelState.SLEEPING, message=f"parked: {detail}", reason=reason
                )
            else:
                self.registry.update(key, state=ModelState.UNLOADING, reason=reason)
                self._report_soon.set()
                await backend.unload(key, entry.model)
                self.registry.update(
                    key,
                    state=ModelState.EVICTED,
                    progress=None,
                    message=f"evicted: {detail}",
                    reason=reason,
                )
        except BackendError as exc:
            log.warning("could not %s %s: %s", kind, key, exc.message)
            if kind != "park":
                self.registry.update(key, state=entry.state, reason=entry.reason)
            return
        self.metrics.evictions.labels(reason, kind).inc()
        log.info("%s %s (%s)", "parked" if kind == "park" else "evicted", key, detail)
        self._poke()

    async def _wake_parked(self, entry: Entry, backend: ModelBackend) -> None:
        try:
            await backend.wake(entry.key, entry.model)
        except BackendError as exc:
            self._fail(entry.key, "BackendError", exc.message)
            return
        # Back on the GPU now: just loaded, as far as recency and eviction go.
        self.registry.update(
            entry.key,
            state=ModelState.LOADED,
            message=None,
            reason=None,
            loaded_at=self._now(),
            served=False,
        )
        log.info("woke %s from host RAM", entry.key)

    def _shared_with(self, entry: Entry) -> str | None:
        """Another assignment that Ollama serves from the same loaded model as `entry` (one
        runner per model name, whichever namespaces asked): unloading it would unload theirs."""
        if entry.backend is not Backend.OLLAMA:
            return None
        return next(
            (
                key
                for key, a in self._desired.items()
                if key != entry.key
                and a.backend is Backend.OLLAMA
                and same_model(Backend.OLLAMA, a.model, entry.model)
            ),
            None,
        )

    async def _unload(self, entry: Entry, reason: str, keep_entry: bool = False) -> None:
        backend = self.backends.get(entry.backend)
        if self._shared_with(entry) is not None:
            backend = None  # still assigned under another key: keep it loaded, drop our entry
        if backend is not None and entry.state is not ModelState.EVICTED:
            try:
                await backend.unload(entry.key, entry.model)
            except BackendError as exc:
                log.warning("could not unload %s: %s", entry.key, exc.message)
                self.registry.update(entry.key, message=f"unload failed: {exc.message}")
                return
        if not keep_entry:
            self.registry.remove(entry.key)
        self._retries.pop(entry.key, None)
        log.info("unloaded %s (%s)", entry.key, reason)

    def _progress(self, key: str, percent: int) -> None:
        entry = self.registry.get(key)
        if entry is not None and entry.progress != percent:
            self.registry.update(key, progress=percent)
            self._report_soon.set()

    def _fail_from(self, key: str, exc: BackendError) -> None:
        """Failed, as the backend's error says: out of memory (the operator places it afresh),
        passing (retried with back-off) or permanent (retried when the assignment changes)."""
        if _OUT_OF_MEMORY.search(exc.message):
            self._fail(key, "OutOfMemory", exc.message)
        elif exc.retryable:
            self._fail(key, "BackendError", exc.message)
        else:
            self._fail(key, "PermanentError", exc.message, permanent=True)

    def _fail(self, key: str, reason: str, message: str, permanent: bool = False) -> None:
        self.metrics.failures.labels(reason).inc()
        self.metrics.loads.labels(self._backend_of(key), "failed").inc()
        if permanent:
            text = f"{reason}: {message} (permanent: not retried until the assignment changes)"
            self.registry.update(
                key,
                state=ModelState.FAILED,
                message=text,
                progress=None,
                reason=reason,
                permanent=True,
            )
            log.warning("load of %s failed for good: %s", key, message)
        else:
            delay = self._backoff(key)
            self.registry.update(
                key,
                state=ModelState.FAILED,
                message=f"{reason}: {message}",
                progress=None,
                reason=reason,
                permanent=False,
            )
            log.warning("load of %s failed (%s): %s; retry in %.0fs", key, reason, message, delay)
        self._poke()

    def _backend_of(self, key: str) -> str:
        entry = self.registry.get(key)
        return entry.backend.value if entry else "unknown"

    def _maybe_drop_page_cache(self, needed: int) -> None:
        threshold = self.config.drop_page_cache_above
        if threshold is not None and needed > threshold:
            problem = drop_page_cache(self.config.proc)
            if problem:
                self._notes.append(problem)

    # ---- pressure --------------------------------------------------------------------------

    def _host_under_pressure(self) -> bool:
        pressure = self._last_host.pressure if self._last_host else None
        return under_host_pressure(pressure, self.config.eviction)

    def _host_available(self) -> int | None:
        memory = self._last_host.memory if self._last_host else None
        return None if memory is None else memory.available_bytes

    async def _relieve_pressure(self) -> None:
        """Demote the coldest evictable models when foreign VRAM or host PSI squeezes us.

        Skipped while any load or unload is in flight: their memory is still moving, and the
        next pass (after the next measurement) sees the settled figures.
        """
        if self._last_host is None or self._tasks:
            return
        now = self._clock()
        entries = self.registry.snapshot()
        host = plan_host_pressure(
            [self._resident(e) for e in entries],
            self._last_host.pressure,
            now,
            self.config.eviction,
            last_step_at=self._last_host_step,
        )
        if host.actions:
            self._last_host_step = now
        for action in host.actions:
            await self._demote(action.key, action.kind, host.reason, host.message)
        entries = self.registry.snapshot()  # again: the host's demotions changed some
        foreign = self._foreign_on_node(entries)
        for gpu in self._last_gpus.values():
            on_gpu = [e for e in entries if e.gpu_uuid == gpu.uuid]
            unmanaged = self._unmanaged(gpu, on_gpu)
            plan = plan_vram_pressure(
                [self._resident(e) for e in on_gpu],
                total_bytes=gpu.total_bytes - self.config.min_free_bytes,
                unmanaged_bytes=unmanaged if foreign is None else min(unmanaged, foreign),
                now=now,
                config=self.config.eviction,
                host_under_pressure=self._host_under_pressure(),
                host_available_bytes=self._host_available(),
            )
            for action in plan.actions:
                await self._demote(action.key, action.kind, plan.reason, plan.message)

    def _foreign_on_node(self, entries: list[Entry]) -> int | None:
        """With models of a backend that lays them out itself (Ollama) on the node: the VRAM
        no model of ours explains over all its GPUs, the most any one GPU can show of other
        processes'. Such a model is charged to the GPU the operator named, but may sit on
        another, where its memory looked like another process's and the agent evicted models
        to yield it (a test holds it). None where every model sits where it is charged."""
        if not any(
            e.state in ON_GPU
            and (backend := self.backends.get(e.backend)) is not None
            and backend.lays_out_itself
            for e in entries
        ):
            return None
        units = _units(list(self._last_gpus.values()))
        managed = sum(self.registry.vram_on(g.uuid) for g in units)
        return max(0, sum(g.used_bytes for g in units) - managed)

    @staticmethod
    def _unmanaged(gpu: GPU, entries: list[Entry]) -> int:
        managed = sum(e.vram_bytes or 0 for e in entries if e.state in ON_GPU)
        return max(0, gpu.used_bytes - managed)

    # ---- reporting -------------------------------------------------------------------------

    def _read_gpus(self) -> GPUReading:
        reading = self.gpus.read()
        self._last_gpus = {g.uuid: g for g in reading.gpus}
        return reading

    async def _check_health(self) -> None:
        for kind, backend in self.backends.items():
            self._health[kind] = await backend.health()

    async def _refresh_access(self) -> None:
        """Follow last access from the backends so recency reflects real traffic."""
        for kind, backend in self.backends.items():
            if not self._health.get(kind, BackendHealth(name=kind, healthy=False)).healthy:
                continue
            try:
                resident = await backend.list_resident()
            except BackendError:
                continue
            for entry in self.registry.snapshot():
                if entry.backend is not kind or entry.key in self._tasks:
                    continue
                info = next((i for i in resident if i.key == entry.key), None) or next(
                    (i for i in resident if not i.key and same_model(kind, i.model, entry.model)),
                    None,
                )
                if info is None and entry.state is ModelState.LOADED:
                    idle = self._idle_beyond_keep_alive(entry, self._clock())
                    self.registry.update(
                        entry.key,
                        state=ModelState.EVICTED,
                        reason="NotResident" if idle is None else "KeepAliveExpired",
                        idle_expired=idle is not None,
                        message=(
                            "no longer resident in the backend"
                            if idle is None
                            else f"evicted: idle for {idle:.0f}s, past keepAlive"
                        ),
                    )
                elif info is not None:
                    changes: dict[str, object] = {}
                    if info.last_access and info.last_access != entry.last_access:
                        changes["last_access"] = info.last_access
                    if info.request_rate != entry.request_rate:
                        changes["request_rate"] = info.request_rate
                    if info.in_use != entry.in_use:
                        changes["in_use"] = info.in_use
                    if info.in_use and entry.state is ModelState.LOADED and not entry.served:
                        changes["served"] = True
                    if info.vram_bytes and info.state is ModelState.LOADED:
                        changes["vram_bytes"] = info.vram_bytes
                        changes["vram_source"] = "measured"
                    if info.state is ModelState.FAILED and entry.state is not ModelState.FAILED:
                        # Died on its own (a crashed vllm serve): retried with back-off.
                        self._fail(entry.key, "BackendError", info.message or "the backend failed")
                        continue
                    if entry.state is ModelState.LOADED and info.message != entry.message:
                        changes["message"] = info.message  # e.g. partly on CPU
                    if info.endpoint != entry.endpoint and entry.state is ModelState.LOADED:
                        changes["endpoint"] = info.endpoint
                    if changes:
                        self.registry.update(entry.key, **changes)

    async def report(self) -> None:
        """Measure everything and write the GPUNode status (heartbeat included)."""
        await self._check_health()
        await self._refresh_access()
        gpu_reading = self._read_gpus()
        host = self.host.read()
        self._last_host = host
        if self.config.clean_orphan_shm:
            removed, problems = remove_orphaned_shm(self.config.proc)
            self._notes.extend(problems)
            for segment in removed:
                log.info("removed orphaned shared-memory segment %s", segment.shmid)
        entries = self.registry.snapshot()
        gpus = []
        for gpu in gpu_reading.gpus:
            on_gpu = [e for e in entries if e.gpu_uuid == gpu.uuid]
            gpus.append(gpu.model_copy(update={"unmanaged_bytes": self._unmanaged(gpu, on_gpu)}))
        self._update_conditions(gpus, host)
        notes, self._notes = self._notes, []
        status = GPUNodeStatus(
            last_heartbeat_time=self._now(),
            agent_version=__version__,
            gpus=gpus,
            host_memory=host.memory,
            memory_pressure=host.pressure,
            backends=list(self._health.values()),
            models=[e.to_status() for e in entries],
            unavailable=[*gpu_reading.unavailable, *host.unavailable, *notes],
            conditions=self._conditions,
            gpu_count=len(gpus),
            free_vram=format_bytes(sum(g.free_bytes for g in gpus)),
            model_count=sum(1 for e in entries if e.state is ModelState.LOADED),
            memory_psi=(
                f"{host.pressure.some.avg10:.2f}"
                if host.pressure.available and host.pressure.some
                else "n/a"
            ),
        )
        self.metrics.observe(gpus, host.pressure, entries)
        await asyncio.to_thread(self.store.write_status, status)

    def _update_conditions(self, gpus: list[GPU], host: HostReading) -> None:
        now = self._now()
        unhealthy = [h for h in self._health.values() if not h.healthy]
        if unhealthy:
            ready = Condition(
                type="Ready",
                status="False",
                reason="BackendUnhealthy",
                message="; ".join(f"{h.name}: {h.message or 'unhealthy'}" for h in unhealthy),
                last_transition_time=now,
            )
        else:
            ready = Condition(
                type="Ready",
                status="True",
                reason="AgentReporting",
                message=f"agent reports every {self.config.report_interval:g}s",
                last_transition_time=now,
            )
        squeezed = [
            g
            for g in gpus
            if (g.unmanaged_bytes or 0) > 0 and g.free_bytes < self.config.min_free_bytes
        ]
        vram = Condition(
            type="VRAMPressure",
            status="True" if squeezed else "False",
            reason="UnmanagedVRAM" if squeezed else "WithinCapacity",
            message=", ".join(
                f"{g.uuid}: {format_bytes(g.unmanaged_bytes or 0)} used by other processes"
                for g in squeezed
            ),
            last_transition_time=now,
        )
        pressure = self._host_under_pressure()
        memory = Condition(
            type="MemoryPressure",
            status="True" if pressure else ("False" if host.pressure.available else "Unknown"),
            reason=(
                "PSIAboveThreshold"
                if pressure
                else ("PSIBelowThreshold" if host.pressure.available else "PSIUnavailable")
            ),
            message="" if host.pressure.available else "the kernel does not report memory PSI",
            last_transition_time=now,
        )
        for condition in (ready, vram, memory):
            self._conditions = set_condition(self._conditions, condition)

    # ---- helpers ---------------------------------------------------------------------------

    def _resident(self, entry: Entry) -> Resident:
        return Resident(
            key=entry.key,
            priority=entry.priority,
            vram_bytes=entry.vram_bytes or 0,
            state=entry.state,
            loaded_at=entry.loaded_at.timestamp() if entry.loaded_at else self._clock(),
            last_access=entry.last_access.timestamp() if entry.last_access else 0.0,
            can_park=entry.can_park,
            request_rate=entry.request_rate,
            in_use=entry.in_use,
            served=entry.served,
        )

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC).replace(microsecond=0)


def _units(gpus: list[GPU]) -> list[GPU]:
    """The GPUs models go on: a physical GPU whose MIG instances are listed is theirs."""
    parents = {g.parent_uuid for g in gpus if g.parent_uuid}
    return [g for g in gpus if g.uuid not in parents]
