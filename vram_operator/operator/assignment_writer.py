"""Assignment changes to one GPUNode, coalesced into as few merge patches as possible.

Placements decide under one lock and hand their changes over at once (`submit`, in decision
order, so the last decision about a key wins as it did in memory); the writes happen after the
lock is released (`wait`). Whichever caller finds no write in flight for a node writes every
change submitted for it so far in one patch, then the ones that arrived meanwhile, and so on:
a burst of 50 placements on one node costs a handful of patches, not 50. No task is spawned,
so nothing outlives the callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from vram_operator.api import Assignment

Changes = Mapping[str, Assignment | None]
Patch = Callable[[str, Changes], Awaitable[bool]]
"""Write `changes` (key to assignment, None withdraws) to a node; False when it is gone."""


class AssignmentWriter:
    """Batches per-node assignment changes; one write per node in flight at a time."""

    def __init__(self, patch: Patch) -> None:
        self._patch = patch
        self._pending: dict[str, dict[str, Assignment | None]] = {}
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._writing: set[str] = set()
        self._held: dict[str, int] = {}

    def submit(self, node: str, changes: Changes) -> asyncio.Future[bool]:
        """Queue changes for `node`; the future says whether the node took them."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(node, {}).update(changes)
        self._waiters.setdefault(node, []).append(future)
        return future

    async def wait(self, node: str, future: asyncio.Future[bool]) -> bool:
        """Write what is pending for `node` unless another caller is doing so; then the result.

        Raises what the write raised (the changes in that batch are then not applied).
        """
        await self._drain(node)
        return await future

    def hold(self, node: str) -> None:
        """Write nothing more to `node` until `release`: what must be seen first (a displaced
        model's status) goes out before the withdrawal does. Call where changes are submitted,
        so no other caller flushes them in between."""
        self._held[node] = self._held.get(node, 0) + 1

    async def release(self, node: str) -> None:
        """Undo one `hold`; the last one writes what was submitted meanwhile."""
        count = self._held.get(node, 0) - 1
        if count > 0:
            self._held[node] = count
            return
        self._held.pop(node, None)
        await self._drain(node)

    async def _drain(self, node: str) -> None:
        if node in self._writing or node in self._held:
            return  # the writer in flight, or the last release, writes it
        self._writing.add(node)
        try:
            while self._pending.get(node) and node not in self._held:
                await self._write_batch(node)
        finally:
            self._writing.discard(node)
            if self._pending.get(node) and node not in self._held:
                # Cancelled mid-write: the callers still waiting must not hang.
                self._fail(node, RuntimeError("assignment writer stopped"))

    async def _write_batch(self, node: str) -> None:
        batch = self._pending.pop(node)
        waiters = self._waiters.pop(node, [])
        try:
            ok = await self._patch(node, batch)
        except BaseException as exc:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(ok)

    def _fail(self, node: str, exc: Exception) -> None:
        self._pending.pop(node, None)
        for waiter in self._waiters.pop(node, []):
            if not waiter.done():
                waiter.set_exception(exc)
