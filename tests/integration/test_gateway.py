"""The gateway as a user meets it, through the official `openai` and `ollama` clients.

Two halves: the gateway in-process in front of the fake Ollama and fake vLLM, with the view fed
the GPUNode and ModelDeployment objects a cluster would hold (fast, every protocol detail); and
the gateway as a process on the local control plane, in front of simulated nodes whose agents
and operator are real, for routing across replicas, a killed agent, and requests held while a
model loads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
import yaml
from aiohttp import web
from kubernetes import client

from vram_operator.gateway.server import Gateway, GatewayConfig
from vram_operator.gateway.view import ClusterView
from vram_operator.simulation.cluster import SimulatedCluster
from vram_operator.simulation.fake_ollama import FakeOllama, OllamaConfig
from vram_operator.simulation.fake_vllm import FakeVLLM
from vram_operator.simulation.gpu import GIB, SimulatedGPUs
from vram_operator.simulation.nodes import ManagedProcess, free_port

pytestmark = pytest.mark.integration

QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
HELLO: Any = [{"role": "user", "content": "hello"}]
EMBED = "BAAI/bge-small-en-v1.5-embed"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


# --- in-process: the gateway in front of the fakes ----------------------------------------------


async def _site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def _deployment(name: str, model: str, backend: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vram.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": model, "backend": backend, **spec},
    }


def _gpunode(name: str, ollama_url: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "vram.dev/v1alpha1",
        "kind": "GPUNode",
        "metadata": {"name": name},
        "status": {
            "lastHeartbeatTime": dt.datetime.now(dt.UTC).isoformat(),
            "backends": [{"name": "ollama", "healthy": True, "endpoint": ollama_url}],
            "models": models,
        },
    }


class Stack:
    """The fakes, a gateway over a hand-fed view, and its URL."""

    def __init__(self, tmp: Path) -> None:
        self.gpus = SimulatedGPUs.create(tmp / "gpus.json", node="n1", count=1, sizes=[24 * GIB])
        self.view = ClusterView(grace=30)
        self.gateway = Gateway(self.view, GatewayConfig(queue_size=5, queue_timeout=2))
        self.runners: list[web.AppRunner] = []
        self.url = ""
        self.ollama_url = ""
        self.vllm_url = ""
        self.nodes: list[dict[str, Any]] = []

    async def start(self) -> Stack:
        fake = FakeOllama(self.gpus, "test:ollama", config=OllamaConfig())
        runner, self.ollama_url = await _site(fake.app())
        self.runners.append(runner)
        async with aiohttp.ClientSession() as http:
            for model in ("llama3.2:1b", "nomic-embed-text"):
                await (await http.post(self.ollama_url + "/api/pull", json={"model": model})).read()
        vllm = FakeVLLM(self.gpus, "test:vllm", "0", QWEN, 0.3, auto_tools=True)
        vllm.allocate()
        runner, self.vllm_url = await _site(vllm.app())
        self.runners.append(runner)
        embed = FakeVLLM(self.gpus, "test:embed", "0", EMBED, 0.1)
        embed.allocate()
        runner, embed_url = await _site(embed.app())
        self.runners.append(runner)
        self.view.replace(
            "modeldeployments",
            [
                _deployment("chat", "llama3.2:1b", "ollama"),
                _deployment("nomic", "nomic-embed-text", "ollama"),
                _deployment("qwen", QWEN, "vllm"),
                _deployment("bge", EMBED, "vllm"),
                _deployment("cold", "llama3.2:3b", "ollama"),
            ],
        )
        loaded = [
            {"key": "default.chat", "model": "llama3.2:1b", "backend": "ollama", "state": "Loaded"},
            {
                "key": "default.nomic",
                "model": "nomic-embed-text",
                "backend": "ollama",
                "state": "Loaded",
            },
            {
                "key": "default.qwen",
                "model": QWEN,
                "backend": "vllm",
                "state": "Loaded",
                "endpoint": self.vllm_url,
            },
            {
                "key": "default.bge",
                "model": EMBED,
                "backend": "vllm",
                "state": "Loaded",
                "endpoint": embed_url,
            },
            {
                "key": "default.cold",
                "model": "llama3.2:3b",
                "backend": "ollama",
                "state": "Loading",
            },
        ]
        self.nodes = [_gpunode("n1", self.ollama_url, loaded)]
        self.view.replace("gpunodes", self.nodes)
        runner, self.url = await _site(self.gateway.app())
        self.runners.append(runner)
        self.openai = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)
        self.ollama = ollama.AsyncClient(host=self.url)
        return self

    async def stop(self) -> None:
        await self.openai.close()
        await self.ollama.close()
        for runner in reversed(self.runners):
            await runner.cleanup()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    started = await Stack(tmp_path).start()
    try:
        yield started
    finally:
        await started.stop()


async def test_openai_client_lists_models_with_their_state(stack: Stack) -> None:
    models = await stack.openai.models.list()
    listed = {m.id: (m.model_extra or {}).get("state") for m in models.data}
    assert listed == {
        "bge": "Ready",
        "chat": "Ready",
        "cold": "Loading",
        "nomic": "Ready",
        "qwen": "Ready",
    }


@pytest.mark.parametrize("model", ["chat", "qwen"])
async def test_openai_chat_streaming_and_not(stack: Stack, model: str) -> None:
    gateway = stack.openai
    messages: Any = [{"role": "user", "content": "hello"}]
    reply = await gateway.chat.completions.create(model=model, messages=messages)
    served = "llama3.2:1b" if model == "chat" else QWEN
    assert reply.choices[0].message.content == f"This is a simulated reply from {served}."
    stream = await gateway.chat.completions.create(model=model, messages=messages, stream=True)
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert len(parts) > 3
    assert "".join(parts) == f"This is a simulated reply from {served}."


async def test_openai_completions_through_both_backends(stack: Stack) -> None:
    gateway = stack.openai
    for model in ("chat", "qwen"):
        reply = await gateway.completions.create(model=model, prompt="once upon", max_tokens=3)
        assert reply.choices[0].text == "This is a"
        assert reply.choices[0].finish_reason == "length"


async def test_openai_embeddings_through_both_backends(stack: Stack) -> None:
    gateway = stack.openai
    ollama_vectors = await gateway.embeddings.create(model="nomic", input=["a", "b"])
    assert [len(d.embedding) for d in ollama_vectors.data] == [768, 768]
    vllm_vectors = await gateway.embeddings.create(model="bge", input="a")
    assert len(vllm_vectors.data[0].embedding) == 384
    again = await gateway.embeddings.create(model="bge", input="a")
    assert again.data[0].embedding == vllm_vectors.data[0].embedding  # deterministic


@pytest.mark.parametrize("model", ["chat", "qwen"])
async def test_openai_tools_pass_through_and_come_back_as_tool_calls(
    stack: Stack, model: str
) -> None:
    reply = await stack.openai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "weather in Oslo?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "simulated", "days": 0}  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls"


async def test_ollama_client_lists_chats_streams_and_embeds(stack: Stack) -> None:
    gateway = stack.ollama
    listed = await gateway.list()
    assert [m.model for m in listed.models] == ["chat", "cold", "nomic"]  # Ollama-backed only
    running = await gateway.ps()
    assert [m.model for m in running.models] == ["chat", "nomic"]
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/api/version") as answer:
        assert await answer.json() == {"version": "0.12.3"}
    reply = await gateway.chat(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == "This is a simulated reply from llama3.2:1b."
    parts = [
        part.message.content or ""
        async for part in await gateway.chat(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    ]
    assert "".join(parts) == "This is a simulated reply from llama3.2:1b."
    generated = await gateway.generate(model="chat", prompt="hi")
    assert generated.response == "This is a simulated reply from llama3.2:1b."
    vectors = await gateway.embed(model="nomic", input=["x", "y"])
    assert len(vectors.embeddings) == 2
    assert len(vectors.embeddings[0]) == 768


async def test_ollama_client_tools_pass_through(stack: Stack) -> None:
    reply = await stack.ollama.chat(
        model="chat", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL]
    )
    [call] = reply.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert dict(call.function.arguments) == {"city": "simulated", "days": 0}


async def test_ollama_management_and_vllm_models_are_refused_in_ollamas_shape(
    stack: Stack,
) -> None:
    gateway = stack.ollama
    with pytest.raises(ollama.ResponseError) as pulled:
        await gateway.pull("llama3.2:3b")
    assert pulled.value.status_code == 404
    assert "not served by the vram-operator gateway" in pulled.value.error
    with pytest.raises(ollama.ResponseError) as deleted:
        await gateway.delete("chat")
    assert deleted.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as vllm:
        await gateway.chat(model="qwen", messages=[{"role": "user", "content": "hi"}])
    assert vllm.value.status_code == 400
    assert "OpenAI API" in vllm.value.error


async def test_unknown_model_is_404_naming_the_known_ones_in_both_shapes(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await stack.openai.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found"
    assert "known models: bge, chat, cold, nomic, qwen" in caught.value.message
    with pytest.raises(ollama.ResponseError) as ollama_caught:
        await stack.ollama.chat(model="gpt-4", messages=[])
    assert ollama_caught.value.status_code == 404
    assert "known models: bge, chat, cold, nomic, qwen" in ollama_caught.value.error


async def test_a_backends_own_error_comes_back_in_its_shape(stack: Stack) -> None:
    """vLLM refuses chat for a pooling model with its OpenAI-shaped 400; passed on as is."""
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.openai.chat.completions.create(
            model="bge", messages=[{"role": "user", "content": "hi"}]
        )
    assert "does not support Chat Completions API" in caught.value.message


async def test_unknown_fields_reach_the_backend_untouched(stack: Stack) -> None:
    """A recording backend sees the body as sent, `model` rewritten to the served name, and
    Ollama's keep_alive and runner options removed."""
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"model": "x", "message": {"role": "assistant", "content": ""}})

    app = web.Application()
    app.router.add_post("/api/chat", record)
    app.router.add_post("/v1/chat/completions", record)
    runner, url = await _site(app)
    stack.runners.append(runner)
    loaded = {"key": "default.chat", "model": "llama3.2:1b", "backend": "ollama", "state": "Loaded"}
    stack.view.replace("gpunodes", [_gpunode("n1", url, [loaded])])
    body = {
        "model": "default/chat",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER_TOOL],
        "x_vendor_extension": {"nested": [1, 2.5, None]},
        "stream": False,
        "keep_alive": 0,
        "options": {"temperature": 0.2, "num_ctx": 2048},
    }
    async with aiohttp.ClientSession() as http:
        for path in ("/api/chat", "/v1/chat/completions"):
            async with http.post(stack.url + path, json=body) as response:
                assert response.status == 200
    native, compatible = seen
    assert native == {
        **{k: v for k, v in body.items() if k != "keep_alive"},
        "model": "llama3.2:1b",
        "options": {"temperature": 0.2},
    }
    assert compatible == {**body, "model": "llama3.2:1b"}


async def test_a_replica_that_refuses_connections_is_skipped(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    loaded = {"key": "default.chat", "model": "llama3.2:1b", "backend": "ollama", "state": "Loaded"}
    stack.view.replace(
        "gpunodes", [_gpunode("dead", dead, [loaded]), _gpunode("n1", stack.ollama_url, [loaded])]
    )
    gateway = stack.openai
    for _ in range(4):
        reply = await gateway.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
    metrics = stack.gateway.metrics
    assert metrics.retries.labels("default", "chat")._value.get() >= 1


async def test_a_cold_request_waits_then_times_out_with_retry_after(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "cold", "messages": [{"role": "user", "content": "hi"}]}
        started = time.monotonic()
        async with http.post(stack.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            error = (await response.json())["error"]
        assert time.monotonic() - started >= 2
        assert error["code"] == "model_not_ready"
        assert "Loading" in error["message"]


async def test_a_cold_request_goes_through_once_the_model_is_loaded(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        await (
            await http.post(stack.ollama_url + "/api/pull", json={"model": "llama3.2:3b"})
        ).read()

    async def finish_loading() -> None:
        await asyncio.sleep(0.5)
        models = stack.nodes[0]["status"]["models"]
        models[-1] = {**models[-1], "state": "Loaded"}
        stack.view.replace("gpunodes", stack.nodes)

    loader = asyncio.create_task(finish_loading())
    reply = await stack.ollama.generate(model="cold", prompt="hi")
    await loader
    assert reply.response == "This is a simulated reply from llama3.2:3b."
    waits = stack.gateway.metrics.cold_waits.labels("default", "cold", "served")._value.get()
    assert waits == 1


# --- on the local control plane ------------------------------------------------------------------


class GatewayProcess:
    """`vram-operator gateway` as a process, with its URL."""

    def __init__(self, cluster: SimulatedCluster, name: str, *args: str) -> None:
        self.process = ManagedProcess(
            name,
            [
                sys.executable,
                "-m",
                "vram_operator",
                "gateway",
                "--kubeconfig",
                cluster.kubeconfig,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--heartbeat-grace",
                "4",
                *args,
            ],
            cluster.workdir / f"{name}.log",
            None,
        )
        self.process.start()
        match = self.process.wait_for_line(re.compile(r"listening on (http://[0-9.]+:[0-9]+)"))
        self.url = match.group(1)

    def metric(self, metric: str, /, **labels: str) -> float:
        import urllib.request

        text = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(metric + "{"):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def gateway_factory(sim_cluster: SimulatedCluster) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(*args: str) -> GatewayProcess:
        gateway = GatewayProcess(sim_cluster, f"gateway-{len(started)}", *args)
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            gateway.process.stop()


def _apply(kubectl: Any, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), check=True)


def _wait(
    predicate: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s\n{logs()}")


def _client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _models(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    with _client(gateway) as listing:
        models = listing.models.list()
    return {m.id: {**(m.model_extra or {})} for m in models.data}


def _writes(kubectl: Any) -> int:
    """Write requests the API server has answered so far (apiserver_request_total)."""
    text = kubectl("get", "--raw", "/metrics", check=True).stdout
    total = 0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and re.search(
            r'verb="(POST|PUT|PATCH|DELETE|APPLY)"', line
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


@pytest.mark.slow
def test_two_replicas_share_requests_and_a_lost_agent_is_routed_around(
    sim_cluster: SimulatedCluster, kubectl: Any, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    for name in ("gw-node-a", "gw-node-b"):
        sim_cluster.add_node(name, agent_args=["--report-interval", "1"])
    sim_cluster.start_operator("--heartbeat-grace", "30")
    gateway = gateway_factory()
    _apply(kubectl, _deployment("pair", "llama3.2:1b", "ollama", replicas=2))
    _wait(
        lambda: _models(gateway).get("pair", {}).get("ready_replicas") == 2,
        60,
        "2 ready replicas",
        sim_cluster.logs,
    )
    chat = _client(gateway)
    for _ in range(10):
        reply = chat.chat.completions.create(
            model="pair", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "This is a simulated reply from llama3.2:1b."
    per_node = {
        node: gateway.metric("vram_gateway_backend_requests_total", name="pair", node=node)
        for node in ("gw-node-a", "gw-node-b")
    }
    assert per_node == {"gw-node-a": 5.0, "gw-node-b": 5.0}

    # The API server saw no more writes for 10 requests than for none (heartbeats only).
    before = _writes(kubectl)
    started = time.monotonic()
    for _ in range(100):
        chat.chat.completions.create(model="pair", messages=[{"role": "user", "content": "hi"}])
    busy = _writes(kubectl) - before
    elapsed = time.monotonic() - started
    before = _writes(kubectl)
    time.sleep(elapsed)
    idle = _writes(kubectl) - before
    assert busy < idle + 10, f"{busy} writes during 100 requests, {idle} idle"

    agent = sim_cluster.nodes["gw-node-a"].agent
    assert agent is not None
    agent.stop(signal.SIGKILL)
    _wait(lambda: _models(gateway)["pair"]["ready_replicas"] == 1, 15, "a stale node", lambda: "")
    before_b = gateway.metric("vram_gateway_backend_requests_total", name="pair", node="gw-node-b")
    before_a = gateway.metric("vram_gateway_backend_requests_total", name="pair", node="gw-node-a")
    for _ in range(6):
        chat.chat.completions.create(model="pair", messages=[{"role": "user", "content": "hi"}])
    after_a = gateway.metric("vram_gateway_backend_requests_total", name="pair", node="gw-node-a")
    after_b = gateway.metric("vram_gateway_backend_requests_total", name="pair", node="gw-node-b")
    chat.close()
    assert (after_a - before_a, after_b - before_b) == (0, 6)


async def _burst(url: str, model: str, count: int) -> list[int]:
    async with aiohttp.ClientSession() as http:

        async def one() -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(url + "/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.slow
def test_requests_wait_while_a_model_loads_and_a_full_queue_is_429(
    sim_cluster: SimulatedCluster,
    kubectl: Any,
    k8s_client: client.ApiClient,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    sim_cluster.add_node(
        "gw-node-slow", agent_args=["--report-interval", "1"], ollama_args=["--load-seconds", "3"]
    )
    sim_cluster.start_operator("--heartbeat-grace", "30")
    roomy = gateway_factory("--queue-size", "100")
    tight = gateway_factory("--queue-size", "10")

    # One request sent as soon as the gateway knows the model: it waits, then succeeds.
    _apply(kubectl, _deployment("slow-one", "llama3.2:1b", "ollama"))
    _wait(lambda: "slow-one" in _models(roomy), 20, "slow-one listed", sim_cluster.logs)
    assert _models(roomy)["slow-one"]["state"] != "Ready"
    started = time.monotonic()
    with _client(roomy) as chat:
        reply = chat.chat.completions.create(
            model="slow-one", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.choices[0].message.content == "This is a simulated reply from llama3.2:1b."
    assert time.monotonic() - started > 1  # it did wait for the load
    assert roomy.metric("vram_gateway_cold_waits_total", name="slow-one", outcome="served") == 1

    # 50 at once during another load: all wait and succeed on one gateway; on the gateway
    # with a queue of 10, ten wait and succeed, the other forty get 429 at once.
    _apply(kubectl, _deployment("slow-many", "llama3.2:3b", "ollama"))
    _wait(
        lambda: "slow-many" in _models(roomy) and "slow-many" in _models(tight),
        20,
        "slow-many listed",
        sim_cluster.logs,
    )

    async def both() -> tuple[list[int], list[int]]:
        return await asyncio.gather(
            _burst(roomy.url, "slow-many", 50), _burst(tight.url, "slow-many", 50)
        )

    roomy_codes, tight_codes = asyncio.run(both())
    assert roomy_codes == [200] * 50
    assert sorted(tight_codes) == [200] * 10 + [429] * 40
    assert tight.metric("vram_gateway_rejected_requests_total", reason="queue_full") == 40


async def test_demand_and_metrics_count_what_the_gateway_served(stack: Stack) -> None:
    for _ in range(3):
        await stack.openai.chat.completions.create(model="chat", messages=HELLO)
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + "/demand") as answer:
            demand = await answer.json()
        async with http.get(stack.url + "/metrics") as answer:
            metrics = await answer.text()
    (chat,) = [m for m in demand["models"] if m["key"] == "default.chat"]
    assert (chat["requests"], chat["inFlight"], chat["waiting"]) == (3, 0, 0)
    assert chat["lastRequestTime"].endswith("Z")
    assert 'vram_gateway_ready_replicas{name="chat",namespace="default"} 1.0' in metrics
    assert 'vram_gateway_ready_replicas{name="cold",namespace="default"} 0.0' in metrics
    served = (
        'vram_gateway_requests_total{code="200",endpoint="/v1/chat/completions",'
        'name="chat",namespace="default"} 3.0'
    )
    assert served in metrics
