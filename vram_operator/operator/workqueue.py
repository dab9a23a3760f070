"""The operator's queue of ModelDeployments to reconcile, as client-go's workqueue keeps it.

A key is queued at most once however often it is marked; a key being reconciled is never
handed to a second worker, and marking it meanwhile queues it again once the first is done.
Urgent keys (a status that must follow a residency change at once) go before the rest; the
rest go in the order they were first marked, so a burst is worked through oldest first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Deduplicating, two-level FIFO of keys for a pool of workers on one event loop."""

    def __init__(self) -> None:
        self._urgent: dict[K, None] = {}
        self._normal: dict[K, None] = {}
        self._running: set[K] = set()
        self._again: dict[K, bool] = {}
        self._ready = asyncio.Event()

    def add(self, key: K, urgent: bool = False) -> None:
        """Queue `key`; an urgent mark moves an already queued key to the front."""
        if key in self._running:
            self._again[key] = self._again.get(key, False) or urgent
            return
        if urgent:
            self._normal.pop(key, None)
            self._urgent[key] = None
        elif key not in self._urgent:
            self._normal.setdefault(key, None)
        self._ready.set()

    async def get(self) -> K:
        """The next key, now marked running; waits for one. Cancelling the wait takes none."""
        while True:
            for queue in (self._urgent, self._normal):
                if queue:
                    key = next(iter(queue))
                    del queue[key]  # no await from here on: a cancel cannot lose the key
                    self._running.add(key)
                    return key
            self._ready.clear()
            await self._ready.wait()

    def done(self, key: K) -> None:
        """`key`'s reconcile finished; queue it again if it was marked meanwhile."""
        self._running.discard(key)
        if key in self._again:
            self.add(key, self._again.pop(key))

    def __len__(self) -> int:
        """Keys waiting (not counting those being reconciled)."""
        return len(self._urgent) + len(self._normal)
