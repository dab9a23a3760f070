"""A whole simulated cluster on a local control plane: CRDs, Node objects, simulated GPU
nodes (agents over fake backends) and operator processes. The demo and the integration
tests build clusters with this, so both exercise the same path a user's cluster takes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vram_operator.api.crd import custom_resource_definitions

from .nodes import GiB, ManagedProcess, SimulatedNode, free_port

TENANT_LABEL = "vram.dev/tenant"
"""Namespaces carrying this label are tenants: the trusted policy below does not cover them."""

TRUSTED_POLICY: dict[str, Any] = {
    "apiVersion": "vram.dev/v1alpha1",
    "kind": "ModelPolicy",
    "metadata": {"name": "trusted-namespaces"},
    "spec": {
        "namespaceSelector": {
            "matchExpressions": [{"key": TENANT_LABEL, "operator": "DoesNotExist"}]
        },
        "allowedPriorities": ["critical", "high", "normal", "low"],
        "modelSources": {
            "ollamaRegistries": ["*"],
            "huggingFaceOrgs": ["*"],
            "pathRoots": ["/"],
        },
    },
}
"""What an admin grants the namespaces of one trusted team: every priority, any source. The
demo and the tests run their models in such namespaces; tenants get the safe default."""


def install_trusted_policy(api_client: client.ApiClient) -> None:
    """Create TRUSTED_POLICY (or leave the one already there)."""
    try:
        client.CustomObjectsApi(api_client).create_cluster_custom_object(
            "vram.dev", "v1alpha1", "modelpolicies", TRUSTED_POLICY
        )
    except ApiException as exc:
        if exc.status != 409:
            raise


def install_crds(api_client: client.ApiClient, timeout: float = 30) -> None:
    """Create or update the CRDs and wait until the API server serves them."""
    api = client.ApiextensionsV1Api(api_client)
    for crd in custom_resource_definitions():
        name = crd["metadata"]["name"]
        try:
            api.create_custom_resource_definition(crd)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = api.read_custom_resource_definition(name)
            crd["metadata"]["resourceVersion"] = (
                current.metadata and current.metadata.resource_version
            )
            api.replace_custom_resource_definition(name, crd)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    for crd in custom_resource_definitions():
        name = crd["metadata"]["name"]
        while True:
            status = api.read_custom_resource_definition(name).status
            conditions = (status.conditions if status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {timeout}s")
            time.sleep(0.1)


def create_node(
    api_client: client.ApiClient,
    name: str,
    labels: dict[str, str] | None = None,
    taints: Sequence[dict[str, Any]] = (),
) -> None:
    """A Node object standing for a machine (there is no kubelet to register one)."""
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {"taints": list(taints)},
    }
    core = client.CoreV1Api(api_client)
    try:
        core.create_node(body)  # type: ignore[arg-type]
    except ApiException as exc:
        if exc.status != 409:
            raise
    # The API server taints every new Node not-ready until its kubelet reports; there is no
    # kubelet here, so set the taints the caller asked for, as a ready node would have.
    core.patch_node(name, {"spec": {"taints": list(taints) or None}})


class SimulatedCluster:
    """Nodes and operators started on one control plane; stop() ends every process."""

    def __init__(
        self,
        api_client: client.ApiClient,
        kubeconfig: str,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        node_class: type[SimulatedNode] = SimulatedNode,
    ) -> None:
        """`env` is added to the environment of every process it starts (`PYTHONPATH` set to
        another checkout runs that checkout's operator and agents); `node_class` builds nodes."""
        self.api = api_client
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.env = dict(env or {})
        self.node_class = node_class
        self.nodes: dict[str, SimulatedNode] = {}
        self.operators: list[ManagedProcess] = []
        self.gateways: list[ManagedProcess] = []

    def add_node(
        self,
        name: str,
        gpu_sizes: Sequence[int] = (24 * GiB,),
        labels: dict[str, str] | None = None,
        taints: Sequence[dict[str, Any]] = (),
        agent_args: Sequence[str] = (),
        ollama_args: Sequence[str] = (),
        diffusion: bool = False,
    ) -> SimulatedNode:
        """`diffusion` adds the diffusion server with fake pipelines to the node."""
        create_node(self.api, name, labels, taints)
        node = self.node_class(
            name,
            self.workdir,
            self.kubeconfig,
            gpu_sizes=gpu_sizes,
            agent_args=agent_args,
            ollama_args=ollama_args,
            # Nodes share this machine's loopback, so each supervisor gets its own ports.
            vllm_ports=f"{8100 + 20 * len(self.nodes)}-{8119 + 20 * len(self.nodes)}",
            env=self.env,
            **({"diffusion": True} if diffusion else {}),
        )
        self.nodes[name] = node
        return node.start()

    def start_operator(self, *args: str, namespace: str = "default") -> ManagedProcess:
        index = len(self.operators)
        operator = ManagedProcess(
            f"operator-{index}",
            [
                sys.executable,
                "-m",
                "vram_operator",
                "operator",
                "--kubeconfig",
                self.kubeconfig,
                "--namespace",
                namespace,
                "--identity",
                f"operator-{index}",
                "--metrics-port",
                str(free_port()),
                "--metrics-host",
                "127.0.0.1",
                *args,
            ],
            self.workdir / f"operator-{index}.log",
            env={**os.environ, **self.env} if self.env else None,
        )
        operator.start()
        self.operators.append(operator)
        return operator

    def start_gateway(self, *args: str) -> tuple[ManagedProcess, str]:
        """`vram-operator gateway` on a free loopback port; the process and its URL."""
        index = len(self.gateways)
        gateway = ManagedProcess(
            f"gateway-{index}",
            [
                sys.executable,
                "-m",
                "vram_operator",
                "gateway",
                "--kubeconfig",
                self.kubeconfig,
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                *args,
            ],
            self.workdir / f"gateway-{index}.log",
            env={**os.environ, **self.env} if self.env else None,
        )
        gateway.start()
        self.gateways.append(gateway)
        url = gateway.wait_for_line(re.compile(r"listening on (http://[0-9.]+:[0-9]+)")).group(1)
        return gateway, url

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        for operator in self.operators:
            operator.stop()
        for node in self.nodes.values():
            node.stop()

    def logs(self) -> str:
        parts = [f"--- {op.name}\n{op.tail()}" for op in self.operators]
        parts.extend(node.logs() for node in self.nodes.values())
        return "\n".join(parts)
