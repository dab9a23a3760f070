"""The operator end to end: a real kube-apiserver, the operator and node agents as real
processes over the fake Ollama (and the real vLLM supervisor), and every promise of the
ModelDeployment flow checked in the objects a user reads.

Each test starts its own nodes and operators on the session's control plane and keeps its
ModelDeployments in a namespace of its own; the `sim_cluster` fixture stops every process and
wipes every object afterwards. Models are invented `name:tag` Ollama references whose sizes a
catalog given to each fake Ollama fixes, so `spec.vram` is what really lands on the GPU.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from vram_operator.api import FINALIZER, GROUP, VERSION, SpecError, parse_spec
from vram_operator.api.budget import reserve_bytes
from vram_operator.api.modeldeployment import SUPERVISOR_OWNED_VLLM_FLAGS
from vram_operator.simulation.cluster import SimulatedCluster
from vram_operator.simulation.gpu import GIB, SimulatedGPUs
from vram_operator.simulation.nodes import ManagedProcess

pytestmark = pytest.mark.integration

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
Body = dict[str, Any]
T = TypeVar("T")

MIB = 2**20
MDEPS = "modeldeployments"
GPUNODES = "gpunodes"
AGENT_ARGS = ("--report-interval", "1")
HEARTBEAT_GRACE = 8
LEASE_SECONDS = 15
"""The operator's Lease duration (LeaderElector's default); a standby polls every 5 s."""
SETTLE = 90.0
"""Deadline for anything that needs a few reconciles and loads on this 2-core machine."""
PENDING_REASONS = ("InsufficientVRAM", "Preempted")
RESERVE = reserve_bytes(256 * MIB)
"""VRAM per GPU the operator never promises: the agents' --min-free (256Mi by default) and the
slack api/budget.py adds."""


# ---- the test's view of the cluster ----------------------------------------------------------


def condition(body: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    """One status condition of an object, or None."""
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), None)


def is_ready(body: Mapping[str, Any] | None) -> bool:
    ready = condition(body, "Ready")
    return ready is not None and ready.get("status") == "True"


def ready_nodes(body: Mapping[str, Any] | None) -> list[str]:
    """Nodes on which the status says a replica is Loaded."""
    placements = ((body or {}).get("status") or {}).get("placements") or []
    return sorted(p["node"] for p in placements if p.get("state") == "Loaded")


@dataclass
class Env:
    """One test: its namespace, its simulated cluster, and the calls the test makes."""

    cluster: SimulatedCluster
    namespace: str

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.cluster.api)

    # nodes and operators

    def add_nodes(
        self,
        names: Sequence[str],
        models: Mapping[str, int],
        gpu_sizes: Sequence[int] = (4 * GIB,),
        max_models: int = 16,
    ) -> None:
        """Nodes whose fake Ollama knows `models` (name:tag to VRAM bytes) and holds at most
        `max_models` at once (OLLAMA_MAX_LOADED_MODELS, told to the agent too), agents
        reporting 1/s."""
        catalog = self.cluster.workdir / f"catalog-{len(self.cluster.nodes)}.json"
        sizes = {
            name: {"size": max(size // 2, 1), "size_vram": size} for name, size in models.items()
        }
        catalog.write_text(json.dumps(sizes))
        for name in names:
            self.cluster.add_node(
                name,
                gpu_sizes=gpu_sizes,
                agent_args=(*AGENT_ARGS, "--ollama-max-loaded-models", str(max_models)),
                ollama_args=("--catalog", str(catalog), "--max-loaded-models", str(max_models)),
            )

    def start_operator(self, *args: str) -> ManagedProcess:
        return self.cluster.start_operator("--heartbeat-grace", str(HEARTBEAT_GRACE), *args)

    # ModelDeployments

    def create(self, name: str, spec: Mapping[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": dict(spec),
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, MDEPS, body)

    def patch_spec(self, name: str, changes: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, MDEPS, name, {"spec": dict(changes)}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, MDEPS, name)

    def get(self, name: str) -> Body | None:
        try:
            body: Any = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, MDEPS, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return body

    def deployments(self) -> dict[str, Body]:
        listing: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, MDEPS
        )
        return {item["metadata"]["name"]: item for item in listing["items"]}

    def key(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    # GPUNodes and simulated GPUs

    def gpunodes(self) -> dict[str, Body]:
        listing: Any = self.custom.list_cluster_custom_object(GROUP, VERSION, GPUNODES)
        return {item["metadata"]["name"]: item for item in listing["items"]}

    def reported(self, name: str) -> dict[str, str]:
        """Node to the state its agent reports for this ModelDeployment."""
        key = self.key(name)
        return {
            node: model["state"]
            for node, body in self.gpunodes().items()
            for model in (body.get("status") or {}).get("models") or []
            if model["key"] == key
        }

    def assigned(self, name: str) -> list[str]:
        """Nodes whose GPUNode.spec.assignments hold this ModelDeployment."""
        key = self.key(name)
        return sorted(
            node
            for node, body in self.gpunodes().items()
            if key in ((body.get("spec") or {}).get("assignments") or {})
        )

    def allocations(self, model: str) -> dict[str, int]:
        """Node to the simulated GPU memory the fake Ollama there holds for `model`."""
        held: dict[str, int] = defaultdict(int)
        for name, node in self.cluster.nodes.items():
            for owners in SimulatedGPUs(node.gpu_state).allocations().values():
                for owner, nbytes in owners.items():
                    if owner.startswith("pid:") and owner.endswith(f":{model}"):
                        held[name] += nbytes
        return dict(held)

    # waiting, with the evidence when it does not happen

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = SETTLE) -> T:
        """Poll `probe` until it returns something truthy; fail with the logs if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.5)

    def fail(self, message: str) -> NoReturn:
        summary = "\n".join(
            f"  {name}: {describe(body)}" for name, body in sorted(self.deployments().items())
        )
        pytest.fail(
            f"{message}\nModelDeployments in {self.namespace}:\n{summary}\n"
            f"logs:\n{self.cluster.logs()}",
            pytrace=False,
        )

    def check(self, ok: bool, message: str) -> None:
        """assert, with the cluster's state and logs in the failure."""
        if not ok:
            self.fail(message)

    def wait_ready(self, names: Iterable[str], timeout: float = SETTLE) -> dict[str, Body]:
        wanted = sorted(names)

        def probe() -> dict[str, Body] | None:
            bodies = self.deployments()
            if all(is_ready(bodies.get(n)) for n in wanted):
                return {n: bodies[n] for n in wanted}
            return None

        return self.wait(f"{', '.join(wanted)} to be Ready", probe, timeout)


def describe(body: Mapping[str, Any]) -> str:
    ready = condition(body, "Ready") or {}
    status = body.get("status") or {}
    return (
        f"{ready.get('status')}/{ready.get('reason')} ready={status.get('ready')} "
        f"placements={[(p['node'], p['state']) for p in status.get('placements') or []]} "
        f"{ready.get('message', '')!r}"
    )


@pytest.fixture
def env(sim_cluster: SimulatedCluster, request: pytest.FixtureRequest) -> Env:
    """The simulated cluster and a fresh namespace named after the test."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    namespace = f"op-{name}"[:63].rstrip("-")
    core = client.CoreV1Api(sim_cluster.api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    except ApiException as exc:
        # No controller-manager finalizes a deleted namespace here, so it is never deleted, and
        # a rerun on an existing cluster finds it.
        if exc.status != 409:
            raise
    return Env(sim_cluster, namespace)


# ---- every GPUNode version, and the capacity promise ------------------------------------------


class GPUNodeRecorder:
    """Every GPUNode version the API server emits while a test runs, from a watch thread.

    Listing once and then watching from that resourceVersion yields each version in order, so a
    check over `snapshots` covers every status an agent wrote, not only the last.
    """

    def __init__(self, api: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpunode-recorder", daemon=True)
        self._lock = threading.Lock()
        self._snapshots: list[Body] = []
        self.error: BaseException | None = None
        self.gaps = 0

    @property
    def snapshots(self) -> list[Body]:
        with self._lock:
            return list(self._snapshots)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _record(self, items: Iterable[Body]) -> None:
        with self._lock:
            self._snapshots.extend(items)

    def _run(self) -> None:
        version: str | None = None
        try:
            while not self._stop.is_set():
                if version is None:
                    listing: Any = self._custom.list_cluster_custom_object(GROUP, VERSION, GPUNODES)
                    self._record(listing["items"])
                    version = listing["metadata"]["resourceVersion"]
                stream = watch.Watch().stream(
                    self._custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    GPUNODES,
                    resource_version=version,
                    timeout_seconds=1,
                )
                try:
                    for event in stream:
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "DELETED":
                            self._record([obj])
                except ApiException as exc:
                    if exc.status != 410:
                        raise
                    self.gaps += 1  # the history was compacted: relist, and say so
                    version = None
        except BaseException as exc:  # reported by the test, never lost in a thread
            self.error = exc

    def violations(self) -> list[str]:
        """Every snapshot in which a GPU holds, or is promised, more than it has."""
        problems = []
        for snapshot in self.snapshots:
            name = snapshot["metadata"]["name"]
            version = snapshot["metadata"]["resourceVersion"]
            status = snapshot.get("status") or {}
            assignments = ((snapshot.get("spec") or {}).get("assignments") or {}).values()
            for gpu in status.get("gpus") or []:
                total, used = gpu["totalBytes"], gpu["usedBytes"]
                where = f"{name}@{version} {gpu['uuid']}"
                if used > total:
                    problems.append(f"{where}: usedBytes {used} > totalBytes {total}")
                # Loading counts too: the agent reports it once it has committed to the GPU.
                resident = sum(
                    m.get("vramBytes") or 0
                    for m in status.get("models") or []
                    if m.get("gpuUuid") == gpu["uuid"] and m["state"] in ("Loaded", "Loading")
                )
                if resident > total:
                    problems.append(f"{where}: resident models hold {resident} > {total}")
                promised = sum(
                    a.get("vramBytes") or 0 for a in assignments if a.get("gpuUuid") == gpu["uuid"]
                )
                if promised > total - RESERVE:
                    problems.append(f"{where}: assignments promise {promised} > {total} - reserve")
        return problems

    def assert_within_capacity(self, env: Env) -> None:
        env.check(self.error is None, f"the GPUNode watch failed: {self.error!r}")
        env.check(self.gaps == 0, "the GPUNode watch missed versions (410 Gone)")
        snapshots = self.snapshots
        env.check(len(snapshots) > 0, "no GPUNode version was recorded")
        problems = self.violations()
        env.check(not problems, f"over capacity in {len(problems)} snapshot(s): {problems[:10]}")


@pytest.fixture
def recorder(sim_cluster: SimulatedCluster) -> Iterator[GPUNodeRecorder]:
    """Records GPUNode versions from before the test's first node until its end."""
    rec = GPUNodeRecorder(sim_cluster.api)
    rec.start()
    try:
        yield rec
    finally:
        rec.stop()


def operator_log(process: ManagedProcess) -> str:
    return process.log_path.read_text(errors="replace")


def assert_operator_healthy(env: Env, process: ManagedProcess) -> None:
    env.check(process.alive(), f"{process.name} exited")
    log = operator_log(process)
    env.check("Traceback" not in log, f"{process.name} logged a traceback:\n{log[-6000:]}")


# ---- apply → Ready, scale, change, delete -------------------------------------------------


@pytest.mark.slow
def test_lifecycle_apply_scale_change_delete(
    env: Env, recorder: GPUNodeRecorder, kubectl: Kubectl
) -> None:
    small, other = "tiny-a:1b", "tiny-b:1b"
    size = 256 * MIB
    env.add_nodes(["life-1", "life-2", "life-3"], {small: size, other: size})
    operator = env.start_operator()
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": "life", "namespace": env.namespace},
        "spec": {"model": small, "backend": "ollama", "vram": "256Mi"},
    }
    applied = kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    env.check(applied.returncode == 0, f"kubectl apply failed: {applied.stderr}")
    waited = kubectl(
        "wait",
        "--for=condition=Ready",
        "mdep/life",
        "-n",
        env.namespace,
        "--timeout=90s",
        timeout=120,
    )
    env.check(waited.returncode == 0, f"kubectl wait failed: {waited.stdout}{waited.stderr}")
    body = env.get("life")
    assert body is not None
    env.check(FINALIZER in body["metadata"].get("finalizers", []), "no vram.dev/unload finalizer")
    env.check(body["status"]["readyReplicas"] == 1, f"status: {body['status']}")
    first = ready_nodes(body)
    env.check(len(first) == 1 and env.allocations(small) == {first[0]: size}, "not on one GPU")

    # 1 → 3: a replica on each node, each really holding the model's memory.
    env.patch_spec("life", {"replicas": 3})
    env.wait(
        "3 Loaded replicas",
        lambda: len(ready_nodes(env.get("life"))) == 3 and is_ready(env.get("life")),
    )
    env.wait(
        "every node to hold tiny-a",
        lambda: env.allocations(small) == {n: size for n in ("life-1", "life-2", "life-3")},
    )

    # 3 → 1: two replicas withdrawn, unloaded and their memory freed.
    env.patch_spec("life", {"replicas": 1})
    env.wait(
        "1 replica left",
        lambda: len(ready_nodes(env.get("life"))) == 1 and is_ready(env.get("life")),
    )
    kept = ready_nodes(env.get("life"))
    env.wait("the others to unload", lambda: list(env.reported("life")) == kept)
    env.wait("their GPU memory to be freed", lambda: list(env.allocations(small)) == kept)
    env.check(env.assigned("life") == kept, f"assigned {env.assigned('life')}, kept {kept}")

    # A different model: the old one leaves every GPU, the new one is Ready.
    env.patch_spec("life", {"model": other})
    env.wait(
        "the new model to be Loaded",
        lambda: (
            len(env.allocations(other)) == 1
            and not env.allocations(small)
            and is_ready(env.get("life"))
            and len(ready_nodes(env.get("life"))) == 1
        ),
    )
    body = env.get("life")
    assert body is not None
    env.check(
        body["status"]["observedGeneration"] == body["metadata"]["generation"],
        "status does not describe the latest generation",
    )

    # Delete: the agents unload, the memory is freed, the finalizer goes, the object goes.
    deleted = kubectl("delete", "mdep/life", "-n", env.namespace, "--wait=false")
    env.check(deleted.returncode == 0, f"kubectl delete failed: {deleted.stderr}")
    env.wait("the object to be gone", lambda: env.get("life") is None)
    env.wait("agents to report it gone", lambda: env.reported("life") == {})
    env.check(env.allocations(other) == {}, f"still allocated: {env.allocations(other)}")
    env.check(env.assigned("life") == [], "an assignment outlived the object")
    assert_operator_healthy(env, operator)
    recorder.assert_within_capacity(env)


# ---- more than fits ---------------------------------------------------------------------------


def free_for(gpunodes: Mapping[str, Body]) -> dict[str, int]:
    """GPU UUID to the VRAM the operator may still promise, computed from the objects alone."""
    free = {}
    for body in gpunodes.values():
        assignments = ((body.get("spec") or {}).get("assignments") or {}).values()
        models = (body.get("status") or {}).get("models") or []
        for gpu in (body.get("status") or {}).get("gpus") or []:
            held = 0
            for assignment in assignments:
                if assignment.get("gpuUuid") != gpu["uuid"]:
                    continue
                key = f"{assignment['namespace']}.{assignment['name']}"
                measured = [m.get("vramBytes") or 0 for m in models if m["key"] == key]
                held += max([assignment.get("vramBytes") or 0, *measured])
            free[gpu["uuid"]] = gpu["totalBytes"] - RESERVE - held
    return free


@pytest.mark.slow
def test_more_models_than_fit(env: Env, recorder: GPUNodeRecorder) -> None:
    """Four 1.5Gi slots for eight 1.5Gi models: critical and high displace low, never the reverse.

    First low and normal models fill the GPUs (one left over, whichever the workers came to
    last); then two critical models and a high one arrive. Placement may displace only strictly
    lower, evictable priorities, and only for high and critical requests, so the low models that
    were Ready are displaced (Preempted) and a normal model keeps the last slot.
    """
    size = int(1.5 * GIB)
    names = {
        "low-a": "low",
        "low-b": "low",
        "low-c": "low",
        "normal-a": "normal",
        "normal-b": "normal",
        "crit-a": "critical",
        "crit-b": "critical",
        "high-a": "high",
    }
    models = {f"{name}:1b": size for name in names}
    env.add_nodes(["fit-1", "fit-2"], models)
    operator = env.start_operator()

    def spec(name: str) -> dict[str, Any]:
        return {
            "model": f"{name}:1b",
            "backend": "ollama",
            "vram": "1.5Gi",
            "priority": names[name],
        }

    first_wave = ["low-a", "low-b", "low-c", "normal-a", "normal-b"]
    for name in first_wave:
        env.create(name, spec(name))

    def settled(wanted_ready: int) -> dict[str, Body] | None:
        bodies = env.deployments()
        ready = [n for n, b in bodies.items() if is_ready(b)]
        pending = [
            n
            for n, b in bodies.items()
            if (condition(b, "Scheduled") or {}).get("reason") in PENDING_REASONS
        ]
        return (
            bodies
            if len(ready) == wanted_ready and len(ready) + len(pending) == len(bodies)
            else None
        )

    first = env.wait("4 of 5 first-wave models Ready, the fifth pending", lambda: settled(4))
    ready_first = {n for n, b in first.items() if is_ready(b)}
    second_wave = ["crit-a", "crit-b", "high-a"]
    for name in second_wave:
        # One after another: memory a displaced model still holds while it unloads is not yet
        # free, so a newcomer arriving meanwhile may rightly displace elsewhere.
        env.create(name, spec(name))
        env.wait_ready([name])
    bodies = env.wait("the cluster to settle with 4 Ready", lambda: settled(4))

    ready = sorted(n for n, b in bodies.items() if is_ready(b))
    env.check(set(second_wave) <= set(ready), f"Ready: {ready}")
    # The one slot left is a normal model's: no low model beats a normal one to it.
    env.check(
        len([n for n in ready if names[n] == "normal"]) == 1, f"Ready: {ready}, expected a normal"
    )
    free = free_for(env.gpunodes())
    for name, body in bodies.items():
        if name in ready:
            continue
        scheduled = condition(body, "Scheduled") or {}
        env.check(
            scheduled.get("status") == "False" and scheduled.get("reason") in PENDING_REASONS,
            f"{name}: {describe(body)}",
        )
        # Truly: no GPU has room for it, and it may displace nothing (only high and critical may).
        env.check(max(free.values()) < size, f"{name} pending although {free} has room for {size}")
        env.check(names[name] in ("low", "normal"), f"{name} pending at priority {names[name]}")
        if names[name] == "low" and name in ready_first:
            env.check(
                scheduled["reason"] == "Preempted" and "displaced from" in scheduled["message"],
                f"{name} was Ready before the critical models came: {describe(body)}",
            )
    # Once Loaded, a critical model is never withdrawn from its node.
    first_seen: dict[str, tuple[str, int]] = {}
    for index, snapshot in enumerate(recorder.snapshots):
        node = snapshot["metadata"]["name"]
        assignments = (snapshot.get("spec") or {}).get("assignments") or {}
        for model in (snapshot.get("status") or {}).get("models") or []:
            if model["state"] == "Loaded" and model.get("priority") == "critical":
                first_seen.setdefault(model["key"], (node, index))
        for key, (where, since) in first_seen.items():
            if where == node and key not in assignments:
                env.fail(f"critical {key} withdrawn from {node} (snapshot {index} > {since})")
    env.check(len(first_seen) == 2, f"critical models seen Loaded: {first_seen}")
    print("\n".join(f"{n}: {describe(b)}" for n, b in sorted(bodies.items())))
    print(f"{len(recorder.snapshots)} GPUNode versions checked")
    assert_operator_healthy(env, operator)
    recorder.assert_within_capacity(env)


# ---- a node lost ------------------------------------------------------------------------------


@pytest.mark.slow
def test_lost_node_models_move_within_grace(env: Env, recorder: GPUNodeRecorder) -> None:
    size = 1 * GIB
    env.add_nodes(["lost-1", "lost-2", "lost-3"], {"mover-a:1b": size, "mover-b:1b": size})
    operator = env.start_operator()
    env.create("mover-a", {"model": "mover-a:1b", "backend": "ollama", "vram": "1Gi"})
    env.create(
        "mover-b", {"model": "mover-b:1b", "backend": "ollama", "vram": "1Gi", "replicas": 2}
    )
    bodies = env.wait_ready(["mover-a", "mover-b"])
    # binpack puts mover-a and one replica of mover-b on the same (fullest) node.
    victim = ready_nodes(bodies["mover-a"])[0]
    env.check(victim in ready_nodes(bodies["mover-b"]), f"placements: {bodies}")

    agent = env.cluster.nodes[victim].agent
    assert agent is not None
    agent.stop(signal.SIGKILL)
    killed = time.monotonic()

    def moved() -> bool:
        a, b = env.get("mover-a"), env.get("mover-b")
        return (
            is_ready(a)
            and is_ready(b)
            and victim not in ready_nodes(a) + ready_nodes(b)
            and len(ready_nodes(b)) == 2
        )

    env.wait(
        f"models to leave {victim} within the {HEARTBEAT_GRACE}s grace + 10s",
        moved,
        timeout=HEARTBEAT_GRACE + 10,
    )
    elapsed = time.monotonic() - killed
    print(f"models moved {elapsed:.1f}s after the agent on {victim} was killed")
    env.check(env.assigned("mover-a") != [victim], "mover-a still assigned to the lost node")
    env.check(victim not in env.assigned("mover-b"), "mover-b still assigned to the lost node")
    assert_operator_healthy(env, operator)
    recorder.assert_within_capacity(env)


# ---- the operator killed mid-burst ------------------------------------------------------------


@pytest.mark.slow
def test_operator_killed_mid_burst_loses_nothing_loads_nothing_twice(
    env: Env, recorder: GPUNodeRecorder
) -> None:
    """100 tiny models, the operator SIGKILLed after 50 were applied, a new one started."""
    count, kill_at = 100, 50
    size = 64 * MIB
    models = {f"tiny-{i}:1b": size for i in range(count)}
    # Room for 23 per GPU (1.8Gi less the 320Mi reserve), 69 in all: the last ones must say
    # InsufficientVRAM, and mean it.
    env.add_nodes(
        ["burst-1", "burst-2", "burst-3"], models, gpu_sizes=[int(1.8 * GIB)], max_models=32
    )
    first = env.start_operator("--strategy", "spread")
    env.wait("operator-0 to start", lambda: "operator state rebuilt" in operator_log(first))
    for i in range(count):
        env.create(f"tiny-{i}", {"model": f"tiny-{i}:1b", "backend": "ollama", "vram": "64Mi"})
        if i + 1 == kill_at:
            # Killed while it works through the queue: some placed, most not yet.
            env.wait(
                "operator-0 to place a model",
                lambda: any(env.assigned(f"tiny-{n}") for n in range(kill_at)),
            )
            first.stop(signal.SIGKILL)
            placed = sum(bool(env.assigned(f"tiny-{n}")) for n in range(kill_at))
            print(f"operator-0 killed after placing {placed} of {kill_at}")
    second = env.start_operator("--strategy", "spread")

    def settled() -> dict[str, Body] | None:
        bodies = env.deployments()
        if len(bodies) != count:
            return None
        for body in bodies.values():
            if is_ready(body):
                continue
            scheduled = condition(body, "Scheduled") or {}
            if scheduled.get("reason") != "InsufficientVRAM":
                return None
        return bodies

    started = time.monotonic()
    bodies = env.wait("all 100 to be Ready or InsufficientVRAM", settled, timeout=240)
    print(f"settled {time.monotonic() - started:.0f}s after the second operator started")
    ready = sorted(n for n, b in bodies.items() if is_ready(b))
    pending = sorted(set(bodies) - set(ready))
    print(f"{len(ready)} Ready, {len(pending)} InsufficientVRAM")
    env.check(len(ready) > count // 2, f"only {len(ready)} Ready")
    if pending:
        free = free_for(env.gpunodes())
        env.check(max(free.values()) < size, f"{pending} pending while {free} has room")
    env.check(
        all(
            b["status"]["observedGeneration"] == b["metadata"]["generation"]
            for b in bodies.values()
        ),
        "a status describes an old generation",
    )

    # Never two homes: no key ever assigned, reported or allocated on two nodes.
    homes: dict[str, set[str]] = defaultdict(set)
    for snapshot in recorder.snapshots:
        node = snapshot["metadata"]["name"]
        for key in (snapshot.get("spec") or {}).get("assignments") or {}:
            homes[key].add(node)
        for model in (snapshot.get("status") or {}).get("models") or []:
            homes[model["key"]].add(node)
    twice = {key: nodes for key, nodes in homes.items() if len(nodes) > 1}
    env.check(not twice, f"models on two nodes: {twice}")
    env.check(
        sorted(homes) == sorted(env.key(n) for n in ready),
        f"assigned or reported: {sorted(set(homes) ^ {env.key(n) for n in ready})} differ",
    )
    owners: Counter[str] = Counter()
    for node in env.cluster.nodes.values():
        for held in SimulatedGPUs(node.gpu_state).allocations().values():
            owners.update(owner.rsplit(":", 2)[-2] for owner in held if owner.startswith("pid:"))
    env.check(
        all(owners[name] == 1 for name in ready) and sum(owners.values()) == len(ready),
        f"simulated allocations per model: {dict(owners)}",
    )
    assert_operator_healthy(env, second)
    second_log = operator_log(second)
    env.check("operator state rebuilt" in second_log, "the second operator never took over")
    recorder.assert_within_capacity(env)


@pytest.mark.slow
def test_assignment_orphaned_while_operator_down_is_withdrawn(env: Env, kubectl: Kubectl) -> None:
    """A ModelDeployment force-deleted (finalizer stripped) while no operator runs: the next
    operator finds its assignment with no owner and withdraws it, so the agent unloads it."""
    model = "orphan:1b"
    env.add_nodes(["orphan-1"], {model: 256 * MIB})
    first = env.start_operator()
    env.create("orphan", {"model": model, "backend": "ollama", "vram": "256Mi"})
    env.wait_ready(["orphan"])
    first.stop(signal.SIGKILL)
    stripped = kubectl(
        "patch",
        "mdep/orphan",
        "-n",
        env.namespace,
        "--type=merge",
        "-p",
        '{"metadata": {"finalizers": null}}',
    )
    env.check(stripped.returncode == 0, f"kubectl patch failed: {stripped.stderr}")
    env.delete("orphan")
    env.wait("the object to be gone", lambda: env.get("orphan") is None)
    env.check(env.assigned("orphan") == ["orphan-1"], "the assignment went without an operator")
    second = env.start_operator()
    env.wait("the orphaned assignment to be withdrawn", lambda: env.assigned("orphan") == [])
    env.wait("the agent to unload it", lambda: env.reported("orphan") == {})
    env.wait("its GPU memory to be freed", lambda: env.allocations(model) == {})
    assert_operator_healthy(env, second)


# ---- invalid specs ----------------------------------------------------------------------------

_word = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)
_ollama_model = st.builds(lambda n, t: f"{n}:{t}", _word, _word)
_vllm_model = st.builds(lambda o, n: f"{o}/{n}", _word, _word)
_safe_args = st.lists(
    st.sampled_from(["--max-model-len=4096", "--dtype=half", "--seed=1"]), max_size=3
)
_label_key = st.builds(lambda p, n: f"{p}.example.com/{n}", _word, _word)
_valid_toleration = st.fixed_dictionaries(
    {"key": _word, "operator": st.just("Equal"), "value": _word, "effect": st.just("NoSchedule")}
)

Case = tuple[dict[str, Any], str]
"""An invalid spec and the field its InvalidSpec message must name."""


@st.composite
def _invalid_spec(draw: st.DrawFn) -> Case:
    """A spec the CRD's schema accepts and the operator must reject, naming one field."""
    kind = draw(
        st.sampled_from(
            [
                "vllm-options-on-ollama",
                "ollama-options-on-vllm",
                "supervisor-flag",
                "ollama-ref",
                "vllm-ref",
                "selector-key",
                "selector-value",
                "exists-with-value",
                "equal-without-key",
            ]
        )
    )
    ollama: dict[str, Any] = {"model": draw(_ollama_model), "backend": "ollama", "vram": "64Mi"}
    vllm: dict[str, Any] = {"model": draw(_vllm_model), "backend": "vllm", "vram": "64Mi"}
    if kind == "vllm-options-on-ollama":
        return {**ollama, "vllm": {"args": draw(_safe_args)}}, "spec.vllm"
    if kind == "ollama-options-on-vllm":
        options = draw(st.dictionaries(st.sampled_from(["num_ctx", "num_gpu"]), st.integers(1, 9)))
        return {**vllm, "ollama": {"options": options}}, "spec.ollama"
    if kind == "supervisor-flag":
        before, after = draw(_safe_args), draw(_safe_args)
        flag = draw(st.sampled_from(SUPERVISOR_OWNED_VLLM_FLAGS))
        value = draw(st.sampled_from(["", "=8000", "=0.5", "=0.0.0.0"]))
        args = [*before, flag + value, *after]
        return {**vllm, "vllm": {"args": args}}, f"spec.vllm.args[{len(before)}]"
    if kind == "ollama-ref":
        name, tag = draw(_word), draw(_word)
        bad = draw(
            st.sampled_from(
                [f"-{name}:{tag}", f"{name}:", f"{name}:{tag}:{tag}", f"{name}@{tag}", f":{tag}"]
            )
        )
        return {**ollama, "model": bad}, "spec.model"
    if kind == "vllm-ref":
        a, b, c = draw(_word), draw(_word), draw(_word)
        bad = draw(st.sampled_from([a, f"{a}/{b}/{c}", f"./{a}/{b}", f"{a}/", f"~/{a}"]))
        return {**vllm, "model": bad}, "spec.model"
    base = draw(st.sampled_from([ollama, vllm]))
    if kind == "selector-key":
        name = draw(_word)
        key = draw(
            st.sampled_from(
                [f"-{name}", f"{name}-", f"Upper.Example/{name}", f"a/b/{name}", "x" * 64 + name]
            )
        )
        return {**base, "nodeSelector": {key: "yes"}}, f"spec.nodeSelector.{key}"
    if kind == "selector-value":
        key, word = draw(_label_key), draw(_word)
        value = draw(st.sampled_from([f"-{word}", f"{word}-", f"{word} x", f"{word}/x", "v" * 64]))
        return {**base, "nodeSelector": {key: value}}, f"spec.nodeSelector.{key}"
    earlier = draw(st.lists(_valid_toleration, max_size=2))
    if kind == "exists-with-value":
        toleration = {"key": draw(_word), "operator": "Exists", "value": draw(_word)}
        field_ = f"spec.tolerations[{len(earlier)}].value"
    else:
        toleration = {"operator": "Equal", "value": draw(_word), "effect": "NoExecute"}
        field_ = f"spec.tolerations[{len(earlier)}].key"
    return {**base, "tolerations": [*earlier, toleration]}, field_


def generate_invalid_specs(count: int) -> list[Case]:
    """`count` cases drawn by hypothesis, deterministically (derandomized, no database)."""
    cases: list[Case] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(_invalid_spec())
    def collect(case: Case) -> None:
        cases.append(case)

    collect()
    return cases


@pytest.mark.slow
def test_invalid_specs_are_reported_never_crash(env: Env) -> None:
    cases = generate_invalid_specs(50)
    assert len(cases) == 50
    for spec, field_ in cases:  # the generator's own promise, checked before the cluster's
        with pytest.raises(SpecError) as error:
            parse_spec(spec)
        assert error.value.field == field_, (spec, str(error.value))
    operator = env.start_operator()
    for index, (spec, _) in enumerate(cases):
        env.create(f"invalid-{index:02d}", spec)
    expected = {f"invalid-{index:02d}": field_ for index, (_, field_) in enumerate(cases)}

    def all_reported() -> dict[str, Body] | None:
        bodies = env.deployments()
        done = all(
            (condition(bodies.get(name), "Ready") or {}).get("reason") == "InvalidSpec"
            for name in expected
        )
        return bodies if done else None

    bodies = env.wait("all 50 to say InvalidSpec", all_reported)
    for name, field_ in expected.items():
        body = bodies[name]
        for kind in ("Ready", "Scheduled"):
            cond = condition(body, kind) or {}
            env.check(
                cond.get("status") == "False" and cond.get("reason") == "InvalidSpec",
                f"{name} {kind}: {cond}",
            )
        message = (condition(body, "Ready") or {}).get("message", "")
        env.check(message.startswith(f"{field_}: "), f"{name}: {message!r} names not {field_}")
        env.check(
            body["status"].get("placements", []) == [], f"{name} was placed: {body['status']}"
        )
    assert_operator_healthy(env, operator)


# ---- two operators, one leader ---------------------------------------------------------------


def lease_holder(env: Env) -> str | None:
    try:
        lease = client.CoordinationV1Api(env.cluster.api).read_namespaced_lease(
            "vram-operator", "default"
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return lease.spec.holder_identity if lease.spec else None


@pytest.mark.slow
def test_two_operators_one_leader_and_takeover(env: Env) -> None:
    env.add_nodes(["ha-1"], {"ha-a:1b": 256 * MIB, "ha-b:1b": 256 * MIB})
    leader = env.start_operator()
    env.wait("operator-0 to hold the Lease", lambda: lease_holder(env) == "operator-0")
    standby = env.start_operator()
    env.wait("operator-1 to stand by", lambda: "standing by" in operator_log(standby))
    env.create("ha-a", {"model": "ha-a:1b", "backend": "ollama", "vram": "256Mi"})
    env.wait_ready(["ha-a"])
    # Only the Lease holder acts: the standby never started its handlers or its worker.
    env.check("operator state rebuilt" in operator_log(leader), "the leader never started")
    env.check(
        "operator state rebuilt" not in operator_log(standby) and standby.alive(),
        f"the standby acted:\n{operator_log(standby)[-3000:]}",
    )
    env.check(lease_holder(env) == "operator-0", f"holder is {lease_holder(env)}")

    leader.stop(signal.SIGKILL)
    killed = time.monotonic()
    margin = 15
    env.wait(
        "operator-1 to take the Lease",
        lambda: lease_holder(env) == "operator-1",
        timeout=LEASE_SECONDS + margin,
    )
    print(f"operator-1 took over {time.monotonic() - killed:.1f}s after operator-0 died")
    env.wait("operator-1 to start", lambda: "operator state rebuilt" in operator_log(standby))
    # It keeps reconciling: a new model, a change and a delete all go through it.
    env.create("ha-b", {"model": "ha-b:1b", "backend": "ollama", "vram": "256Mi"})
    env.wait_ready(["ha-b"])
    env.patch_spec("ha-a", {"replicas": 0})
    env.wait("ha-a to unload at 0 replicas", lambda: env.reported("ha-a") == {})
    env.delete("ha-a")
    env.wait("ha-a to be gone", lambda: env.get("ha-a") is None)
    assert_operator_healthy(env, standby)


# ---- preemption -------------------------------------------------------------------------------


@pytest.mark.slow
def test_preemption_displaces_lower_priority_then_replaces_it(
    env: Env, recorder: GPUNodeRecorder
) -> None:
    size = 3 * GIB
    env.add_nodes(["pre-1", "pre-2"], {f"{n}:1b": size for n in ("low-a", "low-b", "urgent")})
    operator = env.start_operator()
    for name in ("low-a", "low-b"):
        env.create(
            name, {"model": f"{name}:1b", "backend": "ollama", "vram": "3Gi", "priority": "low"}
        )
    bodies = env.wait_ready(["low-a", "low-b"])
    env.check(ready_nodes(bodies["low-a"]) != ready_nodes(bodies["low-b"]), f"placements: {bodies}")

    env.create(
        "urgent", {"model": "urgent:1b", "backend": "ollama", "vram": "3Gi", "priority": "high"}
    )
    urgent = env.wait_ready(["urgent"])["urgent"]
    where = ready_nodes(urgent)[0]
    displaced = "low-a" if ready_nodes(bodies["low-a"]) == [where] else "low-b"
    survivor = "low-b" if displaced == "low-a" else "low-a"

    def preempted() -> Body | None:
        body = env.get(displaced)
        ready = condition(body, "Ready") or {}
        return body if ready.get("reason") == "Preempted" else None

    body = env.wait(f"{displaced} to say Preempted", preempted)
    message = (condition(body, "Ready") or {}).get("message", "")
    # Named as its own namespace reads it (another namespace would see no name).
    env.check(f"displaced from {where} by urgent;" in message, f"message: {message!r}")
    scheduled = condition(body, "Scheduled") or {}
    env.check(scheduled.get("status") == "False", f"{displaced}: {describe(body)}")
    env.wait(f"{displaced} to leave {where}", lambda: env.reported(displaced) == {})
    env.check(is_ready(env.get(survivor)), f"{survivor} was disturbed")

    # Room elsewhere: the displaced model is placed again as soon as capacity frees up.
    env.delete(survivor)
    env.wait(f"{survivor} to be gone", lambda: env.get(survivor) is None)
    back = env.wait_ready([displaced])[displaced]
    env.check(ready_nodes(back) != [where], f"{displaced} back on {ready_nodes(back)}")
    env.check(is_ready(env.get("urgent")), "the urgent model was disturbed")
    assert_operator_healthy(env, operator)
    recorder.assert_within_capacity(env)
