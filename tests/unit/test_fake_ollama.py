"""The fake Ollama behaves as Ollama 0.12.3 does where the agent can tell: names, runner
reloads, its own evictions and CPU offload, the delayed end of an unload, /api/show's arrays.

Each test names the upstream behaviour it pins (github.com/ollama/ollama, tag v0.12.3)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from vram_operator.simulation.fake_ollama import (
    DEFAULT_CATALOG,
    VERSION,
    CatalogModel,
    FakeOllama,
    OllamaConfig,
    needs_reload,
    parse_env_keep_alive,
    parse_name,
    runner_options,
)
from vram_operator.simulation.gpu import GIB, SimulatedGPUs

pytestmark = pytest.mark.unit

Client = TestClient[web.Request, web.Application]

CATALOG = {
    **DEFAULT_CATALOG,
    "mymodel:latest": CatalogModel(size=500_000_000, size_vram=1 * GIB),
    "hybrid:1b": CatalogModel(
        size=900_000_000,
        size_vram=1 * GIB,
        block_count=8,
        head_count_kv=(0, 0, 8, 0, 0, 8, 0, 0),
    ),
}


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def gpus_of(tmp_path: Path, *sizes: int) -> SimulatedGPUs:
    return SimulatedGPUs.create(tmp_path / "gpus.json", node="n", count=len(sizes), sizes=sizes)


@contextlib.asynccontextmanager
async def serving(
    gpus: SimulatedGPUs, clock: Clock | None = None, **config: Any
) -> AsyncIterator[tuple[FakeOllama, Client]]:
    fake = FakeOllama(gpus, "pid:9:ollama:1", CATALOG, OllamaConfig(**config), clock or Clock())
    async with TestClient(TestServer(fake.app())) as client:
        yield fake, client


async def call(client: Client, path: str, body: Any = None) -> tuple[int, Any]:
    if body is None:
        response = await client.get(path)
    else:
        response = await client.post(path, json=body)
    return response.status, await response.json()


async def ps(client: Client) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = (await call(client, "/api/ps"))[1]["models"]
    return models


async def pull(client: Client, *models: str) -> None:
    for model in models:
        status, body = await call(client, "/api/pull", {"model": model, "stream": False})
        assert status == 200, body


# --- names: types/model/name.go, server/routes.go getExistingName ------------------------------


@pytest.mark.parametrize(
    ("text", "short"),
    [
        ("llama3.2:1b", "llama3.2:1b"),
        ("library/llama3.2:1b", "llama3.2:1b"),
        ("registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b"),
        ("https://registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b"),
        ("mymodel", "mymodel:latest"),
        ("user/mymodel", "user/mymodel:latest"),
        ("hf.co/bartowski/Qwen-GGUF:Q4_K_M", "hf.co/bartowski/Qwen-GGUF:Q4_K_M"),
        ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t"),
    ],
)
def test_names_parse_as_ollama_parses_them(text: str, short: str) -> None:
    assert parse_name(text).short == short
    assert parse_name(text).valid


@pytest.mark.parametrize("text", ["", "llama3.2:", "/llama3.2", "a//b", "bad name", "x:y/z:"])
def test_invalid_names_are_invalid(text: str) -> None:
    assert not parse_name(text).valid


async def test_ps_and_tags_list_short_names_matched_without_case(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB)) as (_, client):
        await pull(client, "library/llama3.2:1b", "mymodel")
        tags = [m["name"] for m in (await call(client, "/api/tags"))[1]["models"]]
        assert sorted(tags) == ["llama3.2:1b", "mymodel:latest"]
        # A request in another case, or fully qualified, finds the stored model.
        status, _ = await call(client, "/api/generate", {"model": "Llama3.2:1B"})
        assert status == 200
        status, _ = await call(client, "/api/generate", {"model": "MyModel"})
        assert status == 200
        assert sorted(m["name"] for m in await ps(client)) == ["llama3.2:1b", "mymodel:latest"]
        status, body = await call(client, "/api/pull", {"model": "bad name"})
        assert (status, body) == (400, {"error": "invalid model name"})


async def test_a_model_pulled_in_another_case_keeps_that_case(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB)) as (_, client):
        await pull(client, "MyModel")
        await pull(client, "mymodel:LATEST")  # the same model: no second entry
        tags = [m["name"] for m in (await call(client, "/api/tags"))[1]["models"]]
        assert tags == ["MyModel:latest"]


# --- runner options: server/sched.go needsReload --------------------------------------------


def test_runner_options_layer_defaults_model_and_request() -> None:
    options = runner_options({"num_ctx": 8192}, {"num_batch": 256, "temperature": 0.1})
    assert options["num_ctx"] == 8192
    assert options["num_batch"] == 256
    assert "temperature" not in options  # not a runner option: never reloads
    assert runner_options({}, {"num_ctx": 1})["num_ctx"] == 4  # GetRunner's floor
    running = runner_options({}, {"num_gpu": 10})
    assert not needs_reload(running, runner_options({}, {}))  # num_gpu -1 takes what runs
    assert needs_reload(running, runner_options({}, {"num_gpu": 5}))


async def test_a_request_with_other_runner_options_reloads_the_runner(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB)) as (fake, client):
        await pull(client, "llama3.2:1b")
        await call(client, "/api/generate", {"model": "llama3.2:1b", "options": {"num_ctx": 8192}})
        [big] = await ps(client)
        assert big["context_length"] == 8192
        assert big["size"] > 2 * GIB  # a larger KV cache
        # A client's plain request carries no options, so it runs with the defaults: reload.
        status, reply = await call(
            client, "/api/generate", {"model": "llama3.2:1b", "prompt": "hi", "stream": False}
        )
        assert status == 200
        assert reply["load_duration"] >= 0
        [default] = await ps(client)
        assert default["context_length"] == 4096
        assert default["size"] == 2 * GIB
        assert fake.loads["llama3.2:1b"] == 2
        # Sampling options are not runner options: no reload.
        await call(
            client,
            "/api/generate",
            {"model": "llama3.2:1b", "prompt": "hi", "stream": False, "options": {"top_k": 1}},
        )
        assert fake.loads["llama3.2:1b"] == 2


async def test_a_created_model_carries_its_options_and_shares_the_runner(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB)) as (fake, client):
        await pull(client, "llama3.2:1b")
        status, body = await call(
            client,
            "/api/create",
            {
                "model": "llama3.2:1b-big",
                "from": "llama3.2:1b",
                "parameters": {"num_ctx": 8192},
                "stream": False,
            },
        )
        assert (status, body) == (200, {"status": "success"})
        shown = (await call(client, "/api/show", {"model": "llama3.2:1b-big"}))[1]
        assert "num_ctx" in shown["parameters"]
        await call(client, "/api/generate", {"model": "llama3.2:1b-big"})
        await call(
            client,
            "/api/generate",
            {"model": "llama3.2:1b-big", "prompt": "hi", "stream": False},
        )
        assert fake.loads["llama3.2:1b-big"] == 1  # no options in the request, no reload
        [running] = await ps(client)
        assert (running["name"], running["context_length"]) == ("llama3.2:1b-big", 8192)
        # The plain name shares the weights, so it takes the runner over with its defaults.
        await call(
            client, "/api/generate", {"model": "llama3.2:1b", "prompt": "hi", "stream": False}
        )
        [running] = await ps(client)
        assert (running["name"], running["context_length"]) == ("llama3.2:1b", 4096)
        status, body = await call(client, "/api/create", {"model": "x:1"})
        assert (status, body) == (400, {"error": "neither 'from' or 'files' was specified"})


# --- its own eviction and offload: sched.go findRunnerToUnload, llm/server.go createLayout -----


async def test_a_load_that_does_not_fit_evicts_the_idle_runner_with_the_shortest_keep_alive(
    tmp_path: Path,
) -> None:
    gpus = gpus_of(tmp_path, 6 * GIB)
    async with serving(gpus, unload_seconds=0) as (fake, client):
        await pull(client, "llama3.2:1b", "mymodel", "keep:1", "llama3.2:3b")
        await call(client, "/api/generate", {"model": "llama3.2:1b", "keep_alive": -1})
        await call(client, "/api/generate", {"model": "mymodel", "keep_alive": "10m"})
        await call(client, "/api/generate", {"model": "keep:1", "keep_alive": "1h"})
        # 4 GiB held of 6: the 3.2 GiB model needs room; mymodel has the shortest keep-alive,
        # then keep:1 (together 2 GiB); llama3.2:1b (forever) stays.
        status, _ = await call(client, "/api/generate", {"model": "llama3.2:3b"})
        assert status == 200
        names = sorted(m["name"] for m in await ps(client))
        assert names == ["llama3.2:1b", "llama3.2:3b"]
        assert all(m["size_vram"] == m["size"] for m in await ps(client))
        assert fake.loads["mymodel:latest"] == 1


async def test_max_loaded_models_evicts_even_when_memory_is_free(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB), unload_seconds=0, max_loaded_models=1) as (
        _,
        client,
    ):
        await pull(client, "llama3.2:1b", "mymodel")
        await call(client, "/api/generate", {"model": "llama3.2:1b", "keep_alive": -1})
        await call(client, "/api/generate", {"model": "mymodel"})
        assert [m["name"] for m in await ps(client)] == ["mymodel:latest"]


async def test_the_default_runner_limit_is_three_per_gpu(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB), unload_seconds=0) as (_, client):
        models = ["a:1", "b:1", "c:1", "d:1"]
        await pull(client, *models)
        for model in models:
            await call(client, "/api/generate", {"model": model})
        assert len(await ps(client)) == 3


async def test_a_model_too_big_for_one_gpu_is_split_across_two(tmp_path: Path) -> None:
    gpus = gpus_of(tmp_path, 4 * GIB, 4 * GIB)
    async with serving(gpus) as (_, client):
        await pull(client, "llama3.1:8b-instruct-q4_K_M")
        await call(client, "/api/generate", {"model": "llama3.1:8b-instruct-q4_K_M"})
        [running] = await ps(client)
        assert running["size_vram"] == running["size"] == 6 * GIB
        assert "gpu" not in running  # /api/ps names no GPU
        assert all(device.used_bytes > 0 for device in gpus.devices())


async def test_num_gpu_zero_keeps_the_model_in_host_memory(tmp_path: Path) -> None:
    gpus = gpus_of(tmp_path, 24 * GIB)
    async with serving(gpus) as (_, client):
        await pull(client, "llama3.2:1b")
        await call(client, "/api/generate", {"model": "llama3.2:1b", "options": {"num_gpu": 0}})
        [running] = await ps(client)
        assert (running["size_vram"], running["size"]) == (0, 2 * GIB)
        assert gpus.device(0).used_bytes == 0


# --- unload: routes.go GenerateHandler, sched.go expireRunner ------------------------------


async def test_unload_answers_at_once_and_frees_memory_later(tmp_path: Path) -> None:
    gpus = gpus_of(tmp_path, 24 * GIB)
    clock = Clock()
    async with serving(gpus, clock, unload_seconds=0.2) as (_, client):
        await pull(client, "llama3.2:1b")
        await call(client, "/api/generate", {"model": "llama3.2:1b", "keep_alive": -1})
        status, body = await call(
            client, "/api/generate", {"model": "llama3.2:1b", "prompt": "", "keep_alive": 0}
        )
        assert (status, body["done_reason"]) == (200, "unload")
        [going] = await ps(client)  # still listed, and still holding its memory
        assert dt.datetime.fromisoformat(going["expires_at"]) == clock.now
        assert gpus.device(0).used_bytes == 2 * GIB
        await asyncio.sleep(0.3)
        assert await ps(client) == []
        assert gpus.device(0).used_bytes == 0


async def test_keep_alive_zero_with_a_prompt_unloads_after_answering(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB), unload_seconds=0) as (_, client):
        await pull(client, "llama3.2:1b")
        status, reply = await call(
            client,
            "/api/generate",
            {"model": "llama3.2:1b", "prompt": "hi", "stream": False, "keep_alive": 0},
        )
        assert (status, reply["done_reason"]) == (200, "stop")
        await asyncio.sleep(0.01)
        assert await ps(client) == []


# --- /api/show: routes.go getModelData --------------------------------------------------------


async def test_show_drops_arrays_unless_verbose(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB)) as (_, client):
        await pull(client, "hybrid:1b")
        plain = (await call(client, "/api/show", {"model": "hybrid:1b"}))[1]["model_info"]
        assert plain["llama.attention.head_count_kv"] is None
        verbose = (await call(client, "/api/show", {"model": "hybrid:1b", "verbose": True}))[1]
        assert verbose["model_info"]["llama.attention.head_count_kv"] == [0, 0, 8, 0, 0, 8, 0, 0]


# --- the rest of the surface ----------------------------------------------------------------


async def test_version_and_error_shapes(tmp_path: Path) -> None:
    async with serving(gpus_of(tmp_path, 24 * GIB)) as (_, client):
        assert (
            (await call(client, "/api/version"))[1] == {"version": VERSION} == {"version": "0.12.3"}
        )
        assert await call(client, "/api/generate", {"model": "nope:1"}) == (
            404,
            {"error": "model 'nope:1' not found"},
        )
        assert await call(client, "/api/embed", {"model": "nope:1"}) == (
            404,
            {"error": 'model "nope:1" not found, try pulling it first'},
        )
        status, body = await call(client, "/api/generate", {"model": "x:1", "keep_alive": "10"})
        assert (status, body) == (400, {"error": 'time: missing unit in duration "10"'})
        await pull(client, "llama3.2:1b")
        status, body = await call(
            client, "/api/generate", {"model": "llama3.2:1b", "options": {"num_ctx": "big"}}
        )
        assert (status, body) == (500, {"error": 'option "num_ctx" must be of type integer'})


def test_the_command_line_reads_keep_alive_as_ollama_keep_alive_does() -> None:
    assert parse_env_keep_alive("-1") == float("inf")  # the chart's value
    assert parse_env_keep_alive("30") == 30.0
    assert parse_env_keep_alive("5m") == 300.0
    assert parse_env_keep_alive("nonsense") == 300.0
