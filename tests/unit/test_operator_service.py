"""The operator's service over an in-memory store: a lost node, a replica that could not load,
displaced models and deletions, decided and written as the API server would see them."""

from __future__ import annotations

import argparse
import copy
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from kubernetes import client

from vram_operator.api import (
    Assignment,
    Backend,
    Condition,
    GPUNode,
    ModelDeploymentStatus,
    ModelState,
    Priority,
    ResidentModel,
)
from vram_operator.api.modelpolicy import ModelPolicy, ModelPolicyStatus
from vram_operator.operator.main import build_parser, label_selector
from vram_operator.operator.metrics import OperatorMetrics
from vram_operator.operator.placement import PlacementConfig
from vram_operator.operator.service import OperatorConfig, OperatorService
from vram_operator.simulation.cluster import TRUSTED_POLICY

pytestmark = pytest.mark.unit

GI = 2**30
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
GRACE = 10.0


class MemoryStore:
    """The Store protocol over dicts, recording every write."""

    def __init__(self) -> None:
        self.gpunodes: dict[str, GPUNode] = {}
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Assignment | None]]] = []
        self.conditions: dict[str, list[Condition]] = {}
        self.events: list[tuple[str, str]] = []
        self.policy_status: dict[str, ModelPolicyStatus] = {}
        self.refuse_writes = False
        self.node_labels: dict[str, dict[str, str]] = {}
        """Nodes with no GPUNode (yet), by name, with their labels."""
        self.created: list[str] = []
        self.reads = 0
        self.status_writes = 0

    async def list_gpunodes(self) -> list[GPUNode]:
        return list(self.gpunodes.values())

    async def list_nodes(self) -> dict[str, client.V1Node]:
        labels = {**{name: {} for name in self.gpunodes}, **self.node_labels}
        return {
            name: client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=found))
            for name, found in labels.items()
        }

    async def create_gpunode(self, node: str) -> None:
        self.created.append(node)

    async def list_deployments(self) -> list[dict[str, Any]]:
        return list(self.deployments.values())

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return self.deployments.get((namespace, name))

    async def get_gpunode(self, node: str) -> GPUNode | None:
        return self.gpunodes.get(node)

    async def set_assignments(self, node: str, changes: Mapping[str, Assignment | None]) -> bool:
        if self.refuse_writes:
            raise RuntimeError("etcdserver: request is too large")
        gpunode = self.gpunodes.get(node)
        if gpunode is None:
            return False
        self.patches.append((node, dict(changes)))
        assignments = dict(gpunode.spec.assignments)
        for key, assignment in changes.items():
            if assignment is None:
                assignments.pop(key, None)
            else:
                assignments[key] = assignment
        spec = gpunode.spec.model_copy(update={"assignments": assignments})
        self.gpunodes[node] = gpunode.model_copy(update={"spec": spec})
        return True

    async def set_gpunode_conditions(self, node: str, conditions: Sequence[Condition]) -> None:
        self.conditions[node] = list(conditions)

    async def delete_gpunode(self, node: str) -> None:
        self.gpunodes.pop(node, None)

    async def write_status(
        self, namespace: str, name: str, status: ModelDeploymentStatus
    ) -> dict[str, Any] | None:
        body = self.deployments.get((namespace, name))
        if body is None:
            return None
        body["status"] = status.to_k8s()
        meta = body["metadata"]
        meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)
        self.status_writes += 1
        return copy.deepcopy(body)

    async def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((body["metadata"]["name"], reason))

    async def list_policies(self) -> list[ModelPolicy]:
        return [ModelPolicy.model_validate(TRUSTED_POLICY)]

    async def list_namespaces(self) -> dict[str, dict[str, str]]:
        return {ns: {} for ns, _ in self.deployments}

    async def write_policy_status(self, name: str, status: ModelPolicyStatus) -> None:
        self.policy_status[name] = status

    # ---- the test's hands ----------------------------------------------------------------

    def add_node(self, name: str, total: int = 8 * GI, heartbeat: dt.datetime = T0) -> None:
        self.gpunodes[name] = GPUNode.model_validate(
            {
                "metadata": {"name": name},
                "status": {
                    "lastHeartbeatTime": heartbeat.isoformat(),
                    "gpus": [
                        {
                            "index": 0,
                            "uuid": f"GPU-{name}",
                            "name": "Simulated",
                            "totalBytes": total,
                            "usedBytes": 0,
                            "freeBytes": total,
                        }
                    ],
                },
            }
        )

    def beat(self, node: str, heartbeat: dt.datetime) -> None:
        gpunode = self.gpunodes[node]
        assert gpunode.status is not None
        status = gpunode.status.model_copy(update={"last_heartbeat_time": heartbeat})
        self.gpunodes[node] = gpunode.model_copy(update={"status": status})

    def report(
        self, node: str, key: str, state: ModelState, reason: str | None = None
    ) -> dict[str, Any]:
        """The node's agent reports `key` in `state`; returns the GPUNode as the watch gives it."""
        gpunode = self.gpunodes[node]
        assert gpunode.status is not None
        model = ResidentModel(
            key=key,
            model="m:1b",
            backend=Backend.OLLAMA,
            gpu_uuid=f"GPU-{node}",
            state=state,
            vram_bytes=GI,
            reason=reason,
            message=f"{reason}: not enough memory" if reason else None,
        )
        others = [m for m in gpunode.status.models if m.key != key]
        status = gpunode.status.model_copy(update={"models": [*others, model]})
        self.gpunodes[node] = gpunode.model_copy(update={"status": status})
        return self.gpunodes[node].model_dump(by_alias=True, mode="json")

    def apply(self, name: str, vram: str = "4Gi", priority: str = "normal", **meta: Any) -> None:
        self.deployments[("ns", name)] = {
            "apiVersion": "vram.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"namespace": "ns", "name": name, "generation": 1, "uid": name, **meta},
            "spec": {
                "model": f"{name}:1b",
                "backend": "ollama",
                "vram": vram,
                "priority": priority,
            },
        }

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.deployments[("ns", name)]["status"]
        return status

    def assigned(self, node: str) -> set[str]:
        return set(self.gpunodes[node].spec.assignments)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


def condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


async def service(store: MemoryStore, clock: Clock, spread: bool = False) -> OperatorService:
    placement = PlacementConfig(
        strategy="spread" if spread else "binpack", heartbeat_grace_seconds=GRACE
    )
    config = OperatorConfig(placement=placement, gpu_reserve_bytes=0)
    svc = OperatorService(store, config, OperatorMetrics(), clock=clock)
    await svc.start()
    return svc


async def drain(svc: OperatorService) -> list[tuple[str, str]]:
    """Reconcile whatever is queued, in queue order; returns that order."""
    order = []
    while len(svc.queue):
        key = await svc.queue.get()
        order.append(key)
        await svc.reconcile(*key)
        svc.queue.done(key)
    return order


async def test_a_lost_node_is_marked_emptied_in_one_write_and_its_models_move() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a")
    store.add_node("b")
    for name in ("m1", "m2", "m3"):
        store.apply(name, vram="2Gi")
    svc = await service(store, clock, spread=True)
    await drain(svc)
    on_b = {key for key in store.assigned("b")}
    assert on_b, "spread nothing onto b"
    # a keeps reporting; b falls silent past the grace period.
    clock.now = T0 + dt.timedelta(seconds=GRACE + 1)
    store.beat("a", clock.now)
    svc.observe_gpunode(store.gpunodes["a"].model_dump(by_alias=True, mode="json"), "a")
    store.patches.clear()
    await svc._check_staleness()
    assert store.patches == [("b", dict.fromkeys(on_b))]
    ready = next(c for c in store.conditions["b"] if c.type == "Ready")
    assert (ready.status, ready.reason) == ("Unknown", "HeartbeatLost")
    order = await drain(svc)
    assert {f"{ns}.{name}" for ns, name in order[: len(on_b)]} == on_b  # they went first
    assert store.assigned("b") == set()
    assert store.assigned("a") == {"ns.m1", "ns.m2", "ns.m3"}
    for _, name in order:
        assert all(p["node"] == "a" for p in store.status(name)["placements"])


async def test_a_replica_that_could_not_load_is_placed_afresh_elsewhere() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a")
    store.add_node("b")
    store.apply("m")
    svc = await service(store, clock)
    await drain(svc)
    (first,) = [n for n in ("a", "b") if "ns.m" in store.assigned(n)]
    other = "b" if first == "a" else "a"
    raw = store.report(first, "ns.m", ModelState.FAILED, reason="InsufficientVRAM")
    svc.observe_gpunode(raw, first)
    await drain(svc)
    assert "ns.m" not in store.assigned(first)
    assert "ns.m" in store.assigned(other)
    # With the other node gone too, it waits Pending and says why, its budget released.
    store.gpunodes.pop(other)
    svc.observe_gpunode(None, other)
    await drain(svc)
    scheduled = condition(store.status("m"), "Scheduled")
    assert scheduled["status"] == "False"
    assert "could not load it a moment ago (InsufficientVRAM" in scheduled["message"]
    assert not any("ns.m" in store.assigned(n) for n in store.gpunodes)


async def test_an_idle_eviction_stays_where_it_is() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a")
    store.apply("m")
    svc = await service(store, clock)
    await drain(svc)
    svc.observe_gpunode(store.report("a", "ns.m", ModelState.EVICTED, "KeepAliveExpired"), "a")
    await drain(svc)
    assert "ns.m" in store.assigned("a")


async def test_displaced_models_are_queued_ahead_of_everything_else() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a", total=8 * GI)
    store.apply("low", vram="6Gi", priority="low")
    svc = await service(store, clock)
    await drain(svc)
    assert store.assigned("a") == {"ns.low"}
    store.apply("high", vram="6Gi", priority="high")
    store.apply("later", vram="1Gi")
    svc.mark("ns", "high")
    svc.mark("ns", "later")
    first = await svc.queue.get()
    await svc.reconcile(*first)
    svc.queue.done(first)
    assert first == ("ns", "high")
    assert await svc.queue.get() == ("ns", "low")  # before "later", queued earlier
    assert store.assigned("a") == {"ns.high"}


async def test_a_deleting_model_shows_it_at_once_and_is_never_ready() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a")
    store.apply("m")
    svc = await service(store, clock)
    await drain(svc)
    svc.observe_gpunode(store.report("a", "ns.m", ModelState.LOADED), "a")
    await drain(svc)
    assert condition(store.status("m"), "Ready")["status"] == "True"
    store.deployments[("ns", "m")]["metadata"]["deletionTimestamp"] = T0.isoformat()
    holding = await svc.finalize("ns", "m")
    assert holding == ["a"]
    assert store.assigned("a") == set()
    ready = condition(store.status("m"), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Deleting")
    assert store.status("m")["readyReplicas"] == 0


async def test_assignments_someone_else_wrote_are_put_back() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a")
    store.apply("m", vram="2Gi")
    svc = await service(store, clock)
    await drain(svc)
    ours = store.gpunodes["a"].spec.assignments["ns.m"]
    before = store.gpunodes["a"].model_dump(by_alias=True, mode="json")
    # A node token injects a model nobody declared and rewrites ours to another model.
    forged = ours.model_copy(update={"model": "evil:1b", "priority": Priority.CRITICAL})
    spec = store.gpunodes["a"].spec.model_copy(
        update={"assignments": {"ns.m": forged, "other.injected": forged}}
    )
    store.gpunodes["a"] = store.gpunodes["a"].model_copy(update={"spec": spec})
    svc.observe_gpunode(before, "a")
    svc.observe_gpunode(store.gpunodes["a"].model_dump(by_alias=True, mode="json"), "a")
    await svc._restore_foreign()
    assert store.gpunodes["a"].spec.assignments == {"ns.m": ours}


async def test_a_heartbeat_from_the_future_is_stale() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a", heartbeat=T0 + dt.timedelta(days=365 * 7000))
    store.apply("m", vram="2Gi")
    svc = await service(store, clock)
    await drain(svc)
    assert store.assigned("a") == set()
    assert condition(store.status("m"), "Scheduled")["status"] == "False"


async def test_a_size_reported_by_a_node_that_was_not_assigned_the_model_is_ignored() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a", total=8 * GI)
    store.add_node("b", total=8 * GI)
    store.deployments[("ns", "m")] = {
        "metadata": {"namespace": "ns", "name": "m", "generation": 1, "uid": "m"},
        "spec": {"model": "m:1b", "backend": "ollama"},  # no vram: estimated
    }
    svc = await service(store, clock)
    await drain(svc)
    (home,) = [n for n in ("a", "b") if "ns.m" in store.assigned(n)]
    liar = "b" if home == "a" else "a"
    raw = store.report(liar, "ns.m", ModelState.LOADED)
    gpunode = store.gpunodes[liar]
    assert gpunode.status is not None
    inflated = [m.model_copy(update={"vram_bytes": 10**15}) for m in gpunode.status.models]
    status = gpunode.status.model_copy(update={"models": inflated})
    store.gpunodes[liar] = gpunode.model_copy(update={"status": status})
    svc.observe_gpunode(store.gpunodes[liar].model_dump(by_alias=True, mode="json"), liar)
    svc.mark("ns", "m")
    await drain(svc)
    assert "ns.m" in store.assigned(home)
    assert raw  # the report landed; the operator simply does not believe it


async def test_a_write_that_raises_releases_what_it_reserved() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a", total=8 * GI)
    store.apply("big", vram="6Gi")
    svc = await service(store, clock)
    store.refuse_writes = True
    await svc._guarded("ns", "big")  # logged, never raised to the worker
    assert store.assigned("a") == set()
    store.refuse_writes = False
    store.apply("other", vram="6Gi")
    svc.mark("ns", "other")
    await svc._guarded("ns", "other")
    assert store.assigned("a") == {"ns.other"}  # the 6Gi the failed write held were released


async def test_the_operator_creates_the_gpunodes_of_the_nodes_its_selector_picks() -> None:
    store, clock = MemoryStore(), Clock()
    gpu = {"nvidia.com/gpu.present": "true"}
    store.add_node("has-one")
    store.node_labels = {"has-one": gpu, "gpu": gpu, "cpu": {}}
    config = OperatorConfig(gpu_node_selector=gpu)
    svc = OperatorService(store, config, OperatorMetrics(), clock=clock)
    await svc.start()
    assert store.created == ["gpu"]  # not the CPU node, not the one that has its GPUNode
    await svc._ensure_gpunodes()
    assert store.created == ["gpu"]  # asked once: its watch event is due
    svc._created.clear()  # ... and did not come in time: asked again
    await svc._ensure_gpunodes()
    assert store.created == ["gpu", "gpu"]
    svc.observe_gpunode(None, "has-one")  # deleted while its Node lives: created again
    await svc._ensure_gpunodes()
    assert store.created == ["gpu", "gpu", "has-one"]
    svc._created.clear()
    svc.observe_node(None, "gpu")  # the Node is gone: nothing to create for it
    svc.observe_gpunode(None, "has-one")
    await svc._ensure_gpunodes()
    assert store.created == ["gpu", "gpu", "has-one", "has-one"]


async def test_without_a_selector_the_operator_creates_no_gpunode() -> None:
    store, clock = MemoryStore(), Clock()
    store.node_labels = {"gpu": {"nvidia.com/gpu.present": "true"}}
    svc = OperatorService(store, OperatorConfig(), OperatorMetrics(), clock=clock)
    await svc.start()
    await svc._ensure_gpunodes()
    assert store.created == []


def test_the_gpu_node_selector_flag_reads_equalities_and_names_a_bad_item() -> None:
    parser = build_parser()
    assert parser.parse_args([]).gpu_node_selector is None
    assert parser.parse_args(["--gpu-node-selector", ""]).gpu_node_selector == {}
    given = parser.parse_args(["--gpu-node-selector", "a=1, nvidia.com/gpu.present=true"])
    assert given.gpu_node_selector == {"a": "1", "nvidia.com/gpu.present": "true"}
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not KEY=VALUE"):
        label_selector("a=1,gpu")


async def test_a_watched_object_is_reconciled_without_reading_it_again() -> None:
    store, clock = MemoryStore(), Clock()
    store.add_node("a")
    store.apply("m")
    store.deployments[("ns", "m")]["metadata"]["resourceVersion"] = "5"
    svc = await service(store, clock)
    svc.observe_deployment(copy.deepcopy(store.deployments[("ns", "m")]), "ns", "m")
    await drain(svc)
    assert store.reads == 0
    assert store.assigned("a") == {"ns.m"}
    writes = store.status_writes
    assert writes >= 1
    # The answer to our own write is the newest version: the next pass compares with it and
    # writes nothing, and the watch's older echo of the first version does not replace it.
    echo = copy.deepcopy(store.deployments[("ns", "m")])
    echo["metadata"]["resourceVersion"] = "5"
    echo["status"] = {}
    svc.observe_deployment(echo, "ns", "m")
    svc.mark("ns", "m")
    await drain(svc)
    assert (store.reads, store.status_writes) == (0, writes)
    # Gone from the watch: read again, found gone, withdrawn.
    del store.deployments[("ns", "m")]
    svc.observe_deployment(None, "ns", "m")
    svc.mark("ns", "m")
    await drain(svc)
    assert store.reads == 1
    assert store.assigned("a") == set()
