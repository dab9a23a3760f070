"""The node agent alone, as a real process, against the fake backends and a real API server.

No operator runs here: each test writes assignments into the GPUNode's spec itself (a merge
patch per key, as the operator does) and reads back what the agent reports in its status.
Every expectation is a bounded poll of that status, the simulated GPU, the fake backends or
the agent's /metrics; the sleeps that remain only let time pass so models differ in age.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from vram_operator.api import (
    GROUP,
    VERSION,
    Assignment,
    Backend,
    GPUNode,
    GPUNodeStatus,
    ModelState,
    Priority,
    ResidentModel,
)
from vram_operator.api.gpunode import PLURAL
from vram_operator.simulation.cluster import SimulatedCluster
from vram_operator.simulation.fake_vllm import INSTANCE_OVERHEAD_BYTES
from vram_operator.simulation.gpu import GIB, SimulatedGPUs, simulated_uuid
from vram_operator.simulation.nodes import SimulatedNode

QWEN_HELD = 4 * GIB + INSTANCE_OVERHEAD_BYTES
"""A 4 GiB vLLM budget on a 16 GiB GPU (utilization 0.25 exactly) and the instance overhead."""

pytestmark = pytest.mark.integration

T = TypeVar("T")

TIMEOUT = 60.0
"""Seconds any one expectation may take to come true; generous for a 2-core machine."""

POLL = 0.2
CALM_PROC = Path(__file__).parents[1] / "data" / "proc"
"""A /proc with fixed memory figures and no pressure, so host PSI never evicts in these tests."""

QUICK = ["--report-interval", "1", "--retry-initial-seconds", "1", "--proc", str(CALM_PROC)]
VLLM_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


# ---- reading and writing GPUNodes ------------------------------------------------------------


class GPUNodes:
    """The GPUNode objects, read and written as the operator would."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)

    def raw(self, name: str) -> dict[str, Any] | None:
        try:
            found = self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        assert isinstance(found, dict)
        return found

    def get(self, name: str) -> GPUNode | None:
        raw = self.raw(name)
        return None if raw is None else GPUNode.model_validate(raw)

    def status(self, name: str) -> GPUNodeStatus | None:
        node = self.get(name)
        return None if node is None else node.status

    def model(self, name: str, key: str) -> ResidentModel | None:
        status = self.status(name)
        return None if status is None else next((m for m in status.models if m.key == key), None)

    def assign(self, name: str, key: str, assignment: Assignment | None) -> None:
        """Add, replace or (None) withdraw one assignment with a merge patch."""
        value = None if assignment is None else assignment.to_k8s()
        self.custom.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, name, {"spec": {"assignments": {key: value}}}
        )


def assignment(
    key: str,
    model: str,
    backend: Backend = Backend.OLLAMA,
    priority: Priority = Priority.NORMAL,
    vram_bytes: int | None = None,
) -> Assignment:
    namespace, name = key.split(".", 1)
    return Assignment(
        namespace=namespace,
        name=name,
        model=model,
        backend=backend,
        priority=priority,
        vram_bytes=vram_bytes,
    )


def eventually(probe: Callable[[], T | None], what: str, timeout: float = TIMEOUT) -> T:
    """Poll until probe returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}", pytrace=False)
        time.sleep(POLL)


def in_state(nodes: GPUNodes, name: str, key: str, state: ModelState) -> ResidentModel:
    def probe() -> ResidentModel | None:
        found = nodes.model(name, key)
        return found if found is not None and found.state is state else None

    return eventually(probe, f"{key} {state} on {name}")


def heartbeat(nodes: GPUNodes, name: str) -> dt.datetime:
    status = eventually(lambda: nodes.status(name), f"a status on GPUNode {name}")
    assert status.last_heartbeat_time is not None
    return status.last_heartbeat_time


def heartbeat_after(nodes: GPUNodes, name: str, moment: dt.datetime) -> GPUNodeStatus:
    """The first status whose heartbeat is later than `moment` (heartbeats have 1s steps)."""

    def probe() -> GPUNodeStatus | None:
        status = nodes.status(name)
        beat = status.last_heartbeat_time if status else None
        return status if beat is not None and beat > moment else None

    return eventually(probe, f"a heartbeat on {name} after {moment.isoformat()}")


def reports_later(nodes: GPUNodes, name: str, count: int = 2) -> GPUNodeStatus:
    """The status after `count` more heartbeats: what the agent still says some reports on."""
    status = heartbeat_after(nodes, name, heartbeat(nodes, name))
    for _ in range(count - 1):
        assert status.last_heartbeat_time is not None
        status = heartbeat_after(nodes, name, status.last_heartbeat_time)
    return status


def condition(status: GPUNodeStatus, kind: str) -> tuple[str, str | None, str | None]:
    found = next(c for c in status.conditions if c.type == kind)
    return found.status, found.reason, found.message


def start(cluster: SimulatedCluster, nodes: GPUNodes, name: str, **options: Any) -> SimulatedNode:
    """Add a node and wait for its agent's first report, so its GPUNode exists."""
    node = cluster.add_node(name, **options)
    heartbeat(nodes, name)
    return node


def held(node: SimulatedNode) -> dict[str, int]:
    """Bytes per owner on the node's first simulated GPU."""
    return dict(SimulatedGPUs(node.gpu_state).devices()[0].allocations)


def ollama_owner(node: SimulatedNode, model: str) -> str | None:
    """The simulated-GPU owner under which the fake Ollama holds `model`, if it does."""
    return next((o for o in held(node) if ":ollama:" in o and o.endswith(f":{model}")), None)


def http_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def metrics(node: SimulatedNode) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The agent's /metrics as {(sample name, labels): value}."""
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_sum(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(value for (sample, _), value in found.items() if sample == name)


def catalog(sizes: dict[str, int]) -> list[str]:
    """Fake Ollama arguments adding models of the given VRAM sizes to its catalog."""
    entries = {name: {"size": 100_000_000, "size_vram": size} for name, size in sizes.items()}
    return ["--catalog", json.dumps(entries)]


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def cluster(sim_cluster: SimulatedCluster) -> Iterator[SimulatedCluster]:
    """The simulated cluster; its process logs are printed at teardown, which pytest shows
    under the report of a failed test."""
    yield sim_cluster
    print(sim_cluster.logs())


@pytest.fixture
def nodes(k8s_client: client.ApiClient) -> GPUNodes:
    return GPUNodes(k8s_client)


# ---- assignment → loaded → reported ----------------------------------------------------------


def test_assignments_load_and_report_measured_state(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    assert nodes.get("agent-load") is None
    node = cluster.add_node("agent-load", gpu_sizes=[16 * GIB], agent_args=QUICK)
    uuid = simulated_uuid("agent-load", 0)
    created = eventually(lambda: nodes.get("agent-load"), "the agent to create its GPUNode")
    assert created.spec.assignments == {}
    first_beat = heartbeat(nodes, "agent-load")

    nodes.assign("agent-load", "default.llama", assignment("default.llama", "llama3.2:1b"))
    nodes.assign(
        "agent-load",
        "default.qwen",
        assignment("default.qwen", VLLM_MODEL, Backend.VLLM, vram_bytes=4 * GIB),
    )
    llama = in_state(nodes, "agent-load", "default.llama", ModelState.LOADED)
    qwen = in_state(nodes, "agent-load", "default.qwen", ModelState.LOADED)

    # The fake Ollama holds llama3.2:1b in 2 GiB; vLLM preallocates its whole budget.
    assert (llama.vram_bytes, llama.vram_source) == (2 * GIB, "measured")
    # The budget, plus the instance overhead vLLM holds outside it (api/budget.py).
    assert (qwen.vram_bytes, qwen.vram_source) == (QWEN_HELD, "measured")
    for model in (llama, qwen):
        assert model.gpu_uuid == uuid
        assert model.load_seconds is not None
        assert model.load_seconds >= 0
        assert model.loaded_at is not None
        assert model.progress == 100
    allocations = held(node)
    assert sorted(allocations.values()) == [2 * GIB, QWEN_HELD]

    def settled() -> GPUNodeStatus | None:
        status = nodes.status("agent-load")
        used = SimulatedGPUs(node.gpu_state).devices()[0].used_bytes
        return status if status and status.gpus and status.gpus[0].used_bytes == used else None

    status = eventually(settled, "the reported GPU to match the simulated one")
    (gpu,) = status.gpus
    assert (gpu.index, gpu.uuid, gpu.total_bytes) == (0, uuid, 16 * GIB)
    assert (gpu.used_bytes, gpu.free_bytes) == (2 * GIB + QWEN_HELD, 14 * GIB - QWEN_HELD)
    assert gpu.unmanaged_bytes == 0  # every byte in use is a model the agent accounts for
    assert status.host_memory is not None
    assert status.host_memory.total_bytes == 24_682_416 * 1024
    assert status.host_memory.available_bytes == 24_233_216 * 1024
    assert status.memory_pressure is not None
    assert status.memory_pressure.available
    assert status.memory_pressure.some is not None
    assert status.memory_pressure.some.avg10 == 0
    assert {(b.name, b.healthy) for b in status.backends} == {
        (Backend.OLLAMA, True),
        (Backend.VLLM, True),
    }
    assert condition(status, "Ready")[0] == "True"
    assert condition(status, "VRAMPressure")[:2] == ("False", "WithinCapacity")
    assert condition(status, "MemoryPressure")[:2] == ("False", "PSIBelowThreshold")
    assert (status.gpu_count, status.free_vram, status.model_count) == (1, "9.5Gi", 2)
    assert status.agent_version
    assert status.unavailable == []
    raw = nodes.raw("agent-load")
    assert raw is not None
    assert {"gpuCount", "freeVram", "modelCount", "lastHeartbeatTime"} <= raw["status"].keys()
    # Created, then two assignments: status writes through the subresource leave it there.
    assert raw["metadata"]["generation"] == 3
    assert status.last_heartbeat_time is not None
    assert status.last_heartbeat_time > first_beat
    heartbeat_after(nodes, "agent-load", status.last_heartbeat_time)

    nodes.assign("agent-load", "default.llama", None)
    nodes.assign("agent-load", "default.qwen", None)
    eventually(
        lambda: (s := nodes.status("agent-load")) is not None and s.models == [],
        "both models gone from the status once withdrawn",
    )
    eventually(lambda: held(node) == {}, "the simulated GPU freed")
    assert http_json(f"{node.ollama_url}/api/ps")["models"] == []
    assert http_json(f"{node.supervisor_url}/models")["models"] == []


def test_recreates_a_deleted_gpunode_and_keeps_reporting(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    start(cluster, nodes, "agent-recreate", gpu_sizes=[8 * GIB], agent_args=QUICK)
    before = eventually(lambda: nodes.raw("agent-recreate"), "the agent to create its GPUNode")
    assert heartbeat(nodes, "agent-recreate")
    nodes.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "agent-recreate")

    def recreated() -> dict[str, Any] | None:
        raw = nodes.raw("agent-recreate")
        if raw is None or raw["metadata"]["uid"] == before["metadata"]["uid"]:
            return None
        return raw if raw.get("status", {}).get("lastHeartbeatTime") else None

    eventually(recreated, "the agent to create its GPUNode again and report into it")
    reports_later(nodes, "agent-recreate")
    node = cluster.nodes["agent-recreate"]
    assert node.agent is not None
    assert node.agent.alive()


# ---- eviction ----------------------------------------------------------------------------------

EVICTION_CATALOG = catalog(
    {"keep:1": 1 * GIB, "cold-high:1": 2 * GIB, "warm-normal:1": 2 * GIB, "hot-low:1": 2 * GIB}
)


def eviction_node(
    cluster: SimulatedCluster, nodes: GPUNodes, name: str, policy: str = "hybrid"
) -> SimulatedNode:
    """An 8 GiB GPU whose agent evicts at once (no minimum residency) by `policy`."""
    return start(
        cluster,
        nodes,
        name,
        gpu_sizes=[8 * GIB],
        agent_args=[*QUICK, "--min-residency", "0", "--policy", policy],
        ollama_args=EVICTION_CATALOG,
    )


def load(nodes: GPUNodes, name: str, key: str, model: str, priority: Priority, size: int) -> None:
    nodes.assign(name, key, assignment(key, model, priority=priority, vram_bytes=size))


@pytest.mark.parametrize(
    ("policy", "victim"),
    [
        ("lru", "default.cold-high"),  # longest idle, whatever its priority
        ("priority", "default.hot-low"),  # lowest priority, however hot
        ("hybrid", "default.warm-normal"),  # idle time over priority weight is largest
    ],
)
def test_eviction_picks_the_victim_of_each_policy(
    cluster: SimulatedCluster, nodes: GPUNodes, policy: str, victim: str
) -> None:
    name = f"agent-evict-{policy}"
    node = eviction_node(cluster, nodes, name, policy)
    # keep (critical, 1 GiB) is the coldest of all: lru would take it if critical could go.
    load(nodes, name, "default.keep", "keep:1", Priority.CRITICAL, 1 * GIB)
    load(nodes, name, "default.cold-high", "cold-high:1", Priority.HIGH, 2 * GIB)
    in_state(nodes, name, "default.keep", ModelState.LOADED)
    in_state(nodes, name, "default.cold-high", ModelState.LOADED)
    time.sleep(4)  # cold-high ages 4 s more than warm-normal
    load(nodes, name, "default.warm-normal", "warm-normal:1", Priority.NORMAL, 2 * GIB)
    load(nodes, name, "default.hot-low", "hot-low:1", Priority.LOW, 2 * GIB)
    in_state(nodes, name, "default.warm-normal", ModelState.LOADED)
    in_state(nodes, name, "default.hot-low", ModelState.LOADED)
    time.sleep(10)  # idle now: cold-high 14 s, warm-normal 10 s
    # Traffic makes hot-low the most recently used; the agent learns it from /api/ps.
    used_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    reply = http_json(
        f"{node.ollama_url}/api/generate",
        {"model": "hot-low:1", "prompt": "hello", "stream": False, "keep_alive": -1},
    )
    assert reply["done"] is True

    def accessed() -> ResidentModel | None:
        found = nodes.model(name, "default.hot-low")
        seen = found.last_access if found else None
        return found if seen is not None and seen >= used_at else None

    eventually(accessed, "the agent to see the traffic to hot-low")
    # An assigned newcomer that does not fit evicts nothing: which model gives way to which is
    # the operator's decision. It fails InsufficientVRAM, for the operator to place it afresh.
    load(nodes, name, "default.incoming", "incoming:1", Priority.HIGH, 2 * GIB)
    refused = in_state(nodes, name, "default.incoming", ModelState.FAILED)
    assert refused.reason == "InsufficientVRAM"
    assert refused.message is not None
    assert "held by" in refused.message
    nodes.assign(name, "default.incoming", None)
    eventually(lambda: nodes.model(name, "default.incoming") is None, "incoming to go")
    assert metric_sum(metrics(node), "vram_model_evictions_total") == 0
    # Memory the agent does not manage is real pressure: it demotes by its policy.
    # Hybrid scores (idle / weight): hot-low ~1/1, cold-high 14/4, warm-normal 10/2.
    # 7.75 GiB usable, 7 GiB held, 1 GiB taken by another process: exactly one victim.
    node.gpus.pressure(0, 1 * GIB)

    evicted = in_state(nodes, name, victim, ModelState.EVICTED)
    assert evicted.reason == "VRAMPressure"
    assert evicted.message is not None
    status = reports_later(nodes, name)
    states = {m.key: m.state for m in status.models}
    earlier = {"default.keep", "default.cold-high", "default.warm-normal", "default.hot-low"}
    assert states == {
        victim: ModelState.EVICTED,
        **{key: ModelState.LOADED for key in earlier - {victim}},
    }
    victim_model = victim.removeprefix("default.") + ":1"
    assert ollama_owner(node, victim_model) is None
    assert ollama_owner(node, "keep:1") is not None
    # Exactly one: the victim did not come back by evicting another in its turn (a thrash).
    assert metric_sum(metrics(node), "vram_model_evictions_total") == 1


def test_nothing_is_evicted_when_even_evicting_everything_would_not_make_room(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    name = "agent-insufficient"
    node = eviction_node(cluster, nodes, name)
    load(nodes, name, "default.keep", "keep:1", Priority.CRITICAL, 1 * GIB)
    load(nodes, name, "default.cold-high", "cold-high:1", Priority.HIGH, 2 * GIB)
    load(nodes, name, "default.hot-low", "hot-low:1", Priority.LOW, 2 * GIB)
    for key in ("default.keep", "default.cold-high", "default.hot-low"):
        in_state(nodes, name, key, ModelState.LOADED)
    before = held(node)
    # 2.75 GiB usable is free; the agent evicts no assigned model for another (the operator
    # decides that), so the newcomer fails, once: placing it afresh is the operator's to do.
    load(nodes, name, "default.huge", "huge:1", Priority.HIGH, 7 * GIB)
    failed = in_state(nodes, name, "default.huge", ModelState.FAILED)
    assert failed.message is not None
    assert failed.message.startswith("InsufficientVRAM:")
    assert failed.reason == "InsufficientVRAM"
    time.sleep(3)
    status = reports_later(nodes, name)
    failures = metrics(node).get(
        ("vram_model_failures_total", frozenset({("reason", "InsufficientVRAM")}))
    )
    assert failures == 1
    for key in ("default.keep", "default.cold-high", "default.hot-low"):
        assert next(m for m in status.models if m.key == key).state is ModelState.LOADED
    assert held(node) == before
    assert metric_sum(metrics(node), "vram_model_evictions_total") == 0


def test_an_ollama_load_counts_room_over_the_gpus_ollama_chooses_from(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    """Ollama puts a model on the GPU with the most free memory, whatever GPU the operator
    named: the room for a load is counted over the node's GPUs, as Ollama counts it, so a
    model another GPU could hold is not refused because Ollama filled the named one; and the
    memory Ollama's models hold on a GPU other than the one they are charged to is not taken
    for another process's, which the agent would make room for by evicting them."""
    name = "agent-ollama-layout"
    sizes = {"x:1": 2 * GIB, "y:1": 2 * GIB, "z:1": 6 * GIB, "w:1": 6 * GIB}
    node = start(
        cluster,
        nodes,
        name,
        gpu_sizes=[8 * GIB, 8 * GIB],
        agent_args=[*QUICK, "--min-residency", "0"],
        ollama_args=catalog(sizes),
    )
    first, second = simulated_uuid(name, 0), simulated_uuid(name, 1)

    def on(gpu: str, key: str, model: str) -> None:
        placed = assignment(key, model, vram_bytes=sizes[model])
        nodes.assign(name, key, placed.model_copy(update={"gpu_uuid": gpu}))

    # Both named on the first GPU (binpack fills it); Ollama puts y on the second, the emptier.
    on(first, "default.x", "x:1")
    in_state(nodes, name, "default.x", ModelState.LOADED)
    on(first, "default.y", "y:1")
    in_state(nodes, name, "default.y", ModelState.LOADED)
    gpus = {d.uuid: d for d in SimulatedGPUs(node.gpu_state).devices()}
    assert [gpus[first].used_bytes, gpus[second].used_bytes] == [2 * GIB, 2 * GIB]
    # The second GPU is charged nothing, but holds y: z does not fit there, and does on the
    # first, where Ollama puts it. Counted on the second GPU alone, it was refused.
    on(second, "default.z", "z:1")
    in_state(nodes, name, "default.z", ModelState.LOADED)
    # 16 GiB less 10 held less 256 MiB on each: 6 GiB more does not fit anywhere.
    on(second, "default.w", "w:1")
    refused = in_state(nodes, name, "default.w", ModelState.FAILED)
    assert refused.reason == "InsufficientVRAM"
    assert refused.message is not None
    assert "over the node's 2 GPUs" in refused.message
    # The first GPU holds x and z (8 GiB) and is charged x and y (4 GiB): nothing else uses
    # it, and every model may go at once (no minimum residency), yet none does.
    status = reports_later(nodes, name, count=3)
    states = {m.key: m.state for m in status.models}
    assert states == {
        "default.x": ModelState.LOADED,
        "default.y": ModelState.LOADED,
        "default.z": ModelState.LOADED,
        "default.w": ModelState.FAILED,
    }
    assert metric_sum(metrics(node), "vram_model_evictions_total") == 0


def test_a_pipelines_activation_room_is_not_given_to_a_model_loaded_after_it(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    """A diffusion pipeline holds its weights and takes its activation peak only while it
    renders; memory the GPU shows free for that peak is not free for another model."""
    name = "agent-activation-room"
    node = start(
        cluster,
        nodes,
        name,
        gpu_sizes=[16 * GIB],
        agent_args=QUICK,
        ollama_args=catalog({"filler:1": 8 * GIB}),
        diffusion=True,
    )
    sdxl = "default.sdxl"
    nodes.assign(
        name, sdxl, assignment(sdxl, "stabilityai/stable-diffusion-xl-base-1.0", Backend.DIFFUSERS)
    )
    loaded = in_state(nodes, name, sdxl, ModelState.LOADED)
    budget = loaded.vram_bytes or 0
    weights = sum(held(node).values())
    # The figures this test relies on: the filler fits the free memory, not the budgeted.
    assert 16 * GIB - weights - 256 * 2**20 > 8 * GIB > 16 * GIB - budget - 256 * 2**20
    load(nodes, name, "default.filler", "filler:1", Priority.HIGH, 8 * GIB)
    refused = in_state(nodes, name, "default.filler", ModelState.FAILED)
    assert refused.reason == "InsufficientVRAM"
    assert refused.message is not None
    assert "sdxl" in refused.message
    assert ollama_owner(node, "filler:1") is None
    answer = http_json(
        f"{loaded.endpoint}/v1/images/generations", {"prompt": "a lighthouse", "size": "512x512"}
    )
    assert answer["data"][0]["b64_json"]


def test_a_critical_model_survives_a_newcomer_that_cannot_fit(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    name = "agent-critical"
    node = start(
        cluster,
        nodes,
        name,
        gpu_sizes=[8 * GIB],
        agent_args=[*QUICK, "--min-residency", "0"],
        ollama_args=catalog({"big-critical:1": 7 * GIB}),
    )
    load(nodes, name, "default.big", "big-critical:1", Priority.CRITICAL, 7 * GIB)
    in_state(nodes, name, "default.big", ModelState.LOADED)
    before = held(node)
    # Even a critical newcomer displaces only non-critical models.
    load(nodes, name, "default.newcomer", "newcomer:1", Priority.CRITICAL, 1 * GIB)
    failed = in_state(nodes, name, "default.newcomer", ModelState.FAILED)
    assert failed.message is not None
    assert failed.message.startswith("InsufficientVRAM:")
    status = reports_later(nodes, name)
    big = next(m for m in status.models if m.key == "default.big")
    assert big.state is ModelState.LOADED
    assert held(node) == before
    assert metric_sum(metrics(node), "vram_model_evictions_total") == 0


# ---- restart adoption --------------------------------------------------------------------------


def test_a_restarted_agent_adopts_resident_models_without_reloading(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    name = "agent-adopt"
    node = start(cluster, nodes, name, gpu_sizes=[16 * GIB], agent_args=QUICK)
    nodes.assign(name, "default.llama", assignment("default.llama", "llama3.2:1b"))
    nodes.assign(
        name,
        "default.qwen",
        assignment("default.qwen", VLLM_MODEL, Backend.VLLM, vram_bytes=4 * GIB),
    )
    in_state(nodes, name, "default.llama", ModelState.LOADED)
    in_state(nodes, name, "default.qwen", ModelState.LOADED)
    ps_before = http_json(f"{node.ollama_url}/api/ps")["models"]
    vllm_before = http_json(f"{node.supervisor_url}/models")["models"]
    allocations = held(node)
    assert node.agent is not None
    node.agent.stop(signal.SIGKILL)

    restarted_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    node.start_agent()
    status = heartbeat_after(nodes, name, restarted_at)
    states = {m.key: (m.state, m.vram_bytes) for m in status.models}
    assert states == {
        "default.llama": (ModelState.LOADED, 2 * GIB),
        "default.qwen": (ModelState.LOADED, QWEN_HELD),
    }
    reports_later(nodes, name)
    # No second load: the same vLLM process, Ollama untouched (a load request would have
    # moved expires_at), and the simulated GPU held by the same owners.
    assert http_json(f"{node.supervisor_url}/models")["models"] == vllm_before
    assert http_json(f"{node.ollama_url}/api/ps")["models"] == ps_before
    assert held(node) == allocations
    assert "adopted default.llama" in node.agent.tail(200)
    assert "adopted default.qwen" in node.agent.tail(200)
    assert metric_sum(metrics(node), "vram_model_loads_total") == 0


# ---- a backend dying mid-load ------------------------------------------------------------------


def test_a_backend_killed_mid_load_fails_the_model_then_it_recovers(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    name = "agent-crash"
    node = start(
        cluster,
        nodes,
        name,
        gpu_sizes=[16 * GIB],
        agent_args=QUICK,
        ollama_args=["--pull-seconds", "4"],
    )
    nodes.assign(
        name,
        "default.qwen",
        assignment("default.qwen", VLLM_MODEL, Backend.VLLM, vram_bytes=4 * GIB),
    )
    in_state(nodes, name, "default.qwen", ModelState.LOADED)
    nodes.assign(name, "default.llama", assignment("default.llama", "llama3.2:1b"))

    def pulling() -> ResidentModel | None:
        found = nodes.model(name, "default.llama")
        loading = found is not None and found.state is ModelState.LOADING
        return found if loading and found and (found.progress or 0) > 0 else None

    eventually(pulling, "the pull of llama3.2:1b under way")
    assert node.ollama is not None
    node.ollama.stop(signal.SIGKILL)

    failed = in_state(nodes, name, "default.llama", ModelState.FAILED)
    # Every retry of the pull met a closed port: that is the last word from the backend.
    assert failed.message is not None
    assert failed.message.startswith("BackendError:")
    assert "cannot connect" in failed.message

    def ollama_unhealthy() -> GPUNodeStatus | None:
        status = nodes.status(name)
        return status if status and condition(status, "Ready")[0] == "False" else None

    status = eventually(ollama_unhealthy, "Ready=False while Ollama is down")
    _, reason, message = condition(status, "Ready")
    assert reason == "BackendUnhealthy"
    assert message is not None
    assert message.startswith("ollama:")
    assert {(b.name, b.healthy) for b in status.backends} == {
        (Backend.OLLAMA, False),
        (Backend.VLLM, True),
    }
    qwen = next(m for m in status.models if m.key == "default.qwen")
    assert qwen.state is ModelState.LOADED

    node.start_ollama()
    recovered = in_state(nodes, name, "default.llama", ModelState.LOADED)
    assert (recovered.vram_bytes, recovered.message) == (2 * GIB, None)

    def ready_again() -> GPUNodeStatus | None:
        status = nodes.status(name)
        return status if status and condition(status, "Ready")[0] == "True" else None

    eventually(ready_again, "Ready=True once Ollama answers again")
    assert ollama_owner(node, "llama3.2:1b") is not None


# ---- malformed /proc ---------------------------------------------------------------------------


def test_malformed_proc_files_are_reported_and_the_agent_lives_on(
    cluster: SimulatedCluster, nodes: GPUNodes, tmp_path: Path
) -> None:
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       16384000 kB\nMemFree:  8000000 kB\nMemAvai")
    (proc / "pressure" / "memory").write_text("some avg10=lots avg60=\x00\x01\nfull ???\n")
    name = "agent-badproc"
    node = start(
        cluster,
        nodes,
        name,
        gpu_sizes=[8 * GIB],
        agent_args=["--report-interval", "1", "--proc", str(proc)],
    )
    first = heartbeat(nodes, name)
    status = reports_later(nodes, name)
    assert status.last_heartbeat_time is not None
    assert status.last_heartbeat_time > first
    assert status.host_memory is None
    assert status.memory_pressure is not None
    assert status.memory_pressure.available is False
    assert any("MemAvailable" in line for line in status.unavailable), status.unavailable
    assert any("memory PSI" in line and "lots" in line for line in status.unavailable)
    assert condition(status, "MemoryPressure")[:2] == ("Unknown", "PSIUnavailable")
    assert len(status.gpus) == 1  # the rest of the report goes on
    assert node.agent is not None
    assert node.agent.alive()

    (proc / "meminfo").write_text((CALM_PROC / "meminfo").read_text())
    (proc / "pressure" / "memory").write_text((CALM_PROC / "pressure" / "memory").read_text())

    def healed() -> GPUNodeStatus | None:
        status = nodes.status(name)
        return status if status and status.host_memory and not status.unavailable else None

    status = eventually(healed, "the figures back once the files read well")
    assert status.memory_pressure is not None
    assert status.memory_pressure.available
    assert condition(status, "MemoryPressure")[0] == "False"


# ---- metrics -----------------------------------------------------------------------------------


def test_metrics_describe_gpus_models_and_loads(cluster: SimulatedCluster, nodes: GPUNodes) -> None:
    name = "agent-metrics"
    node = start(cluster, nodes, name, gpu_sizes=[8 * GIB], agent_args=QUICK)
    uuid = simulated_uuid(name, 0)
    nodes.assign(name, "default.llama", assignment("default.llama", "llama3.2:1b"))
    in_state(nodes, name, "default.llama", ModelState.LOADED)

    def reported() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        found = metrics(node)
        return found if metric_sum(found, "vram_model_resident_bytes") else None

    found = eventually(reported, "the loaded model in /metrics")
    gpu_labels = frozenset({("gpu_uuid", uuid), ("gpu_name", "Simulated H100 80GB")})
    assert found[("vram_gpu_memory_total_bytes", gpu_labels)] == 8 * GIB
    assert found[("vram_gpu_memory_used_bytes", gpu_labels)] == 2 * GIB
    model_labels = frozenset(
        {
            ("model_key", "default.llama"),
            ("model", "llama3.2:1b"),
            ("backend", "ollama"),
            ("gpu_uuid", uuid),
        }
    )
    assert found[("vram_model_resident_bytes", model_labels)] == 2 * GIB
    loaded = frozenset({("backend", "ollama"), ("outcome", "loaded")})
    assert found[("vram_model_loads_total", loaded)] == 1
    buckets = [
        (dict(labels), value)
        for (sample, labels), value in found.items()
        if sample == "vram_model_load_duration_seconds_bucket"
    ]
    assert buckets
    assert all(labels["backend"] == "ollama" for labels, _ in buckets)
    assert max(value for _, value in buckets) == 1  # the +Inf bucket holds the one load
    state = frozenset({("model_key", "default.llama"), ("state", "Loaded")})
    assert found[("vram_model_state", state)] == 1
    assert all(sample.startswith("vram_") for sample, _ in found)


# ---- watch scope -------------------------------------------------------------------------------


def test_each_agent_watches_and_writes_only_its_own_gpunode(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    node_a = start(cluster, nodes, "agent-a", gpu_sizes=[8 * GIB], agent_args=QUICK)
    node_b = start(cluster, nodes, "agent-b", gpu_sizes=[8 * GIB], agent_args=QUICK)
    uuid_a, uuid_b = simulated_uuid("agent-a", 0), simulated_uuid("agent-b", 0)
    heartbeat(nodes, "agent-a")
    heartbeat(nodes, "agent-b")
    raw_b = nodes.raw("agent-b")
    assert raw_b is not None
    since = raw_b["metadata"]["resourceVersion"]

    nodes.assign("agent-a", "default.only-a", assignment("default.only-a", "llama3.2:1b"))
    in_state(nodes, "agent-a", "default.only-a", ModelState.LOADED)
    reports_later(nodes, "agent-b")
    assert held(node_b) == {}
    nodes.assign("agent-b", "default.only-b", assignment("default.only-b", "llama3.2:3b"))
    in_state(nodes, "agent-b", "default.only-b", ModelState.LOADED)
    reports_later(nodes, "agent-a")

    # Every write to B's GPUNode since A started loading, replayed from the API server.
    statuses = []
    stream = watch.Watch()
    for event in stream.stream(
        nodes.custom.list_cluster_custom_object,
        GROUP,
        VERSION,
        PLURAL,
        field_selector="metadata.name=agent-b",
        resource_version=since,
        timeout_seconds=2,
    ):
        obj = GPUNode.model_validate(event["object"])
        assert obj.metadata["name"] == "agent-b"
        if obj.status is not None:
            statuses.append(obj.status)
    assert len(statuses) >= 2
    for status in statuses:
        assert [g.uuid for g in status.gpus] == [uuid_b]
        assert {m.key for m in status.models} <= {"default.only-b"}
    status_a = nodes.status("agent-a")
    assert status_a is not None
    assert [g.uuid for g in status_a.gpus] == [uuid_a]
    assert {m.key for m in status_a.models} == {"default.only-a"}
    assert ollama_owner(node_a, "llama3.2:3b") is None
    assert ollama_owner(node_b, "llama3.2:1b") is None


# ---- keepAlive ------------------------------------------------------------------------------


def test_an_idle_model_is_unloaded_after_keep_alive_and_stays_out(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    """vLLM keeps models forever, so the agent enforces keepAlive itself; the model stays out
    (Evicted, saying why) until its assignment changes, instead of being reloaded at once."""
    node = start(cluster, nodes, "agent-idle", gpu_sizes=[16 * GIB], agent_args=QUICK)
    idle = assignment("default.idle", VLLM_MODEL, Backend.VLLM, vram_bytes=2 * GIB)
    nodes.assign("agent-idle", "default.idle", idle.model_copy(update={"keep_alive_seconds": 3}))
    in_state(nodes, "agent-idle", "default.idle", ModelState.LOADED)

    evicted = in_state(nodes, "agent-idle", "default.idle", ModelState.EVICTED)
    assert evicted.message is not None
    assert "past keepAlive" in evicted.message
    eventually(lambda: not held(node), "the simulated GPU to be empty")
    later = reports_later(nodes, "agent-idle", count=3)
    (model,) = later.models
    assert model.state is ModelState.EVICTED  # not reloaded behind the user's back
    assert metric_sum(metrics(node), "vram_model_evictions_total") == 1

    # A new generation of the assignment (the user changed the spec) loads it again.
    nodes.assign(
        "agent-idle",
        "default.idle",
        idle.model_copy(update={"keep_alive_seconds": 600, "generation": 2}),
    )
    in_state(nodes, "agent-idle", "default.idle", ModelState.LOADED)


# ---- the backends as the real servers behave ---------------------------------------------------


def test_ollama_names_as_ollama_reads_them_survive_a_restart_without_reloads(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    """Ollama lists short, case-folded names with :latest for a tagless one
    (types/model/name.go at v0.12.3); the agent must still know its models, and adopt them
    after a restart without loading anything again."""
    name = "agent-names"
    node = start(
        cluster,
        nodes,
        name,
        gpu_sizes=[16 * GIB],
        agent_args=QUICK,
        ollama_args=catalog({"mymodel:latest": GIB}),
    )
    wanted = {
        "default.tagless": "mymodel",
        "default.library": "library/llama3.2:1b",
        "default.mixed": "Llama3.2:3B",
    }
    for key, model in wanted.items():
        nodes.assign(name, key, assignment(key, model))
    for key in wanted:
        in_state(nodes, name, key, ModelState.LOADED)
    listed = {m["name"] for m in http_json(f"{node.ollama_url}/api/ps")["models"]}
    # Not what was asked: short names, :latest added (the case is the first pull's).
    assert {n.lower() for n in listed} == {"mymodel:latest", "llama3.2:1b", "llama3.2:3b"}
    stable = reports_later(nodes, name)
    assert {m.key: m.state for m in stable.models} == dict.fromkeys(wanted, ModelState.LOADED)
    ps_before = sorted(http_json(f"{node.ollama_url}/api/ps")["models"], key=str)
    loads_before = node.ollama.tail(400).count("fake ollama: loading") if node.ollama else 0
    assert node.agent is not None
    node.agent.stop(signal.SIGKILL)

    restarted_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    node.start_agent()
    status = heartbeat_after(nodes, name, restarted_at)  # the first report after the restart
    assert {m.key: m.state for m in status.models} == dict.fromkeys(wanted, ModelState.LOADED)
    reports_later(nodes, name)
    assert sorted(http_json(f"{node.ollama_url}/api/ps")["models"], key=str) == ps_before
    assert node.ollama is not None
    assert node.ollama.tail(400).count("fake ollama: loading") == loads_before
    assert metric_sum(metrics(node), "vram_model_loads_total") == 0


def test_a_model_missing_from_the_registry_fails_once_and_stays_quiet(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    # The fake's registry serves any name:tag; a tagless name it does not list does not exist.
    name = "agent-missing"
    node = start(cluster, nodes, name, gpu_sizes=[8 * GIB], agent_args=QUICK)
    nodes.assign(
        name, "default.ghost", assignment("default.ghost", "no-such-model", vram_bytes=GIB)
    )
    failed = in_state(nodes, name, "default.ghost", ModelState.FAILED)
    assert failed.reason == "PermanentError"
    assert failed.message is not None
    assert "permanent" in failed.message
    time.sleep(4)  # several retry back-offs of QUICK's 1 s, had it been retried
    reports_later(nodes, name)
    failures = metrics(node).get(
        ("vram_model_failures_total", frozenset({("reason", "PermanentError")}))
    )
    assert failures == 1
    # A changed spec (a new generation) is worth one more try.
    retry = assignment("default.ghost", "no-such-model", vram_bytes=GIB)
    nodes.assign(name, "default.ghost", retry.model_copy(update={"generation": 2}))

    def failed_again() -> bool:
        found = metrics(node).get(
            ("vram_model_failures_total", frozenset({("reason", "PermanentError")}))
        )
        return found == 2

    eventually(failed_again, "a second attempt for the new generation")


def test_a_vllm_model_on_the_second_gpu_answers_where_its_status_says(
    cluster: SimulatedCluster, nodes: GPUNodes
) -> None:
    """vLLM 0.11 parses CUDA_VISIBLE_DEVICES with int() (platforms/interface.py): the model is
    started with the second GPU's index, and answers at the endpoint the GPUNode reports,
    from the node's own address rather than the pod's loopback."""
    name = "agent-second-gpu"
    start(cluster, nodes, name, gpu_sizes=[16 * GIB, 16 * GIB], agent_args=QUICK)
    second = simulated_uuid(name, 1)
    wanted = assignment("default.qwen", VLLM_MODEL, Backend.VLLM, vram_bytes=4 * GIB)
    nodes.assign(name, "default.qwen", wanted.model_copy(update={"gpu_uuid": second}))
    loaded = in_state(nodes, name, "default.qwen", ModelState.LOADED)
    assert loaded.gpu_uuid == second
    assert loaded.endpoint is not None
    host = urllib.parse.urlsplit(loaded.endpoint).hostname
    assert host is not None
    assert not host.startswith("127."), loaded.endpoint
    served = http_json(f"{loaded.endpoint}/v1/models")
    assert [m["id"] for m in served["data"]] == [VLLM_MODEL]
    node = cluster.nodes[name]
    children = http_json(f"{node.supervisor_url}/models")["models"]
    (child,) = [c for c in children if c["key"] == "default.qwen"]
    assert child["deviceIndex"] == 1  # what CUDA_VISIBLE_DEVICES said; a UUID ends its start
