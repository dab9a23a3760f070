"""One way for every component to reach the API server: a kubeconfig file or in-cluster."""

from __future__ import annotations

import os

from kubernetes import client, config


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient from --kubeconfig, $KUBECONFIG, or the pod's service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        return config.new_client_from_config(config_file=path)
    config.load_incluster_config()
    return client.ApiClient()
