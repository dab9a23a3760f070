"""Swap-out to host RAM as pure decisions: which victims of a swap-out for demand are parked
(vLLM sleep mode, the node's host RAM), a parked replica charged nowhere on the GPU, woken on
its own GPU when asked for again, withdrawn when not needed, and its status."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from vram_operator.api import GPU, Assignment, Backend, ModelState, ResidentModel
from vram_operator.api.modeldeployment import VLLMOptions, parse_spec
from vram_operator.operator.folding import fold_status
from vram_operator.operator.placement import (
    Choice,
    NodeView,
    PlacementConfig,
    PlacementRequest,
    Victim,
    place,
    plan_parking,
)

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
GI = 2**30
CONFIG = PlacementConfig(min_residency_seconds=30)
SETTLED = {"ns.a": T0 - dt.timedelta(seconds=50), "ns.b": T0 - dt.timedelta(seconds=40)}


def gpu(total: int = 24 * GI, used: int = 0, uuid: str = "GPU-0") -> GPU:
    return GPU(
        index=0,
        uuid=uuid,
        name="Simulated",
        total_bytes=total,
        used_bytes=used,
        free_bytes=total - used,
    )


def vllm(
    name: str,
    *,
    parked: bool = False,
    sleep_mode: bool | None = True,
    vram: int = 10 * GI,
    backend: Backend = Backend.VLLM,
) -> Assignment:
    return Assignment(
        namespace="ns",
        name=name,
        model=f"org/{name}",
        backend=backend,
        gpu_uuid="GPU-0",
        vram_bytes=vram,
        vllm=None if sleep_mode is None else VLLMOptions(sleep_mode=sleep_mode),
        parked=parked,
    )


def report(name: str, state: ModelState = ModelState.LOADED, vram: int = 10 * GI) -> ResidentModel:
    return ResidentModel(
        key=f"ns.{name}",
        model=f"org/{name}",
        backend=Backend.VLLM,
        gpu_uuid="GPU-0",
        state=state,
        vram_bytes=vram,
    )


def node(
    assignments: list[Assignment],
    reports: list[ResidentModel],
    *,
    host: int | None = 64 * GI,
    pressure: bool = False,
    used: int = 0,
    name: str = "n1",
) -> NodeView:
    return NodeView(
        name=name,
        heartbeat=T0,
        gpus=(gpu(used=used),),
        assignments={f"ns.{a.name}": a for a in assignments},
        resident=tuple(reports),
        host_available_bytes=host,
        host_under_pressure=pressure,
    )


def request(name: str, *, demanded: bool = True, replicas: int = 1, **extra: object) -> Any:
    return PlacementRequest(
        key=f"ns.{name}",
        vram_bytes=10 * GI,
        backend=Backend.OLLAMA,
        demanded=demanded,
        replicas=replicas,
        **extra,  # type: ignore[arg-type]
    )


# ---- park or unload ----------------------------------------------------------------------------


def test_a_sleep_mode_vllm_victim_is_parked_where_host_ram_takes_it() -> None:
    view = node([vllm("a"), vllm("b")], [report("a"), report("b")], host=64 * GI)
    assert plan_parking([Victim("n1", "ns.a")], [view]) == {Victim("n1", "ns.a")}


def test_victims_share_their_nodes_host_ram_and_the_rest_are_unloaded() -> None:
    view = node([vllm("a"), vllm("b")], [report("a"), report("b")], host=15 * GI)
    victims = [Victim("n1", "ns.a"), Victim("n1", "ns.b")]
    assert plan_parking(victims, [view]) == {Victim("n1", "ns.a")}


@pytest.mark.parametrize(
    "why",
    ["host RAM too small", "host under pressure", "no sleep mode", "no vllm options", "ollama"],
)
def test_a_victim_is_unloaded_where_it_cannot_be_parked(why: str) -> None:
    a = {
        "no sleep mode": vllm("a", sleep_mode=False),
        "no vllm options": vllm("a", sleep_mode=None),
        "ollama": vllm("a", sleep_mode=None, backend=Backend.OLLAMA),
    }.get(why, vllm("a"))
    view = node(
        [a],
        [report("a")],
        host=5 * GI if why == "host RAM too small" else 64 * GI,
        pressure=why == "host under pressure",
    )
    assert plan_parking([Victim("n1", "ns.a")], [view]) == frozenset()


def test_only_a_loaded_victim_is_parked() -> None:
    view = node([vllm("a")], [report("a", ModelState.LOADING)])
    assert plan_parking([Victim("n1", "ns.a")], [view]) == frozenset()
    assert plan_parking([Victim("n1", "ns.a")], [node([vllm("a")], [])]) == frozenset()


def test_host_room_counts_what_parked_replicas_not_asleep_yet_are_about_to_take() -> None:
    going = node([vllm("a", parked=True)], [report("a", ModelState.LOADED)], host=30 * GI)
    assert going.host_room() == 20 * GI
    asleep = node([vllm("a", parked=True)], [report("a", ModelState.SLEEPING)], host=30 * GI)
    assert asleep.host_room() == 30 * GI  # MemAvailable already shows it
    assert node([], [], host=None).host_room() is None
    assert node([], [], pressure=True).host_room() == 0


# ---- the GPU budget ----------------------------------------------------------------------------


def test_a_parked_replica_is_charged_nowhere_on_the_gpu_but_its_residue_is_used_memory() -> None:
    residue = GI // 2
    view = node(
        [vllm("a", parked=True), vllm("b")],
        [report("a", ModelState.SLEEPING), report("b")],
        used=10 * GI + residue,
    )
    (budget,) = view.budgets()
    assert set(budget.holds) == {"ns.b"}
    assert budget.room == 24 * GI - residue


# ---- waking ------------------------------------------------------------------------------------


def test_a_parked_replica_is_woken_on_its_own_gpu_when_that_gpu_has_room() -> None:
    sleeping = node([vllm("a", parked=True)], [report("a", ModelState.SLEEPING)])
    other = node([], [], name="n0")  # as free, and first by name: a cold start would go there
    decision = place(
        request("a", demanded=False, parked={"n1": "GPU-0"}), [other, sleeping], CONFIG, T0
    )
    assert decision.chosen == (Choice("n1", "GPU-0"),)
    assert decision.remove == ()
    assert decision.message.startswith("waking on n1 (GPU-0)")


def test_a_parked_replica_asked_for_is_woken_by_swapping_out_the_coldest() -> None:
    view = node(
        [vllm("a", parked=True), vllm("b"), vllm("c")],
        [report("a", ModelState.SLEEPING), report("b"), report("c")],
    )
    recency = {"ns.b": T0 - dt.timedelta(seconds=40), "ns.c": T0 - dt.timedelta(seconds=90)}
    wake = request("a", parked={"n1": "GPU-0"})
    decision = place(wake, [view], CONFIG, T0, recency=recency)
    assert decision.chosen == (Choice("n1", "GPU-0"),)
    assert decision.preempted == (Victim("n1", "ns.c"),)
    # Not asked for: it waits parked, and says why.
    decision = place(request("a", demanded=False, parked={"n1": "GPU-0"}), [view], CONFIG, T0)
    assert (decision.chosen, decision.remove) == ((), ())
    assert decision.reason is not None


def test_a_parked_replica_is_withdrawn_once_not_needed() -> None:
    sleeping = node([vllm("a", parked=True)], [report("a", ModelState.SLEEPING)])
    scaled_to_zero = place(request("a", replicas=0, parked={"n1": "GPU-0"}), [sleeping], CONFIG, T0)
    assert scaled_to_zero.remove == ("n1",)
    elsewhere = node([vllm("a")], [report("a")], name="n2")
    held = request("a", parked={"n1": "GPU-0"}, existing=frozenset({"n2"}))
    decision = place(held, [sleeping, elsewhere], CONFIG, T0)
    assert (decision.keep, decision.remove) == (("n2",), ("n1",))


# ---- status ------------------------------------------------------------------------------------


def test_a_parked_replica_shows_in_host_ram_and_is_neither_scheduled_nor_ready() -> None:
    spec = parse_spec({"model": "org/a", "backend": "vllm", "vram": "10Gi"})
    for state, tier in ((ModelState.LOADED, "GPU"), (ModelState.SLEEPING, "HostRAM")):
        status = fold_status(
            spec=spec,
            spec_error=None,
            generation=1,
            assigned_nodes={"n1": vllm("a", parked=True)},
            reports={"n1": report("a", state)},
            pending_reason="SwappedOut",
            pending_message="swapped out of n1 for b; parked in host RAM",
            previous=None,
            now=T0,
        )
        conditions = {c.type: c for c in status.conditions}
        assert (status.ready_replicas, status.replicas, status.tiers) == (0, 0, tier)
        assert conditions["Scheduled"].reason == "SwappedOut"
        assert conditions["Ready"].status == "False"
        assert status.placements[0].state is state
