"""The agent's storage against the real API server: status writes survive conflicts."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from vram_operator.api import GROUP, VERSION, GPUNodeStatus, now
from vram_operator.api.gpunode import PLURAL
from vram_operator.node_agent.storage import CONFLICT_RETRIES, GPUNodeStore, StoreError

pytestmark = pytest.mark.integration


class _Interfering:
    """Wraps the custom-objects API: after each of the first `times` reads, another writer
    changes the object's spec, so the agent's PUT at the read resourceVersion gets a real 409."""

    def __init__(self, api: client.CustomObjectsApi, times: int) -> None:
        self._api = api
        self.left = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str) -> Any:
        found = self._api.get_cluster_custom_object(group, version, plural, name)
        if self.left > 0:
            self.left -= 1
            touch = {"metadata": {"labels": {"touched": str(self.left)}}}
            self._api.patch_cluster_custom_object(group, version, plural, name, touch)
        return found


@pytest.fixture
def store(k8s_client: client.ApiClient, crds: None) -> Any:
    node = "store-conflicts"
    store = GPUNodeStore(k8s_client, node)
    store.ensure()
    yield store
    client.CustomObjectsApi(k8s_client).delete_cluster_custom_object(GROUP, VERSION, PLURAL, node)


def _status() -> GPUNodeStatus:
    return GPUNodeStatus(last_heartbeat_time=now(), agent_version="test", gpu_count=0)


def test_a_conflicting_status_write_is_retried_until_it_lands(store: GPUNodeStore) -> None:
    real = store._api
    store._api = _Interfering(real, times=3)  # type: ignore[assignment]
    status = _status()
    assert store.write_status(status) == 3  # three 409s from the API server, then success
    stored = store.get()
    assert stored is not None
    assert stored.status == status


def test_a_status_that_never_lands_is_an_error_not_a_loss(store: GPUNodeStore) -> None:
    store._api = _Interfering(store._api, times=CONFLICT_RETRIES)  # type: ignore[assignment]
    with pytest.raises(StoreError, match="kept conflicting"):
        store.write_status(_status())
