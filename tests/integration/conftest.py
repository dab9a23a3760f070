"""Fixtures for tests that talk to a real kube-apiserver (see vram_operator.localcluster).

One control plane serves the whole session: a warm start costs seconds, and
tests keep to their own namespaces or object names instead of restarting it.
With ``VRAM_USE_EXISTING_CLUSTER=true`` and ``KUBECONFIG`` set, the tests run
against that cluster instead.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client, config

from vram_operator.localcluster import BinariesNotFoundError, LocalControlPlane

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
