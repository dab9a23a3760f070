"""One way for every component to reach the API server: a kubeconfig file or in-cluster."""

from __future__ import annotations

import os

from kubernetes import client, config


def api_client(kubeconfig: str | None = None, connections: int | None = None) -> client.ApiClient:
    """An ApiClient from --kubeconfig, $KUBECONFIG, or the pod's service account.

    `connections`: the most requests in flight at once (urllib3 keeps that many connections;
    the client's default is 5 per core, and a caller beyond that waits for one to free up).
    """
    configuration = client.Configuration()
    if connections is not None:
        configuration.connection_pool_maxsize = connections
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        return config.new_client_from_config(config_file=path, client_configuration=configuration)
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)
