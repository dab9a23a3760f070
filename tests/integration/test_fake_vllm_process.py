"""The fake vLLM as the real process the supervisor starts: it binds, allocates its share of
the simulated GPU, answers /health, and gives the memory back on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from vram_operator.simulation.gpu import GIB, SimulatedGPUs

pytestmark = pytest.mark.integration


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "gpus.json"
    SimulatedGPUs.create(path, node="node-a", count=2, total_bytes=24 * GIB)
    return path


@pytest.fixture
def gpus(state: Path) -> SimulatedGPUs:
    return SimulatedGPUs(state)


async def test_vllm_as_a_process(gpus: SimulatedGPUs, state: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vram_operator.simulation.fake_vllm",
        "serve",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--gpu-memory-utilization",
        "0.25",
        "--enable-sleep-mode",
        env={**os.environ, "VRAM_SIM_GPU_STATE": str(state), "CUDA_VISIBLE_DEVICES": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))\n", first)
        assert match, first
        async with aiohttp.ClientSession() as session, session.get(f"{match[1]}/health") as health:
            assert health.status == 200
        owner = f"pid:{process.pid}:vllm:{match[2]}"
        assert gpus.device(1).allocations == {owner: 6 * GIB}
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    assert gpus.device(1).allocations == {}
