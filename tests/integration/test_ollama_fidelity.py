"""The Ollama backend against the fake Ollama as the real process the agent talks to: names
as Ollama reads them, options that survive client requests, an unload that waits for the
memory, and a model the registry lacks failing for good. No control plane is needed."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vram_operator.node_agent.backends import (
    AiohttpTransport,
    BackendError,
    LoadRequest,
    OllamaBackend,
    RetryPolicy,
)
from vram_operator.node_agent.backends.ollama import same_model
from vram_operator.simulation.gpu import GIB, SimulatedGPUs

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)


@pytest.fixture
async def ollama(tmp_path: Path) -> AsyncIterator[tuple[str, SimulatedGPUs]]:
    state = tmp_path / "gpus.json"
    gpus = SimulatedGPUs.create(state, node="n", total_bytes=8 * GIB)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vram_operator.simulation.fake_ollama",
        "--port",
        "0",
        "--gpu-state",
        str(state),
        "--unload-seconds",
        "0.5",
        "--keep-alive",
        "-1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", first)
        assert match, first
        yield match[1], gpus
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 20)
    assert gpus.device(0).allocations == {}


async def test_the_backend_against_the_fake_process(ollama: tuple[str, SimulatedGPUs]) -> None:
    url, gpus = ollama
    backend = OllamaBackend(url, retry=FAST, unload_poll=0.05)
    client = AiohttpTransport()
    try:
        assert (await backend.health()).version == "0.12.3"
        # 9: a tagless name and a qualified one are the models /api/ps lists in short form.
        await backend.pull("mymodel:latest", lambda _: None)
        await backend.load(LoadRequest(key="a", model="mymodel"))
        await backend.load(
            LoadRequest(key="b", model="library/llama3.2:1b", options={"num_ctx": 8192})
        )
        listed = {info.model for info in await backend.list_resident()}
        assert listed == {"mymodel", "library/llama3.2:1b"}
        # 10: a client calling the served name keeps the runner and its options.
        served = backend.served_name("library/llama3.2:1b")
        before = (await client.request("GET", f"{url}/api/ps")).body
        reply = await client.request(
            "POST",
            f"{url}/api/generate",
            json={"model": served, "prompt": "hi", "stream": False},
        )
        assert reply.ok
        assert b'"load_duration":0' in reply.body
        assert b'"context_length":8192' in (await client.request("GET", f"{url}/api/ps")).body
        assert before.count(b"context_length") == 2
        # 12: unload returns when the memory is free, so the next load finds it.
        held = gpus.device(0).used_bytes
        await backend.unload("b", "library/llama3.2:1b")
        assert gpus.device(0).used_bytes < held
        assert [info.model for info in await backend.list_resident()] == ["mymodel"]
        # A restarted agent's backend names what it finds so that same_model matches.
        fresh = OllamaBackend(url, retry=FAST)
        try:
            [found] = await fresh.list_resident()
        finally:
            await fresh.aclose()
        assert found.model == "mymodel:latest"
        assert same_model(found.model, "mymodel")
        # A model the registry does not have fails for good.
        with pytest.raises(BackendError, match="permanent") as caught:
            await backend.pull("no-such-model", lambda _: None)
        assert not caught.value.retryable
    finally:
        await client.aclose()
        await backend.aclose()
