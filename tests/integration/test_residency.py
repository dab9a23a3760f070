"""Residency driven by demand, on the local control plane: the scale subresource (kubectl scale
and an HPA's write), scale to zero and back on one request through the gateway, and the coldest
model swapped out for the one requests wait for, with a critical model never touched; a vLLM
model swapped out is parked in host RAM and its next request wakes it (not a cold start).

Simulated nodes run real agents over the fake Ollama and fake vLLM with load (and wake) times;
the operator reads the gateway's /demand (--gateway-demand-url) and the gateway holds requests
while residency follows.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from vram_operator.api import GROUP, VERSION
from vram_operator.simulation.cluster import SimulatedCluster
from vram_operator.simulation.gpu import GIB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
Body = dict[str, Any]
T = TypeVar("T")
MDEPS = "modeldeployments"
SETTLE = 90.0
LOAD_SECONDS = "2"
"""The fake Ollama's load time, as the issue's tests ask."""


class Residency:
    """One test's namespace, cluster, gateway and calls."""

    def __init__(self, cluster: SimulatedCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(cluster.api)
        self.gateway_url = ""

    def add_node(
        self,
        name: str,
        models: Mapping[str, int],
        gpu_sizes: Sequence[int],
        agent_args: Sequence[str] = (),
    ) -> None:
        catalog = self.cluster.workdir / f"catalog-{name}.json"
        sizes = {m: {"size": max(s // 2, 1), "size_vram": s} for m, s in models.items()}
        catalog.write_text(json.dumps(sizes))
        self.cluster.add_node(
            name,
            gpu_sizes=gpu_sizes,
            agent_args=("--report-interval", "1", *agent_args),
            ollama_args=("--catalog", str(catalog), "--load-seconds", LOAD_SECONDS),
        )

    def start(self, *operator_args: str) -> None:
        """A gateway, then an operator reading its demand."""
        _, self.gateway_url = self.cluster.start_gateway(
            "--heartbeat-grace", "8", "--queue-timeout", "90"
        )
        self.cluster.start_operator(
            "--heartbeat-grace",
            "8",
            "--gateway-demand-url",
            self.gateway_url + "/demand",
            "--demand-interval",
            "0.5",
            *operator_args,
        )

    def create(self, name: str, spec: Mapping[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": dict(spec),
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, MDEPS, body)

    def get(self, name: str) -> Body:
        body: Any = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, MDEPS, name
        )
        return dict(body)

    def status(self, name: str) -> Body:
        return dict(self.get(name).get("status") or {})

    def assigned(self) -> dict[str, list[str]]:
        """Model name (in this namespace) to the nodes assigned it."""
        listing: Any = self.custom.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
        held: dict[str, list[str]] = {}
        for node in listing["items"]:
            for key in (node.get("spec") or {}).get("assignments") or {}:
                namespace, _, name = key.partition(".")
                if namespace == self.namespace:
                    held.setdefault(name, []).append(node["metadata"]["name"])
        return held

    def reports(self) -> dict[str, Body]:
        """Model name to what its agent reports (one node in these tests)."""
        listing: Any = self.custom.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
        return {
            m["key"].partition(".")[2]: m
            for node in listing["items"]
            for m in (node.get("status") or {}).get("models") or []
            if m["key"].startswith(self.namespace + ".")
        }

    def chat(self, model: str) -> str:
        with openai.OpenAI(
            base_url=self.gateway_url + "/v1", api_key="x", max_retries=0, timeout=120
        ) as api:
            reply = api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
        return str(reply.choices[0].message.content)

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = SETTLE) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout:g}s waiting for {what}\n{self.cluster.logs()}",
                    pytrace=False,
                )
            time.sleep(0.3)


@pytest.fixture
def residency(sim_cluster: SimulatedCluster, request: pytest.FixtureRequest) -> Residency:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    namespace = f"rs-{name}"[:63].rstrip("-")
    core = client.CoreV1Api(sim_cluster.api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    except ApiException as exc:
        if exc.status != 409:
            raise
    return Residency(sim_cluster, namespace)


def ready_of(kubectl: Kubectl, namespace: str, name: str) -> str:
    """The Ready column of `kubectl get mdep`, as a person reads it."""
    out = kubectl("get", "mdep", name, "-n", namespace, "--no-headers", check=True).stdout
    return out.split()[3]


def test_kubectl_scale_and_an_hpa_write_to_the_scale_subresource_are_honoured(
    residency: Residency, kubectl: Kubectl
) -> None:
    for node in ("rs-scale-a", "rs-scale-b", "rs-scale-c"):
        residency.add_node(node, {"scaled:1b": 1 * GIB}, [8 * GIB])
    residency.cluster.start_operator("--heartbeat-grace", "8")
    ns = residency.namespace
    residency.create("scaled", {"model": "scaled:1b", "backend": "ollama", "vram": "1Gi"})
    residency.wait("one replica", lambda: residency.status("scaled").get("readyReplicas") == 1)

    kubectl("scale", "mdep/scaled", "--replicas=2", "-n", ns, check=True)
    residency.wait("two replicas", lambda: residency.status("scaled").get("readyReplicas") == 2)
    assert residency.get("scaled")["spec"]["replicas"] == 2
    assert ready_of(kubectl, ns, "scaled") == "2/2"

    # What an HPA does: read the Scale, then write spec.replicas through it.
    scale: Any = residency.custom.get_namespaced_custom_object_scale(
        GROUP, VERSION, ns, MDEPS, "scaled"
    )
    assert scale["status"] == {"replicas": 2, "selector": "vram.dev/model-deployment=scaled"}
    scale["spec"]["replicas"] = 3
    residency.custom.replace_namespaced_custom_object_scale(
        GROUP, VERSION, ns, MDEPS, "scaled", scale
    )
    residency.wait("three replicas", lambda: residency.status("scaled").get("readyReplicas") == 3)
    residency.custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, ns, MDEPS, "scaled", {"spec": {"replicas": 1}}
    )
    residency.wait(
        "one replica again",
        lambda: (
            residency.status("scaled").get("replicas") == 1
            and len(residency.assigned().get("scaled", [])) == 1
        ),
    )
    assert ready_of(kubectl, ns, "scaled") == "1/1"


def test_min_replicas_zero_unloads_after_the_delay_and_one_request_brings_it_back(
    residency: Residency, kubectl: Kubectl
) -> None:
    residency.add_node("rs-zero", {"sleepy:1b": 2 * GIB}, [24 * GIB])
    residency.start()
    ns = residency.namespace
    spec = {
        "model": "sleepy:1b",
        "backend": "ollama",
        "vram": "2Gi",
        "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelay": "8s"},
    }
    residency.create("sleepy", spec)
    residency.wait("loaded", lambda: residency.status("sleepy").get("readyReplicas") == 1)
    seen = [ready_of(kubectl, ns, "sleepy")]

    residency.wait(
        "scaled to zero",
        lambda: (
            residency.status("sleepy").get("desiredReplicas") == 0
            and "sleepy" not in residency.assigned()
            and "sleepy" not in residency.reports()
        ),
        timeout=60,
    )
    seen.append(ready_of(kubectl, ns, "sleepy"))
    tier = kubectl("get", "mdep", "sleepy", "-n", ns, check=True).stdout
    assert "ScaledToZero" in tier

    started = time.monotonic()
    assert residency.chat("sleepy") == "This is a simulated reply from sleepy:1b."
    waited = time.monotonic() - started
    assert waited > float(LOAD_SECONDS)  # it was held while the model came back
    residency.wait("ready again", lambda: residency.status("sleepy").get("readyReplicas") == 1)
    seen.append(ready_of(kubectl, ns, "sleepy"))
    assert seen == ["1/1", "0/0", "1/1"]
    events = kubectl("get", "events", "-n", ns, check=True).stdout
    assert "Scaled" in events


def test_requests_alternating_between_three_models_on_one_gpu_swap_out_the_coldest(
    residency: Residency,
) -> None:
    sizes = {"swap-a:1b": 10 * GIB, "swap-b:1b": 10 * GIB, "swap-c:1b": 10 * GIB}
    residency.add_node("rs-swap", {**sizes, "keeper:1b": 2 * GIB}, [24 * GIB])
    residency.start("--min-residency", "3")
    residency.create(
        "keeper",
        {"model": "keeper:1b", "backend": "ollama", "vram": "2Gi", "priority": "critical"},
    )
    residency.wait("keeper loaded", lambda: residency.status("keeper").get("readyReplicas") == 1)
    for name in ("swap-a", "swap-b", "swap-c"):
        residency.create(name, {"model": f"{name}:1b", "backend": "ollama", "vram": "10Gi"})
    residency.wait(
        "two of three loaded",
        lambda: sum(residency.status(n).get("readyReplicas", 0) for n in sizes_names(sizes)) == 2,
    )
    keeper_loaded = residency.reports()["keeper"]["loadedAt"]

    names = sizes_names(sizes)
    resident = sorted(set(residency.assigned()) - {"keeper"})
    cold = next(n for n in names if n not in resident)
    order = [*resident, cold] * 3
    for index, name in enumerate(order):
        assert residency.chat(name) == f"This is a simulated reply from {name}:1b."
        held = set(residency.assigned()) - {"keeper"}
        if index >= 1:
            # The model served just before stays; the one asked for least recently made room.
            assert held == {order[index - 1], name}, (index, name, held)
    for name in names:
        if name in residency.assigned():
            continue
        scheduled = next(
            c for c in residency.status(name)["conditions"] if c["type"] == "Scheduled"
        )
        assert scheduled["reason"] == "SwappedOut", scheduled
        assert "which requests were waiting for" in scheduled["message"]
    # The critical model never moved and was never reloaded.
    assert residency.assigned()["keeper"] == ["rs-swap"]
    assert residency.reports()["keeper"]["loadedAt"] == keeper_loaded
    assert residency.reports()["keeper"]["state"] == "Loaded"


def sizes_names(sizes: Mapping[str, int]) -> list[str]:
    return [m.partition(":")[0] for m in sizes]


def test_a_model_unloaded_for_idleness_comes_back_on_its_next_request(
    residency: Residency, kubectl: Kubectl
) -> None:
    residency.add_node("rs-idle", {"dozy:1b": 2 * GIB}, [24 * GIB])
    residency.start()
    ns = residency.namespace
    spec = {"model": "dozy:1b", "backend": "ollama", "vram": "2Gi", "keepAlive": "6s"}
    residency.create("dozy", spec)
    residency.wait("loaded", lambda: residency.status("dozy").get("readyReplicas") == 1)
    assert residency.chat("dozy") == "This is a simulated reply from dozy:1b."

    def idle() -> bool:
        ready: dict[str, Any] = next(
            (c for c in residency.status("dozy").get("conditions") or [] if c["type"] == "Ready"),
            {},
        )
        return ready.get("reason") == "ScaledToZero" and "dozy" not in residency.assigned()

    residency.wait("withdrawn for idleness", idle, timeout=60)
    assert ready_of(kubectl, ns, "dozy") == "0/0"
    assert residency.chat("dozy") == "This is a simulated reply from dozy:1b."
    residency.wait("loaded again", lambda: residency.status("dozy").get("readyReplicas") == 1)
    assert ready_of(kubectl, ns, "dozy") == "1/1"


VLLM_COLD_SECONDS = "5"
VLLM_WAKE_SECONDS = "0.5"
"""The fake vLLM's start-up and wake-up times, as the issue's tests ask."""
REPLY = "This is a simulated reply from"


def operator_counter(cluster: SimulatedCluster, name: str, labels: Mapping[str, str]) -> float:
    """One sample of the (first) operator's /metrics; 0 when it has not been counted yet."""
    argv = cluster.operators[0].argv
    port = argv[argv.index("--metrics-port") + 1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


PARK_NAMES = ["park-a", "park-b", "park-c"]


def two_of_three_vllm_models(
    residency: Residency, monkeypatch: pytest.MonkeyPatch, agent_args: Sequence[str] = ()
) -> None:
    """Two of three vLLM models (sleep mode on) loaded on one 7Gi GPU (2.5Gi each with vLLM's
    overhead, and a sleeping one's context), the third waiting for room; parking one takes its
    2.5Gi of host RAM."""
    monkeypatch.setenv("VRAM_SIM_VLLM_STARTUP_SECONDS", VLLM_COLD_SECONDS)
    monkeypatch.setenv("VRAM_SIM_VLLM_WAKE_SECONDS", VLLM_WAKE_SECONDS)
    residency.add_node("rs-park", {}, [7 * GIB], agent_args)
    residency.start("--min-residency", "3")
    names = PARK_NAMES
    spec = {"backend": "vllm", "vram": "2Gi", "vllm": {"sleepMode": True}}
    for name in names[:2]:
        residency.create(name, {**spec, "model": f"org/{name}"})
    residency.wait(
        "two loaded",
        lambda: all(residency.status(n).get("readyReplicas") == 1 for n in names[:2]),
    )
    residency.create("park-c", {**spec, "model": "org/park-c"})
    residency.wait(
        "the third pending",
        lambda: (
            (c := condition_of(residency.status("park-c"), "Scheduled")) is not None
            and c["reason"] == "InsufficientVRAM"
        ),
    )


def parking_node_assignments(residency: Residency) -> dict[str, Body]:
    """Model name (in this namespace) to its assignment on rs-park."""
    listing: Any = residency.custom.get_cluster_custom_object(GROUP, VERSION, "gpunodes", "rs-park")
    held = (listing.get("spec") or {}).get("assignments") or {}
    mine = residency.namespace + "."
    return {k.partition(".")[2]: v for k, v in held.items() if k.startswith(mine)}


def test_a_vllm_model_swapped_out_by_demand_wakes_from_host_ram_when_asked_for_again(
    residency: Residency, monkeypatch: pytest.MonkeyPatch, kubectl: Kubectl
) -> None:
    two_of_three_vllm_models(residency, monkeypatch)
    ns, names = residency.namespace, PARK_NAMES

    def assignments() -> dict[str, Body]:
        return parking_node_assignments(residency)

    # A request for the third swaps the colder of the two out: parked, not unloaded.
    assert residency.chat("park-c").startswith(REPLY)
    parked = residency.wait(
        "one parked in host RAM",
        lambda: next(
            (
                n
                for n in names[:2]
                if assignments().get(n, {}).get("parked")
                and residency.reports().get(n, {}).get("state") == "Sleeping"
                and residency.status(n).get("tiers") == "HostRAM"
            ),
            None,
        ),
    )
    status = residency.status(parked)
    scheduled = condition_of(status, "Scheduled")
    assert scheduled is not None
    assert scheduled["reason"] == "SwappedOut", scheduled
    assert "parked in host RAM" in scheduled["message"]
    assert status.get("readyReplicas", 0) == 0
    assert "HostRAM" in kubectl("get", "mdep", parked, "-n", ns, check=True).stdout
    labels = {"namespace": ns, "name": parked}
    assert operator_counter(residency.cluster, "vram_operator_cold_starts_total", labels) == 1

    # Asked for again once the others have settled: it wakes on the same GPU, the coldest
    # of the others making room, well inside a cold start.
    time.sleep(3.5)
    started = time.monotonic()
    assert residency.chat(parked).startswith(REPLY)
    waited = time.monotonic() - started
    residency.wait("ready again", lambda: residency.status(parked).get("readyReplicas") == 1)
    assert waited < float(VLLM_COLD_SECONDS), waited
    assert not assignments()[parked].get("parked")
    assert residency.reports()[parked]["state"] == "Loaded"
    residency.wait(
        "the wake-up counted",
        lambda: operator_counter(residency.cluster, "vram_operator_wake_ups_total", labels) == 1,
    )
    assert operator_counter(residency.cluster, "vram_operator_cold_starts_total", labels) == 1
    supervisor = residency.cluster.nodes["rs-park"].dir / "vllm-supervisor.log"
    assert supervisor.read_text().count(f"starting {ns}.{parked}:") == 1  # one process, ever
    events = kubectl("get", "events", "-n", ns, check=True).stdout
    assert "woke on rs-park" in events
    print(f"woke {parked} from host RAM in {waited:.2f}s (cold start {VLLM_COLD_SECONDS}s)")


def condition_of(status: Mapping[str, Any], kind: str) -> Body | None:
    found = next((c for c in status.get("conditions") or [] if c["type"] == kind), None)
    return None if found is None else dict(found)


def test_a_vllm_model_swapped_out_where_host_ram_cannot_take_it_is_unloaded_and_comes_back_cold(
    residency: Residency, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The agent reads host memory from a /proc that shows 1 GiB available: too little to park.
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal: 4194304 kB\nMemAvailable: 1048576 kB\n")
    two_of_three_vllm_models(residency, monkeypatch, ("--proc", str(proc)))
    ns, names = residency.namespace, PARK_NAMES

    assert residency.chat("park-c").startswith(REPLY)
    gone = residency.wait(
        "one unloaded",
        lambda: next(
            (
                n
                for n in names[:2]
                if n not in parking_node_assignments(residency) and n not in residency.reports()
            ),
            None,
        ),
    )
    scheduled = condition_of(residency.status(gone), "Scheduled")
    assert scheduled is not None
    assert scheduled["reason"] == "SwappedOut", scheduled
    assert "unloaded" in scheduled["message"]
    assert residency.status(gone).get("tiers") is None  # nothing left anywhere but on disk

    time.sleep(3.5)
    started = time.monotonic()
    assert residency.chat(gone).startswith(REPLY)
    waited = time.monotonic() - started
    assert waited > float(VLLM_COLD_SECONDS), waited  # a cold start, not a wake-up
    labels = {"namespace": ns, "name": gone}
    residency.wait(
        "the second cold start counted",
        lambda: operator_counter(residency.cluster, "vram_operator_cold_starts_total", labels) == 2,
    )
    assert operator_counter(residency.cluster, "vram_operator_wake_ups_total", labels) == 0
    supervisor = residency.cluster.nodes["rs-park"].dir / "vllm-supervisor.log"
    assert supervisor.read_text().count(f"starting {ns}.{gone}:") == 2
