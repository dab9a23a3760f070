"""Models and the cluster from a live cluster: ModelDeployments, GPUNodes and their Nodes.

The conversion (`from_objects`) is pure; `read_cluster` is the only function here that talks
to an API server, and the kubernetes client is imported only when it is called.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from vram_operator.api import GROUP, VERSION, GPUNode
from vram_operator.operator.placement import Taint

from .cluster import ClusterSpec, DescriptionError, NodeSpec, SimModel, models_from_documents


def from_objects(
    modeldeployments: Iterable[Mapping[str, Any]],
    gpunodes: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any]],
    base: ClusterSpec | None = None,
) -> tuple[ClusterSpec, list[SimModel]]:
    """The simulator's inputs from listed objects (as the API server returns them).

    Each GPUNode becomes a node with the GPUs its agent reports (a MIG parent left out, as
    placement does) and the host memory it reports; its Node (by name, in `nodes`: a dict
    with `labels` and `taints`) gives labels and taints. Speeds and settings come from `base`
    (a cluster file) where given, else the defaults.
    """
    models = models_from_documents(
        {**dict(obj), "kind": "ModelDeployment"} for obj in modeldeployments
    )
    specs: list[NodeSpec] = []
    template = base.nodes[0] if base and base.nodes else NodeSpec(name="template", gpu_bytes=(1,))
    for raw in gpunodes:
        gpunode = GPUNode.model_validate(raw)
        name = str(gpunode.metadata.get("name", ""))
        status = gpunode.status
        if not name or status is None or not status.gpus:
            continue
        parents = {g.parent_uuid for g in status.gpus if g.parent_uuid}
        units = sorted((g for g in status.gpus if g.uuid not in parents), key=lambda g: g.index)
        node = nodes.get(name) or {}
        host = status.host_memory.total_bytes if status.host_memory else template.host_bytes
        specs.append(
            replace(
                template,
                name=name,
                gpu_bytes=tuple(g.total_bytes for g in units),
                host_bytes=host,
                labels=dict(node.get("labels") or {}),
                taints=tuple(Taint.from_k8s(t) for t in node.get("taints") or ()),
            )
        )
    if not specs:
        raise DescriptionError("the cluster has no GPUNode reporting GPUs")
    cluster = replace(base, nodes=tuple(specs)) if base else ClusterSpec(nodes=tuple(specs))
    return cluster, models


def read_cluster(
    kubeconfig: str | None, base: ClusterSpec | None = None
) -> tuple[ClusterSpec, list[SimModel]]:
    """List ModelDeployments, GPUNodes and Nodes from the API server and convert them."""
    from kubernetes import client

    from vram_operator.kubeconfig import api_client

    api = api_client(kubeconfig)
    try:
        custom = client.CustomObjectsApi(api)
        mdeps: Any = custom.list_cluster_custom_object(GROUP, VERSION, "modeldeployments")
        gpunodes: Any = custom.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
        listed: Any = client.CoreV1Api(api).list_node()
        nodes: dict[str, dict[str, Any]] = {}
        for item in listed.items:
            taints = (item.spec.taints if item.spec else None) or []
            nodes[item.metadata.name] = {
                "labels": item.metadata.labels or {},
                "taints": [{"key": t.key, "value": t.value, "effect": t.effect} for t in taints],
            }
    finally:
        api.close()
    return from_objects(mdeps["items"], gpunodes["items"], nodes, base)
