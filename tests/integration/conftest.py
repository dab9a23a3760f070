"""Fixtures for tests that talk to a real kube-apiserver (see vram_operator.localcluster).

One control plane serves the whole session: a warm start costs seconds, and
tests keep to their own namespaces or object names instead of restarting it.
With ``VRAM_USE_EXISTING_CLUSTER=true`` and ``KUBECONFIG`` set, the tests run
against that cluster instead.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from vram_operator.api import GROUP, VERSION
from vram_operator.localcluster import BinariesNotFoundError, LocalControlPlane
from vram_operator.simulation.cluster import (
    SimulatedCluster,
    install_crds,
    install_trusted_policy,
)

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def control_plane() -> Iterator[LocalControlPlane]:
    """A started control plane for the session; stopped (processes and temp dir) at the end."""
    cp = LocalControlPlane()
    try:
        cp.start()
    except BinariesNotFoundError as err:
        # Fail rather than skip: a skipped suite would hide a missing install step in CI.
        pytest.fail(str(err), pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def k8s_client(control_plane: LocalControlPlane) -> Iterator[client.ApiClient]:
    """A kubernetes ApiClient for the control plane, closed at teardown (no leaked sockets)."""
    assert control_plane.kubeconfig is not None
    api = config.new_client_from_config(  # type: ignore[no-untyped-call,unused-ignore]
        config_file=str(control_plane.kubeconfig)
    )
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def kubectl(control_plane: LocalControlPlane) -> Kubectl:
    """``kubectl(*args, input=None, check=False, timeout=60)`` against the control plane.

    Returns the CompletedProcess with text stdout/stderr; ``--kubeconfig`` is set.
    """
    return control_plane.kubectl


@pytest.fixture(scope="session")
def crds(k8s_client: client.ApiClient) -> None:
    """The generated CRDs, installed once and Established."""
    install_crds(k8s_client)
    install_trusted_policy(k8s_client)


@pytest.fixture
def sim_cluster(
    control_plane: LocalControlPlane,
    k8s_client: client.ApiClient,
    crds: None,
    tmp_path: Path,
) -> Iterator[SimulatedCluster]:
    """An empty simulated cluster: add nodes and operators to it; everything is removed after.

    Teardown stops every process it started and deletes what the test left behind
    (ModelDeployments with their finalizers, GPUNodes, Node objects, Leases), so tests that
    share the session's control plane do not see each other's objects.
    """
    assert control_plane.kubeconfig is not None
    cluster = SimulatedCluster(k8s_client, str(control_plane.kubeconfig), tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()
        wipe_cluster(k8s_client)


def wipe_cluster(api: client.ApiClient) -> None:
    """Delete every vram.dev object, Node and Lease the tests may have created."""
    custom = client.CustomObjectsApi(api)
    listing: Any = custom.list_cluster_custom_object(GROUP, VERSION, "modeldeployments")
    for item in listing["items"]:
        meta = item["metadata"]
        args = (GROUP, VERSION, meta["namespace"], "modeldeployments", meta["name"])
        with contextlib.suppress(ApiException):
            custom.patch_namespaced_custom_object(*args, {"metadata": {"finalizers": None}})
        with contextlib.suppress(ApiException):
            custom.delete_namespaced_custom_object(*args)
    gpunodes: Any = custom.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
    for item in gpunodes["items"]:
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(
                GROUP, VERSION, "gpunodes", item["metadata"]["name"]
            )
    core = client.CoreV1Api(api)
    nodes: Any = core.list_node()
    for node in nodes.items:
        with contextlib.suppress(ApiException):
            core.delete_node(node.metadata.name)
    coordination = client.CoordinationV1Api(api)
    leases: Any = coordination.list_lease_for_all_namespaces()
    for lease in leases.items:
        if lease.metadata.name == "vram-operator":
            with contextlib.suppress(ApiException):
                coordination.delete_namespaced_lease(lease.metadata.name, lease.metadata.namespace)
