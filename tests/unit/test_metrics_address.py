"""Where the operator's and the agent's /metrics listen: the pod IP in a pod, loopback
outside one, never every address unless asked."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from vram_operator.metrics_server import LOOPBACK, default_metrics_address, serve_metrics
from vram_operator.node_agent.main import build_parser as agent_parser
from vram_operator.operator.main import build_parser as operator_parser

pytestmark = pytest.mark.unit

Parser = Callable[[], argparse.ArgumentParser]
PARSERS = [pytest.param(operator_parser, id="operator"), pytest.param(agent_parser, id="agent")]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"POD_IP": "10.244.1.7"}, "10.244.1.7"),
        ({"POD_IP": "fd00:10:244::7"}, "fd00:10:244::7"),
        ({"POD_IP": " 10.0.0.2\n"}, "10.0.0.2"),
        ({"POD_IP": ""}, LOOPBACK),
        ({}, LOOPBACK),
    ],
)
def test_default_address_is_the_pod_ip_else_loopback(
    environ: dict[str, str], expected: str
) -> None:
    assert default_metrics_address(environ) == expected


@pytest.mark.parametrize("build", PARSERS)
def test_parsers_default_to_the_pod_ip(build: Parser, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    args = build().parse_args(["--node=n"] if build is agent_parser else [])
    assert args.metrics_address == "10.1.2.3"
    monkeypatch.delenv("POD_IP")
    args = build().parse_args(["--node=n"] if build is agent_parser else [])
    assert args.metrics_address == LOOPBACK


@pytest.mark.parametrize("build", PARSERS)
@pytest.mark.parametrize("flag", ["--metrics-address", "--metrics-host"])
def test_address_flag_and_its_old_name(build: Parser, flag: str) -> None:
    args = build().parse_args([f"{flag}=::"])
    assert args.metrics_address == "::"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


async def test_served_on_the_given_address_only() -> None:
    port = _free_port()
    runner = await serve_metrics(CollectorRegistry(), LOOPBACK, port)
    try:
        assert [tuple(a)[:2] for a in runner.addresses] == [(LOOPBACK, port)]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{LOOPBACK}:{port}/healthz") as answer,
        ):
            assert answer.status == 200
    finally:
        await runner.cleanup()
