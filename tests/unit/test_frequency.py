"""Frequency-aware swap-out among equal priorities: the request before the last, as two
successive demand reads tell it, and a model asked for again and again kept over one asked
for once (LRU-2), however recent that one request."""

from __future__ import annotations

import datetime as dt

import pytest
from test_autoscaling import CONFIG, T0, view
from test_autoscaling import wanted as request
from test_autoscaling_service import full_node, wanted
from test_operator_service import T0 as START
from test_operator_service import Clock, condition, drain

from vram_operator.api import Priority
from vram_operator.api.demand import ModelDemand
from vram_operator.operator.demand import request_before_last
from vram_operator.operator.placement import place

pytestmark = pytest.mark.unit


def ago(seconds: float) -> dt.datetime:
    return T0 - dt.timedelta(seconds=seconds)


def read(requests: int, last: float | None) -> ModelDemand:
    return ModelDemand(
        "ns",
        "m",
        "vllm",
        "org/m",
        requests=requests,
        last_request=None if last is None else ago(last),
    )


def test_the_request_before_the_last_follows_successive_reads() -> None:
    assert request_before_last(None, read(1, 100), None) is None  # asked for once
    assert request_before_last(None, read(5, 100), None) == ago(100)  # often, before we looked
    assert request_before_last(read(1, 100), read(2, 50), None) == ago(100)
    assert request_before_last(read(2, 50), read(4, 10), ago(100)) == ago(10)  # two in one read
    assert request_before_last(read(2, 50), read(2, 50), ago(100)) == ago(100)  # nothing new
    assert request_before_last(read(9, 50), read(1, 10), ago(100)) == ago(50)  # gateway restarted
    assert request_before_last(read(0, None), read(0, None), None) is None


def test_a_model_asked_for_often_outranks_one_asked_for_once() -> None:
    node = view({"ns.a": Priority.NORMAL, "ns.b": Priority.NORMAL})
    # a: asked for at -100 s and -50 s; b: once, at -40 s (more recently than a's last).
    recency = {"ns.a": ago(50), "ns.b": ago(40)}
    earlier = {"ns.a": ago(100)}
    decision = place(request("ns.c"), [node], CONFIG, T0, recency=recency, earlier=earlier)
    assert [v.key for v in decision.preempted] == ["ns.b"]
    # Without frequency figures it is plain recency: the colder a goes.
    decision = place(request("ns.c"), [node], CONFIG, T0, recency=recency)
    assert [v.key for v in decision.preempted] == ["ns.a"]


def test_frequency_never_beats_priority_or_the_minimum_residency() -> None:
    node = view({"ns.low": Priority.LOW, "ns.b": Priority.NORMAL})
    recency = {"ns.low": ago(31), "ns.b": ago(900)}
    earlier = {"ns.low": ago(32)}
    decision = place(request("ns.c"), [node], CONFIG, T0, recency=recency, earlier=earlier)
    assert [v.key for v in decision.preempted] == ["ns.low"]
    node = view({"ns.a": Priority.NORMAL, "ns.b": Priority.NORMAL})
    recency = {"ns.a": ago(50), "ns.b": ago(10)}  # b is within the minimum residency
    decision = place(
        request("ns.c"), [node], CONFIG, T0, recency=recency, earlier={"ns.a": ago(60)}
    )
    assert [v.key for v in decision.preempted] == ["ns.a"]


async def test_the_operator_swaps_out_the_model_asked_for_once() -> None:
    clock = Clock()
    store, svc = await full_node(clock, swap_order="lru2")

    def asked(name: str, requests: int, last: float, waiting: int = 0) -> ModelDemand:
        return wanted(name, waiting=waiting, last=last, requests=requests)

    # a was asked for twice (at 10 s and 30 s), b once, at 40 s: b is the one to go.
    for moment, reads in (
        (10, {"ns.a": asked("a", 1, 10)}),
        (30, {"ns.a": asked("a", 2, 30)}),
        (40, {"ns.a": asked("a", 2, 30), "ns.b": asked("b", 1, 40)}),
        (
            100,
            {"ns.a": asked("a", 2, 30), "ns.b": asked("b", 1, 40), "ns.c": asked("c", 1, 100, 1)},
        ),
    ):
        clock.now = START + dt.timedelta(seconds=moment)
        await svc.apply_demand(reads)
        await drain(svc)
    assert store.assigned("n1") == {"ns.a", "ns.c"}
    assert condition(store.status("b"), "Scheduled")["reason"] == "SwappedOut"
