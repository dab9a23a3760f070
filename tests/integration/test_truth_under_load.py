"""Status that stays true under load: the operator never promises memory an agent cannot
deliver, status follows residency within a report interval in every snapshot, a lost node is
marked and emptied, and a burst settles even with the operator killed under it.

Real kube-apiserver, operator and agents as processes, fake Ollama and the real vLLM
supervisor over simulated GPUs; `vram_operator.simulation.audit` records every object version
and samples the simulated GPUs, so each check covers every snapshot, not only the last.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vram_operator.api import GROUP, VERSION
from vram_operator.simulation.audit import Audit
from vram_operator.simulation.burst import BurstModel, burst, ollama_catalog, settled
from vram_operator.simulation.cluster import SimulatedCluster
from vram_operator.simulation.gpu import GIB
from vram_operator.simulation.nodes import ManagedProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")
MIB = 2**20
MDEPS = "modeldeployments"
NAMESPACE = "default"
REPORT_INTERVAL = 1.0
HEARTBEAT_GRACE = 6
TOLERANCE = REPORT_INTERVAL + 1.5
"""One report interval, plus the time a report and a status write take on a busy machine."""
AGENT_ARGS = ("--report-interval", str(REPORT_INTERVAL))


class Scenario:
    """A simulated cluster under audit, with the calls the tests make."""

    def __init__(self, cluster: SimulatedCluster) -> None:
        self.cluster = cluster
        self.custom = client.CustomObjectsApi(cluster.api)
        self.models: dict[str, str] = {}  # Ollama model name to assignment key
        self.replicas: dict[str, int] = {}
        self.applied: dict[str, float] = {}
        self.audit = Audit(cluster.api, lambda: dict(cluster.nodes), lambda: dict(self.models))

    def add_nodes(self, names: Sequence[str], gpu_bytes: int, catalog: Path) -> None:
        for name in names:
            self.cluster.add_node(
                name,
                gpu_sizes=[gpu_bytes],
                agent_args=AGENT_ARGS,
                ollama_args=("--catalog", str(catalog)),
            )
        # Placement only considers nodes that have reported: wait for every agent.
        self.wait(
            "every agent to report",
            lambda: all((self.gpunode(n) or {}).get("status") for n in names),
            timeout=60,
        )

    def start_operator(self, *args: str) -> ManagedProcess:
        operator = self.cluster.start_operator("--heartbeat-grace", str(HEARTBEAT_GRACE), *args)
        self.wait("the operator to start", lambda: "operator state rebuilt" in log_of(operator))
        return operator

    def apply(self, model: BurstModel) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": model.name, "namespace": NAMESPACE},
            "spec": dict(model.spec),
        }
        key = f"{NAMESPACE}.{model.name}"
        if model.ollama_model is not None:
            self.models[model.ollama_model] = key
        self.replicas[key] = int(model.spec.get("replicas", 1))
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, MDEPS, body)
        self.applied[model.name] = time.monotonic()

    def deployments(self) -> dict[str, dict[str, Any]]:
        listing: Any = self.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, MDEPS)
        return {item["metadata"]["name"]: item for item in listing["items"]}

    def gpunode(self, name: str) -> dict[str, Any] | None:
        try:
            body: Any = self.custom.get_cluster_custom_object(GROUP, VERSION, "gpunodes", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(body)

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 120) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.3)

    def fail(self, message: str) -> Any:
        lines = [f"  {name}: {describe(body)}" for name, body in sorted(self.deployments().items())]
        pytest.fail(
            f"{message}\nModelDeployments:\n"
            + "\n".join(lines)
            + f"\nlogs:\n{self.cluster.logs()}",
            pytrace=False,
        )

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.fail(message)

    def settle(self, count: int, timeout: float) -> dict[str, dict[str, Any]]:
        def probe() -> dict[str, dict[str, Any]] | None:
            bodies = self.deployments()
            if len(bodies) == count and all(settled(b) for b in bodies.values()):
                return bodies
            return None

        return self.wait(f"all {count} ModelDeployments to settle", probe, timeout)

    def check_truth(self) -> None:
        """The promises every snapshot must keep."""
        self.audit.sample()
        self.check(not self.audit.errors, f"the audit failed: {self.audit.errors!r}")
        stale = self.audit.stale_ready_claims(TOLERANCE)
        self.check(not stale, f"status claimed replicas the GPUs did not hold: {stale[:10]}")
        overfull = self.audit.overfull_reports()
        self.check(not overfull, f"GPUNode reports over capacity: {overfull[:10]}")
        twice = self.audit.held_twice(self.replicas)
        self.check(not twice, f"models held twice: {twice[:10]}")


def describe(body: Mapping[str, Any]) -> str:
    status = body.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    ready = conditions.get("Ready") or {}
    scheduled = conditions.get("Scheduled") or {}
    placements = [(p["node"], p["state"]) for p in status.get("placements") or []]
    return (
        f"Ready={ready.get('status')}/{ready.get('reason')} "
        f"Scheduled={scheduled.get('status')}/{scheduled.get('reason')} {placements} "
        f"{ready.get('message', '')!r}"
    )


def log_of(process: ManagedProcess) -> str:
    return process.log_path.read_text(errors="replace")


def condition(body: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any]:
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), {})


@pytest.fixture
def scenario(sim_cluster: SimulatedCluster) -> Iterator[Scenario]:
    run = Scenario(sim_cluster)
    run.audit.start()
    try:
        yield run
    finally:
        run.audit.stop()


def test_the_operator_never_promises_what_the_agent_cannot_load(
    scenario: Scenario, tmp_path: Path
) -> None:
    """Four 576Mi vLLM models and one 79360Mi Ollama model on one 80Gi GPU: charged at their
    requested size they all 'fit', and the last load used to fail and evict others. Each must
    end Ready or Pending with a true reason within 15 s of its apply, and nothing is evicted."""
    models = [
        BurstModel(
            f"small-{i}",
            {"model": f"org/small-{i}", "backend": "vllm", "priority": "low", "vram": "576Mi"},
        )
        for i in range(4)
    ]
    big = BurstModel("big", {"model": "big:1b", "backend": "ollama", "vram": "79360Mi"})
    models.append(big)
    catalog = ollama_catalog(models, tmp_path / "catalog.json")
    scenario.add_nodes(["one-gpu"], 80 * GIB, catalog)
    scenario.start_operator()
    scenario.wait("the node to report", lambda: (scenario.gpunode("one-gpu") or {}).get("status"))
    for model in models:
        scenario.apply(model)
    bodies = scenario.settle(len(models), timeout=15 + 5)
    for name, body in bodies.items():
        print(f"{name}: {describe(body)}")
        if condition(body, "Ready").get("status") != "True":
            scheduled = condition(body, "Scheduled")
            scenario.check(
                scheduled.get("reason") == "InsufficientVRAM"
                and "can hold" in str(scheduled.get("message")),
                f"{name} is not Ready and does not say it lacks memory: {describe(body)}",
            )
    ready = [n for n, b in bodies.items() if condition(b, "Ready").get("status") == "True"]
    scenario.check(len(ready) >= 2, f"only {ready} Ready: placement is too cautious")
    time.sleep(3)  # long enough for a late failure or eviction to show
    scenario.check(not scenario.audit.evictions(), f"evicted: {scenario.audit.evictions()}")
    scenario.check(
        all(settled(b) for b in scenario.deployments().values()), "something moved after settling"
    )
    scenario.check_truth()


BURST_COUNT = 36
BURST_NODES = ("burst-a", "burst-b", "burst-c")
BURST_GPU = 8 * GIB


def _apply_burst(scenario: Scenario, tmp_path: Path, seed: int) -> list[BurstModel]:
    models = burst(BURST_COUNT, BURST_GPU, len(BURST_NODES), seed=seed)
    scenario.add_nodes(BURST_NODES, BURST_GPU, ollama_catalog(models, tmp_path / "catalog.json"))
    return models


def test_a_burst_settles_and_every_snapshot_tells_the_truth(
    scenario: Scenario, tmp_path: Path
) -> None:
    models = _apply_burst(scenario, tmp_path, seed=7)
    scenario.start_operator()
    for model in models:
        scenario.apply(model)
    started = time.monotonic()
    bodies = scenario.settle(len(models), timeout=120)
    print(f"{len(models)} settled in {time.monotonic() - started:.1f}s")
    ready = sum(condition(b, "Ready").get("status") == "True" for b in bodies.values())
    scenario.check(0 < ready < len(models), f"{ready} of {len(models)} Ready at 1.5x")
    scenario.check_truth()


def test_a_burst_with_the_operator_killed_three_times(scenario: Scenario, tmp_path: Path) -> None:
    models = _apply_burst(scenario, tmp_path, seed=11)
    operator = scenario.start_operator()
    third = len(models) // 3
    for index, model in enumerate(models):
        scenario.apply(model)
        if index + 1 in (third, 2 * third, len(models)):
            time.sleep(1.0)  # mid-flight: some placed, some loading, most not yet
            operator.stop(signal.SIGKILL)
            operator = scenario.start_operator()
    bodies = scenario.settle(len(models), timeout=150)
    scenario.check(
        all(
            b["status"]["observedGeneration"] == b["metadata"]["generation"]
            for b in bodies.values()
        ),
        "a status describes an old generation",
    )
    scenario.check_truth()


def test_a_lost_agent_is_marked_and_its_models_move(scenario: Scenario, tmp_path: Path) -> None:
    models = [
        BurstModel(f"mover-{i}", {"model": f"mover-{i}:1b", "backend": "ollama", "vram": "1Gi"})
        for i in range(6)
    ]
    catalog = ollama_catalog(models, tmp_path / "catalog.json")
    scenario.add_nodes(["keeper", "victim"], 8 * GIB, catalog)
    scenario.start_operator("--strategy", "spread")  # some on each node
    for model in models:
        scenario.apply(model)
    bodies = scenario.settle(len(models), timeout=60)
    on_victim = [
        name
        for name, body in bodies.items()
        if any(p["node"] == "victim" for p in body["status"]["placements"])
    ]
    scenario.check(bool(on_victim), "nothing was placed on the node to be lost")
    agent = scenario.cluster.nodes["victim"].agent
    assert agent is not None
    agent.stop(signal.SIGKILL)
    killed = time.monotonic()

    def marked() -> bool:
        ready = condition(scenario.gpunode("victim"), "Ready")
        return (ready.get("status"), ready.get("reason")) == ("Unknown", "HeartbeatLost")

    scenario.wait("victim to be Ready=Unknown", marked, timeout=HEARTBEAT_GRACE + 5 + 5)
    elapsed = time.monotonic() - killed
    print(f"marked HeartbeatLost {elapsed:.1f}s after the kill")
    scenario.check(elapsed <= HEARTBEAT_GRACE + 5 + REPORT_INTERVAL, f"marked after {elapsed:.1f}s")
    claims = [
        name
        for name, body in scenario.deployments().items()
        for p in body["status"]["placements"]
        if p["node"] == "victim" and p["state"] == "Loaded"
    ]
    scenario.check(not claims, f"still claiming Loaded on the lost node: {claims}")
    assigned = (scenario.gpunode("victim") or {}).get("spec", {}).get("assignments") or {}
    scenario.check(not assigned, f"the lost node still holds assignments: {sorted(assigned)}")

    def moved() -> bool:
        bodies = scenario.deployments()
        return all(
            condition(bodies[name], "Ready").get("status") == "True"
            and all(p["node"] == "keeper" for p in bodies[name]["status"]["placements"])
            for name in on_victim
        )

    scenario.wait("the lost node's models to be Ready on keeper", moved, timeout=30)
