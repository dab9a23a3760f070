"""The Ollama backend against the fake Ollama (0.12.3 behaviour): names as Ollama reads them,
options that survive client requests, Ollama's own evictions and CPU offload, unloads that
wait for the memory, verbose estimates, permanent failures."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from vram_operator.api import ModelState
from vram_operator.node_agent.backends import (
    AiohttpTransport,
    BackendError,
    LoadRequest,
    OllamaBackend,
    Response,
    RetryPolicy,
)
from vram_operator.node_agent.backends.ollama import served_name
from vram_operator.node_agent.backends.ollama_names import (
    base_of_derived,
    derived_model_name,
    normalize_model_name,
    parse_model_name,
    same_model,
    short_model_name,
)
from vram_operator.node_agent.estimate import (
    DEFAULT_OLLAMA_CONTEXT,
    OVERHEAD_BYTES,
    default_ollama_context,
    from_ollama_show,
)
from vram_operator.simulation.fake_ollama import (
    DEFAULT_CATALOG,
    CatalogModel,
    FakeOllama,
    OllamaConfig,
)
from vram_operator.simulation.gpu import GIB, SimulatedGPUs

pytestmark = pytest.mark.unit

FAST = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)
T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)
HYBRID_KV = (0, 0, 8, 0, 0, 8, 0, 0)
CATALOG = {
    **DEFAULT_CATALOG,
    "mymodel:latest": CatalogModel(size=500_000_000, size_vram=1 * GIB),
    "hybrid:1b": CatalogModel(
        size=900_000_000,
        size_vram=1 * GIB,
        parameter_count=1_000_000_000,
        quantization_level="Q8_0",
        context_length=8192,
        block_count=8,
        embedding_length=2048,
        head_count=32,
        head_count_kv=HYBRID_KV,
    ),
}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


class Recording(AiohttpTransport):
    """The real transport, keeping every request body."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, Any]] = []

    async def request(
        self, method: str, url: str, json: Any = None, time_limit: float = 10.0
    ) -> Response:
        self.sent.append((url.rsplit("/api/", 1)[-1], json))
        return await super().request(method, url, json, time_limit)

    async def stream_lines(
        self, method: str, url: str, json: Any = None, idle_limit: float = 10.0
    ) -> AsyncGenerator[bytes, None]:
        self.sent.append((url.rsplit("/api/", 1)[-1], json))
        async for line in super().stream_lines(method, url, json, idle_limit):
            yield line


@dataclass
class Rig:
    backend: OllamaBackend
    fake: FakeOllama
    gpus: SimulatedGPUs
    transport: Recording
    url: str

    async def client(self, path: str, body: Any) -> Any:
        """A request as a client of the model would send it (not through the backend)."""
        transport = AiohttpTransport()
        try:
            answer = await transport.request("POST", f"{self.url}{path}", json=body)
        finally:
            await transport.aclose()
        assert answer.ok, answer.body
        return answer

    def restarted(self) -> OllamaBackend:
        """A new backend on the same server: the agent after a restart."""
        return OllamaBackend(self.url, transport=AiohttpTransport(), retry=FAST, clock=Clock())


async def _rig(tmp_path: Path, sizes: tuple[int, ...], **config: Any) -> AsyncIterator[Rig]:
    gpus = SimulatedGPUs.create(tmp_path / "gpus.json", node="n", count=len(sizes), sizes=sizes)
    clock = Clock()
    fake = FakeOllama(gpus, "pid:1:ollama:t", CATALOG, OllamaConfig(**config), clock)
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    transport = Recording()
    backend = OllamaBackend(
        url, transport=transport, retry=FAST, clock=clock, unload_timeout=5, unload_poll=0.02
    )
    try:
        yield Rig(backend, fake, gpus, transport, url)
    finally:
        await backend.aclose()
        await server.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for made in _rig(tmp_path, (24 * GIB,), unload_seconds=0.05):
        yield made


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Rig]:
    """One 4 GiB GPU."""
    async for made in _rig(tmp_path, (4 * GIB,), unload_seconds=0.05):
        yield made


async def loaded(rig: Rig, model: str, **request: Any) -> Any:
    await rig.backend.pull(model, lambda _: None)
    return await rig.backend.load(LoadRequest(key="ns.m", model=model, **request))


# --- 9: names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("llama3.2:1b", "library/llama3.2:1b"),
        ("llama3.2:1b", "registry.ollama.ai/library/llama3.2:1b"),
        ("llama3.2:1b", "Llama3.2:1B"),
        ("mymodel", "mymodel:latest"),
        ("user/m", "registry.ollama.ai/USER/m:latest"),
    ],
)
def test_same_model_follows_ollamas_name_rules(a: str, b: str) -> None:
    assert same_model(a, b)
    assert normalize_model_name(a) == normalize_model_name(b)


def test_names_that_differ() -> None:
    assert not same_model("llama3.2:1b", "llama3.2:3b")
    assert not same_model("user/m", "m")
    assert not same_model("hf.co/u/m:q4", "u/m:q4")


def test_short_names_and_validity() -> None:
    assert short_model_name("registry.ollama.ai/library/llama3.2") == "llama3.2:latest"
    assert short_model_name("library/Llama3.2:1B") == "Llama3.2:1B"  # case is kept
    assert short_model_name("hf.co/u/m:q4") == "hf.co/u/m:q4"
    assert short_model_name("https://hf.co/u/m") == "hf.co/u/m:latest"
    assert parse_model_name("localhost:5000/u/m:t").host == "localhost:5000"
    for bad in ("", "m:", "a//b", "bad name", "x.y/m"):
        assert not parse_model_name(bad).is_valid, bad


def test_derived_names_are_stable_and_recognised() -> None:
    first = derived_model_name("llama3.2:1b", {"num_ctx": 8192, "num_batch": 256})
    again = derived_model_name("library/llama3.2:1b", {"num_batch": 256, "num_ctx": 8192})
    assert first == again
    assert first.startswith("llama3.2:1b-vram-")
    assert derived_model_name("llama3.2:1b", {"num_ctx": 4096}) != first
    assert parse_model_name(first).is_valid
    assert base_of_derived(first) == "llama3.2:1b"
    assert base_of_derived("llama3.2:1b") is None
    assert served_name("mymodel", {}) == "mymodel:latest"
    long = derived_model_name("m:" + "t" * 80, {"num_ctx": 1})
    assert parse_model_name(long).is_valid


@pytest.mark.parametrize(
    ("pulled", "model"),
    [
        ("llama3.2:1b", "library/llama3.2:1b"),
        ("llama3.2:1b", "Llama3.2:1B"),
        ("llama3.2:1b", "registry.ollama.ai/library/llama3.2:1b"),
        ("mymodel", "mymodel"),
    ],
)
async def test_a_model_loads_and_is_listed_under_the_name_it_was_asked_for(
    rig: Rig, pulled: str, model: str
) -> None:
    await rig.backend.pull(pulled, lambda _: None)  # on disk under Ollama's own spelling
    info = await loaded(rig, model)
    assert info.model == model
    assert [r.model for r in await rig.backend.list_resident()] == [model]
    # The backend of a restarted agent knows no request: it lists Ollama's short name, which
    # same_model matches to the assignment.
    fresh = rig.restarted()
    try:
        [listed] = await fresh.list_resident()
    finally:
        await fresh.aclose()
    assert same_model(listed.model, model)
    assert listed.model == short_model_name(listed.model)


async def test_a_tagless_model_stays_loaded_across_reports(rig: Rig) -> None:
    await loaded(rig, "mymodel")
    for _ in range(3):
        await rig.backend.list_resident()
    assert rig.fake.loads["mymodel:latest"] == 1


# --- 10: runner options -----------------------------------------------------------------------


async def test_options_survive_a_client_request_for_the_served_name(rig: Rig) -> None:
    info = await loaded(rig, "llama3.2:1b", options={"num_ctx": 8192}, gpu_index=0)
    assert info.model == "llama3.2:1b"
    served = rig.backend.served_name("llama3.2:1b")
    assert served == derived_model_name("llama3.2:1b", {"num_ctx": 8192})
    generate = [body for path, body in rig.transport.sent if path == "generate"]
    assert generate == [{"model": served, "prompt": "", "stream": False, "keep_alive": -1}]
    # A client calls the served name with no options: the runner keeps num_ctx 8192.
    reply = await rig.client("/api/generate", {"model": served, "prompt": "hi", "stream": False})
    assert reply.ok
    assert rig.fake.loads[served] == 1
    [running] = [m for m in await _ps(rig) if m["name"] == served]
    assert running["context_length"] == 8192
    # Loading again finds the derived model on disk: no second create.
    await rig.backend.unload("ns.m", "llama3.2:1b")
    await rig.backend.load(LoadRequest(key="ns.m", model="llama3.2:1b", options={"num_ctx": 8192}))
    assert [path for path, _ in rig.transport.sent].count("create") == 1


async def test_a_client_using_the_plain_name_is_reported(rig: Rig) -> None:
    await loaded(rig, "llama3.2:1b", options={"num_ctx": 8192})
    await rig.client("/api/generate", {"model": "llama3.2:1b", "prompt": "hi", "stream": False})
    [info] = await rig.backend.list_resident()
    assert info.model == "llama3.2:1b"
    assert info.message is not None
    assert "with Ollama's default options" in info.message
    assert rig.backend.vanished() == []
    await rig.backend.unload("ns.m", "llama3.2:1b")
    assert await _ps(rig) == []


async def _ps(rig: Rig) -> list[dict[str, Any]]:
    transport = AiohttpTransport()
    try:
        answer = await transport.request("GET", f"{rig.url}/api/ps")
    finally:
        await transport.aclose()
    models: list[dict[str, Any]] = json.loads(answer.body)["models"]
    return models


# --- 11: Ollama's own decisions ----------------------------------------------------------------


async def test_a_model_ollama_evicted_is_reported_vanished(small: Rig) -> None:
    await loaded(small, "llama3.2:1b")  # 2 GiB of 4
    await small.backend.pull("llama3.2:3b", lambda _: None)
    # A client loads a 3.2 GiB model: Ollama unloads the idle one to make room.
    await small.client("/api/generate", {"model": "llama3.2:3b"})
    resident = await small.backend.list_resident()
    assert [r.model for r in resident] == ["llama3.2:3b"]
    [gone] = small.backend.vanished()
    assert (gone.model, gone.state) == ("llama3.2:1b", ModelState.EVICTED)
    assert gone.message is not None
    assert "Ollama unloaded it" in gone.message


async def test_a_model_partly_on_the_cpu_says_so(small: Rig) -> None:
    info = await loaded(small, "llama3.1:8b-instruct-q4_K_M")  # 6 GiB on a 4 GiB GPU
    assert info.state is ModelState.LOADED
    assert info.vram_bytes is not None
    assert info.vram_bytes < 6 * GIB
    assert info.message is not None
    assert info.message.startswith("partly on CPU: ")
    assert info.message.endswith("of 6Gi in VRAM")
    assert info.gpu_uuid is None  # /api/ps names no GPU


# --- 12: unload waits for the memory ----------------------------------------------------------


async def test_unload_returns_once_the_memory_is_free(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path, (24 * GIB,), unload_seconds=0.3):
        await loaded(rig, "llama3.2:1b")
        await rig.backend.unload("ns.m", "llama3.2:1b")
        assert rig.gpus.device(0).used_bytes == 0
        assert await _ps(rig) == []


async def test_unload_gives_up_after_its_bound(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path, (24 * GIB,), unload_seconds=2):
        await loaded(rig, "llama3.2:1b")
        impatient = OllamaBackend(rig.url, retry=FAST, unload_timeout=0.1, unload_poll=0.02)
        try:
            with pytest.raises(BackendError, match="still in /api/ps") as caught:
                await impatient.unload("ns.m", "llama3.2:1b")
        finally:
            await impatient.aclose()
        assert caught.value.retryable


async def test_unload_after_a_restart_finds_the_derived_model(rig: Rig) -> None:
    await loaded(rig, "llama3.2:1b", options={"num_ctx": 8192})
    fresh = rig.restarted()
    try:
        [listed] = await fresh.list_resident()
        assert listed.model == "llama3.2:1b"  # the derived name, read back
        await fresh.unload("ns.m", "llama3.2:1b")
    finally:
        await fresh.aclose()
    assert await _ps(rig) == []


# --- 13: estimates ----------------------------------------------------------------------------


async def test_the_estimate_reads_per_layer_kv_heads_from_the_verbose_show(rig: Rig) -> None:
    await rig.backend.pull("hybrid:1b", lambda _: None)
    estimate = await rig.backend.estimate("hybrid:1b")
    assert estimate is not None
    assert ("show", {"model": "hybrid:1b", "verbose": True}) in rig.transport.sent
    head_dim = 2048 // 32
    kv = sum(HYBRID_KV) * head_dim * 2 * 2 * DEFAULT_OLLAMA_CONTEXT
    weights = math.ceil(1_000_000_000 * 34 / 32)
    assert estimate.bytes == weights + kv + OVERHEAD_BYTES
    # The same model from the plain answer: the KV cache is unknown, not guessed.
    plain = await rig.client("/api/show", {"model": "hybrid:1b"})
    truncated = from_ollama_show(json.loads(plain.body))
    assert "head_count_kv is empty" in truncated.detail
    # num_ctx counts, up to the trained 8192 (llm/server.go caps it).
    longer = await rig.backend.estimate("hybrid:1b", context_length=8192)
    capped = await rig.backend.estimate("hybrid:1b", context_length=100_000)
    assert longer is not None
    assert capped is not None
    assert longer.bytes == estimate.bytes + kv
    assert capped.bytes == longer.bytes
    assert "capped at the trained 8192" in capped.detail


def test_the_default_context_follows_the_version() -> None:
    assert default_ollama_context("0.12.3") == 4096
    assert default_ollama_context("0.12.3", 80 * GIB) == 4096
    assert default_ollama_context("0.15.5", 80 * GIB) == 262_144
    assert default_ollama_context("0.15.5", 24 * GIB) == 32_768
    assert default_ollama_context("0.15.5", 8 * GIB) == 4096
    assert default_ollama_context("0.15.5") == 4096
    assert default_ollama_context(None) == 4096


# --- 14 and permanent failures ----------------------------------------------------------------


async def test_keep_alive_zero_is_refused_not_sent_as_an_unload(rig: Rig) -> None:
    await rig.backend.pull("llama3.2:1b", lambda _: None)
    with pytest.raises(BackendError, match="keep_alive 0") as caught:
        await rig.backend.load(LoadRequest(key="k", model="llama3.2:1b", keep_alive_seconds=0))
    assert not caught.value.retryable
    assert "generate" not in [path for path, _ in rig.transport.sent]


async def test_a_model_the_registry_lacks_is_a_permanent_failure(rig: Rig) -> None:
    with pytest.raises(BackendError, match="file does not exist") as caught:
        await rig.backend.pull("nosuchmodel", lambda _: None)
    assert not caught.value.retryable
    assert "permanent" in caught.value.message
    assert [path for path, _ in rig.transport.sent].count("pull") == 1  # not retried
    with pytest.raises(BackendError, match="permanent") as invalid:
        await rig.backend.pull("bad name", lambda _: None)
    assert not invalid.value.retryable
