"""Generate the CustomResourceDefinitions from the pydantic models, the single source of truth.

Pydantic emits JSON Schema; Kubernetes wants a structural OpenAPI v3 schema. The differences
handled here: no $ref, no titles, no `null` branches, no `const`, free-form maps marked with
x-kubernetes-preserve-unknown-fields, and empty-container defaults dropped so the API server
does not write `[]` into every object.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from . import gpunode, modeldeployment, modelpolicy
from .common import GROUP, VERSION

JSON = dict[str, Any]


def _resolve(node: Any, defs: JSON) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _resolve(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        branches = [b for b in any_of if b.get("type") != "null"]
        if len(branches) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return _resolve({**branches[0], **rest}, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


def _structural(node: JSON, in_status: bool) -> JSON:
    out: JSON = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "default" and (value is None or value == [] or value == {} or in_status):
            continue
        if key == "description" and isinstance(value, str):
            out[key] = " ".join(value.split())
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        out[key] = value
    if "properties" in out:
        out["properties"] = {
            name: _structural(schema, in_status) for name, schema in out["properties"].items()
        }
        out.setdefault("type", "object")
        if not out.get("required"):
            out.pop("required", None)
    if "items" in out:
        out["items"] = _structural(out["items"], in_status)
    additional = out.get("additionalProperties")
    if additional is True or additional == {}:
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
        out.setdefault("type", "object")
    elif additional is False:
        del out["additionalProperties"]
    elif isinstance(additional, dict):
        out["additionalProperties"] = _structural(additional, in_status)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "integer" and "format" not in out:
        out["format"] = "int64"
    if not out.get("type") and not out.get("x-kubernetes-int-or-string"):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def openapi_schema(model: type[BaseModel], in_status: bool = False) -> JSON:
    """The structural schema of one model, with every reference inlined."""
    raw = model.model_json_schema(by_alias=True)
    resolved = _resolve(raw, raw.get("$defs", {}))
    return _structural(resolved, in_status)


def _crd(
    *,
    kind: str,
    plural: str,
    short_name: str,
    scope: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    columns: list[JSON],
    spec_required: bool,
    scale: JSON | None = None,
) -> JSON:
    spec_schema = openapi_schema(spec_model)
    status_schema = openapi_schema(status_model, in_status=True)
    root: JSON = {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    if spec_required:
        root["required"] = ["spec"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["vram"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, **({"scale": scale} if scale else {})},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _column(
    name: str, path: str, kind: str = "string", description: str = "", priority: int = 0
) -> JSON:
    column: JSON = {"name": name, "type": kind, "jsonPath": path}
    if description:
        column["description"] = description
    if priority:
        column["priority"] = priority  # shown by kubectl get -o wide only
    return column


def custom_resource_definitions() -> list[JSON]:
    """The CRDs: ModelDeployment, GPUNode, ModelPolicy."""
    ready_reason = '.status.conditions[?(@.type=="Ready")].reason'
    return [
        _crd(
            kind=modeldeployment.KIND,
            plural=modeldeployment.PLURAL,
            short_name="mdep",
            scope="Namespaced",
            spec_model=modeldeployment.ModelDeploymentSpec,
            status_model=modeldeployment.ModelDeploymentStatus,
            description=modeldeployment.ModelDeployment.__doc__ or "",
            spec_required=True,
            # kubectl scale, HPA and KEDA write spec.replicas through this; HPA needs a
            # selector string in status (autoscaling/v1 Scale.status.selector).
            scale={
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
            columns=[
                _column("Backend", ".spec.backend", description="ollama, vllm or diffusers"),
                _column("Priority", ".spec.priority"),
                _column("Ready", ".status.ready", description="ready/desired replicas"),
                _column("Tier", ".status.tiers", description="each replica: GPU, HostRAM or Disk"),
                _column("VRAM", ".status.vram", description="VRAM per replica"),
                _column("Status", ready_reason, description="reason of the Ready condition"),
                _column("Age", ".metadata.creationTimestamp", "date"),
                _column(
                    "Desired",
                    ".status.desiredReplicas",
                    "integer",
                    "spec.replicas, or what autoscaling chose",
                    priority=1,
                ),
                _column("Assigned", ".status.replicas", "integer", "replicas placed", priority=1),
            ],
        ),
        _crd(
            kind=gpunode.KIND,
            plural=gpunode.PLURAL,
            short_name="gpun",
            scope="Cluster",
            spec_model=gpunode.GPUNodeSpec,
            status_model=gpunode.GPUNodeStatus,
            description=gpunode.GPUNode.__doc__ or "",
            spec_required=False,
            columns=[
                _column("GPUs", ".status.gpuCount", "integer"),
                _column("Free VRAM", ".status.freeVram"),
                _column("Models", ".status.modelCount", "integer"),
                _column("Memory PSI", ".status.memoryPsi", description="PSI some avg10"),
                _column("Heartbeat", ".status.lastHeartbeatTime", "date"),
            ],
        ),
        _crd(
            kind=modelpolicy.KIND,
            plural=modelpolicy.PLURAL,
            short_name="mpol",
            scope="Cluster",
            spec_model=modelpolicy.ModelPolicySpec,
            status_model=modelpolicy.ModelPolicyStatus,
            description=modelpolicy.ModelPolicy.__doc__ or "",
            spec_required=False,
            columns=[
                _column("Quota", ".spec.vramQuota", description="VRAM per namespace"),
                _column("Used", ".status.used", description="the largest namespace's usage of it"),
                _column("Namespaces", ".status.namespaceCount", "integer"),
                _column("Age", ".metadata.creationTimestamp", "date"),
            ],
        ),
    ]


def render_yaml() -> str:
    """The exact text of `vram-operator crds` and of the files in crds/."""
    return yaml.safe_dump_all(custom_resource_definitions(), sort_keys=False, width=100)
