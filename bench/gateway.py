"""The gateway's cost: latency it adds (p50, p99) and requests/s on one core, against calling the
fake backend directly, in one run.

Three processes: the fake vLLM (0.11.0's OpenAI API over a simulated GPU) pinned to the last
CPU, the gateway pinned to CPU 0 (its event loop is one thread: one core is what it gets),
and this script's client, pinned beside the backend. The gateway's view is fed one
ModelDeployment and one GPUNode reporting the model Loaded at the backend's address, as its
watch would be, so no API server takes part. Each phase runs the same requests, a
non-streaming chat completion, once straight to the backend and once through the gateway:

- latency: one request at a time, `--requests` of each, after a warm-up; p50 and p99 of each
  path, and their differences, the gateway's added latency;
- throughput: `--concurrency` requests in flight for `--seconds`; requests/s of each path, and
  the gateway process's CPU time per request (from /proc/PID/stat), whose inverse is the
  requests/s one core of gateway can carry when the backend is not the limit.

`--write` puts the figures into BENCHMARKS.md (its "## Gateway" section); they are never
asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from benchmarks_md import stamp, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vram_operator.simulation.nodes import free_port  # noqa: E402

SECTION = "## Gateway"
"""The heading that starts this script's section of BENCHMARKS.md."""
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MESSAGES = [{"role": "user", "content": "hello"}]
DIRECT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
"""Straight to vLLM, which knows the model by its served name."""
ROUTED = {"model": "qwen", "messages": MESSAGES, "max_tokens": 8}
"""Through the gateway, which knows it by the ModelDeployment's name."""


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _run_backend(port: int, state: str, cpu: int) -> None:
    _pin(cpu)
    from aiohttp import web

    from vram_operator.simulation.fake_vllm import FakeVLLM
    from vram_operator.simulation.gpu import GIB, SimulatedGPUs

    gpus = SimulatedGPUs.create(Path(state), node="bench", count=1, sizes=[80 * GIB])
    fake = FakeVLLM(gpus, "bench:vllm", "0", MODEL, 0.5)
    fake.allocate()
    web.run_app(fake.app(), host="127.0.0.1", port=port, access_log=None, print=None)


def _run_gateway(port: int, backend: str, cpu: int) -> None:
    _pin(cpu)
    from aiohttp import web

    from vram_operator.gateway.server import Gateway, GatewayConfig
    from vram_operator.gateway.view import ClusterView

    async def build() -> web.Application:
        view = ClusterView(grace=3600)
        view.replace(
            "modeldeployments",
            [
                {
                    "metadata": {"name": "qwen", "namespace": "default"},
                    "spec": {"model": MODEL, "backend": "vllm"},
                }
            ],
        )
        view.replace(
            "gpunodes",
            [
                {
                    "metadata": {"name": "bench"},
                    "status": {
                        "lastHeartbeatTime": dt.datetime.now(dt.UTC).isoformat(),
                        "models": [
                            {
                                "key": "default.qwen",
                                "model": MODEL,
                                "backend": "vllm",
                                "state": "Loaded",
                                "endpoint": backend,
                            }
                        ],
                    },
                }
            ],
        )
        return Gateway(view, GatewayConfig(identity="bench")).app()

    web.run_app(build(), host="127.0.0.1", port=port, access_log=None, print=None)


async def _wait_up(url: str, body: dict) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.post(url + "/v1/chat/completions", json=body) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


async def _latencies(http: aiohttp.ClientSession, url: str, body: dict, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        async with http.post(url + "/v1/chat/completions", json=body) as response:
            await response.read()
            assert response.status == 200, response.status
        latencies.append(time.perf_counter() - started)
    return latencies


async def _throughput(
    http: aiohttp.ClientSession, url: str, body: dict, concurrency: int, seconds: float
) -> int:
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            async with http.post(url + "/v1/chat/completions", json=body) as response:
                await response.read()
                assert response.status == 200, response.status
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def measure(args: argparse.Namespace, gateway_pid: int, direct: str, routed: str) -> dict:
    await _wait_up(direct, DIRECT)
    await _wait_up(routed, ROUTED)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await _latencies(http, direct, DIRECT, args.warmup)
        await _latencies(http, routed, ROUTED, args.warmup)
        # Interleaved halves, so drift on a shared machine falls on both paths alike.
        half = args.requests // 2
        direct_lat = await _latencies(http, direct, DIRECT, half)
        routed_lat = await _latencies(http, routed, ROUTED, half)
        direct_lat += await _latencies(http, direct, DIRECT, args.requests - half)
        routed_lat += await _latencies(http, routed, ROUTED, args.requests - half)
        direct_done = await _throughput(http, direct, DIRECT, args.concurrency, args.seconds)
        cpu_before = _cpu_seconds(gateway_pid)
        routed_done = await _throughput(http, routed, ROUTED, args.concurrency, args.seconds)
        cpu_used = _cpu_seconds(gateway_pid) - cpu_before
    return {
        "direct": direct_lat,
        "routed": routed_lat,
        "direct_rps": direct_done / args.seconds,
        "routed_rps": routed_done / args.seconds,
        "cpu_per_request": cpu_used / max(routed_done, 1),
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def report(args: argparse.Namespace, figures: dict, cpus: tuple[int, int]) -> list[str]:
    direct, routed = figures["direct"], figures["routed"]
    p50 = (statistics.median(direct), statistics.median(routed))
    p99 = (_percentile(direct, 0.99), _percentile(routed, 0.99))
    command = " ".join(["python bench/gateway.py", *sys.argv[1:]])
    per_core = 1 / figures["cpu_per_request"] if figures["cpu_per_request"] else float("inf")
    busy = figures["routed_rps"] * figures["cpu_per_request"]
    return [
        f"{SECTION}: added latency and requests/s on one core, against the backend directly",
        "",
        "Written by `python bench/gateway.py --write`; one run, both paths measured in it. "
        "Never asserted in tests.",
        "",
        *stamp(),
        f"- command: `{command}`",
        f"- load average (1, 5, 15 min) when it ended: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (a machine shared with other work)",
        f"- scenario: a non-streaming chat completion (max_tokens 8) to the fake vLLM 0.11.0; "
        f"gateway pinned to CPU {cpus[0]}, backend and client to CPU {cpus[1]}; latency: "
        f"{args.requests} sequential requests per path after {args.warmup} warm-up; "
        f"throughput: {args.concurrency} in flight for {args.seconds:g} s per path",
        "",
        "| what | direct | through the gateway | added |",
        "| --- | --- | --- | --- |",
        f"| latency p50 | {_ms(p50[0])} | {_ms(p50[1])} | {_ms(p50[1] - p50[0])} |",
        f"| latency p99 | {_ms(p99[0])} | {_ms(p99[1])} | {_ms(p99[1] - p99[0])} |",
        f"| requests/s, {args.concurrency} in flight | {figures['direct_rps']:.0f} | "
        f"{figures['routed_rps']:.0f} | |",
        f"| gateway CPU per request | | {_ms(figures['cpu_per_request'])} | |",
        f"| gateway process CPU use in the throughput phase | | {busy:.0%} of its core | |",
        f"| requests/s one gateway core carries (1 / CPU per request) | | {per_core:.0f} | |",
        "",
        "The measured requests/s through the gateway fall short of the last row when the "
        "gateway's core is not all its own or it waits on the other processes (its CPU use "
        "above is below 100%); 1 / CPU per request is what a dedicated core would carry.",
        "",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="sequential, per path")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput phase, per path")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    available = sorted(os.sched_getaffinity(0))
    cpus = (available[0], available[-1])
    backend_port, gateway_port = free_port(), free_port()
    backend_url = f"http://127.0.0.1:{backend_port}"
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        backend = context.Process(
            target=_run_backend, args=(backend_port, f"{tmp}/gpus.json", cpus[1]), daemon=True
        )
        gateway = context.Process(
            target=_run_gateway, args=(gateway_port, backend_url, cpus[0]), daemon=True
        )
        backend.start()
        gateway.start()
        _pin(cpus[1])
        try:
            assert gateway.pid is not None
            figures = asyncio.run(
                measure(args, gateway.pid, backend_url, f"http://127.0.0.1:{gateway_port}")
            )
        finally:
            for process in (gateway, backend):
                process.terminate()
                process.join(5)
    lines = report(args, figures, cpus)
    print("\n".join(lines))
    if args.write:
        write_section(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
