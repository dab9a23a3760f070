"""Operator duties beyond placement: its Prometheus metrics, and cleaning up after a Node that
was deleted (the machine is gone, so its agent is gone too)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from vram_operator.api import GROUP, VERSION
from vram_operator.simulation.cluster import SimulatedCluster
from vram_operator.simulation.gpu import GIB
from vram_operator.simulation.nodes import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")
NAMESPACE = "default"


def eventually(probe: Callable[[], T | None], what: str, logs: Callable[[], str]) -> T:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"not within 90s: {what}\n{logs()}", pytrace=False)


def _ready_on(custom: client.CustomObjectsApi, name: str) -> list[str] | None:
    body: Any = custom.get_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "modeldeployments", name
    )
    status = body.get("status") or {}
    ready = any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
    )
    nodes = [p["node"] for p in status.get("placements", []) if p["state"] == "Loaded"]
    return nodes if ready else None


def _gpunode_exists(custom: client.CustomObjectsApi, name: str) -> bool:
    try:
        custom.get_cluster_custom_object(GROUP, VERSION, "gpunodes", name)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            totals[f"{sample.name}{{{label}}}"] = sample.value
    return totals


def test_metrics_and_cleanup_after_a_deleted_node(
    sim_cluster: SimulatedCluster, k8s_client: client.ApiClient
) -> None:
    custom = client.CustomObjectsApi(k8s_client)
    for name in ("keep-node", "doomed-node"):
        sim_cluster.add_node(name, gpu_sizes=[8 * GIB], agent_args=["--report-interval", "1"])
    port = free_port()
    sim_cluster.start_operator("--heartbeat-grace", "8", "--metrics-port", str(port))
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        "modeldeployments",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": "pinned"},
            "spec": {
                "model": "llama3.2:1b",
                "backend": "ollama",
                "vram": "2Gi",
                "nodeSelector": {"kubernetes.io/hostname": "doomed-node"},
            },
        },
    )
    assert eventually(lambda: _ready_on(custom, "pinned"), "pinned Ready", sim_cluster.logs) == [
        "doomed-node"
    ]

    # An edit the schema accepts but the operator refuses leaves the loaded replica serving.
    args = (GROUP, VERSION, NAMESPACE, "modeldeployments", "pinned")
    custom.patch_namespaced_custom_object(*args, {"spec": {"vllm": {"args": []}}})

    def invalid() -> dict[str, Any] | None:
        body: Any = custom.get_namespaced_custom_object(*args)
        status = body.get("status") or {}
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        return status if ready and ready[0]["reason"] == "InvalidSpec" else None

    status = eventually(invalid, "pinned InvalidSpec", sim_cluster.logs)
    assert [(p["node"], p["state"]) for p in status["placements"]] == [("doomed-node", "Loaded")]
    assert sim_cluster.nodes["doomed-node"].gpus.devices()[0].used_bytes == 2 * GIB
    custom.patch_namespaced_custom_object(*args, {"spec": {"vllm": None}})
    eventually(lambda: _ready_on(custom, "pinned"), "pinned Ready again", sim_cluster.logs)

    found = _metrics(port)
    assert found["vram_operator_placements_total{outcome=placed}"] >= 1
    assert found["vram_operator_reconciles_total{result=ok}"] >= 1
    assert found["vram_operator_reconcile_duration_seconds_count{}"] >= 1

    # The machine goes away: its agent stops, then its Node object is deleted.
    sim_cluster.nodes["doomed-node"].stop()
    client.CoreV1Api(k8s_client).delete_node("doomed-node")
    eventually(
        lambda: not _gpunode_exists(custom, "doomed-node"),
        "the GPUNode of the deleted Node to be deleted",
        sim_cluster.logs,
    )
    assert _gpunode_exists(custom, "keep-node")

    # The pinned model has nowhere to go now, and says so; the gauge counts it.
    def pending_reason() -> str | None:
        body: Any = custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "modeldeployments", "pinned"
        )
        for c in (body.get("status") or {}).get("conditions", []):
            if c["type"] == "Scheduled" and c["status"] == "False":
                return str(c["reason"])
        return None

    assert eventually(pending_reason, "pinned Pending", sim_cluster.logs) == "NoMatchingNodes"
    pending = _metrics(port)
    assert pending["vram_operator_pending_models{reason=NoMatchingNodes}"] == 1
