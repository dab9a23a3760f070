"""A fake `vllm serve`: vLLM's OpenAI server endpoints over the simulated GPU.

The vLLM supervisor starts it instead of `vllm serve` when told to, with the same arguments:
`python -m vram_operator.simulation.fake_vllm serve MODEL --port P --host H
--gpu-memory-utilization F [--enable-sleep-mode] [--served-model-name N] [--max-model-len L]`;
other vLLM arguments are accepted and ignored. The simulated GPU comes from the environment:
`VRAM_SIM_GPU_STATE` (the state file) and `CUDA_VISIBLE_DEVICES` (its first entry, a UUID or an
index; 0 when unset).

Like vLLM it takes F x the GPU's total memory at start, before it listens, and exits with 1 and
an out-of-memory message on stderr when that does not fit. Once ready it prints
`listening on http://HOST:PORT` as its first stdout line and serves /health, /version,
/v1/models, /v1/completions, /v1/chat/completions (short canned replies; no streaming) and
/metrics with vLLM's metric names. With --enable-sleep-mode it also serves /sleep?level=1 (all
but a small residual of its memory goes back to the GPU), /wake_up and /is_sleeping; without it
those paths do not exist (404).

Switches, from the environment: VRAM_SIM_VLLM_STARTUP_SECONDS (time to start, holding the
memory, before it listens), VRAM_SIM_VLLM_REQUEST_SECONDS (time each completion takes) and
VRAM_SIM_VLLM_FAIL=1 (engine start-up fails after the start-up time, exit 1).

SIGTERM or SIGINT frees its memory. At start it frees what an earlier process on the same port
left (one killed with SIGKILL): a real GPU returns a dead process's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from vram_operator.api.budget import VLLM_INSTANCE_OVERHEAD_BYTES

from .fake_ollama import bind, serve, stop_on_signals
from .gpu import SimulatedGPUs, SimulatedOutOfMemory, UnknownGPU

VERSION = "0.10.1"
"""The vLLM version it reports."""

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
        # The budget vLLM profiles within, plus the CUDA context and CUDA-graph pool that sit
        # outside it (vLLM 0.11.0 v1/worker/gpu_worker.py); the accounting rule in
        # vram_operator.api.budget charges the same.
        self.budget_bytes = int(gpu_memory_utilization * self.device.total_bytes)
        self.allocation_bytes = self.budget_bytes + VLLM_INSTANCE_OVERHEAD_BYTES
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
        app.router.add_get("/metrics", self._metrics)
        if self.sleep_mode:
            app.router.add_post("/sleep", self._sleep)
            app.router.add_post("/wake_up", self._wake_up)
            app.router.add_get("/is_sleeping", self._is_sleeping)
        app.cleanup_ctx.append(self._lifetime)
        return app

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

    async def _completions(self, request: web.Request) -> web.Response:
        body, failure = await self._request(request)
        if failure is not None:
            return failure
        prompt = body.get("prompt", "")
        text_in = " ".join(prompt) if isinstance(prompt, list) else str(prompt)
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

    async def _chat_completions(self, request: web.Request) -> web.Response:
        body, failure = await self._request(request)
        if failure is not None:
            return failure
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _openai_error("messages must be a list", "BadRequestError", 400)
        text_in = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
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
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                    }
                ],
                "usage": usage,
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
        if body.get("stream"):
            message = "streaming is not simulated; send stream: false"
            return body, _openai_error(message, "BadRequestError", 400)
        if self.sleeping:
            message = "the engine is sleeping; POST /wake_up first"
            return body, _openai_error(message, "ServiceUnavailableError", 503)
        return body, None

    async def _generate(self, prompt: str, max_tokens: Any) -> tuple[str, str, Json]:
        """A canned reply, cut to max_tokens, counted in the metrics as vLLM counts."""
        name = self.served_model_name
        words = f"This is a simulated reply from {name}.".split(" ")
        limit = DEFAULT_MAX_TOKENS if max_tokens is None else max(int(max_tokens), 0)
        reason = "length" if limit < len(words) else "stop"
        words = words[:limit]
        prompt_tokens = max(len(prompt.split()), 1)
        self._count_running(+1)
        try:
            await asyncio.sleep(self.request_seconds)
        finally:
            self._count_running(-1)
        self._success.labels(reason, name).inc()
        self._prompt_tokens.labels(name).inc(prompt_tokens)
        self._generation_tokens.labels(name).inc(len(words))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        return " ".join(words), reason, usage

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
        if not self.sleeping:
            # Level 1 offloads the weights and drops the KV cache; the context stays.
            residual = VLLM_INSTANCE_OVERHEAD_BYTES + math.ceil(self.budget_bytes * SLEEP_RESIDUAL)
            self.gpus.set_allocation(self.device.uuid, self.owner, residual)
            self.sleeping = True
        return web.Response()

    async def _wake_up(self, request: web.Request) -> web.Response:
        if self.sleeping:
            try:
                self.gpus.set_allocation(self.device.uuid, self.owner, self.allocation_bytes)
            except SimulatedOutOfMemory as err:
                return _openai_error(str(err), "InternalServerError", 500)
            self.sleeping = False
        return web.Response()

    async def _is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping})


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run like `vllm serve` until SIGTERM or SIGINT; 1 when start-up fails."""
    args, _ignored = _parser().parse_known_args(argv)
    state = os.environ.get("VRAM_SIM_GPU_STATE")
    if not state:
        print("fake vllm: VRAM_SIM_GPU_STATE must name the simulated GPU state", file=sys.stderr)
        return 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    if not visible:
        print("RuntimeError: No CUDA GPUs are available", file=sys.stderr)
        return 1
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        print(f"OSError: {err}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    gpus = SimulatedGPUs(state)
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
