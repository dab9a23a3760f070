"""A fake `vllm serve`: vLLM 0.11.0's OpenAI server endpoints over the simulated GPU.

The vLLM supervisor starts it instead of `vllm serve` when told to, with the same arguments:
`python -m vram_operator.simulation.fake_vllm serve MODEL --port P --host H
--gpu-memory-utilization F [--enable-sleep-mode] [--served-model-name N] [--max-model-len L]`
and the other `vllm serve` flags in `_VALUE_FLAGS` / `_SWITCHES`. Every behaviour below follows
vLLM 0.11.0 (the version the chart pins), file named beside it:

- Arguments: an unknown flag ends the process with argparse's usage message and exit code 2
  (vllm/entrypoints/cli/main.py calls `parser.parse_args()`, not parse_known_args).
- Device: the simulated GPU comes from `VRAM_SIM_GPU_STATE` (the state file) and
  `CUDA_VISIBLE_DEVICES`, whose entries must be integer indices
  (vllm/platforms/interface.py, `device_id_to_physical_device_id`, does `int()` on each entry;
  a GPU UUID ends the start with ValueError, vLLM issues #20939, #13815). Index i names the
  i-th device of the state file, as the container sees its devices.
- Memory: F x the GPU's total memory (the budget) plus the instance overhead outside it
  (vllm/v1/worker/gpu_worker.py), taken before it listens; exit 1 with an out-of-memory
  message on stderr when that does not fit.
- Once ready it prints `listening on http://HOST:PORT` as its first stdout line and serves
  /health, /version (`{"version": "0.11.0"}`), /v1/models, /v1/completions,
  /v1/chat/completions (short canned replies; `"stream": true` answers text/event-stream
  chunks ending with `data: [DONE]`, vllm/entrypoints/openai/serving_chat.py and
  serving_completion.py), /v1/embeddings for a pooling model (`--runner pooling`, or `auto`
  with "embed" in the name; a generative one answers 400 "The model does not support
  Embeddings API", and a pooling one so for chat and completions, api_server.py), tool calls
  (tools without tool_choice are "auto", which needs --enable-auto-tool-choice and
  --tool-call-parser, else 400; serving_chat.py, protocol.py check_tool_usage) and /metrics
  with vLLM's metric names. Replies are deterministic: the same words for a model every time.
- /sleep?level=1, /wake_up and /is_sleeping exist only with VLLM_SERVER_DEV_MODE=1
  (vllm/entrypoints/openai/api_server.py registers them under `if envs.VLLM_SERVER_DEV_MODE`);
  sleeping returns all but a small residual of the memory (needs --enable-sleep-mode).
- Crashes: vLLM 0.11 has no guard for /sleep while requests run, nor for a request sent to a
  sleeping engine: the engine core dies and the server exits (vLLM issues #28714, #15483,
  #45520). The fake does the same: it prints an EngineDeadError and exits with 1.

Switches, from the environment: VRAM_SIM_VLLM_STARTUP_SECONDS (time to start, holding the
memory, before it listens), VRAM_SIM_VLLM_WAKE_SECONDS (time /wake_up takes, holding the
memory), VRAM_SIM_VLLM_REQUEST_SECONDS (time each completion takes) and
VRAM_SIM_VLLM_FAIL=1 (engine start-up fails after the start-up time, exit 1).

The supervisor's download command is faked by `vram_operator.simulation.fake_hf_download`.

SIGTERM or SIGINT frees its memory. At start it frees what an earlier process on the same port
left (one killed with SIGKILL): a real GPU returns a dead process's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import hashlib
import json
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from .gpu import SimulatedGPUs, SimulatedOutOfMemory, UnknownGPU
from .serving import bind, serve, stop_on_signals

VERSION = "0.11.0"
"""The vLLM version it reports (vllm/version.py of the pinned release)."""

INSTANCE_OVERHEAD_BYTES = 512 * 2**20
"""What one `vllm serve` holds outside --gpu-memory-utilization: the CUDA context and the
CUDA-graph pool of a small model (vllm/v1/worker/gpu_worker.py sizes the KV cache within the
budget; those two come on top). The fake's own figure, not imported from the operator's budget
(`vram_operator.api.budget`): a budget that fell short of it must fail tests, not move the fake
along with it."""

SLEEP_RESIDUAL = 0.05
"""Share of its budget a sleeping server keeps besides its context (allocator pools)."""

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_MAX_TOKENS = 16
Json = dict[str, Any]


def _openai_error(message: str, kind: str, status: int) -> web.Response:
    """An error in the OpenAI shape vLLM answers with."""
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status=status,
    )


class FakeVLLM:
    """One fake vLLM server: its model, its memory on one simulated GPU, its counters.

    `allocate()` takes the memory (main does so before serving, as vLLM does before it
    listens); the application's cleanup and `release()` give it back.
    """

    def __init__(
        self,
        gpus: SimulatedGPUs,
        owner: str,
        gpu: str,
        model: str,
        gpu_memory_utilization: float,
        served_model_name: str | None = None,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        sleep_mode: bool = False,
        request_seconds: float = 0.0,
        dev_mode: bool = False,
        on_crash: Callable[[str], None] | None = None,
        runner: str = "auto",
        auto_tools: bool = False,
        wake_seconds: float = 0.0,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        self.gpus = gpus
        self.owner = owner
        self.device = gpus.device(gpu)
        self.model = model
        self.served_model_name = served_model_name or model
        self.max_model_len = max_model_len
        self.sleep_mode = sleep_mode
        self.request_seconds = request_seconds
        self.dev_mode = dev_mode
        self.pooling = runner == "pooling" or (runner == "auto" and "embed" in model.lower())
        """A pooling model serves /v1/embeddings and nothing generative (vllm/config/model.py
        picks the runner from the architecture; the fake goes by the name)."""
        self.auto_tools = auto_tools
        """--enable-auto-tool-choice with a --tool-call-parser: tool_choice "auto" works."""
        self.wake_seconds = wake_seconds
        """How long /wake_up takes to bring the weights back from host RAM."""
        self.crashed: str | None = None
        """Why the engine died, once it has (see `crash`)."""
        self._on_crash = on_crash
        # The budget vLLM profiles within, plus the CUDA context and CUDA-graph pool that sit
        # outside it (vLLM 0.11.0 v1/worker/gpu_worker.py); the accounting rule in
        # vram_operator.api.budget charges the same.
        self.budget_bytes = int(gpu_memory_utilization * self.device.total_bytes)
        self.allocation_bytes = self.budget_bytes + INSTANCE_OVERHEAD_BYTES
        self.sleeping = False
        self._in_flight = 0
        self._created = int(time.time())
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=self.registry,
        )
        self._waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels,
            registry=self.registry,
        )
        self._cache_usage = [
            Gauge(
                name, "KV-cache usage. 1 means 100 percent usage.", labels, registry=self.registry
            )
            for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")
        ]
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["finished_reason", "model_name"],
            registry=self.registry,
        )
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            labels,
            registry=self.registry,
        )
        self._generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            registry=self.registry,
        )
        name = self.served_model_name
        for metric in (self._running, self._waiting, *self._cache_usage):
            metric.labels(name).set(0)
        self._prompt_tokens.labels(name)
        self._generation_tokens.labels(name)

    def allocate(self) -> None:
        """Take the memory vLLM preallocates; SimulatedOutOfMemory where it does not fit."""
        self.gpus.allocate(self.device.uuid, self.owner, self.allocation_bytes)

    def release(self) -> None:
        """Give all of it back."""
        self.gpus.release(glob.escape(self.owner))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/metrics", self._metrics)
        if self.dev_mode:  # vllm/entrypoints/openai/api_server.py: only with VLLM_SERVER_DEV_MODE
            app.router.add_post("/sleep", self._sleep)
            app.router.add_post("/wake_up", self._wake_up)
            app.router.add_get("/is_sleeping", self._is_sleeping)
        app.cleanup_ctx.append(self._lifetime)
        return app

    def crash(self, why: str) -> web.Response:
        """The engine core dies, as vLLM 0.11's does: the process exits (through `on_crash`,
        which `main` makes an exit with status 1); in-process, a 500 and `crashed` set."""
        message = (
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            f"See stack trace (above) for the root cause. ({why})"
        )
        self.crashed = message
        if self._on_crash is not None:
            self._on_crash(message)
        return _openai_error(message, "InternalServerError", 500)

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        yield
        self.release()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.served_model_name,
                        "object": "model",
                        "created": self._created,
                        "owned_by": "vllm",
                        "root": self.model,
                        "parent": None,
                        "max_model_len": self.max_model_len,
                    }
                ],
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._request(request)
        if failure is not None:
            return failure
        if self.pooling:  # api_server.py create_completion: no handler for a pooling model
            return _openai_error(
                "The model does not support Completions API", "BadRequestError", 400
            )
        prompt = body.get("prompt", "")
        text_in = " ".join(prompt) if isinstance(prompt, list) else str(prompt)
        if body.get("stream"):
            return await self._stream(request, "text_completion", text_in, body.get("max_tokens"))
        text, reason, usage = await self._generate(text_in, body.get("max_tokens"))
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.served_model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                "usage": usage,
            }
        )

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._request(request)
        if failure is not None:
            return failure
        if self.pooling:  # api_server.py create_chat_completion: no handler
            return _openai_error(
                "The model does not support Chat Completions API", "BadRequestError", 400
            )
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _openai_error("messages must be a list", "BadRequestError", 400)
        text_in = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        calls = self._tool_calls(body)
        if isinstance(calls, web.Response):
            return calls
        if calls:
            return await self._tool_answer(request, body, text_in, calls)
        if body.get("stream"):
            return await self._stream(request, "chat.completion.chunk", text_in, limit)
        text, reason, usage = await self._generate(text_in, limit)
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.served_model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": _message(text, []),
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                    }
                ],
                "usage": usage,
            }
        )

    def _tool_calls(self, body: Json) -> list[Json] | web.Response:
        """The functions the simulated model calls, as vLLM 0.11 decides whether it may:
        tools without tool_choice mean "auto" (protocol.py check_tool_usage), which needs
        --enable-auto-tool-choice and --tool-call-parser (serving_chat.py, else 400); "none"
        calls nothing; a named choice calls that function; "required" and "auto" the first."""
        tools = body.get("tools") or []
        choice = body.get("tool_choice", "auto" if tools else None)
        if choice is None or choice == "none":
            return []
        if not tools:
            message = "When using `tool_choice`, `tools` must be set."
            return _openai_error(message, "BadRequestError", 400)
        if choice not in ("auto", "required") and not isinstance(choice, dict):
            message = (
                f"Invalid value for `tool_choice`: {choice}! Only named tools, "
                '"none", "auto" or "required" are supported.'
            )
            return _openai_error(message, "BadRequestError", 400)
        if choice == "auto" and not self.auto_tools:
            message = (
                '"auto" tool choice requires --enable-auto-tool-choice and '
                "--tool-call-parser to be set"
            )
            return _openai_error(message, "BadRequestError", 400)
        functions = [t.get("function") or {} for t in tools if isinstance(t, dict)]
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            functions = [f for f in functions if f.get("name") == wanted]
            if not functions:
                message = f"Tool '{wanted}' has not been passed in `tools`."
                return _openai_error(message, "BadRequestError", 400)
        function = functions[0]
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        defaults = {"integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}
        arguments = {
            key: defaults.get(str((properties.get(key) or {}).get("type")), "simulated")
            for key in parameters.get("required") or []
        }
        name = str(function.get("name"))
        digest = hashlib.sha256(f"{name}{arguments}".encode()).hexdigest()[:32]
        call = {
            "id": f"chatcmpl-tool-{digest}",  # protocol.py make_tool_call_id: random there
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }
        return [call]

    async def _tool_answer(
        self, request: web.Request, body: Json, prompt: str, calls: list[Json]
    ) -> web.StreamResponse:
        """A chat answer that is a tool call; finish_reason `tool_calls` for an auto choice,
        else what the engine stopped with (serving_chat.py chat_completion_full_generator)."""
        reason = "tool_calls" if body.get("tool_choice", "auto") == "auto" else "stop"
        arguments = calls[0]["function"]["arguments"]
        usage = self._count_finished(prompt, arguments.split(), reason)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.served_model_name,
        }
        if not body.get("stream"):
            choice = {
                "index": 0,
                "message": _message("", calls),
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": None,
            }
            return web.json_response(
                {"object": "chat.completion", **head, "choices": [choice], "usage": usage}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas = [
            {"role": "assistant", "content": ""},
            {"tool_calls": [{"index": 0, **calls[0]}]},
        ]
        for index, delta in enumerate(deltas):
            last = index == len(deltas) - 1
            choice = {"index": 0, "delta": delta, "finish_reason": reason if last else None}
            chunk = {"object": "chat.completion.chunk", **head, "choices": [choice]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        """/v1/embeddings (serving_embedding.py, protocol.py EmbeddingResponse): only a pooling
        model has the handler; input a string, a list of strings, or token ids."""
        body, failure = await self._request(request)
        if failure is not None:
            return failure
        if not self.pooling:  # api_server.py create_embedding: no handler
            return _openai_error(
                "The model does not support Embeddings API", "BadRequestError", 400
            )
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            return _openai_error("input must be a string or a list", "BadRequestError", 400)
        data = [
            {"index": index, "object": "embedding", "embedding": _vector(str(text), 384)}
            for index, text in enumerate(texts)
        ]
        tokens = sum(max(len(str(text).split()), 1) for text in texts)
        return web.json_response(
            {
                "id": f"embd-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": self.served_model_name,
                "data": data,
                "usage": {
                    "prompt_tokens": tokens,
                    "total_tokens": tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )

    async def _request(self, request: web.Request) -> tuple[Json, web.Response | None]:
        """The request body, or the error vLLM would answer with."""
        try:
            body = await request.json()
        except ValueError as err:
            return {}, _openai_error(f"invalid JSON: {err}", "BadRequestError", 400)
        if not isinstance(body, dict):
            return {}, _openai_error("the body must be a JSON object", "BadRequestError", 400)
        if body.get("model") not in (None, self.served_model_name):
            message = f"The model `{body.get('model')}` does not exist."
            return body, _openai_error(message, "NotFoundError", 404)
        if self.sleeping:
            # vLLM 0.11 forwards the request to the sleeping engine, which dies (#15483).
            return body, self.crash("a request reached the engine while it was sleeping")
        return body, None

    def _reply(self, max_tokens: Any) -> tuple[list[str], str]:
        """The canned reply's words, cut to max_tokens, and the finish reason."""
        words = f"This is a simulated reply from {self.served_model_name}.".split(" ")
        limit = DEFAULT_MAX_TOKENS if max_tokens is None else max(int(max_tokens), 0)
        reason = "length" if limit < len(words) else "stop"
        return words[:limit], reason

    async def _stream(
        self, request: web.Request, kind: str, prompt: str, max_tokens: Any
    ) -> web.StreamResponse:
        """Server-sent events, one chunk per word, then `data: [DONE]`, as vLLM streams
        (vllm/entrypoints/openai/serving_chat.py, serving_completion.py)."""
        words, reason = self._reply(max_tokens)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk_id = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
        self._count_running(+1)
        try:
            for index, word in enumerate(words):
                text = word if index == 0 else f" {word}"
                last = index == len(words) - 1
                if kind.startswith("chat"):
                    choice: Json = {"index": 0, "delta": {"content": text}}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None}
                choice["finish_reason"] = reason if last else None
                chunk = {
                    "id": chunk_id,
                    "object": kind,
                    "created": int(time.time()),
                    "model": self.served_model_name,
                    "choices": [choice],
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.request_seconds / max(len(words), 1))
            await response.write(b"data: [DONE]\n\n")
        finally:
            self._count_running(-1)
        self._count_finished(prompt, words, reason)
        await response.write_eof()
        return response

    async def _generate(self, prompt: str, max_tokens: Any) -> tuple[str, str, Json]:
        """A canned reply, cut to max_tokens, counted in the metrics as vLLM counts."""
        words, reason = self._reply(max_tokens)
        self._count_running(+1)
        try:
            await asyncio.sleep(self.request_seconds)
        finally:
            self._count_running(-1)
        return " ".join(words), reason, self._count_finished(prompt, words, reason)

    def _count_finished(self, prompt: str, words: list[str], reason: str) -> Json:
        """Count a finished request in the metrics; its usage block."""
        name = self.served_model_name
        prompt_tokens = max(len(prompt.split()), 1)
        self._success.labels(reason, name).inc()
        self._prompt_tokens.labels(name).inc(prompt_tokens)
        self._generation_tokens.labels(name).inc(len(words))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        return usage

    def _count_running(self, change: int) -> None:
        """Requests in flight, and a KV-cache usage that grows with them."""
        self._in_flight += change
        name = self.served_model_name
        self._running.labels(name).set(self._in_flight)
        for gauge in self._cache_usage:
            gauge.labels(name).set(min(self._in_flight * 0.05, 1.0))

    async def _sleep(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return _openai_error(f"sleep level must be 1 or 2, got {level}", "BadRequestError", 400)
        if not self.sleep_mode:
            message = "Sleep mode is not enabled; start the server with --enable-sleep-mode"
            return _openai_error(message, "InternalServerError", 500)
        if self._in_flight:
            # vLLM 0.11 sleeps the engine under running requests, which kills it (#28714).
            return self.crash(f"/sleep with {self._in_flight} request(s) in flight")
        if not self.sleeping:
            # Level 1 offloads the weights and drops the KV cache; the context stays.
            residual = INSTANCE_OVERHEAD_BYTES + math.ceil(self.budget_bytes * SLEEP_RESIDUAL)
            self.gpus.set_allocation(self.device.uuid, self.owner, residual)
            self.sleeping = True
        return web.Response()

    async def _wake_up(self, request: web.Request) -> web.Response:
        if self.sleeping:
            try:
                self.gpus.set_allocation(self.device.uuid, self.owner, self.allocation_bytes)
            except SimulatedOutOfMemory as err:
                return _openai_error(str(err), "InternalServerError", 500)
            await asyncio.sleep(self.wake_seconds)  # the weights coming back from host RAM
            self.sleeping = False
        return web.Response()

    async def _is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping})


def _message(content: str, tool_calls: list[Json]) -> Json:
    """protocol.py ChatMessage as vLLM serializes it: tool_calls always a list."""
    return {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": tool_calls,
        "reasoning_content": None,
    }


def _vector(text: str, size: int) -> list[float]:
    """A deterministic unit vector per text."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = [seed[i % len(seed)] - 127.5 for i in range(size)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


_VALUE_FLAGS = (
    "--dtype",
    "--tokenizer",
    "--revision",
    "--download-dir",
    "--load-format",
    "--quantization",
    "--kv-cache-dtype",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--block-size",
    "--swap-space",
    "--cpu-offload-gb",
    "--seed",
    "--max-logprobs",
    "--generation-config",
    "--chat-template",
    "--api-key",
    "--uvicorn-log-level",
    "--limit-mm-per-prompt",
    "--tool-call-parser",
    "--reasoning-parser",
    "--compilation-config",
)
"""`vllm serve` flags taking one value that the fake accepts and ignores (vLLM 0.11.0
engine/arg_utils.py, entrypoints/openai/cli_args.py)."""

_SWITCHES = (
    "--trust-remote-code",
    "--enforce-eager",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--disable-log-stats",
    "--disable-uvicorn-access-log",
    "--enable-auto-tool-choice",
    "--disable-custom-all-reduce",
)
"""`vllm serve` switches the fake accepts and ignores (same sources)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vram_operator.simulation.fake_vllm",
        description="A fake `vllm serve` whose memory is taken from a simulated GPU.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_command = commands.add_parser("serve", help="serve one model, as `vllm serve`")
    serve_command.add_argument("model")
    serve_command.add_argument("--host", default="0.0.0.0")
    serve_command.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve_command.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve_command.add_argument("--enable-sleep-mode", action="store_true")
    serve_command.add_argument("--served-model-name", nargs="+")
    serve_command.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    # vllm/config/model.py RunnerOption; engine/arg_utils.py adds it as --runner.
    serve_command.add_argument(
        "--runner", choices=["auto", "generate", "pooling", "draft"], default="auto"
    )
    for flag in _VALUE_FLAGS:
        serve_command.add_argument(flag)
    for flag in _SWITCHES:
        serve_command.add_argument(flag, action="store_true")
    return parser


def _seconds(name: str) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else 0.0


async def _run(fake: FakeVLLM, sock: socket.socket, startup_seconds: float, fail: bool) -> int:
    """Start up (holding the memory), then serve until a signal; the exit status."""
    stop = stop_on_signals()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), startup_seconds)
    if stop.is_set():
        return 0
    if fail:
        print(
            "RuntimeError: Engine core initialization failed. See root cause above. "
            "(simulated by VRAM_SIM_VLLM_FAIL=1)",
            file=sys.stderr,
        )
        return 1
    await serve(fake.app(), sock, stop)
    return 0


def visible_device(environment: Mapping[str, str]) -> str:
    """The device CUDA_VISIBLE_DEVICES gives the server, as vLLM 0.11 reads it: each entry
    parsed with int() (vllm/platforms/interface.py); ValueError for a UUID. Unset means 0."""
    text = environment.get("CUDA_VISIBLE_DEVICES")
    if text is None or not text.strip():
        return "0"
    first = text.split(",")[0].strip()
    return str(int(first))  # int() raises ValueError exactly where vLLM's does


def _exit_now(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)  # the engine is gone; main's finally frees the memory first via on_crash


def _dashes(argv: Sequence[str]) -> list[str]:
    """`_` read as `-` in long flags' names, as vLLM 0.11.0's FlexibleArgumentParser does
    (vllm/utils/__init__.py, `parse_args`) before argparse sees them."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run like `vllm serve` until SIGTERM or SIGINT; 1 when start-up fails, 2 for bad flags."""
    args = _parser().parse_args(_dashes(sys.argv[1:] if argv is None else argv))
    state = os.environ.get("VRAM_SIM_GPU_STATE")
    if not state:
        print("fake vllm: VRAM_SIM_GPU_STATE must name the simulated GPU state", file=sys.stderr)
        return 1
    try:
        visible = visible_device(os.environ)
    except ValueError as err:
        print(f"ValueError: {err}", file=sys.stderr)
        return 1
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        print(f"OSError: {err}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    gpus = SimulatedGPUs(state)
    fake: FakeVLLM | None = None

    def crash(message: str) -> None:
        if fake is not None:
            fake.release()  # a real GPU frees a dead process's memory
        _exit_now(message)

    try:
        # No live process can hold this port now, so what is recorded under it is stale.
        gpus.release(f"pid:*:vllm:{port}")
        fake = FakeVLLM(
            gpus,
            owner=f"pid:{os.getpid()}:vllm:{port}",
            gpu=visible,
            model=args.model,
            gpu_memory_utilization=args.gpu_memory_utilization,
            served_model_name=args.served_model_name[0] if args.served_model_name else None,
            max_model_len=args.max_model_len,
            sleep_mode=args.enable_sleep_mode,
            request_seconds=_seconds("VRAM_SIM_VLLM_REQUEST_SECONDS"),
            dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1",
            on_crash=crash,
            runner=args.runner,
            auto_tools=bool(args.enable_auto_tool_choice and args.tool_call_parser),
            wake_seconds=_seconds("VRAM_SIM_VLLM_WAKE_SECONDS"),
        )
        fake.allocate()
    except SimulatedOutOfMemory as err:
        print(f"torch.OutOfMemoryError: {err}", file=sys.stderr)
        sock.close()
        return 1
    except (OSError, ValueError, UnknownGPU) as err:
        print(f"fake vllm: {err}", file=sys.stderr)
        sock.close()
        return 1
    try:
        return asyncio.run(
            _run(
                fake,
                sock,
                _seconds("VRAM_SIM_VLLM_STARTUP_SECONDS"),
                os.environ.get("VRAM_SIM_VLLM_FAIL") == "1",
            )
        )
    finally:
        fake.release()
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
