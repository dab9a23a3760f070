"""The operator's work queue and its per-GPUNode assignment writer, on a real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from vram_operator.api import Assignment, Backend
from vram_operator.operator.assignment_writer import AssignmentWriter
from vram_operator.operator.workqueue import WorkQueue

pytestmark = pytest.mark.unit


async def take(queue: WorkQueue[str]) -> str | None:
    try:
        async with asyncio.timeout(0.05):
            return await queue.get()
    except TimeoutError:
        return None


async def test_a_key_is_queued_once_and_handed_out_in_first_marked_order() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("b", "a", "b", "c", "a"):
        queue.add(key)
    assert len(queue) == 3
    assert [await take(queue) for _ in range(4)] == ["b", "a", "c", None]


async def test_urgent_keys_go_first_and_an_urgent_mark_moves_a_queued_key_forward() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    queue.add("b")
    queue.add("c", urgent=True)
    queue.add("b", urgent=True)
    queue.add("b")  # a plain mark does not demote it again
    assert [await take(queue) for _ in range(3)] == ["c", "b", "a"]


async def test_a_running_key_is_never_handed_out_twice_and_comes_back_once_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    assert await take(queue) == "a"
    queue.add("a")  # marked while it runs
    queue.add("a", urgent=True)
    assert await take(queue) is None
    queue.done("a")
    assert await take(queue) == "a"
    queue.done("a")
    assert await take(queue) is None


async def test_a_waiting_worker_wakes_when_a_key_arrives() -> None:
    queue: WorkQueue[str] = WorkQueue()
    waiter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.add("x")
    assert await asyncio.wait_for(waiter, 1) == "x"


def _assignment(name: str) -> Assignment:
    return Assignment(namespace="ns", name=name, model="m:1b", backend=Backend.OLLAMA)


class RecordingPatch:
    """Stands for the API server: records each patch, slowly, and can fail or say 'gone'."""

    def __init__(self, gone: frozenset[str] = frozenset(), fail: bool = False) -> None:
        self.patches: list[tuple[str, dict[str, Assignment | None]]] = []
        self.gone = gone
        self.fail = fail

    async def __call__(self, node: str, changes: Mapping[str, Assignment | None]) -> bool:
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("the API server is away")
        self.patches.append((node, dict(changes)))
        return node not in self.gone


async def test_changes_submitted_while_a_write_is_in_flight_share_the_next_patch() -> None:
    patch = RecordingPatch()
    writer = AssignmentWriter(patch)

    async def place(name: str) -> bool:
        future = writer.submit("n1", {f"ns.{name}": _assignment(name)})
        return await writer.wait("n1", future)

    results = await asyncio.gather(*(place(f"m{i}") for i in range(20)))
    assert all(results)
    assert len(patch.patches) < 20
    written = {k for _, changes in patch.patches for k in changes}
    assert written == {f"ns.m{i}" for i in range(20)}


async def test_the_last_decision_about_a_key_wins_within_a_batch() -> None:
    patch = RecordingPatch()
    writer = AssignmentWriter(patch)
    first = writer.submit("n1", {"ns.a": _assignment("a")})
    second = writer.submit("n1", {"ns.a": None})
    assert await writer.wait("n1", first)
    assert await writer.wait("n1", second)
    assert patch.patches == [("n1", {"ns.a": None})]


async def test_a_gone_node_answers_false_and_a_failed_write_raises_to_every_waiter() -> None:
    writer = AssignmentWriter(RecordingPatch(gone=frozenset({"n2"})))
    assert not await writer.wait("n2", writer.submit("n2", {"ns.a": None}))
    failing = AssignmentWriter(RecordingPatch(fail=True))
    futures = [failing.submit("n1", {f"ns.{i}": None}) for i in range(3)]
    for future in futures:
        with pytest.raises(RuntimeError, match="away"):
            await failing.wait("n1", future)


async def test_a_held_node_is_written_only_once_released() -> None:
    patch = RecordingPatch()
    writer = AssignmentWriter(patch)
    writer.hold("n1")
    withdrawn = writer.submit("n1", {"ns.victim": None})
    waiting = asyncio.ensure_future(writer.wait("n1", writer.submit("n1", {"ns.b": None})))
    await asyncio.sleep(0)
    assert patch.patches == []  # another caller's wait does not flush a held node
    await writer.release("n1")
    assert await writer.wait("n1", withdrawn)
    assert await waiting
    assert patch.patches == [("n1", {"ns.victim": None, "ns.b": None})]
