"""Every Kubernetes call the operator makes. Blocking client calls run in worker threads.

Assignments are merge-patched one key at a time, so two placements on the same GPUNode never
overwrite each other; ModelDeployment status goes through the status subresource.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vram_operator.api import (
    GROUP,
    VERSION,
    Assignment,
    Condition,
    GPUNode,
    ModelDeploymentStatus,
)
from vram_operator.api.gpunode import KIND as GPUNODE_KIND
from vram_operator.api.gpunode import PLURAL as GPUNODES
from vram_operator.api.modeldeployment import PLURAL as MODELDEPLOYMENTS
from vram_operator.api.modelpolicy import PLURAL as MODELPOLICIES
from vram_operator.api.modelpolicy import ModelPolicy, ModelPolicyStatus

log = logging.getLogger(__name__)


EVENTS = 1000
"""Events queued for the senders at most; more are dropped (a burst's transitions fit)."""


class Store(Protocol):
    """What the operator's service needs from the cluster; `ClusterStore` is the one real
    implementation, and the unit tests run the service over an in-memory one."""

    async def list_gpunodes(self) -> list[GPUNode]: ...
    async def list_nodes(self) -> dict[str, client.V1Node]: ...
    async def list_deployments(self) -> list[dict[str, Any]]: ...
    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def get_gpunode(self, node: str) -> GPUNode | None: ...
    async def set_assignments(
        self, node: str, changes: Mapping[str, Assignment | None]
    ) -> bool: ...
    async def set_gpunode_conditions(self, node: str, conditions: Sequence[Condition]) -> None: ...
    async def create_gpunode(self, node: str) -> None: ...
    async def delete_gpunode(self, node: str) -> None: ...
    async def write_status(
        self, namespace: str, name: str, status: ModelDeploymentStatus
    ) -> dict[str, Any] | None: ...
    async def post_event(
        self, body: dict[str, Any], type_: str, reason: str, message: str
    ) -> None: ...
    async def list_policies(self) -> list[ModelPolicy]: ...
    async def list_namespaces(self) -> dict[str, dict[str, str]]: ...
    async def write_policy_status(self, name: str, status: ModelPolicyStatus) -> None: ...


class ClusterStore:
    """GPUNodes, Nodes and ModelDeployments as the operator reads and writes them."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._events: asyncio.Queue[tuple[str, client.CoreV1Event]] = asyncio.Queue(EVENTS)

    async def list_gpunodes(self) -> list[GPUNode]:
        raw = await asyncio.to_thread(
            self._custom.list_cluster_custom_object, GROUP, VERSION, GPUNODES
        )
        return [GPUNode.model_validate(item) for item in _as_dict(raw).get("items", [])]

    async def list_nodes(self) -> dict[str, client.V1Node]:
        """Node objects by name (labels for nodeSelector, taints for tolerations)."""
        nodes = await asyncio.to_thread(self._core.list_node)
        return {
            node.metadata.name: node
            for node in nodes.items
            if node.metadata is not None and node.metadata.name
        }

    async def set_assignments(self, node: str, changes: Mapping[str, Assignment | None]) -> bool:
        """Add, replace or (None) withdraw assignments in one merge patch; False when the
        GPUNode is gone. Keys not named are left alone, so placements never overwrite each other.
        """
        values = {key: None if a is None else a.to_k8s() for key, a in changes.items()}
        body = {"spec": {"assignments": values}}
        try:
            await asyncio.to_thread(
                self._custom.patch_cluster_custom_object, GROUP, VERSION, GPUNODES, node, body
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def get_gpunode(self, node: str) -> GPUNode | None:
        try:
            raw = await asyncio.to_thread(
                self._custom.get_cluster_custom_object, GROUP, VERSION, GPUNODES, node
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return GPUNode.model_validate(_as_dict(raw))

    async def list_policies(self) -> list[ModelPolicy]:
        """Every ModelPolicy; one that does not validate is skipped with a warning (the API
        server's schema makes that rare), so a bad policy never stops the operator."""
        raw = await asyncio.to_thread(
            self._custom.list_cluster_custom_object, GROUP, VERSION, MODELPOLICIES
        )
        policies = []
        for item in _as_dict(raw).get("items", []):
            try:
                policies.append(ModelPolicy.model_validate(item))
            except ValueError as exc:
                log.warning("ignoring ModelPolicy %s: %s", item["metadata"]["name"], exc)
        return policies

    async def list_namespaces(self) -> dict[str, dict[str, str]]:
        """Namespace name to labels, which ModelPolicies select by."""
        found = await asyncio.to_thread(self._core.list_namespace)
        return {
            ns.metadata.name: dict(ns.metadata.labels or {})
            for ns in found.items
            if ns.metadata is not None and ns.metadata.name
        }

    async def write_policy_status(self, name: str, status: ModelPolicyStatus) -> None:
        """Patch a ModelPolicy's status (usage against its quota); a deleted one is left."""
        try:
            await asyncio.to_thread(
                self._custom.patch_cluster_custom_object_status,
                GROUP,
                VERSION,
                MODELPOLICIES,
                name,
                {"status": status.to_k8s()},
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def set_gpunode_conditions(self, node: str, conditions: Sequence[Condition]) -> None:
        """Replace a GPUNode's status conditions (the operator's one write there: a node whose
        agent stopped reporting is marked Ready=Unknown, as the node lifecycle controller
        does for Nodes). A GPUNode that is gone is left alone."""
        body = {"status": {"conditions": [c.to_k8s() for c in conditions]}}
        try:
            await asyncio.to_thread(
                self._custom.patch_cluster_custom_object_status,
                GROUP,
                VERSION,
                GPUNODES,
                node,
                body,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def create_gpunode(self, node: str) -> None:
        """An empty GPUNode for `node`'s agent to report into (none exists yet)."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": GPUNODE_KIND,
            "metadata": {"name": node},
            "spec": {"assignments": {}},
        }
        try:
            await asyncio.to_thread(
                self._custom.create_cluster_custom_object, GROUP, VERSION, GPUNODES, body
            )
        except ApiException as exc:
            if exc.status != 409:  # there already: what we wanted
                raise

    async def delete_gpunode(self, node: str) -> None:
        try:
            await asyncio.to_thread(
                self._custom.delete_cluster_custom_object, GROUP, VERSION, GPUNODES, node
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            raw = await asyncio.to_thread(
                self._custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                MODELDEPLOYMENTS,
                name,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _as_dict(raw)

    async def list_deployments(self) -> list[dict[str, Any]]:
        raw = await asyncio.to_thread(
            self._custom.list_cluster_custom_object, GROUP, VERSION, MODELDEPLOYMENTS
        )
        items: list[dict[str, Any]] = _as_dict(raw).get("items", [])
        return items

    async def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Queue a core/v1 Event on the object, as `kubectl describe` shows them.

        Best effort and off the reconcile's path, as client-go's recorder sends them: the
        senders (`send_events`) post it; a full queue drops it with a warning. Waiting for
        each Event in the reconcile put one more API round trip per transition in front of
        every object still queued behind it.
        """
        meta = body["metadata"]
        namespace = meta.get("namespace") or "default"
        stamp = dt.datetime.now(dt.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version=body.get("apiVersion"),
                kind=body.get("kind"),
                name=meta["name"],
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            first_timestamp=stamp,
            last_timestamp=stamp,
            count=1,
            source=client.V1EventSource(component="vram-operator"),
            reporting_component="vram.dev/operator",
        )
        try:
            self._events.put_nowait((namespace, event))
        except asyncio.QueueFull:
            log.warning("dropped event %s on %s: %d events queued", reason, meta["name"], EVENTS)

    async def send_events(self) -> None:
        """Post queued Events until cancelled; run a few of these beside the workers."""
        while True:
            namespace, event = await self._events.get()
            try:
                await asyncio.to_thread(self._core.create_namespaced_event, namespace, event)
            except ApiException as exc:
                log.warning(
                    "could not record event %s on %s: %s",
                    event.reason,
                    event.involved_object.name,
                    exc.reason,
                )
            except Exception:  # a connection error: an Event is not worth a dead sender
                log.exception("could not record event %s", event.reason)

    async def write_status(
        self, namespace: str, name: str, status: ModelDeploymentStatus
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource; the object as written, None when it is gone."""
        body = {"status": _with_nulls(status.to_k8s(), ModelDeploymentStatus)}
        try:
            written = await asyncio.to_thread(
                self._custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                MODELDEPLOYMENTS,
                name,
                body,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _as_dict(written)


def _with_nulls(dumped: dict[str, Any], model: type[ModelDeploymentStatus]) -> dict[str, Any]:
    """A merge patch keeps fields it does not mention; name every absent one as null."""
    fields = {info.alias or name for name, info in model.model_fields.items()}
    return {field: dumped.get(field) for field in fields}


def _as_dict(raw: object) -> dict[str, Any]:
    """The custom-objects API returns untyped JSON; anything but an object is a server bug."""
    if not isinstance(raw, dict):
        raise TypeError(f"expected a JSON object from the API server, got {type(raw).__name__}")
    return raw
