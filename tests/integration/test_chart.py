"""The Helm chart: it lints; `helm install` works against a real API server; a render with
every switch on is accepted by it too; the command lines it renders parse with the
components' own parsers; and the real RBAC authorizer gives the operator and the agent what
they need and nothing they must not have.

No kubelet runs, so the Deployment and DaemonSet are stored but never start pods; what this
proves is that they pass API validation and that their ServiceAccounts' rights are right.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from vram_operator.api import GROUP, VERSION, GPUNodeStatus, now
from vram_operator.cli import COMPONENTS
from vram_operator.localcluster import INSTALL_HINT, LocalControlPlane, cache_bin_dir
from vram_operator.node_agent.storage import GPUNodeStore
from vram_operator.operator.storage import ClusterStore

Kubectl = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "vram-operator"

# Every optional switch of values.yaml turned on (or to its non-default branch).
ALL_SWITCHES: dict[str, Any] = {
    "commonLabels": {"team": "ml-platform"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "podAntiAffinity": "hard",
        "placement": {"strategy": "spread", "preemption": False},
        "extraArgs": ["--metrics-host=::"],
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"tier": "control"},
        "serviceAccount": {"annotations": {"example.com/role": "operator"}},
    },
    "agent": {
        "dropPageCacheAbove": "20Gi",
        "cleanOrphanShm": True,
        "priorityClassName": "system-node-critical",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "nvidia.com/gpu.count", "operator": "Exists"}
                            ]
                        }
                    ]
                }
            }
        },
        "extraArgs": ["--simulate-gpus=/tmp/gpus.json"],
    },
    "ollama": {"gpus": 0, "storage": {"type": "emptyDir", "sizeLimit": "100Gi"}},
    "vllm": {
        "gpus": 2,
        "hfTokenSecret": {"name": "hf-token"},
        "storage": {"type": "persistentVolumeClaim", "existingClaim": "model-cache"},
        "extraArgs": ["--startup-timeout=1200"],
    },
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
}


def _helm_path() -> Path:
    """helm from the install script's cache folder, else from PATH."""
    cached = cache_bin_dir() / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    found = shutil.which("helm")
    if found is None:
        # Fail rather than skip, like the control plane fixture: a skip would hide a
        # missing install step in CI.
        pytest.fail(f"helm not found in {cached.parent} or on PATH; {INSTALL_HINT}", pytrace=False)
    return Path(found)


@dataclass(frozen=True)
class Helm:
    """Runs helm on the chart against the test's API server; render() returns dicts."""

    binary: Path
    kubeconfig: Path
    kube_version: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )

    def template(
        self, release: str, namespace: str, values: Path | None = None, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        args += ["--kube-version", self.kube_version, "--include-crds"]
        if values is not None:
            args += ["--values", str(values)]
        return self.run(*args, *extra)

    def render(
        self, release: str, namespace: str, values: Path | None = None, *extra: str
    ) -> list[dict[str, Any]]:
        done = self.template(release, namespace, values, *extra)
        assert done.returncode == 0, done.stderr
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def helm(control_plane: LocalControlPlane, k8s_client: client.ApiClient) -> Helm:
    """helm for the test's API server, rendering for the version that server runs."""
    assert control_plane.kubeconfig is not None
    version = client.VersionApi(k8s_client).get_code().git_version
    return Helm(_helm_path(), control_plane.kubeconfig, version)


@pytest.fixture(scope="module")
def all_switches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "all-switches.yaml"
    path.write_text(yaml.safe_dump(ALL_SWITCHES))
    return path


def _find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def _containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@dataclass(frozen=True)
class Release:
    """A release on the API server: its objects as rendered and as the server stored them."""

    name: str
    namespace: str
    rendered: list[dict[str, Any]]
    stored: list[dict[str, Any]]

    def stored_object(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        return _find(self.stored, kind, name_suffix)

    def service_account(self, component: str) -> str:
        name = _find(self.rendered, "ServiceAccount", f"-{component}")["metadata"]["name"]
        return f"system:serviceaccount:{self.namespace}:{name}"


class Releases:
    """Puts releases with unique names into fresh namespaces, and takes them away again.

    The CRDs stay when a release goes, as `helm uninstall` leaves them.
    """

    def __init__(self, helm: Helm, kubectl: Kubectl, folder: Path) -> None:
        self._helm = helm
        self._kubectl = kubectl
        self._folder = folder
        self._installed: list[Release] = []
        self._applied: list[Release] = []

    def install(self) -> Release:
        """`helm install` with the default values, as a user would (no --wait: no kubelet)."""
        name, namespace = self._names()
        done = self._helm.run(
            "install", name, str(CHART), "--namespace", namespace, "--create-namespace"
        )
        assert done.returncode == 0, done.stderr
        self._installed.append(Release(name, namespace, [], []))
        manifest = self._helm.run("get", "manifest", name, "--namespace", namespace)
        assert manifest.returncode == 0, manifest.stderr
        rendered = [doc for doc in yaml.safe_load_all(manifest.stdout) if doc]
        return Release(name, namespace, rendered, self._read_back(name, rendered))

    def apply(self, values: Path) -> Release:
        """Render with `values` and server-side apply what the server can take.

        ServiceMonitors need the Prometheus Operator's CRDs, so they are applied only where
        monitoring.coreos.com/v1 is served.
        """
        name, namespace = self._names()
        rendered = self._helm.render(name, namespace, values)
        self._kubectl("create", "namespace", namespace, check=True)
        self._applied.append(Release(name, namespace, [], []))
        served = self._kubectl("api-versions", check=True).stdout.split()
        applied = [d for d in rendered if d["apiVersion"] in served]
        skipped = {d["apiVersion"] for d in rendered} - set(served)
        assert skipped <= {"monitoring.coreos.com/v1"}
        manifest = self._folder / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump_all(applied))
        done = self._kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=vram-chart-test",
            "-f", str(manifest),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return Release(name, namespace, rendered, self._read_back(name, applied))

    def remove_all(self) -> None:
        for release in self._installed:
            self._helm.run("uninstall", release.name, "--namespace", release.namespace)
        for release in self._applied:
            selector = f"app.kubernetes.io/instance={release.name}"
            self._kubectl("delete", "clusterrolebinding,clusterrole", "-l", selector)
        for release in self._installed + self._applied:
            # No controller-manager runs, so the namespace stays Terminating; names are unique.
            self._kubectl("delete", "namespace", release.namespace, "--wait=false")

    def _names(self) -> tuple[str, str]:
        suffix = secrets.token_hex(3)
        return f"chart-{suffix}", f"vram-chart-{suffix}"

    def _read_back(self, name: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        manifest = self._folder / f"{name}-read.yaml"
        manifest.write_text(yaml.safe_dump_all(docs))
        got = self._kubectl("get", "-f", str(manifest), "-o", "yaml", check=True)
        stored: list[dict[str, Any]] = yaml.safe_load(got.stdout)["items"]
        assert len(stored) == len(docs)
        return stored


@pytest.fixture(scope="module")
def releases(
    helm: Helm, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Releases]:
    made = Releases(helm, kubectl, tmp_path_factory.mktemp("releases"))
    try:
        yield made
    finally:
        made.remove_all()


@pytest.fixture(scope="module")
def default_release(releases: Releases) -> Release:
    return releases.install()


def test_chart_lints_strictly(helm: Helm, all_switches: Path) -> None:
    for extra in ([], ["--values", str(all_switches)]):
        done = helm.run("lint", "--strict", str(CHART), *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 chart(s) failed" in done.stdout


def test_helm_install_creates_everything(default_release: Release, kubectl: Kubectl) -> None:
    kinds = sorted(d["kind"] for d in default_release.rendered)
    assert kinds == sorted(
        ["ServiceAccount"] * 2
        + ["ClusterRole", "ClusterRoleBinding"] * 2
        + ["Role", "RoleBinding", "Deployment", "PodDisruptionBudget", "DaemonSet"]
        + ["Service"] * 2
        # the gateway: its identity, read-only rights, Deployment, two Services, NetworkPolicy
        + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy"]
        + ["Service"] * 2
    )
    # helm installed crds/ first; they are the generated ones (a unit test checks the bytes).
    crds = kubectl("get", "crd", "modeldeployments.vram.dev", "gpunodes.vram.dev", "-o", "name")
    assert crds.returncode == 0, crds.stderr
    # helm picked the PodDisruptionBudget version the server serves (policy/v1 is 1.21+).
    served = kubectl("api-versions", check=True).stdout.split()
    pdb = _find(default_release.rendered, "PodDisruptionBudget")
    assert pdb["apiVersion"] in served


def test_operator_deployment_is_ha_and_locked_down(default_release: Release) -> None:
    deployment = default_release.stored_object("Deployment", "-operator")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = anti[0]["podAffinityTerm"]
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (operator,) = spec["containers"]
    assert operator["args"][0] == "operator"
    assert "--metrics-port=9300" in operator["args"]
    assert "--namespace=$(POD_NAMESPACE)" in operator["args"]
    assert _env(operator)["POD_NAMESPACE"] == {
        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}
    }
    assert operator["securityContext"]["readOnlyRootFilesystem"] is True
    assert operator["securityContext"]["allowPrivilegeEscalation"] is False
    assert set(operator["resources"]) == {"requests", "limits"}


def test_agent_daemonset_defaults(default_release: Release) -> None:
    daemonset = default_release.stored_object("DaemonSet", "-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["runtimeClassName"] == "nvidia"
    assert "hostIPC" not in spec
    containers = _containers(daemonset)
    assert list(containers) == ["agent", "ollama", "vllm"]

    agent = containers["agent"]
    demand = f"{default_release.name}-vram-operator-gateway-demand.{default_release.namespace}"
    assert agent["args"] == [
        "agent",
        "--ollama-url=http://$(POD_IP):11434",  # the address the gateway reaches it at
        "--ollama-max-loaded-models=16",
        "--vllm-supervisor-url=http://127.0.0.1:8900",
        "--report-interval=10",
        "--policy=cost",
        "--min-residency=120",
        "--psi-threshold=10",
        "--min-free=256Mi",
        "--metrics-port=9400",
        "--metrics-address=$(POD_IP)",
        "--proc=/host/proc",
        "--log-level=INFO",
        f"--gateway-demand-url=http://{demand}.svc:8080/demand",
    ]
    env = _env(agent)
    assert env["NODE_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}
    assert env["POD_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    security = agent["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert "privileged" not in security
    assert "nvidia.com/gpu" not in agent["resources"].get("limits", {})
    proc_mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/host/proc")
    assert proc_mount["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[proc_mount["name"]]["hostPath"]["path"] == "/proc"

    ollama = containers["ollama"]
    assert ollama["image"] == "ollama/ollama:0.12.3"
    assert _env(ollama)["OLLAMA_KEEP_ALIVE"] == "-1"
    assert "OLLAMA_MAX_LOADED_MODELS" in _env(ollama)
    assert volumes["ollama-models"]["hostPath"]["path"] == "/var/lib/vram-operator/ollama"

    vllm = containers["vllm"]
    assert vllm["command"] == ["vram-operator", "vllm-supervisor"]
    assert vllm["args"] == [
        "--port=8900",
        "--serve-port=8000",
        "--advertise-host=$(POD_IP)",
        "--drain-timeout=60",
    ]
    assert _env(vllm)["POD_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    assert vllm["ports"] == [{"name": "vllm", "containerPort": 8000, "protocol": "TCP"}]
    # The agent places models on any GPU of the node: both sidecars see them all, and the pod
    # asks the device plugin for none, so it schedules on a 1-GPU node too.
    for sidecar in (ollama, vllm):
        assert _env(sidecar)["NVIDIA_VISIBLE_DEVICES"] == "all"
        assert "nvidia.com/gpu" not in sidecar["resources"].get("limits", {})
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_every_switch_on_is_accepted(releases: Releases, all_switches: Path) -> None:
    release = releases.apply(all_switches)

    deployment = release.stored_object("Deployment", "-operator")
    pod = deployment["spec"]["template"]["spec"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert deployment["spec"]["template"]["metadata"]["labels"]["tier"] == "control"
    assert deployment["metadata"]["labels"]["team"] == "ml-platform"
    operator_args = _containers(deployment)["operator"]["args"]
    assert "--no-preemption" in operator_args
    assert operator_args[-1] == "--metrics-host=::"

    daemonset = release.stored_object("DaemonSet", "-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostIPC"] is True
    assert "nodeAffinity" in spec["affinity"]
    containers = _containers(daemonset)
    agent = containers["agent"]
    assert "--drop-page-cache-above=20Gi" in agent["args"]
    assert "--clean-orphan-shm" in agent["args"]
    assert agent["args"][-1] == "--simulate-gpus=/tmp/gpus.json"
    assert agent["securityContext"]["privileged"] is True
    assert agent["securityContext"]["runAsUser"] == 0
    proc_mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/host/proc")
    assert not proc_mount.get("readOnly", False)  # drop_caches is written through it

    ollama, vllm = containers["ollama"], containers["vllm"]
    assert _env(ollama)["NVIDIA_VISIBLE_DEVICES"] == "all"  # gpus: 0 shares every GPU
    assert "nvidia.com/gpu" not in ollama["resources"]["limits"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "NVIDIA_VISIBLE_DEVICES" not in _env(vllm)  # the device plugin sets it
    assert _env(vllm)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ollama-models"]["emptyDir"]["sizeLimit"] == "100Gi"
    assert volumes["vllm-cache"]["persistentVolumeClaim"]["claimName"] == "model-cache"

    # ServiceMonitors select the metrics Services of their own component.
    monitors = [d for d in release.rendered if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    services = [d for d in release.rendered if d["kind"] == "Service"]
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse a container's command line with the parser `vram-operator` itself would use."""
    parser = importlib.import_module(COMPONENTS[argv[0]][0]).build_parser()
    try:
        return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`vram-operator {' '.join(argv)}` is refused (its error is in stderr)")


@pytest.mark.parametrize("switches", [False, True], ids=["defaults", "all-switches"])
def test_rendered_command_lines_parse(helm: Helm, all_switches: Path, switches: bool) -> None:
    docs = helm.render("cli", "vram-system", all_switches if switches else None)
    operator = _containers(_find(docs, "Deployment", "-operator"))["operator"]
    parsed = _parse(operator["args"])
    assert parsed.metrics_port == 9300
    assert parsed.strategy == ("spread" if switches else "binpack")
    assert parsed.no_preemption is switches

    pod = _containers(_find(docs, "DaemonSet"))
    parsed = _parse(pod["agent"]["args"])
    assert parsed.proc == "/host/proc"
    assert parsed.clean_orphan_shm is switches
    assert parsed.drop_page_cache_above == ("20Gi" if switches else None)

    vllm = pod["vllm"]
    assert vllm["command"][0] == "vram-operator"
    parsed = _parse(vllm["command"][1:] + vllm["args"])
    assert parsed.port == 8900
    assert parsed.host == "127.0.0.1"  # the probe is an exec for this reason
    assert (parsed.serve_host, parsed.serve_port) == ("0.0.0.0", 8000)
    assert parsed.advertise_host == "$(POD_IP)"  # the kubelet expands it


def test_switches_that_remove_parts(helm: Helm) -> None:
    no_sidecars = helm.render(
        "bare", "vram-system", None, "--set", "ollama.enabled=false,vllm.enabled=false"
    )
    daemonset = _find(no_sidecars, "DaemonSet")
    containers = _containers(daemonset)
    assert list(containers) == ["agent"]
    backend_urls = ("--ollama-url=", "--vllm-supervisor-url=")
    assert not any(arg.startswith(backend_urls) for arg in containers["agent"]["args"])
    volumes = {v["name"] for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert volumes == {"host-proc", "tmp", "kube-api-access"}
    assert "initContainers" not in daemonset["spec"]["template"]["spec"]  # no storage to chown

    no_agent = helm.render(
        "bare", "vram-system", None,
        "--set", "agent.enabled=false,metrics.service.enabled=false,operator.replicas=1",
        "--set", "gateway.enabled=false",
    )  # fmt: skip
    kinds = sorted(d["kind"] for d in no_agent if d["kind"] != "CustomResourceDefinition")
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment"]
    )

    no_rbac = helm.render("bare", "vram-system", None, "--set", "rbac.create=false")
    assert not [d for d in no_rbac if d["apiVersion"].startswith("rbac.authorization.k8s.io")]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("agent.policy=fifo", "agent/policy"),
        ("ollama.storage.type=nfs", "ollama/storage/type"),
        ("vllm.storage.type=persistentVolumeClaim", "vllm.storage.existingClaim is required"),
        ("operator.podAntiAffinity=sometimes", "operator/podAntiAffinity"),
        ("agent.psiThreshold=150", "agent/psiThreshold"),
        ("metrics.bindAddress=0.0.0.0", "metrics/bindAddress"),
        ("admissionPolicy.enabled=maybe", "admissionPolicy/enabled"),
        ("agent.serviceAccountToken.expirationSeconds=60", "expirationSeconds"),
        (
            "metrics.bindAddress=loopback,metrics.serviceMonitor.enabled=true",
            "Prometheus cannot scrape a loopback address",
        ),
    ],
)
def test_bad_values_are_refused_with_the_value_named(helm: Helm, values: str, message: str) -> None:
    done = helm.template("bad", "vram-system", None, "--set", values)
    assert done.returncode != 0
    assert message in done.stderr


def _can(kubectl: Kubectl, who: str, verb: str, resource: str, *extra: str) -> bool:
    done = kubectl("auth", "can-i", verb, resource, f"--as={who}", *extra)
    answer = done.stdout.strip()
    assert answer in ("yes", "no"), done.stderr
    return answer == "yes"


# (verb, resource, extra kubectl arguments); "{ns}" is the release namespace.
OPERATOR_MAY = [
    ("patch", "modeldeployments.vram.dev", ["--subresource=status", "-n", "team-a"]),
    ("update", "modeldeployments.vram.dev", ["--subresource=status", "-n", "team-a"]),
    ("watch", "modeldeployments.vram.dev", ["--all-namespaces"]),
    ("update", "modeldeployments.vram.dev", ["--subresource=finalizers", "-n", "team-a"]),
    ("watch", "gpunodes.vram.dev", []),
    ("create", "gpunodes.vram.dev", []),  # one per Node the agent DaemonSet selects
    ("patch", "gpunodes.vram.dev", []),
    ("delete", "gpunodes.vram.dev", []),
    ("patch", "gpunodes.vram.dev", ["--subresource=status"]),  # Ready=Unknown when lost
    ("watch", "nodes", []),
    ("create", "events", ["-n", "team-a"]),
    ("create", "events.events.k8s.io", ["-n", "team-a"]),
    ("update", "leases.coordination.k8s.io", ["-n", "{ns}"]),
    ("create", "leases.coordination.k8s.io", ["-n", "{ns}"]),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", []),
    ("list", "namespaces", []),
]
OPERATOR_MAY_NOT = [
    ("delete", "pods", ["-n", "{ns}"]),
    ("delete", "pods", ["--all-namespaces"]),
    ("get", "secrets", ["-n", "{ns}"]),
    ("list", "secrets", ["--all-namespaces"]),
    ("update", "leases.coordination.k8s.io", ["-n", "kube-system"]),
    ("update", "gpunodes.vram.dev", ["--subresource=status"]),  # the agents' to write
    ("delete", "modeldeployments.vram.dev", ["-n", "team-a"]),
    ("patch", "nodes", []),
]
AGENT_MAY = [
    ("update", "gpunodes.vram.dev", ["--subresource=status"]),
    ("patch", "gpunodes.vram.dev", ["--subresource=status"]),
    ("watch", "gpunodes.vram.dev", []),
    ("get", "nodes", []),
]
AGENT_MAY_NOT = [
    ("create", "gpunodes.vram.dev", []),  # the operator's: a node could make up others
    ("patch", "modeldeployments.vram.dev", ["-n", "team-a"]),
    ("patch", "modeldeployments.vram.dev", ["--subresource=status", "-n", "team-a"]),
    ("patch", "gpunodes.vram.dev", []),  # spec.assignments is the operator's
    ("delete", "gpunodes.vram.dev", []),
    ("list", "nodes", []),
    ("watch", "nodes", []),
    ("patch", "nodes", []),
    ("get", "secrets", ["-n", "{ns}"]),
    ("delete", "pods", ["-n", "{ns}"]),
]


def _ids(rules: list[tuple[str, str, list[str]]]) -> list[str]:
    return [" ".join([verb, resource, *extra]) for verb, resource, extra in rules]


@pytest.mark.parametrize(
    ("component", "allowed", "rule"),
    [("operator", True, r) for r in OPERATOR_MAY]
    + [("operator", False, r) for r in OPERATOR_MAY_NOT]
    + [("agent", True, r) for r in AGENT_MAY]
    + [("agent", False, r) for r in AGENT_MAY_NOT],
    ids=[f"operator-may:{i}" for i in _ids(OPERATOR_MAY)]
    + [f"operator-may-not:{i}" for i in _ids(OPERATOR_MAY_NOT)]
    + [f"agent-may:{i}" for i in _ids(AGENT_MAY)]
    + [f"agent-may-not:{i}" for i in _ids(AGENT_MAY_NOT)],
)
def test_rbac_as_seen_by_the_authorizer(
    kubectl: Kubectl,
    default_release: Release,
    component: str,
    allowed: bool,
    rule: tuple[str, str, list[str]],
) -> None:
    verb, resource, extra = rule
    args = [a.replace("{ns}", default_release.namespace) for a in extra]
    who = default_release.service_account(component)
    assert _can(kubectl, who, verb, resource, *args) is allowed


# ------------------------------------------------------------------ hardening (issue 9)

TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _pod(workload)
    return [*pod.get("initContainers", []), *pod["containers"]]


def _writable_volume(container: dict[str, Any], path: str) -> str:
    """The volume a path lies on (the deepest mount above it), asserting it is writable."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on the read-only root filesystem"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert not mount.get("readOnly"), f"{path} is on a read-only mount"
    name: str = mount["name"]
    return name


def test_every_long_running_container_is_non_root_and_read_only(
    default_release: Release,
) -> None:
    """As the API server stored them: no container of ours runs as root or writes its root
    filesystem, each keeps no capability and cannot gain privileges, under RuntimeDefault
    seccomp; the three containers of the agent pod run as three different users."""
    users = {}
    for kind, suffix in (("Deployment", "-operator"), ("DaemonSet", "-agent")):
        workload = default_release.stored_object(kind, suffix)
        assert _pod(workload)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in _pod(workload)["containers"]:
            security = {**_pod(workload)["securityContext"], **container["securityContext"]}
            name = container["name"]
            assert security["runAsNonRoot"] is True, name
            assert security["runAsUser"] > 0, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert "privileged" not in security, name
            users[name] = security["runAsUser"]
    assert len({users["agent"], users["ollama"], users["vllm"]}) == 3


def test_what_the_sidecars_write_lies_on_writable_mounts(default_release: Release) -> None:
    """With a read-only root filesystem, HOME, /tmp and every cache folder Ollama, vLLM,
    PyTorch, Triton and Hugging Face write are volume mounts; the caches worth keeping are on
    the storage volume."""
    daemonset = default_release.stored_object("DaemonSet", "-agent")
    containers = _containers(daemonset)
    volumes = {v["name"]: v for v in _pod(daemonset)["volumes"]}

    ollama = containers["ollama"]
    env = _env(ollama)
    assert env["HOME"] == "/home/ollama"
    for path in (env["HOME"], env["OLLAMA_MODELS"], "/tmp", f"{env['HOME']}/.ollama/id_ed25519"):
        assert _writable_volume(ollama, path), path
    assert _writable_volume(ollama, env["OLLAMA_MODELS"]) == "ollama-models"
    assert "emptyDir" in volumes[_writable_volume(ollama, env["HOME"])]

    vllm = containers["vllm"]
    env = _env(vllm)
    assert env["HOME"] == "/home/vllm"
    caches = [
        "XDG_CACHE_HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "CUDA_CACHE_PATH",
        "FLASHINFER_WORKSPACE_BASE",
        "NUMBA_CACHE_DIR",
        "OUTLINES_CACHE_DIR",
    ]
    for variable in caches:
        assert _writable_volume(vllm, env[variable]) == "vllm-cache", variable
    for path in (env["HOME"], env["XDG_CONFIG_HOME"], env["VLLM_CONFIG_ROOT"], "/tmp", "/dev/shm"):
        assert "emptyDir" in volumes[_writable_volume(vllm, path)], path
    assert env["TMPDIR"] == "/tmp"
    assert env["VLLM_NO_USAGE_STATS"] == "1"


def test_only_the_agent_container_gets_a_token(default_release: Release) -> None:
    """No automounted token anywhere in the agent pod; a projected, pod-bound token (with the
    cluster CA and the namespace) only in the agent container, where in-cluster clients look.
    The ServiceAccounts mount nothing by default; the operator pod asks for its token."""
    for account in ("-operator", "-agent"):
        stored = default_release.stored_object("ServiceAccount", account)
        assert stored["automountServiceAccountToken"] is False

    daemonset = default_release.stored_object("DaemonSet", "-agent")
    pod = _pod(daemonset)
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in _all_containers(daemonset):
        secrets_mounts = [
            m
            for m in container.get("volumeMounts", [])
            if m["mountPath"].startswith("/var/run/secrets")
            or "projected" in volumes[m["name"]]
            or "secret" in volumes[m["name"]]
        ]
        if container["name"] != "agent":
            assert secrets_mounts == [], container["name"]
            assert not any("secretKeyRef" in str(e) for e in container.get("env", []))
            continue
        (mount,) = secrets_mounts
        assert mount["mountPath"] == TOKEN_PATH
        assert mount["readOnly"] is True
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert sources[0] == {
        "serviceAccountToken": {"path": "token", "expirationSeconds": 3600},
    }
    assert sources[1] == {
        "configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    }
    assert sources[2] == {
        "downwardAPI": {
            "items": [
                {
                    "path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                }
            ]
        }
    }

    deployment = default_release.stored_object("Deployment", "-operator")
    assert _pod(deployment)["automountServiceAccountToken"] is True


def test_volume_permissions_hand_storage_to_the_sidecar_users(
    helm: Helm, default_release: Release, releases: Releases, all_switches: Path
) -> None:
    """hostPath storage (the default) is chowned to each sidecar's user by a root init
    container that has CHOWN and DAC_OVERRIDE only and no token; emptyDir storage needs none;
    the switch turns it off."""
    daemonset = default_release.stored_object("DaemonSet", "-agent")
    containers = _containers(daemonset)
    (init,) = _pod(daemonset)["initContainers"]
    assert init["name"] == "volume-permissions"
    security = init["securityContext"]
    assert security["runAsUser"] == 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE"]}
    assert "-xdev" in init["command"][2]
    assert "chown -h" in init["command"][2]
    owners = dict(arg.split("=") for arg in init["args"])
    for sidecar, volume in (("ollama", "ollama-models"), ("vllm", "vllm-cache")):
        user = containers[sidecar]["securityContext"]
        assert owners[f"/volumes/{volume}"] == f"{user['runAsUser']}:{user['runAsGroup']}"
        (mount,) = [m for m in init["volumeMounts"] if m["name"] == volume]
        assert mount["mountPath"] == f"/volumes/{volume}"

    # All switches: Ollama on an emptyDir (fsGroup-free, world-writable), vLLM on a claim.
    docs = helm.render("perm", "vram-system", all_switches)
    (init,) = _pod(_find(docs, "DaemonSet"))["initContainers"]
    assert init["args"] == ["/volumes/vllm-cache=10003:10003"]

    for values in (
        "ollama.storage.type=emptyDir,vllm.storage.type=emptyDir",
        "volumePermissions.enabled=false",
        "ollama.securityContext.runAsUser=0,vllm.securityContext.runAsUser=0",
    ):
        docs = helm.render("perm", "vram-system", None, "--set", values)
        assert "initContainers" not in _pod(_find(docs, "DaemonSet")), values


def _policy(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    policies = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert len(policies) == len(bindings) <= 1
    return (policies[0], bindings[0]) if policies else None


def test_gpunode_admission_policy_follows_the_capability(
    helm: Helm, default_release: Release
) -> None:
    """Rendered where the cluster serves ValidatingAdmissionPolicy (not on this 1.20 server,
    as the install shows), or when forced; its CEL ties an agent's write to the GPUNode named
    after its token's node and refuses any spec change. The local server cannot run it: the
    README says how to check it on a real cluster."""
    assert _policy(default_release.rendered) is None
    cases = [
        ([], False),  # `helm template` and clusters before 1.30 have no such API
        (["--set", "admissionPolicy.enabled=false", "--api-versions", VAP_API], False),
        (["--set", "agent.enabled=false", "--api-versions", VAP_API], False),
        (["--set", "admissionPolicy.enabled=true"], True),
    ]
    for extra, rendered in cases:
        assert (_policy(helm.render("vap", "vram-system", None, *extra)) is not None) is rendered

    docs = helm.render("vap", "vram-system", None, "--api-versions", VAP_API)
    found = _policy(docs)
    assert found is not None
    policy, binding = found
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["vram.dev"]
    assert set(rule["resources"]) == {"gpunodes", "gpunodes/status"}
    assert {"UPDATE", "CREATE"} <= set(rule["operations"])

    agent = _find(docs, "ServiceAccount", "-agent")["metadata"]["name"]
    (condition,) = spec["matchConditions"]
    assert condition["expression"] == (
        f"request.userInfo.username == 'system:serviceaccount:vram-system:{agent}'"
    )
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert variables["gpuNode"] == (
        "request.operation == 'DELETE' ? oldObject.metadata.name : object.metadata.name"
    )
    node, unchanged_spec, create = (v["expression"] for v in spec["validations"])
    claim = "request.userInfo.extra['authentication.kubernetes.io/node-name']"
    assert node == (
        "'authentication.kubernetes.io/node-name' in request.userInfo.extra && "
        f"{claim} == [variables.gpuNode]"
    )
    assert unchanged_spec == (
        "request.operation != 'UPDATE' || (has(object.spec) ? has(oldObject.spec) && "
        "object.spec == oldObject.spec : !has(oldObject.spec))"
    )
    assert create == (
        "request.operation != 'CREATE' || !has(object.spec) || "
        "!has(object.spec.assignments) || size(object.spec.assignments) == 0"
    )
    assert all(v["reason"] == "Forbidden" and v["message"] for v in spec["validations"])


def _metrics_services(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")
    ]


def test_metrics_listen_on_the_pod_ip_or_loopback(
    helm: Helm, default_release: Release, releases: Releases, tmp_path: Path
) -> None:
    """podIP (default): `--metrics-address=$(POD_IP)` from the downward API, httpGet liveness
    probes and metrics Services. loopback: 127.0.0.1, exec probes against it (the kubelet
    cannot reach loopback), no metrics Service; the server accepts that render too."""
    for kind, suffix, component in (
        ("Deployment", "-operator", "operator"),
        ("DaemonSet", "-agent", "agent"),
    ):
        container = _containers(default_release.stored_object(kind, suffix))[component]
        assert "--metrics-address=$(POD_IP)" in container["args"]
        assert _env(container)["POD_IP"] == {
            "fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}
        }
        assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
        parsed = _parse(container["args"])
        assert parsed.metrics_address == "$(POD_IP)"  # the kubelet expands it
    assert len(_metrics_services(default_release.rendered)) == 2

    values = tmp_path / "loopback.yaml"
    values.write_text(yaml.safe_dump({"metrics": {"bindAddress": "loopback"}}))
    release = releases.apply(values)
    assert _metrics_services(release.rendered) == []
    for kind, suffix, component, port in (
        ("Deployment", "-operator", "operator", 9300),
        ("DaemonSet", "-agent", "agent", 9400),
    ):
        container = _containers(release.stored_object(kind, suffix))[component]
        assert _parse(container["args"]).metrics_address == "127.0.0.1"
        probe = container["livenessProbe"]
        assert "httpGet" not in probe
        command = probe["exec"]["command"]
        assert command[:2] == ["python3", "-c"]
        assert f'"http://127.0.0.1:{port}/healthz"' in command[2]
        assert (probe["periodSeconds"], probe["timeoutSeconds"]) == (20, 5)


# --- the gateway ---------------------------------------------------------------------------------


def test_gateway_is_two_replicas_behind_a_service_and_the_only_path_to_the_backends(
    default_release: Release,
) -> None:
    deployment = default_release.stored_object("Deployment", "-gateway")
    assert deployment["spec"]["replicas"] == 2
    (gateway,) = _containers(deployment).values()
    parsed = _parse(gateway["args"])
    assert (parsed.port, parsed.queue_size, parsed.queue_timeout) == (8080, 100, 120.0)
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    selector = deployment["spec"]["selector"]["matchLabels"]

    service = default_release.stored_object("Service", "-gateway")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    demand = default_release.stored_object("Service", "-gateway-demand")
    assert demand["spec"]["clusterIP"] == "None"  # every replica, for the agents

    # The agents read every replica's /demand, and report Ollama at the pod IP.
    agent = _containers(default_release.stored_object("DaemonSet", "-agent"))["agent"]
    parsed = _parse(agent["args"])
    name, namespace = demand["metadata"]["name"], default_release.namespace
    assert parsed.gateway_demand_url == f"http://{name}.{namespace}.svc:8080/demand"
    assert parsed.ollama_url == "http://$(POD_IP):11434"
    # And the operator, for spec.autoscaling, wake on request and swap-outs.
    operator = _containers(default_release.stored_object("Deployment", "-operator"))["operator"]
    demand_url = _parse(operator["args"]).gateway_demand_url
    assert demand_url == f"http://{name}.{namespace}.svc:8080/demand"
    assert "POD_IP" in _env(agent)

    # Only the gateway's pods reach the Ollama and vLLM serving ports of the agent pods.
    policy = default_release.stored_object("NetworkPolicy")
    daemonset = default_release.stored_object("DaemonSet", "-agent")
    agent_pods = daemonset["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == agent_pods
    serving, metrics = policy["spec"]["ingress"]
    assert serving["from"] == [{"podSelector": {"matchLabels": selector}}]
    assert sorted(p["port"] for p in serving["ports"]) == [8000, 11434]
    assert "from" not in metrics  # Prometheus scrapes from wherever it runs
    assert [p["port"] for p in metrics["ports"]] == [9400]


def test_gateway_may_only_read(kubectl: Kubectl, default_release: Release) -> None:
    user = (
        f"system:serviceaccount:{default_release.namespace}:"
        + default_release.stored_object("Deployment", "-gateway")["spec"]["template"]["spec"][
            "serviceAccountName"
        ]
    )
    for verb, resource, expected in [
        ("list", "modeldeployments.vram.dev", "yes"),
        ("watch", "gpunodes.vram.dev", "yes"),
        ("patch", "modeldeployments.vram.dev", "no"),
        ("patch", "gpunodes.vram.dev", "no"),
        ("update", "gpunodes.vram.dev/status", "no"),
        ("create", "events", "no"),
        ("get", "secrets", "no"),
    ]:
        answer = kubectl("auth", "can-i", verb, resource, "--as", user, "-A")
        assert answer.stdout.strip() == expected, (verb, resource, answer.stdout, answer.stderr)


def test_gateway_ingress_and_httproute_are_optional(helm: Helm) -> None:
    plain = helm.render("gw", "vram-system")
    assert not [d for d in plain if d["kind"] in ("Ingress", "HTTPRoute")]
    exposed = helm.render(
        "gw", "vram-system", None,
        "--set", "gateway.ingress.enabled=true,gateway.ingress.host=llm.example.com",
        "--set", "gateway.httpRoute.enabled=true,gateway.httpRoute.parentRefs[0].name=public",
    )  # fmt: skip
    ingress = _find(exposed, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gw-vram-operator-gateway", "port": {"name": "http"}}
    route = _find(exposed, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"name": "public"}]
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"name": "gw-vram-operator-gateway", "port": 80}
    ]
    refused = helm.template("gw", "vram-system", None, "--set", "gateway.httpRoute.enabled=true")
    assert refused.returncode != 0
    assert "gateway.httpRoute.parentRefs" in refused.stderr


def test_gateway_can_be_turned_off(helm: Helm) -> None:
    docs = helm.render("gw", "vram-system", None, "--set", "gateway.enabled=false")
    assert not [d for d in docs if "gateway" in d["metadata"]["name"]]
    agent = _containers(_find(docs, "DaemonSet"))["agent"]
    assert not any(a.startswith("--gateway-demand-url") for a in agent["args"])
    assert "--ollama-url=http://127.0.0.1:11434" in agent["args"]
    operator = _containers(_find(docs, "Deployment", "-operator"))["operator"]
    assert not any(a.startswith("--gateway-demand-url") for a in operator["args"])


def test_diffusion_sidecar_is_off_by_default_and_complete_when_on(helm: Helm) -> None:
    default = _containers(_find(helm.render("plain", "vram-system"), "DaemonSet"))
    assert "diffusion" not in default
    assert not any(a.startswith("--diffusion-server-url") for a in default["agent"]["args"])

    docs = helm.render(
        "images",
        "vram-system",
        None,
        "--set",
        "diffusion.enabled=true,diffusion.gpus=1,diffusion.hfTokenSecret.name=hf-token",
    )
    daemonset = _find(docs, "DaemonSet")
    pod = _containers(daemonset)
    assert list(pod) == ["agent", "ollama", "vllm", "diffusion"]
    parsed = _parse(pod["agent"]["args"])
    assert parsed.diffusion_server_url == "http://127.0.0.1:8950"
    diffusion = pod["diffusion"]
    assert diffusion["command"] == ["vram-operator", "diffusion-server"]
    parsed = _parse(diffusion["command"][1:] + diffusion["args"])
    assert (parsed.host, parsed.port) == ("127.0.0.1", 8950)  # control: the agent only
    assert (parsed.serve_host, parsed.serve_port) == ("0.0.0.0", 8951)
    assert parsed.advertise_host == "$(POD_IP)"
    assert parsed.simulate is None
    assert diffusion["ports"] == [{"name": "diffusion", "containerPort": 8951, "protocol": "TCP"}]
    assert diffusion["readinessProbe"]["httpGet"] == {"path": "/health", "port": "diffusion"}
    assert diffusion["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "NVIDIA_VISIBLE_DEVICES" not in _env(diffusion)
    assert _env(diffusion)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    security = diffusion["securityContext"]
    assert security["runAsUser"] == 10004
    assert security["readOnlyRootFilesystem"] is True
    env = _env(diffusion)
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert _writable_volume(diffusion, env["HF_HOME"]) == "diffusion-cache"
    assert "emptyDir" in volumes[_writable_volume(diffusion, env["HOME"])]
    assert "emptyDir" in volumes[_writable_volume(diffusion, "/tmp")]
    assert (
        volumes["diffusion-cache"]["hostPath"]["path"] == "/var/lib/vram-operator/diffusion-cache"
    )
    init = daemonset["spec"]["template"]["spec"]["initContainers"][0]
    assert "/volumes/diffusion-cache=10004:10004" in init["args"]
    policy = _find(docs, "NetworkPolicy")
    serving = policy["spec"]["ingress"][0]
    assert sorted(p["port"] for p in serving["ports"]) == [8000, 8951, 11434]


def test_an_agent_with_the_charts_rights_waits_for_the_operators_gpunode(
    k8s_client: client.ApiClient, default_release: Release
) -> None:
    """The agent may not create a GPUNode (a node could make up others); the operator
    (--gpu-node-selector, from agent.nodeSelector) creates it, and the agent reports into it."""
    node = f"gpu-{secrets.token_hex(3)}"
    as_agent = client.ApiClient(
        configuration=k8s_client.configuration,
        header_name="Impersonate-User",
        header_value=default_release.service_account("agent"),
    )
    store = GPUNodeStore(as_agent, node)
    assert store.ensure() is None  # 403: not the agent's to create
    custom = client.CustomObjectsApi(k8s_client)
    with pytest.raises(client.ApiException) as refused:
        client.CustomObjectsApi(as_agent).create_cluster_custom_object(
            GROUP, VERSION, "gpunodes", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUNode",
                                         "metadata": {"name": node}, "spec": {}}
        )  # fmt: skip
    assert refused.value.status == 403
    as_operator = client.ApiClient(
        configuration=k8s_client.configuration,
        header_name="Impersonate-User",
        header_value=default_release.service_account("operator"),
    )
    try:
        asyncio.run(ClusterStore(as_operator).create_gpunode(node))
        found = store.ensure()
        assert found is not None
        assert found.metadata["name"] == node
        status = GPUNodeStatus(last_heartbeat_time=now(), agent_version="test", gpu_count=0)
        assert store.write_status(status) == 0
        stored: Any = custom.get_cluster_custom_object(GROUP, VERSION, "gpunodes", node)
        assert stored["status"]["agentVersion"] == "test"
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "gpunodes", node)
