"""The simulation: shared GPU state, and the fake Ollama and vLLM servers over it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from vram_operator.api.budget import VLLM_INSTANCE_OVERHEAD_BYTES
from vram_operator.simulation import fake_hf_download, fake_vllm
from vram_operator.simulation.fake_ollama import (
    DEFAULT_CATALOG,
    GENERIC,
    NOT_IN_REGISTRY,
    FakeOllama,
    OllamaConfig,
    bind,
    load_catalog,
    lookup,
    normalize,
    parse_keep_alive,
    serve,
)
from vram_operator.simulation.fake_ollama import main as fake_ollama_main
from vram_operator.simulation.fake_vllm import INSTANCE_OVERHEAD_BYTES, SLEEP_RESIDUAL, FakeVLLM
from vram_operator.simulation.gpu import (
    GIB,
    SimulatedGPUs,
    SimulatedOutOfMemory,
    UnknownGPU,
    main,
    pid_of,
    simulated_uuid,
)
from vram_operator.simulation.gpu_source import SimulatedGPUSource

pytestmark = pytest.mark.unit

UUID_SHAPE = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "gpus.json"
    SimulatedGPUs.create(path, node="node-a", count=2, total_bytes=24 * GIB)
    return path


@pytest.fixture
def gpus(state: Path) -> SimulatedGPUs:
    return SimulatedGPUs(state)


# --- simulated GPUs ---------------------------------------------------------------------------


def test_uuids_are_stable_per_node_and_shaped_like_nvml() -> None:
    assert simulated_uuid("node-a", 0) == simulated_uuid("node-a", 0)
    assert simulated_uuid("node-a", 0) != simulated_uuid("node-a", 1)
    assert simulated_uuid("node-a", 0) != simulated_uuid("node-b", 0)
    assert UUID_SHAPE.match(simulated_uuid("node-a", 3))


def test_two_handles_on_one_file_share_the_accounting(state: Path) -> None:
    writer, reader = SimulatedGPUs(state), SimulatedGPUs(state)
    uuid = reader.devices()[1].uuid
    writer.allocate(uuid, "pid:42:vllm:8001", 10 * GIB)
    writer.allocate(uuid, "pid:42:vllm:8001", 2 * GIB)
    device = reader.device(1)
    assert (device.used_bytes, device.free_bytes) == (12 * GIB, 12 * GIB)
    assert reader.allocations()[uuid] == {"pid:42:vllm:8001": 12 * GIB}
    assert reader.release("pid:42:vllm:8001") == 12 * GIB
    assert writer.device(uuid).used_bytes == 0


def test_allocation_that_does_not_fit_fails_like_cuda_and_changes_nothing(
    gpus: SimulatedGPUs,
) -> None:
    gpus.allocate(0, "a", 20 * GIB)
    with pytest.raises(SimulatedOutOfMemory) as caught:
        gpus.allocate(0, "b", 5 * GIB)
    message = str(caught.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 5.00 GiB")
    assert "4.00 GiB free" in message
    assert caught.value.free_bytes == 4 * GIB
    assert gpus.allocations()[gpus.device(0).uuid] == {"a": 20 * GIB}


def test_set_allocation_resizes_and_zero_frees(gpus: SimulatedGPUs) -> None:
    gpus.allocate(0, "a", 10 * GIB)
    gpus.set_allocation(0, "a", 1 * GIB)
    assert gpus.device(0).used_bytes == 1 * GIB
    with pytest.raises(SimulatedOutOfMemory):
        gpus.set_allocation(0, "a", 25 * GIB)
    gpus.set_allocation(0, "a", 0)
    assert gpus.device(0).allocations == {}


def test_release_takes_patterns_across_gpus(gpus: SimulatedGPUs) -> None:
    gpus.allocate(0, "pid:1:ollama:11434:llama3.2:1b", GIB)
    gpus.allocate(1, "pid:1:ollama:11434:qwen2.5:7b", GIB)
    gpus.allocate(1, "pid:2:ollama:11435:qwen2.5:7b", GIB)
    assert gpus.release("pid:*:ollama:11434:*") == 2 * GIB
    assert [d.used_bytes for d in gpus.devices()] == [0, GIB]


def test_pressure_sets_external_memory(gpus: SimulatedGPUs) -> None:
    gpus.pressure(1, 10 * GIB)
    gpus.pressure(1, 6 * GIB)
    assert gpus.device(1).allocations == {"external:pressure": 6 * GIB}
    gpus.pressure(1, 0)
    assert gpus.device(1).used_bytes == 0


def test_bad_inputs_are_refused(tmp_path: Path, gpus: SimulatedGPUs) -> None:
    with pytest.raises(UnknownGPU, match="GPU-nope"):
        gpus.allocate("GPU-nope", "a", 1)
    with pytest.raises(ValueError, match="negative"):
        gpus.allocate(0, "a", -1)
    with pytest.raises(ValueError, match="disagrees"):
        SimulatedGPUs.create(tmp_path / "x.json", "n", count=3, sizes=[GIB, GIB])
    with pytest.raises(ValueError, match="positive"):
        SimulatedGPUs.create(tmp_path / "x.json", "n", total_bytes=0)
    broken = tmp_path / "broken.json"
    broken.write_text('{"gpus": 3}')
    with pytest.raises(ValueError, match="not a simulated GPU state file"):
        SimulatedGPUs(broken).devices()


def test_gpus_of_different_sizes(tmp_path: Path) -> None:
    gpus = SimulatedGPUs.create(tmp_path / "g.json", "n", sizes=[24 * GIB, 80 * GIB])
    assert [d.total_bytes for d in gpus.devices()] == [24 * GIB, 80 * GIB]


def test_source_reports_gpus_and_owners_as_processes(gpus: SimulatedGPUs, state: Path) -> None:
    uuid = gpus.device(0).uuid
    gpus.allocate(uuid, "pid:4242:vllm:8001", 8 * GIB)
    gpus.pressure(uuid, 2 * GIB)
    reading = SimulatedGPUSource(state).read()
    assert reading.source == "simulated"
    assert reading.unavailable == []
    first = reading.gpus[0]
    assert (first.uuid, first.used_bytes, first.free_bytes) == (uuid, 10 * GIB, 14 * GIB)
    assert first.temperature_celsius == 40
    assert [(p.pid, p.used_bytes) for p in reading.processes[uuid]] == [
        (0, 2 * GIB),
        (4242, 8 * GIB),
    ]
    assert pid_of("pid:17") == 17
    assert pid_of("external:x") == 0


def test_source_without_state_reports_no_gpus(tmp_path: Path) -> None:
    source = SimulatedGPUSource(tmp_path / "missing.json")
    reading = source.read()
    source.close()
    assert reading.gpus == []
    assert "no simulated GPU state" in reading.unavailable[0]


def test_cli_create_external_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "cli.json")
    assert main(["create", "--node", "n", "--count", "2", "--total", "24Gi", path]) == 0
    uuids = capsys.readouterr().out.split()
    assert len(uuids) == 2
    assert all(UUID_SHAPE.match(u) for u in uuids)
    assert main(["external", "--uuid", uuids[1], "--bytes", "10Gi", path]) == 0
    assert main(["show", path]) == 0
    assert "external:cli: 10Gi" in capsys.readouterr().out
    assert main(["external", "--uuid", "1", "--bytes", "30Gi", path]) == 1
    assert "CUDA out of memory" in capsys.readouterr().err
    assert main(["create", "--node", "n", "--total", "8Gi,16Gi", path]) == 0
    assert [d.total_bytes for d in SimulatedGPUs(path).devices()] == [8 * GIB, 16 * GIB]


# --- fake Ollama: pure parts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 300.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        (10, 10.0),
        (0, 0.0),
        ("0", 0.0),
        (-1, math.inf),
        ("-1m", math.inf),
        ("-5m", math.inf),
        ("300ms", 0.3),
        (2.5, 2.5),
    ],
)
def test_keep_alive_forms(value: object, seconds: float) -> None:
    assert parse_keep_alive(value, 300.0) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "Unsupported type: 'bool'"),
        ("soon", 'time: invalid duration "soon"'),
        ([1], "Unsupported type"),
        ("-1", 'time: missing unit in duration "-1"'),  # Go's time.ParseDuration wants a unit
    ],
)
def test_keep_alive_refuses_what_ollama_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_keep_alive(value, 300.0)


def test_catalog_lookup_rules() -> None:
    assert normalize("nomic-embed-text") == "nomic-embed-text:latest"
    assert lookup(DEFAULT_CATALOG, "nomic-embed-text") is DEFAULT_CATALOG["nomic-embed-text:latest"]
    assert lookup(DEFAULT_CATALOG, "made-up:7b") is GENERIC
    assert lookup(DEFAULT_CATALOG, "made-up") is None


def test_catalog_override_from_json(tmp_path: Path) -> None:
    catalog = load_catalog('{"big:70b": {"size": "40G", "size_vram": "42Gi", "family": "llama"}}')
    assert catalog["big:70b"].size_vram == 42 * GIB
    assert "llama3.2:1b" in catalog
    file = tmp_path / "catalog.json"
    file.write_text(json.dumps({"tiny": {"size": 1000, "size_vram": "1Mi"}}))
    assert load_catalog(str(file))["tiny:latest"].size_vram == 2**20
    with pytest.raises(ValueError, match="needs size_vram"):
        load_catalog('{"x:1": {"size": 1}}')


# --- fake Ollama: HTTP ------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand, so keep-alive expiry needs no waiting."""

    def __init__(self) -> None:
        self.now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


Client = TestClient[web.Request, web.Application]


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[Client]:
    async with TestClient(TestServer(app)) as client:
        yield client


def fake_ollama(gpus: SimulatedGPUs, clock: Clock | None = None, **config: Any) -> FakeOllama:
    return FakeOllama(
        gpus, "pid:7:ollama:11434", config=OllamaConfig(**config), clock=clock or Clock()
    )


async def lines(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """The objects of an NDJSON stream."""
    return [json.loads(line) for line in (await response.text()).splitlines()]


async def pull(client: Client, model: str) -> None:
    response = await client.post("/api/pull", json={"model": model, "stream": False})
    assert response.status == 200, await response.text()


async def test_pull_streams_progress_then_lists_the_model(gpus: SimulatedGPUs) -> None:
    async with serving(fake_ollama(gpus).app()) as client:
        response = await client.post("/api/pull", json={"model": "llama3.2:1b"})
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        events = await lines(response)
        assert events[0] == {"status": "pulling manifest"}
        assert events[-1] == {"status": "success"}
        progress = [e for e in events if "digest" in e]
        main_layer = [e for e in progress if e["digest"] == progress[0]["digest"]]
        assert len(main_layer) > 2
        assert [e["completed"] for e in main_layer] == sorted(e["completed"] for e in main_layer)
        assert main_layer[-1]["completed"] == main_layer[-1]["total"]
        assert str(main_layer[0]["digest"]).startswith("sha256:")
        assert main_layer[0]["status"] == f"pulling {str(main_layer[0]['digest'])[7:19]}"

        tags = await (await client.get("/api/tags")).json()
        [entry] = tags["models"]
        assert entry["name"] == "llama3.2:1b"
        assert entry["size"] == DEFAULT_CATALOG["llama3.2:1b"].size
        assert entry["details"]["quantization_level"] == "Q8_0"
        assert (await (await client.get("/api/version")).json())["version"]


async def test_pull_of_unknown_model_fails_as_ollama_does(gpus: SimulatedGPUs) -> None:
    async with serving(fake_ollama(gpus, fail_pull=frozenset({"flaky:1b"})).app()) as client:
        streamed = await client.post("/api/pull", json={"model": "no-such-model"})
        assert streamed.status == 200
        assert await lines(streamed) == [{"status": "pulling manifest"}, {"error": NOT_IN_REGISTRY}]
        single = await client.post("/api/pull", json={"name": "no-such-model", "stream": False})
        assert (single.status, await single.json()) == (500, {"error": NOT_IN_REGISTRY})
        flaky = await lines(await client.post("/api/pull", json={"model": "flaky:1b"}))
        assert any("completed" in e for e in flaky)
        assert "connection reset" in flaky[-1]["error"]
        assert (await (await client.get("/api/tags")).json())["models"] == []


async def test_load_and_unload_move_vram(gpus: SimulatedGPUs) -> None:
    fake = fake_ollama(gpus, unload_seconds=0.05)
    async with serving(fake.app()) as client:
        await pull(client, "llama3.1:8b-instruct-q4_K_M")
        load = await client.post(
            "/api/generate", json={"model": "llama3.1:8b-instruct-q4_K_M", "keep_alive": -1}
        )
        assert (await load.json())["done_reason"] == "load"
        [running] = (await (await client.get("/api/ps")).json())["models"]
        assert running["size_vram"] == 6 * GIB
        assert running["expires_at"].startswith("2317-")
        owner = fake.model_owner("llama3.1:8b-instruct-q4_K_M")
        assert gpus.device(0).allocations == {owner: 6 * GIB}

        unload = await client.post(
            "/api/generate", json={"model": "llama3.1:8b-instruct-q4_K_M", "keep_alive": 0}
        )
        body = await unload.json()
        assert (body["done"], body["done_reason"], body["response"]) == (True, "unload", "")
        await asyncio.sleep(0.1)  # the runner exits a little after the answer
        assert (await (await client.get("/api/ps")).json())["models"] == []
        assert gpus.device(0).used_bytes == 0


async def test_generate_moves_expiry_and_expiry_unloads(gpus: SimulatedGPUs) -> None:
    clock = Clock()
    async with serving(fake_ollama(gpus, clock, unload_seconds=0).app()) as client:
        await pull(client, "qwen2.5:7b")
        await client.post("/api/generate", json={"model": "qwen2.5:7b", "keep_alive": "10m"})
        first = (await (await client.get("/api/ps")).json())["models"][0]["expires_at"]
        clock.advance(60)
        answer = await client.post(
            "/api/generate",
            json={"model": "qwen2.5:7b", "prompt": "hi", "stream": False, "keep_alive": 600},
        )
        reply = await answer.json()
        assert reply["response"]
        assert reply["done_reason"] == "stop"
        second = (await (await client.get("/api/ps")).json())["models"][0]["expires_at"]
        moved = dt.datetime.fromisoformat(second) - dt.datetime.fromisoformat(first)
        assert moved == dt.timedelta(seconds=60)

        clock.advance(601)
        await client.get("/api/ps")  # every request first expires what has run out
        await asyncio.sleep(0.01)
        assert (await (await client.get("/api/ps")).json())["models"] == []
        assert gpus.device(0).used_bytes == 0


async def test_streamed_generate_and_chat(gpus: SimulatedGPUs) -> None:
    async with serving(fake_ollama(gpus).app()) as client:
        await pull(client, "made-up:1b")
        chunks = await lines(
            await client.post("/api/generate", json={"model": "made-up:1b", "prompt": "hi"})
        )
        assert [c["done"] for c in chunks][-2:] == [False, True]
        assert "".join(c["response"] for c in chunks).startswith("This is a simulated reply")
        chat = await client.post(
            "/api/chat",
            json={
                "model": "made-up:1b",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
            },
        )
        assert (await chat.json())["message"]["role"] == "assistant"
        [running] = (await (await client.get("/api/ps")).json())["models"]
        assert running["size_vram"] == GENERIC.size_vram


async def test_model_not_pulled_is_404(gpus: SimulatedGPUs) -> None:
    async with serving(fake_ollama(gpus).app()) as client:
        response = await client.post("/api/generate", json={"model": "llama3.2:1b"})
        assert response.status == 404
        assert await response.json() == {"error": "model 'llama3.2:1b' not found"}
        shown = await client.post("/api/show", json={"model": "llama3.2:1b"})
        assert shown.status == 404


async def test_a_first_model_that_does_not_fit_loads_partly_on_the_cpu(tmp_path: Path) -> None:
    # llm/server.go createLayout (v0.12.3): the layers that do not fit stay in host memory.
    small = SimulatedGPUs.create(tmp_path / "small.json", "n", total_bytes=4 * GIB)
    async with serving(fake_ollama(small).app()) as client:
        await pull(client, "qwen2.5:7b")
        response = await client.post("/api/generate", json={"model": "qwen2.5:7b"})
        assert response.status == 200
        [running] = (await (await client.get("/api/ps")).json())["models"]
        assert running["size"] == int(5.5 * GIB)
        assert 0 < running["size_vram"] <= 4 * GIB < running["size"]
        assert small.device(0).used_bytes == running["size_vram"]


async def test_main_gpu_chooses_nothing_and_failures_are_injectable(gpus: SimulatedGPUs) -> None:
    # In 0.12 the layout takes the GPUs with the most free memory; main_gpu is only an option.
    gpus.pressure(0, 1 * GIB)
    fake = fake_ollama(gpus, fail_load=frozenset({"broken:1b"}))
    async with serving(fake.app()) as client:
        await pull(client, "llama3.2:1b")
        await pull(client, "broken:1b")
        await client.post(
            "/api/generate", json={"model": "llama3.2:1b", "options": {"main_gpu": 0}}
        )
        assert gpus.device(1).used_bytes == 2 * GIB
        broken = await client.post("/api/generate", json={"model": "broken:1b"})
        assert broken.status == 500
        assert "llama runner process has terminated" in (await broken.json())["error"]
    assert gpus.device(1).used_bytes == 0, "stopping the server frees its VRAM"


async def test_embedding_models_load_through_embed(gpus: SimulatedGPUs) -> None:
    async with serving(fake_ollama(gpus).app()) as client:
        await pull(client, "nomic-embed-text")
        refused = await client.post("/api/generate", json={"model": "nomic-embed-text"})
        assert refused.status == 400
        embedded = await client.post(
            "/api/embed", json={"model": "nomic-embed-text", "input": "hello"}
        )
        [vector] = (await embedded.json())["embeddings"]
        assert len(vector) == 768
        assert math.isclose(sum(x * x for x in vector), 1.0)
        [running] = (await (await client.get("/api/ps")).json())["models"]
        assert running["name"] == "nomic-embed-text:latest"


async def test_show_reports_what_estimates_need(gpus: SimulatedGPUs) -> None:
    async with serving(fake_ollama(gpus).app()) as client:
        await pull(client, "qwen2.5:7b")
        shown = await (await client.post("/api/show", json={"model": "qwen2.5:7b"})).json()
        assert shown["details"]["family"] == "qwen2"
        assert shown["model_info"]["general.parameter_count"] == 7_615_616_512
        assert shown["model_info"]["qwen2.context_length"] == 32_768
        assert shown["capabilities"] == ["completion"]


async def test_serve_announces_its_port_first_and_stops_on_the_event(
    gpus: SimulatedGPUs, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    serving_task = asyncio.create_task(serve(fake_ollama(gpus).app(), sock, stop))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                if capsys.readouterr().out == f"listening on http://127.0.0.1:{port}\n":
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the server never announced its port")
            async with session.get(f"http://127.0.0.1:{port}/") as root:
                assert await root.text() == "Ollama is running"
    finally:
        stop.set()
        await serving_task
        sock.close()


def test_ollama_main_needs_a_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.json")
    assert fake_ollama_main(["--port", "0", "--gpu-state", missing]) == 1
    assert "no simulated GPU state" in capsys.readouterr().err


# --- fake vLLM --------------------------------------------------------------------------------


def fake_vllm_server(
    gpus: SimulatedGPUs, sleep_mode: bool = True, request_seconds: float = 0.0
) -> FakeVLLM:
    fake = FakeVLLM(
        gpus,
        owner="pid:9:vllm:8001",
        gpu="1",
        model="Qwen/Qwen2.5-0.5B-Instruct",
        gpu_memory_utilization=0.5,
        sleep_mode=sleep_mode,
        request_seconds=request_seconds,
        dev_mode=sleep_mode,
    )
    fake.allocate()
    return fake


async def test_vllm_sleep_and_wake_move_vram(gpus: SimulatedGPUs) -> None:
    fake = fake_vllm_server(gpus)
    budget = 12 * GIB  # utilization 0.5 of 24 GiB, and the context outside it
    full = budget + INSTANCE_OVERHEAD_BYTES
    async with serving(fake.app()) as client:
        assert gpus.device(1).used_bytes == full
        assert (await client.post("/sleep", params={"level": "1"})).status == 200
        assert await (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
        residual = INSTANCE_OVERHEAD_BYTES + math.ceil(budget * SLEEP_RESIDUAL)
        assert gpus.device(1).used_bytes == residual
        gpus.pressure(1, 20 * GIB)
        refused = await client.post("/wake_up")
        assert refused.status == 500
        assert "CUDA out of memory" in (await refused.json())["error"]["message"]
        assert await (await client.get("/is_sleeping")).json() == {"is_sleeping": True}

        gpus.pressure(1, 0)
        assert (await client.post("/wake_up")).status == 200
        assert gpus.device(1).used_bytes == full
        assert fake.crashed is None
    assert gpus.device(1).used_bytes == 0


async def test_vllm_dies_on_a_request_while_sleeping(gpus: SimulatedGPUs) -> None:
    fake = fake_vllm_server(gpus)
    async with serving(fake.app()) as client:
        assert (await client.post("/sleep", params={"level": "1"})).status == 200
        asleep = await client.post("/v1/completions", json={"prompt": "hi"})
        assert asleep.status == 500
        assert fake.crashed is not None
        assert "EngineDeadError" in fake.crashed


async def test_vllm_dies_on_sleep_with_requests_in_flight(gpus: SimulatedGPUs) -> None:
    fake = fake_vllm_server(gpus, request_seconds=1.0)
    async with serving(fake.app()) as client:
        running = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi"}))
        await asyncio.sleep(0.2)
        answer = await client.post("/sleep", params={"level": "1"})
        assert answer.status == 500
        assert fake.crashed is not None
        assert "1 request(s) in flight" in fake.crashed
        await running


async def test_vllm_sleep_endpoints_need_dev_mode(gpus: SimulatedGPUs) -> None:
    fake = FakeVLLM(gpus, "pid:9:vllm:1", "0", "m", 0.1, sleep_mode=True, dev_mode=False)
    fake.allocate()
    async with serving(fake.app()) as client:
        for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
            assert (await client.request(method, path)).status == 404
        assert await (await client.get("/version")).json() == {"version": "0.11.0"}


async def test_vllm_streams_server_sent_events(gpus: SimulatedGPUs) -> None:
    async with serving(fake_vllm_server(gpus, sleep_mode=False).app()) as client:
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 3}),
        ):
            answer = await client.post(path, json={**body, "stream": True})
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/event-stream")
            events = [
                line.removeprefix("data: ")
                for line in (await answer.text()).split("\n\n")
                if line.strip()
            ]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(event) for event in events[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            assert len(chunks) > 1


def test_vllm_refuses_unknown_flags_like_vllm(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        fake_vllm.main(["serve", "m", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_vllm_reads_cuda_visible_devices_as_integers() -> None:
    assert fake_vllm.visible_device({"CUDA_VISIBLE_DEVICES": "1,0"}) == "1"
    assert fake_vllm.visible_device({}) == "0"
    with pytest.raises(ValueError, match="invalid literal for int"):
        fake_vllm.visible_device({"CUDA_VISIBLE_DEVICES": "GPU-4751ef7d-dc84-5eb3"})


def test_vllm_fake_download_leaves_a_model_in_the_hub_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"HF_HOME": str(tmp_path)}
    assert fake_hf_download.download("Qwen/Qwen2.5-0.5B-Instruct", env) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-2]["completedBytes"] == lines[-2]["totalBytes"] > 0
    snapshot = Path(lines[-1]["path"])
    assert (snapshot / "model.safetensors").is_file()
    assert snapshot.parent.parent / "refs" / "main" == (
        tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "refs" / "main"
    )
    assert fake_hf_download.download("missing/model", env) == 1
    assert "RepositoryNotFoundError" in capsys.readouterr().err


async def test_vllm_endpoints_and_metric_names(gpus: SimulatedGPUs) -> None:
    async with serving(fake_vllm_server(gpus, sleep_mode=False).app()) as client:
        assert (await client.get("/health")).status == 200
        [model] = (await (await client.get("/v1/models")).json())["data"]
        assert (model["id"], model["object"]) == ("Qwen/Qwen2.5-0.5B-Instruct", "model")
        completion = await client.post(
            "/v1/completions",
            json={"model": "Qwen/Qwen2.5-0.5B-Instruct", "prompt": "one two", "max_tokens": 3},
        )
        body = await completion.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        chat = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert (await chat.json())["choices"][0]["finish_reason"] == "stop"
        wrong = await client.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert wrong.status == 404
        assert (await client.post("/sleep")).status == 404, "no sleep mode without the flag"

        metrics = await (await client.get("/metrics")).text()
        model_label = 'model_name="Qwen/Qwen2.5-0.5B-Instruct"'
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:gpu_cache_usage_perc",
        ):
            assert f"{name}{{{model_label}}} 0.0" in metrics
        assert (
            f'vllm:request_success_total{{finished_reason="length",{model_label}}} 1.0' in metrics
        )
        assert f"vllm:prompt_tokens_total{{{model_label}}} 3.0" in metrics
        assert f"vllm:generation_tokens_total{{{model_label}}} " in metrics


def test_vllm_main_frees_stale_memory_and_reports_failed_start(
    gpus: SimulatedGPUs,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gpus.allocate(0, f"pid:1:vllm:{port}", 20 * GIB)  # left by a killed predecessor
    monkeypatch.setenv("VRAM_SIM_GPU_STATE", str(state))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("VRAM_SIM_VLLM_FAIL", "1")
    argv = [
        "serve",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.5",
        "--trust-remote-code",
    ]
    assert fake_vllm.main(argv) == 1
    assert "Engine core initialization failed" in capsys.readouterr().err
    assert gpus.device(0).allocations == {}

    monkeypatch.delenv("VRAM_SIM_VLLM_FAIL")
    gpus.pressure(0, 20 * GIB)
    assert fake_vllm.main(argv) == 1
    assert "torch.OutOfMemoryError: CUDA out of memory" in capsys.readouterr().err


def test_the_operators_vllm_budget_covers_what_an_instance_holds_outside_its_share() -> None:
    """The fake's overhead is vLLM's, its own figure; the budget must not fall short of it."""
    assert VLLM_INSTANCE_OVERHEAD_BYTES >= INSTANCE_OVERHEAD_BYTES


def test_a_fake_vllm_starts_without_the_api_models() -> None:
    """Started once per model, it must not pay for the pydantic models (about 0.4 s a start)."""
    probe = "import sys, vram_operator.simulation.fake_vllm; print(sorted(sys.modules))"
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert "'vram_operator.simulation.fake_vllm'" in found
    assert "'vram_operator.api'" not in found
    assert "'pydantic'" not in found
