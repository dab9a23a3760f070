"""The generated CRDs against a real API server: they install with `vram-operator crds | kubectl
apply -f -`, accept every example, reject every bad manifest naming the field, show their printer
columns and field docs in kubectl, and keep status behind its subresource.

No operator or agent runs here: this is the contract between the schema the API server enforces
and the models the operator validates with, checked on what the server actually stores.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vram_operator.api import (
    GPU,
    GROUP,
    VERSION,
    Condition,
    GPUNodeSpec,
    GPUNodeStatus,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    SpecError,
    now,
    parse_spec,
)
from vram_operator.api.crd import custom_resource_definitions, openapi_schema
from vram_operator.api.modelpolicy import ModelPolicySpec

Kubectl = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BAD = yaml.safe_load((ROOT / "tests/data/bad-modeldeployments.yaml").read_text())
INVALID = yaml.safe_load((ROOT / "tests/data/invalid-specs.yaml").read_text())
MDEP = "modeldeployments"
GPUN = "gpunodes"
CLUSTER_SCOPED = {"GPUNode": GPUN, "ModelPolicy": "modelpolicies"}
# kubectl reads discovery and OpenAPI, which the API server updates a moment after a CRD is
# Established; commands that depend on them are retried for this long.
DISCOVERY_WAIT_S = 30.0


def _examples() -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        found.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


EXAMPLES = _examples()


@dataclass(frozen=True)
class Scratch:
    """A namespace and a name suffix of this module's own, so nothing collides with other tests."""

    namespace: str
    suffix: str

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"


@pytest.fixture(scope="module")
def scratch(k8s_client: client.ApiClient, crds: None) -> Iterator[Scratch]:
    """A fresh namespace; afterwards every object made here, and the namespace, is deleted.

    Objects are deleted one by one because no namespace controller runs to empty the namespace.
    """
    suffix = secrets.token_hex(3)
    made = Scratch(namespace=f"vram-crds-{suffix}", suffix=suffix)
    core = client.CoreV1Api(k8s_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=made.namespace)))
    try:
        yield made
    finally:
        custom = client.CustomObjectsApi(k8s_client)
        listing: Any = custom.list_namespaced_custom_object(GROUP, VERSION, made.namespace, MDEP)
        for item in listing["items"]:
            args = (GROUP, VERSION, made.namespace, MDEP, item["metadata"]["name"])
            with contextlib.suppress(ApiException):
                custom.patch_namespaced_custom_object(*args, {"metadata": {"finalizers": None}})
            with contextlib.suppress(ApiException):
                custom.delete_namespaced_custom_object(*args)
        for plural in CLUSTER_SCOPED.values():
            listed: Any = custom.list_cluster_custom_object(GROUP, VERSION, plural)
            for item in listed["items"]:
                if item["metadata"]["name"].endswith(f"-{suffix}"):
                    with contextlib.suppress(ApiException):
                        custom.delete_cluster_custom_object(
                            GROUP, VERSION, plural, item["metadata"]["name"]
                        )
        with contextlib.suppress(ApiException):
            core.delete_namespace(made.namespace)


@pytest.fixture
def custom(k8s_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(k8s_client)


def _ok(kubectl: Kubectl, *args: str, input: str | None = None) -> str:
    """kubectl's stdout, failing the test with its stderr when it exits non-zero."""
    done = kubectl(*args, input=input)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def _eventually_ok(kubectl: Kubectl, *args: str) -> str:
    """Like _ok, retried while kubectl's view of discovery/OpenAPI catches up with new CRDs."""
    deadline = time.monotonic() + DISCOVERY_WAIT_S
    while True:
        done = kubectl(*args)
        if done.returncode == 0:
            return done.stdout
        if time.monotonic() > deadline:
            pytest.fail(f"kubectl {' '.join(args)}: {done.stderr}")
        time.sleep(0.5)


def _words(text: str) -> str:
    """Text with its line wrapping undone, so a phrase is found wherever kubectl wrapped it."""
    return " ".join(text.split())


def _tables(text: str) -> dict[str, tuple[list[str], list[dict[str, str]]]]:
    """kubectl's tables (one per kind), keyed by the kind in their NAME cells.

    Cells are cut at the header's column offsets, so an empty cell reads as ''.
    """
    tables = {}
    for block in text.strip().split("\n\n"):
        header, *lines = block.splitlines()
        spans = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
        rows = []
        for line in lines:
            row = {}
            for index, (title, start) in enumerate(spans):
                end = spans[index + 1][1] if index + 1 < len(spans) else None
                row[title] = line[start:end].strip()
            rows.append(row)
        kind = rows[0]["NAME"].split("/")[0]
        tables[kind] = ([title for title, _ in spans], rows)
    return tables


def _contains(stored: Any, sent: Any) -> bool:
    """Whether `stored` holds everything in `sent` (the server may add defaults, never change)."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(
            key in stored and _contains(stored[key], value) for key, value in sent.items()
        )
    return bool(stored == sent)


def _names(path: str, field: str) -> bool:
    """Whether an error path is the field or lies inside it (a map key, a list item)."""
    return path == field or path.startswith((f"{field}.", f"{field}["))


def _says(message: str, field: str) -> bool:
    """Whether an API error message blames the field, as in `spec.vram: Invalid value: ...`."""
    return re.search(rf"(?<![\w.]){re.escape(field)}(?:[.\[][^\s:]*)?: ", message) is not None


def _rejection(error: ApiException) -> dict[str, Any]:
    """The Status object of a request the API server refused as invalid (422)."""
    assert error.status == 422, error
    assert error.body is not None
    return dict(json.loads(error.body))


def _manifest(name: str, namespace: str, spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _placed(doc: dict[str, Any], scratch: Scratch) -> dict[str, Any]:
    """An example moved into the scratch namespace (or, cluster-scoped, given a unique name)."""
    doc = copy.deepcopy(doc)
    if doc["kind"] in CLUSTER_SCOPED:
        doc["metadata"]["name"] = scratch.name(doc["metadata"]["name"])
    else:
        doc["metadata"]["namespace"] = scratch.namespace
    return doc


def _read(custom: client.CustomObjectsApi, doc: dict[str, Any]) -> dict[str, Any]:
    meta = doc["metadata"]
    found: Any
    if doc["kind"] in CLUSTER_SCOPED:
        plural = CLUSTER_SCOPED[doc["kind"]]
        found = custom.get_cluster_custom_object(GROUP, VERSION, plural, meta["name"])
    else:
        found = custom.get_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], MDEP, meta["name"]
        )
    return dict(found)


def test_crds_apply_from_the_cli_and_are_served_as_generated(kubectl: Kubectl) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "vram_operator", "crds"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    applied = _ok(kubectl, "apply", "-f", "-", input=printed.stdout)
    for crd in custom_resource_definitions():
        name = crd["metadata"]["name"]
        assert re.search(
            rf"customresourcedefinition\.apiextensions\.k8s\.io/{re.escape(name)} "
            r"(created|configured|unchanged)",
            applied,
        ), applied
        _ok(kubectl, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")

        served = json.loads(_ok(kubectl, "get", "crd", name, "-o", "json"))
        conditions = {c["type"]: c["status"] for c in served["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        assert served["status"]["acceptedNames"] == crd["spec"]["names"]
        # The server adds only the conversion default; schema, columns, names and subresources
        # come back exactly as generated, so nothing was pruned or rewritten on the way in.
        assert served["spec"].pop("conversion") == {"strategy": "None"}
        assert served["spec"] == crd["spec"]


@pytest.mark.parametrize(("path", "doc"), EXAMPLES, ids=[path for path, _ in EXAMPLES])
def test_example_is_accepted(
    kubectl: Kubectl,
    custom: client.CustomObjectsApi,
    scratch: Scratch,
    path: str,
    doc: dict[str, Any],
) -> None:
    placed = _placed(doc, scratch)
    text = yaml.safe_dump(placed)

    dry = _ok(kubectl, "apply", "--dry-run=server", "-f", "-", input=text)
    assert "(server dry run)" in dry
    with pytest.raises(ApiException) as missing:
        _read(custom, placed)
    assert missing.value.status == 404

    _ok(kubectl, "apply", "-f", "-", input=text)
    stored = _read(custom, placed)
    assert stored["metadata"]["generation"] == 1
    # status is a subresource: whatever a manifest carries there is dropped on create.
    assert "status" not in stored
    assert _contains(stored["spec"], doc["spec"])
    # The server's defaults and the operator's defaults agree on what the example means.
    if doc["kind"] == "GPUNode":
        assert GPUNodeSpec.model_validate(stored["spec"]) == GPUNodeSpec.model_validate(doc["spec"])
    elif doc["kind"] == "ModelPolicy":
        assert ModelPolicySpec.model_validate(stored["spec"]) == ModelPolicySpec.model_validate(
            doc["spec"]
        )
    else:
        assert parse_spec(stored["spec"]) == parse_spec(doc["spec"])
        assert stored["spec"]["priority"] == doc["spec"].get("priority", "normal")
        assert stored["spec"]["replicas"] == doc["spec"].get("replicas", 1)


def test_gpunode_example_status_round_trips_through_the_subresource(
    custom: client.CustomObjectsApi, scratch: Scratch
) -> None:
    (example,) = [doc for _, doc in EXAMPLES if doc["kind"] == "GPUNode"]
    name = scratch.name("status-round-trip")
    body = {**copy.deepcopy(example), "metadata": {"name": name}}
    created: Any = custom.create_cluster_custom_object(GROUP, VERSION, GPUN, body)
    assert "status" not in created

    custom.patch_cluster_custom_object_status(
        GROUP, VERSION, GPUN, name, {"status": example["status"]}
    )
    stored: Any = custom.get_cluster_custom_object(GROUP, VERSION, GPUN, name)
    assert stored["status"] == example["status"]
    assert stored["spec"] == example["spec"]
    assert stored["metadata"]["generation"] == created["metadata"]["generation"]
    parsed = GPUNodeStatus.model_validate(stored["status"])
    assert parsed.gpus[0].free_bytes == example["status"]["gpus"][0]["freeBytes"]


@pytest.mark.parametrize("case", BAD, ids=[case["case"] for case in BAD])
def test_bad_manifest_is_rejected_naming_the_field(
    kubectl: Kubectl, custom: client.CustomObjectsApi, scratch: Scratch, case: dict[str, Any]
) -> None:
    field = case["field"]
    # A name per row, so a row the server wrongly accepts cannot turn the next one into a 409.
    slug = re.sub(r"[^a-z0-9]+", "-", case["case"].lower()).strip("-")
    manifest = _manifest(scratch.name(f"bad-{slug}"), scratch.namespace, case["spec"])
    # Servers before 1.2x drop list indices from schema error paths (spec.tolerations.operator).
    names = {field, re.sub(r"\[\d+\]", "", field)}

    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(GROUP, VERSION, scratch.namespace, MDEP, manifest)
    status = _rejection(rejected.value)
    causes = [cause["field"] for cause in status["details"]["causes"]]
    assert any(_names(cause, name) for cause in causes for name in names), status
    assert any(_says(status["message"], name) for name in names), status["message"]

    # What a user sees: the server's message, not kubectl's own client-side check.
    shown = kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(manifest))
    assert shown.returncode != 0
    assert any(_says(shown.stderr, name) for name in names), shown.stderr
    assert "Traceback" not in shown.stderr


def test_manifest_without_spec_is_rejected(
    kubectl: Kubectl, custom: client.CustomObjectsApi, scratch: Scratch
) -> None:
    manifest = _manifest(scratch.name("no-spec"), scratch.namespace, None)
    del manifest["spec"]
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(GROUP, VERSION, scratch.namespace, MDEP, manifest)
    assert "spec: Required value" in _rejection(rejected.value)["message"]

    shown = kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(manifest))
    assert shown.returncode != 0
    assert "spec: Required value" in shown.stderr


def test_kubectl_get_vram_prints_the_printer_columns(
    kubectl: Kubectl, custom: client.CustomObjectsApi, scratch: Scratch
) -> None:
    mdep = scratch.name("columns")
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        scratch.namespace,
        MDEP,
        _manifest(
            mdep,
            scratch.namespace,
            {"model": "Qwen/Qwen2.5-0.5B-Instruct", "backend": "vllm", "priority": "high"},
        ),
    )
    loading = Condition(
        type="Ready",
        status="False",
        reason="Loading",
        message="1 of 2 replicas loaded",
        last_transition_time=now(),
    )
    mdep_status = ModelDeploymentStatus(
        observed_generation=1,
        conditions=[loading],
        ready_replicas=1,
        ready="1/2",
        vram="6Gi",
        vram_bytes=6 * 2**30,
        vram_source="spec",
        tiers="GPU,Disk",
    )
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, scratch.namespace, MDEP, mdep, {"status": mdep_status.to_k8s()}
    )

    node = scratch.name("columns")
    custom.create_cluster_custom_object(
        GROUP, VERSION, GPUN, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUNode",
                               "metadata": {"name": node}}
    )  # fmt: skip
    gpu = GPU(
        index=0,
        uuid="GPU-0",
        name="NVIDIA H100",
        total_bytes=80 * 2**30,
        used_bytes=2 * 2**30,
        free_bytes=78 * 2**30,
    )
    node_status = GPUNodeStatus(
        last_heartbeat_time=now(),
        gpus=[gpu, gpu.model_copy(update={"index": 1, "uuid": "GPU-1"})],
        gpu_count=2,
        free_vram="156Gi",
        model_count=3,
        memory_psi="0.25",
    )
    custom.patch_cluster_custom_object_status(
        GROUP, VERSION, GPUN, node, {"status": node_status.to_k8s()}
    )

    tables = _tables(_eventually_ok(kubectl, "get", "vram", "-A"))
    headers, rows = tables[f"modeldeployment.{GROUP}"]
    assert headers == [
        "NAMESPACE", "NAME", "BACKEND", "PRIORITY", "READY", "TIER", "VRAM", "STATUS", "AGE"
    ]  # fmt: skip
    (row,) = [r for r in rows if r["NAME"] == f"modeldeployment.{GROUP}/{mdep}"]
    assert row["NAMESPACE"] == scratch.namespace
    assert (row["BACKEND"], row["PRIORITY"]) == ("vllm", "high")
    assert (row["READY"], row["VRAM"], row["STATUS"]) == ("1/2", "6Gi", "Loading")
    assert row["TIER"] == "GPU,Disk"
    assert re.fullmatch(r"\d+s", row["AGE"]), row

    headers, rows = tables[f"gpunode.{GROUP}"]
    # kubectl prints an empty NAMESPACE column for a cluster-scoped table after a namespaced
    # one, and none once another cluster-scoped kind (ModelPolicy) comes first.
    assert [h for h in headers if h != "NAMESPACE"] == [
        "NAME", "GPUS", "FREE VRAM", "MODELS", "MEMORY PSI", "HEARTBEAT"
    ]  # fmt: skip
    (row,) = [r for r in rows if r["NAME"] == f"gpunode.{GROUP}/{node}"]
    assert (row["GPUS"], row["FREE VRAM"], row["MODELS"]) == ("2", "156Gi", "3")
    assert row["MEMORY PSI"] == "0.25"
    assert re.fullmatch(r"\d+s", row["HEARTBEAT"]), row

    headers, rows = tables[f"modelpolicy.{GROUP}"]  # the trusted policy the fixtures install
    assert [h for h in headers if h != "NAMESPACE"] == [
        "NAME",
        "QUOTA",
        "USED",
        "NAMESPACES",
        "AGE",
    ]


def test_short_names_list_the_objects(
    kubectl: Kubectl, custom: client.CustomObjectsApi, scratch: Scratch
) -> None:
    mdep = scratch.name("short")
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        scratch.namespace,
        MDEP,
        _manifest(mdep, scratch.namespace, {"model": "llama3.2:1b", "backend": "ollama"}),
    )
    node = scratch.name("short")
    custom.create_cluster_custom_object(
        GROUP, VERSION, GPUN, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUNode",
                               "metadata": {"name": node}}
    )  # fmt: skip

    listed = _eventually_ok(kubectl, "get", "mdep", "-n", scratch.namespace, "-o", "name")
    assert f"modeldeployment.{GROUP}/{mdep}" in listed.split()
    one = _eventually_ok(kubectl, "get", "gpun", node, "-o", "name")
    assert one.strip() == f"gpunode.{GROUP}/{node}"


@pytest.mark.parametrize(
    ("target", "model", "phrases"),
    [
        (
            "mdep.spec",
            ModelDeploymentSpec,
            ["on distinct nodes", "critical is never evicted", "<string> -required-"],
        ),
        ("gpun.status", GPUNodeStatus, ["Written only by the node's agent"]),
    ],
)
def test_kubectl_explain_describes_the_fields(
    kubectl: Kubectl, crds: None, target: str, model: type[Any], phrases: list[str]
) -> None:
    shown = _words(_eventually_ok(kubectl, "explain", target))
    for phrase in phrases:
        assert phrase in shown
    properties = openapi_schema(model)["properties"]
    for field, schema in properties.items():
        assert schema["description"], f"{field} has no docstring"
        assert f"{field} <" in shown, field
        assert _words(schema["description"]) in shown, field


def test_status_is_a_subresource(custom: client.CustomObjectsApi, scratch: Scratch) -> None:
    name = scratch.name("generation")
    args = (GROUP, VERSION, scratch.namespace, MDEP, name)
    spec = {"model": "llama3.2:1b", "backend": "ollama"}
    created: Any = custom.create_namespaced_custom_object(
        *args[:4], _manifest(name, scratch.namespace, spec)
    )
    assert created["metadata"]["generation"] == 1

    changed: Any = custom.patch_namespaced_custom_object(*args, {"spec": {"replicas": 2}})
    assert changed["metadata"]["generation"] == 2

    status = ModelDeploymentStatus(observed_generation=2, ready="0/2").to_k8s()
    # A write to the status subresource ignores spec and leaves the generation alone.
    written: Any = custom.patch_namespaced_custom_object_status(
        *args, {"spec": {"replicas": 5}, "status": status}
    )
    assert written["metadata"]["generation"] == 2
    assert written["spec"]["replicas"] == 2
    assert written["status"]["ready"] == "0/2"
    assert written["status"]["observedGeneration"] == 2

    # Status sent with the main resource is ignored; a metadata change bumps nothing either.
    ignored: Any = custom.patch_namespaced_custom_object(
        *args, {"metadata": {"labels": {"team": "ml"}}, "status": {"ready": "9/9"}}
    )
    assert ignored["metadata"]["labels"] == {"team": "ml"}
    assert ignored["metadata"]["generation"] == 2
    assert ignored["status"] == written["status"]
    stored: Any = custom.get_namespaced_custom_object(*args)
    assert stored["status"] == written["status"]


@pytest.mark.parametrize("case", INVALID, ids=[case["case"] for case in INVALID])
def test_accepted_but_invalid_spec_is_a_spec_error(
    custom: client.CustomObjectsApi,
    scratch: Scratch,
    case: dict[str, Any],
) -> None:
    spec, field, fragment = case["spec"], case["field"], case["message"]
    name = scratch.name(f"semantic-{secrets.token_hex(2)}")
    custom.create_namespaced_custom_object(
        GROUP, VERSION, scratch.namespace, MDEP, _manifest(name, scratch.namespace, spec)
    )
    stored: Any = custom.get_namespaced_custom_object(GROUP, VERSION, scratch.namespace, MDEP, name)
    # The operator validates what the server stored (defaults applied); only SpecError may come
    # out, naming the field and saying what is allowed.
    with pytest.raises(SpecError) as invalid:
        parse_spec(stored.get("spec"))
    assert invalid.value.field == field
    assert fragment in invalid.value.message
    assert str(invalid.value).startswith(f"{field}: ")
