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

from vram_operator.simulation.fake_vllm import INSTANCE_OVERHEAD_BYTES
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
        assert gpus.device(1).allocations == {owner: 6 * GIB + INSTANCE_OVERHEAD_BYTES}
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    assert gpus.device(1).allocations == {}


def fake_vllm_argv() -> list[str]:
    return [
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
        "0.1",
        "--enable-sleep-mode",
    ]


async def test_a_gpu_uuid_in_cuda_visible_devices_kills_the_start(
    gpus: SimulatedGPUs, state: Path
) -> None:
    """vLLM 0.11 int()s each entry (vllm/platforms/interface.py); so does the fake."""
    process = await asyncio.create_subprocess_exec(
        *fake_vllm_argv(),
        env={
            **os.environ,
            "VRAM_SIM_GPU_STATE": str(state),
            "CUDA_VISIBLE_DEVICES": gpus.device(1).uuid,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    assert "ValueError: invalid literal for int()" in stderr.decode()
    assert gpus.device(1).allocations == {}


async def test_a_request_to_a_sleeping_engine_kills_the_process(
    gpus: SimulatedGPUs, state: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        *fake_vllm_argv(),
        env={
            **os.environ,
            "VRAM_SIM_GPU_STATE": str(state),
            "CUDA_VISIBLE_DEVICES": "0",
            "VLLM_SERVER_DEV_MODE": "1",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        url = first.split()[-1]
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/sleep", params={"level": "1"}) as slept:
                assert slept.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with session.post(f"{url}/v1/completions", json={"prompt": "x"}) as answer:
                    await answer.read()
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1
    assert "EngineDeadError" in stderr.decode()
    assert gpus.device(0).allocations == {}, "a dead process's memory is freed"
