"""The serving endpoints of the fakes the gateway is tested against, as strict as the real
servers: Ollama v0.12.3's OpenAI-compatible API and tool calls, vLLM 0.11.0's tool choice,
pooling models and embeddings (each behaviour's upstream file is named in the fakes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from vram_operator.simulation.fake_ollama import FakeOllama
from vram_operator.simulation.fake_vllm import FakeVLLM
from vram_operator.simulation.gpu import GIB, SimulatedGPUs

pytestmark = pytest.mark.unit

Client = TestClient[web.Request, web.Application]
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["q", "n"],
        },
    },
}
HELLO = [{"role": "user", "content": "hello"}]


async def _client(app: web.Application) -> Client:
    client: Client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def ollama(tmp_path: Path) -> AsyncIterator[Client]:
    gpus = SimulatedGPUs.create(tmp_path / "gpus.json", node="n", count=1, sizes=[24 * GIB])
    client = await _client(FakeOllama(gpus, "t:ollama").app())
    for model in ("llama3.2:1b", "nomic-embed-text"):
        await (await client.post("/api/pull", json={"model": model, "stream": False})).read()
    yield client
    await client.close()


def _vllm(tmp_path: Path, model: str = QWEN, **options: Any) -> FakeVLLM:
    tmp_path.mkdir(parents=True, exist_ok=True)
    gpus = SimulatedGPUs.create(tmp_path / "gpus.json", node="n", count=1, sizes=[24 * GIB])
    fake = FakeVLLM(gpus, "t:vllm", "0", model, 0.2, **options)
    fake.allocate()
    return fake


def _events(text: str) -> list[Any]:
    """The JSON of each `data:` line of a server-sent event stream; [DONE] as a string."""
    found: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found


async def test_ollama_openai_chat_is_deterministic_and_streams_to_done(ollama: Client) -> None:
    body = {"model": "llama3.2:1b", "messages": HELLO}
    first = await (await ollama.post("/v1/chat/completions", json=body)).json()
    second = await (await ollama.post("/v1/chat/completions", json=body)).json()
    assert first["choices"] == second["choices"]
    assert first["object"] == "chat.completion"
    assert first["system_fingerprint"] == "fp_ollama"
    assert first["choices"][0]["finish_reason"] == "stop"
    stream = await ollama.post(
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    events = _events(await stream.text())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-2])
    assert text == first["choices"][0]["message"]["content"]


async def test_ollama_tool_calls_native_and_openai(ollama: Client) -> None:
    native = await (
        await ollama.post(
            "/api/chat",
            json={"model": "llama3.2:1b", "messages": HELLO, "tools": [TOOL], "stream": False},
        )
    ).json()
    assert native["message"]["content"] == ""
    assert native["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "lookup", "arguments": {"q": "simulated", "n": 0}}}
    ]
    compat = await (
        await ollama.post(
            "/v1/chat/completions",
            json={"model": "llama3.2:1b", "messages": HELLO, "tools": [TOOL]},
        )
    ).json()
    (call,) = compat["choices"][0]["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"q": "simulated", "n": 0}
    assert compat["choices"][0]["finish_reason"] == "tool_calls"


async def test_ollama_openai_errors_and_refusals(ollama: Client) -> None:
    missing = await ollama.post(
        "/v1/chat/completions", json={"model": "nope:1b", "messages": HELLO}
    )
    assert missing.status == 404
    assert await missing.json() == {
        "error": {
            "message": "model 'nope:1b' not found",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    }
    listed = await ollama.post("/v1/completions", json={"model": "llama3.2:1b", "prompt": ["a"]})
    assert listed.status == 400  # openai.go CompletionRequest.Prompt is a string (#5259)
    empty = await ollama.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": ""})
    assert (empty.status, (await empty.json())["error"]["message"]) == (400, "invalid input")
    vectors = await (
        await ollama.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": ["a", "b"]})
    ).json()
    assert [d["index"] for d in vectors["data"]] == [0, 1]
    assert len(vectors["data"][0]["embedding"]) == 768
    models = await (await ollama.get("/v1/models")).json()
    assert {m["id"] for m in models["data"]} == {"llama3.2:1b", "nomic-embed-text:latest"}
    assert {m["owned_by"] for m in models["data"]} == {"library"}


async def test_vllm_auto_tool_choice_needs_its_flags(tmp_path: Path) -> None:
    client = await _client(_vllm(tmp_path).app())
    try:
        body = {"model": QWEN, "messages": HELLO, "tools": [TOOL]}
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status == 400
        error = (await refused.json())["error"]
        assert error["message"] == (
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )
        assert (error["type"], error["code"]) == ("BadRequestError", 400)
        named = {**body, "tool_choice": {"type": "function", "function": {"name": "lookup"}}}
        answer = await (await client.post("/v1/chat/completions", json=named)).json()
        (call,) = answer["choices"][0]["message"]["tool_calls"]
        assert call["id"].startswith("chatcmpl-tool-")
        assert json.loads(call["function"]["arguments"]) == {"q": "simulated", "n": 0}
        assert answer["choices"][0]["finish_reason"] == "stop"  # named: what the engine ended on
        none = await (
            await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
        ).json()
        assert none["choices"][0]["message"]["tool_calls"] == []
        lonely = await client.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": HELLO, "tool_choice": "auto"}
        )
        assert lonely.status == 400
    finally:
        await client.close()


async def test_vllm_auto_tools_when_enabled_stream_a_tool_call(tmp_path: Path) -> None:
    client = await _client(_vllm(tmp_path, auto_tools=True).app())
    try:
        body = {"model": QWEN, "messages": HELLO, "tools": [TOOL], "stream": True}
        events = _events(await (await client.post("/v1/chat/completions", json=body)).text())
        assert events[-1] == "[DONE]"
        calls = [e for e in events[:-1] if e["choices"][0]["delta"].get("tool_calls")]
        assert calls[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "lookup"
        assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        await client.close()


async def test_vllm_embeddings_only_from_a_pooling_model(tmp_path: Path) -> None:
    generative = await _client(_vllm(tmp_path).app())
    try:
        refused = await generative.post("/v1/embeddings", json={"model": QWEN, "input": "a"})
        assert refused.status == 400
        assert (await refused.json())["error"]["message"] == (
            "The model does not support Embeddings API"
        )
    finally:
        await generative.close()
    pooling = await _client(_vllm(tmp_path / "p", "org/bge", runner="pooling").app())
    try:
        answer = await (
            await pooling.post("/v1/embeddings", json={"model": "org/bge", "input": ["a", "b"]})
        ).json()
        assert answer["object"] == "list"
        assert answer["id"].startswith("embd-")
        assert [d["object"] for d in answer["data"]] == ["embedding", "embedding"]
        assert answer["usage"]["completion_tokens"] == 0
        chat = await pooling.post(
            "/v1/chat/completions", json={"model": "org/bge", "messages": HELLO}
        )
        assert chat.status == 400
        assert "does not support Chat Completions API" in (await chat.json())["error"]["message"]
    finally:
        await pooling.close()
