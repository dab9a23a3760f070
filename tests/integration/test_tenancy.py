"""What a namespace user can make the cluster do: ModelPolicy enforced by the operator, with the
real RBAC authorizer and impersonated tenants on the local control plane.

A tenant may create ModelDeployments in their own namespace and nothing else. Whatever they
write, the outcome is one status that names the field and the policy (PolicyViolation) or the
field (InvalidSpec, or the API server's own refusal), never a retry loop or a traceback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vram_operator.api import GROUP, VERSION
from vram_operator.simulation.burst import BurstModel, ollama_catalog
from vram_operator.simulation.cluster import TENANT_LABEL, SimulatedCluster
from vram_operator.simulation.gpu import GIB, SimulatedGPUs
from vram_operator.simulation.nodes import ManagedProcess, SimulatedNode

pytestmark = pytest.mark.integration

T = TypeVar("T")
TENANT = "tenant-a"
USER = "alice"
MDEPS = "modeldeployments"
POLICIES = "modelpolicies"


class Tenancy:
    """The admin's and the tenant's hands on one simulated cluster."""

    def __init__(self, cluster: SimulatedCluster) -> None:
        self.cluster = cluster
        self.admin = client.CustomObjectsApi(cluster.api)
        tenant_client = client.ApiClient(
            configuration=cluster.api.configuration,
            header_name="Impersonate-User",
            header_value=USER,
        )
        self.tenant = client.CustomObjectsApi(tenant_client)
        self.policies: list[str] = []

    def create_namespace_and_role(self) -> None:
        core, rbac = (
            client.CoreV1Api(self.cluster.api),
            client.RbacAuthorizationV1Api(self.cluster.api),
        )
        with contextlib.suppress(ApiException):
            core.create_namespace(
                client.V1Namespace(
                    metadata=client.V1ObjectMeta(
                        name=TENANT, labels={TENANT_LABEL: "a", "team": "a"}
                    )
                )
            )
        role: Any = {
            "metadata": {"name": "model-user", "namespace": TENANT},
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": [MDEPS],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                }
            ],
        }
        binding: Any = {
            "metadata": {"name": "model-user", "namespace": TENANT},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "model-user",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
        }
        with contextlib.suppress(ApiException):
            rbac.create_namespaced_role(TENANT, role)
        with contextlib.suppress(ApiException):
            rbac.create_namespaced_role_binding(TENANT, binding)

    def add_policy(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelPolicy",
            "metadata": {"name": name},
        }
        self.admin.create_cluster_custom_object(GROUP, VERSION, POLICIES, {**body, "spec": spec})
        self.policies.append(name)

    def remove_policies(self) -> None:
        for name in self.policies:
            with contextlib.suppress(ApiException):
                self.admin.delete_cluster_custom_object(GROUP, VERSION, POLICIES, name)

    def apply(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": TENANT},
            "spec": spec,
        }
        self.tenant.create_namespaced_custom_object(GROUP, VERSION, TENANT, MDEPS, body)

    def get(self, name: str) -> dict[str, Any]:
        body: Any = self.admin.get_namespaced_custom_object(GROUP, VERSION, TENANT, MDEPS, name)
        return dict(body)

    def ready(self, name: str) -> dict[str, Any]:
        conditions = (self.get(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Ready"), {})

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.cluster.logs()}", pytrace=False)
            time.sleep(0.3)

    def reason_of(self, name: str, reason: str) -> dict[str, Any]:
        return self.wait(
            f"{name} to say {reason}",
            lambda: (c := self.ready(name)).get("reason") == reason and c,
        )


@pytest.fixture
def tenancy(sim_cluster: SimulatedCluster) -> Iterator[Tenancy]:
    hands = Tenancy(sim_cluster)
    hands.create_namespace_and_role()
    try:
        yield hands
    finally:
        hands.remove_policies()


def start(tenancy: Tenancy) -> ManagedProcess:
    tenancy.cluster.add_node("tenant-node", gpu_sizes=[24 * GIB])
    return tenancy.cluster.start_operator()


def vllm(*args: str, vram: str = "1Gi", **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "org/model", "backend": "vllm", "vram": vram}
    if args:
        spec["vllm"] = {"args": list(args)}
    return {**spec, **extra}


def test_the_tenant_is_held_by_rbac_to_its_namespace(tenancy: Tenancy) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelPolicy", "metadata": {"name": "mine"}}
    with pytest.raises(ApiException) as caught:
        tenancy.tenant.create_cluster_custom_object(GROUP, VERSION, POLICIES, body)
    assert caught.value.status == 403
    with pytest.raises(ApiException) as caught:
        tenancy.tenant.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
    assert caught.value.status == 403


def test_without_a_policy_a_tenant_gets_the_safe_default(tenancy: Tenancy) -> None:
    operator = start(tenancy)
    refused = {
        "crit": (vllm(priority="critical"), "spec.priority"),
        "remote-code": (vllm("--trust-remote-code"), "spec.vllm.args[0]"),
        "remote-code-underscore": (vllm("--trust_remote_code"), "spec.vllm.args[0]"),
        "config": (vllm("--config=/etc/passwd"), "spec.vllm.args[0]"),
        "download-dir": (vllm("--download-dir=/"), "spec.vllm.args[0]"),
        "abbrev": (vllm("--max-model=4096"), "spec.vllm.args[0]"),
        "wildcard": (vllm(tolerations=[{"operator": "Exists"}]), "spec.tolerations[0]"),
        "path": ({"model": "/etc", "backend": "vllm", "vram": "1Gi"}, "spec.model"),
        "registry": (
            {"model": "evil.example.com/x/m:1b", "backend": "ollama", "vram": "1Gi"},
            "spec.model",
        ),
    }
    invalid = {
        "gpu-util": (vllm("--gpu_memory_utilization=0.98"), "spec.vllm.args[0]"),
        "host": (vllm("--hos=0.0.0.0"), "spec.vllm.args[0]"),
        "climb": (
            {"model": "/m/../var/lib/kubelet", "backend": "vllm", "vram": "1Gi"},
            "spec.model",
        ),
    }
    for name, (spec, _) in {**refused, **invalid}.items():
        tenancy.apply(name, spec)
    tenancy.apply("fine", vllm("--max-model-len", "4096", "--enforce_eager"))
    for name, (_, field) in refused.items():
        condition = tenancy.reason_of(name, "PolicyViolation")
        assert condition["message"].startswith(f"{field}: "), (name, condition)
        assert "ModelPolicy (default" in condition["message"], condition
    for name, (_, field) in invalid.items():
        condition = tenancy.reason_of(name, "InvalidSpec")
        assert condition["message"].startswith(f"{field}: "), (name, condition)
    tenancy.reason_of("fine", "Ready")
    versions = {name: tenancy.get(name)["metadata"]["resourceVersion"] for name in refused}
    time.sleep(3)  # a retry loop would rewrite status or the log meanwhile
    assert versions == {n: tenancy.get(n)["metadata"]["resourceVersion"] for n in refused}
    for name in {**refused, **invalid}:
        assert tenancy.get(name)["status"]["placements"] == []
    log = operator.log_path.read_text()
    assert "Traceback" not in log


def test_a_policy_grants_critical_and_enforces_a_quota(tenancy: Tenancy) -> None:
    tenancy.add_policy(
        "team-a",
        {
            "namespaceSelector": {"matchLabels": {"team": "a"}},
            "allowedPriorities": ["critical", "normal"],
            "vramQuota": "3Gi",
        },
    )
    start(tenancy)
    tenancy.apply("first", vllm(vram="2Gi", priority="critical"))
    tenancy.reason_of("first", "Ready")
    tenancy.apply("second", vllm(vram="2Gi"))
    condition = tenancy.reason_of("second", "PolicyViolation")
    assert condition["message"].startswith("spec.replicas: ")
    assert "3Gi VRAM quota" in condition["message"]
    assert "(ModelPolicy team-a)" in condition["message"]
    tenancy.apply("low", vllm(priority="low"))
    assert "spec.priority" in tenancy.reason_of("low", "PolicyViolation")["message"]

    def usage() -> str | None:
        body: Any = tenancy.admin.get_cluster_custom_object(GROUP, VERSION, POLICIES, "team-a")
        used = (body.get("status") or {}).get("used")
        return used if used and used.startswith("2Gi/3Gi") else None

    assert tenancy.wait("the policy to show its usage", usage) == f"2Gi/3Gi {TENANT}"
    tenancy.tenant.delete_namespaced_custom_object(GROUP, VERSION, TENANT, MDEPS, "first")
    tenancy.reason_of("second", "Ready")  # the freed quota admits the one refused before


def test_one_tenant_deleting_a_shared_ollama_model_leaves_the_others_loaded(
    tenancy: Tenancy, tmp_path: Path
) -> None:
    """Ollama holds one runner per model name: two namespaces asking for the same model share
    it, and withdrawing one of them must not unload what the other still uses."""
    spec = {"model": "shared:1b", "backend": "ollama", "vram": "1Gi"}
    catalog = ollama_catalog([BurstModel("shared", spec)], tmp_path / "catalog.json")
    node = tenancy.cluster.add_node(
        "tenant-node", gpu_sizes=[24 * GIB], ollama_args=("--catalog", str(catalog))
    )
    tenancy.cluster.start_operator()
    tenancy.apply("mine", spec)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": "theirs", "namespace": "default"},
        "spec": spec,
    }
    tenancy.admin.create_namespaced_custom_object(GROUP, VERSION, "default", MDEPS, body)
    tenancy.reason_of("mine", "Ready")

    def theirs_ready() -> bool:
        got: Any = tenancy.admin.get_namespaced_custom_object(
            GROUP, VERSION, "default", MDEPS, "theirs"
        )
        conditions = (got.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    tenancy.wait("theirs to be Ready", theirs_ready)
    tenancy.tenant.delete_namespaced_custom_object(GROUP, VERSION, TENANT, MDEPS, "mine")

    def mine_gone() -> bool:
        try:
            tenancy.get("mine")
        except ApiException as exc:
            return exc.status == 404
        return False

    tenancy.wait("mine to be deleted", mine_gone)
    time.sleep(3)  # an unload would land within this
    assert theirs_ready()
    assert ollama_owner(node, "shared:1b") is not None, "the shared model was unloaded"


def ollama_owner(node: SimulatedNode, model: str) -> str | None:
    """The simulated-GPU owner under which the fake Ollama holds `model`, if it does."""
    held = SimulatedGPUs(node.gpu_state).devices()[0].allocations
    return next((o for o in held if ":ollama:" in o and o.endswith(f":{model}")), None)
