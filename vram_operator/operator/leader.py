"""Leader election through a coordination.k8s.io/v1 Lease, so two replicas never act at once.

The standby polls the Lease; the leader renews it. A leader that cannot renew before the
lease would expire stops acting (the process exits and Kubernetes restarts it as a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


class LeaderElector:
    """Acquire and keep one Lease; `lost` is set when leadership cannot be kept."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
    ) -> None:
        self._api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.lost = asyncio.Event()

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the Lease (True) or stop is set (False)."""
        announced = False
        while not stop.is_set():
            if await asyncio.to_thread(self._try_take):
                log.info("%s is the leader (Lease %s/%s)", self.identity, self.namespace, self.name)
                return True
            if not announced:
                log.info("%s is standing by: another replica holds the Lease", self.identity)
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.renew_seconds)
        return False

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew until stop; set `lost` (and return) when the Lease slips away."""
        last_renewed = asyncio.get_running_loop().time()
        while not stop.is_set():
            try:
                # Not wait_for: it spawns a task, which kopf would wait on when it shuts down.
                async with asyncio.timeout(self.renew_seconds):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            now = asyncio.get_running_loop().time()
            try:
                renewed = await asyncio.to_thread(self._try_take)
            except Exception as exc:  # API unreachable: keep trying until the lease expires
                log.warning("cannot renew the Lease: %s", exc)
                if now - last_renewed < self.lease_seconds:
                    continue
                renewed = False
            if renewed:
                last_renewed = now
                continue
            log.error("lost the Lease %s/%s", self.namespace, self.name)
            self.lost.set()
            return

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown so a standby takes over at once."""
        try:
            lease = await asyncio.to_thread(
                self._api.read_namespaced_lease, self.name, self.namespace
            )
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                await asyncio.to_thread(
                    self._api.replace_namespaced_lease, self.name, self.namespace, lease
                )
        except ApiException as exc:
            log.warning("could not release the Lease: %s", exc.reason)

    def _try_take(self) -> bool:
        """One attempt: create, renew or take over an expired Lease. Conflicts mean no."""
        now = dt.datetime.now(dt.UTC)
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.lease_seconds,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self._api.create_namespaced_lease(self.namespace, body)
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        lease.spec = spec
        holder = spec.holder_identity
        renewed = spec.renew_time
        duration = spec.lease_duration_seconds or self.lease_seconds
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder not in (None, "", self.identity) and not expired:
            return False
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.lease_seconds
        try:
            self._api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True
