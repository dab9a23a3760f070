"""The kopf handlers: thin. Each one hands its object to the OperatorService and returns.

Registered on a private registry (not kopf's global one) so importing this module has no
side effects and tests can run the operator in-process or as a subprocess alike. Every
handler is a coroutine: kopf runs plain functions in a thread pool, and the service's state
and work queue belong to the event loop (a mark from another thread wakes no worker).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from vram_operator.api import FINALIZER, GROUP, VERSION
from vram_operator.api.gpunode import PLURAL as GPUNODES
from vram_operator.api.modeldeployment import PLURAL as MODELDEPLOYMENTS
from vram_operator.api.modelpolicy import PLURAL as MODELPOLICIES

from .service import OperatorService

registry = kopf.OperatorRegistry()

MDEP = (GROUP, VERSION, MODELDEPLOYMENTS)
GPUN = (GROUP, VERSION, GPUNODES)
MPOL = (GROUP, VERSION, MODELPOLICIES)
RETRY_SECONDS = 30.0
"""The slow timer: a pending model is retried this often even if no capacity event arrives."""


def _service(memo: kopf.Memo) -> OperatorService:
    service: OperatorService = memo["service"]
    return service


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our finalizer name, progress kept in annotations (status belongs to us), quiet events."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """A kubeconfig when KUBECONFIG is set (local runs), else the pod's service account."""
    return kopf.login_with_kubeconfig(**kwargs) or kopf.login_with_service_account(**kwargs)


@kopf.on.resume(*MDEP, registry=registry)
@kopf.on.create(*MDEP, registry=registry)
@kopf.on.update(*MDEP, registry=registry)
async def deployment_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    _service(memo).mark(namespace or "", name)


@kopf.on.event(*MDEP, registry=registry)
async def deployment_seen(
    type: str | None, namespace: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    """Every version the watch brings (status too), so reconciles need not read it again."""
    _service(memo).observe_deployment(
        None if type == "DELETED" else dict(body), namespace or "", name
    )


@kopf.timer(*MDEP, interval=RETRY_SECONDS, initial_delay=RETRY_SECONDS, registry=registry)
async def deployment_timer(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    _service(memo).mark(namespace or "", name)


@kopf.on.delete(*MDEP, registry=registry)
async def deployment_deleted(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Withdraw the assignments; keep the finalizer until every agent has unloaded."""
    holding = await _service(memo).finalize(namespace or "", name)
    if holding:
        raise kopf.TemporaryError(f"waiting for {', '.join(holding)} to unload", delay=2)


@kopf.on.event(*GPUN, registry=registry)
async def gpunode_event(
    type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    raw = None if type == "DELETED" else dict(body)
    _service(memo).observe_gpunode(raw, name)


@kopf.on.event("", "v1", "nodes", registry=registry)
async def node_event(
    type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    if type == "DELETED":
        await _service(memo).node_deleted(name)
    else:
        _service(memo).observe_node(dict(body), name)


@kopf.on.event(*MPOL, registry=registry)
async def policy_event(
    type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    _service(memo).observe_policy(None if type == "DELETED" else dict(body), name)


@kopf.on.event("", "v1", "namespaces", registry=registry)
async def namespace_event(
    type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    _service(memo).observe_namespace(None if type == "DELETED" else dict(body), name)
