"""The gateway's read-only view of the cluster: ModelDeployments and GPUNodes, listed and then
watched, folded into routing targets.

Every gateway replica keeps its own copy; none writes to the API server. The sync `kubernetes`
client runs in one thread per kind: a list (which replaces everything known of that kind, so a
deletion missed while disconnected cannot linger), then a watch from the list's
resourceVersion, again from a fresh list when the watch expires (410) or breaks. Events are
handed to the event loop, where `ClusterView` rebuilds the targets and wakes the requests that
wait for a model. A timer re-evaluates heartbeats, since a node goes stale by time passing, not
by an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from vram_operator.api import GROUP, VERSION, GPUNode, ModelDeployment

from .routing import DEFAULT_HEARTBEAT_GRACE, Target, build_targets

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
KINDS = ("modeldeployments", "gpunodes")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key(raw: dict[str, Any]) -> str:
    meta = raw.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


class ClusterView:
    """Deployments and nodes by key; `targets` built from them; waiters woken on change."""

    def __init__(self, grace: float = DEFAULT_HEARTBEAT_GRACE, clock: Clock = _utcnow) -> None:
        self.grace = grace
        self._clock = clock
        self._deployments: dict[str, ModelDeployment] = {}
        self._nodes: dict[str, GPUNode] = {}
        self._synced: set[str] = set()
        self.targets: dict[str, Target] = {}
        self._changed = asyncio.Event()
        self.synced = asyncio.Event()
        self.generation = 0
        """Bumped on every change of the targets."""

    # ---- input -------------------------------------------------------------------------

    def replace(self, kind: str, items: Iterable[dict[str, Any]]) -> None:
        """Everything of `kind` the API server holds now (after a list)."""
        if kind == "modeldeployments":
            self._deployments = {}
        else:
            self._nodes = {}
        for item in items:
            self._put(kind, item)
        self._synced.add(kind)
        if len(self._synced) == len(KINDS):
            self.synced.set()
        self.refresh()

    def apply(self, kind: str, event: str, raw: dict[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        if event == "DELETED":
            store: dict[str, Any] = self._deployments if kind == "modeldeployments" else self._nodes
            store.pop(_key(raw), None)
        else:
            self._put(kind, raw)
        self.refresh()

    def _put(self, kind: str, raw: dict[str, Any]) -> None:
        try:
            if kind == "modeldeployments":
                self._deployments[_key(raw)] = ModelDeployment.model_validate(raw)
            else:
                self._nodes[_key(raw)] = GPUNode.model_validate(raw)
        except ValidationError as err:
            # An invalid spec is the operator's to report (Ready=False, InvalidSpec); here it
            # is simply not servable, and an earlier valid copy is dropped with it.
            log.debug("ignoring %s %s: %s", kind, _key(raw), err.errors()[:1])
            (self._deployments if kind == "modeldeployments" else self._nodes).pop(_key(raw), None)

    # ---- output ------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Rebuild the targets; wake waiters when they changed. True when they did."""
        targets = build_targets(
            self._deployments.values(), self._nodes.values(), self._clock(), self.grace
        )
        if targets == self.targets:
            return False
        self.targets = targets
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def changed(self, within: float) -> None:
        """Return when the targets change, or after `within` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), within)

    async def tick(self, interval: float, stop: asyncio.Event) -> None:
        """Re-evaluate heartbeats every `interval` seconds until `stop`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            self.refresh()


class Watcher:
    """List then watch one kind in a thread, handing results to a ClusterView on its loop."""

    def __init__(self, api_client: Any, view: ClusterView, loop: asyncio.AbstractEventLoop) -> None:
        from kubernetes import client

        self._api = client.CustomObjectsApi(api_client)
        self._view = view
        self._loop = loop
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind in KINDS:
            thread = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask the threads to end; a watch blocked on the network ends with the process (the
        threads are daemons), so stopping never waits out a watch's timeout."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=0.5)

    def _call(self, method: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us: we are stopping
            self._loop.call_soon_threadsafe(method, *args)

    def _run(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self._stop.is_set():
            try:
                listing: Any = self._api.list_cluster_custom_object(GROUP, VERSION, kind)
                self._call(self._view.replace, kind, listing.get("items") or [])
                version = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    watcher = watch.Watch()
                    try:
                        for event in watcher.stream(
                            self._api.list_cluster_custom_object,
                            GROUP,
                            VERSION,
                            kind,
                            resource_version=version,
                            timeout_seconds=30,
                        ):
                            if self._stop.is_set():
                                return
                            obj = event["object"]
                            if event["type"] == "ERROR":
                                raise _Expired
                            version = obj["metadata"]["resourceVersion"]
                            self._call(self._view.apply, kind, event["type"], obj)
                    finally:
                        watcher.stop()
            except _Expired:
                continue
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("watch of %s failed: %s", kind, exc.reason)
                    self._stop.wait(2)
            except Exception as exc:  # network errors: start again after a pause
                log.warning("watch of %s broke: %s", kind, exc)
                self._stop.wait(2)


class _Expired(Exception):
    """The watch's resourceVersion is gone: list again."""
