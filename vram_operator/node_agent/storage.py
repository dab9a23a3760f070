"""Every Kubernetes call the agent makes, on its own GPUNode only.

The sync `kubernetes` client runs in worker threads; the watch uses a field selector on
metadata.name so the agent never receives other nodes' objects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from vram_operator.api import GROUP, VERSION, GPUNode, GPUNodeStatus
from vram_operator.api.gpunode import KIND, PLURAL

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 10


class StoreError(Exception):
    """The API server did not take a write; the agent carries on and writes again later."""


class GPUNodeStore:
    """Reads, creates, watches and writes the status of one GPUNode."""

    def __init__(self, api_client: client.ApiClient, node: str) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self.node = node
        self._last: dict[str, Any] | None = None
        """The newest GPUNode seen (a write's answer or a watch event), to write on top of."""

    def get(self) -> GPUNode | None:
        try:
            raw = self._api.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.node)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return GPUNode.model_validate(raw)

    def ensure(self, labels: dict[str, str] | None = None) -> GPUNode | None:
        """Return the GPUNode, creating an empty one when the cluster has none for this node;
        None when it is missing and not ours to create.

        With the chart the agent may not create GPUNodes (a node could otherwise make up
        others): the operator creates one per selected Node, and the agent waits for it.
        Where its credentials may create (a local run, an older chart) it creates its own.
        """
        existing = self.get()
        if existing is not None:
            return existing
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": self.node, "labels": labels or {}},
            "spec": {"assignments": {}},
        }
        try:
            raw = self._api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        except ApiException as exc:
            if exc.status == 403:
                return None
            if exc.status != 409:  # created by someone else meanwhile: fine
                raise
            raw = self._api.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.node)
        log.info("created GPUNode %s", self.node)
        return GPUNode.model_validate(raw)

    def write_status(self, status: GPUNodeStatus) -> int:
        """Replace the status through the status subresource; retry on conflict.

        The agent owns the whole status, so it PUTs it at the resourceVersion it just read;
        a 409 (the operator changed spec meanwhile) re-reads and tries again. A GPUNode deleted
        under the agent is created again, so the node keeps a place to report into. Returns
        the number of attempts that did not land; raises StoreError when none did (or the
        GPUNode is gone and only the operator may create it).
        """
        body_status = status.to_k8s()
        try:
            for attempt in range(CONFLICT_RETRIES):
                if self._replace_status(body_status):
                    return attempt
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            reason = exc.reason if isinstance(exc, ApiException) else exc
            raise StoreError(f"cannot write the status of GPUNode {self.node}: {reason}") from exc
        raise StoreError(f"the status of GPUNode {self.node} kept conflicting")

    def _replace_status(self, body_status: dict[str, Any]) -> bool:
        """One read-modify-write of the status; False when it must be tried again.

        The read is skipped when the object our last write returned is at hand: most reports
        follow a report, and a spec the operator changed meanwhile answers 409, which reads.
        """
        try:
            current = self._last or self._api.get_cluster_custom_object(
                GROUP, VERSION, PLURAL, self.node
            )
            if not isinstance(current, dict):
                raise TypeError(f"GPUNode {self.node} read back as {type(current).__name__}")
            current["status"] = body_status
            written = self._api.replace_cluster_custom_object_status(
                GROUP, VERSION, PLURAL, self.node, current
            )
            self._last = written if isinstance(written, dict) else None
        except ApiException as exc:
            self._last = None
            if exc.status == 409:
                log.debug("status conflict on %s, retrying", self.node)
                return False
            if exc.status == 404:
                log.warning("GPUNode %s was deleted; creating it again", self.node)
                if self.ensure() is None:
                    raise StoreError(
                        f"GPUNode {self.node} is gone and this agent may not create it: "
                        "waiting for the operator to create it again"
                    ) from exc
                return False
            raise
        return True

    def watch(self, on_change: Callable[[GPUNode | None], None], stop: threading.Event) -> None:
        """Block, calling on_change for every change to this node's GPUNode until stop is set.

        Runs in a thread. A watch that expires or loses its resourceVersion starts again
        from a fresh list, so no event is lost.
        """
        resource_version: str | None = None
        while not stop.is_set():
            watcher = watch.Watch()
            kwargs: dict[str, Any] = {
                "field_selector": f"metadata.name={self.node}",
                "timeout_seconds": 5,
            }
            if resource_version is not None:
                kwargs["resource_version"] = resource_version
            try:
                for event in watcher.stream(
                    self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL, **kwargs
                ):
                    if stop.is_set():
                        break
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        resource_version = None
                        break
                    resource_version = obj["metadata"]["resourceVersion"]
                    self._last = None if event["type"] == "DELETED" else obj
                    on_change(None if event["type"] == "DELETED" else GPUNode.model_validate(obj))
            except ApiException as exc:
                if exc.status == 410:
                    resource_version = None
                    continue
                log.warning("watch of GPUNode %s failed: %s", self.node, exc.reason)
                stop.wait(2)
            except Exception as exc:  # network errors: log and start again after a pause
                log.warning("watch of GPUNode %s broke: %s", self.node, exc)
                stop.wait(2)
            finally:
                watcher.stop()
