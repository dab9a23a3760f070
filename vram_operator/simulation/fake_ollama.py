"""A fake Ollama server: Ollama's HTTP API, with models loaded into the simulated GPU.

It speaks the endpoints the agent uses as Ollama documents and answers them (docs/api.md in
the Ollama repository): /api/version, /api/tags, /api/pull (NDJSON progress), /api/show,
/api/generate and /api/chat (an empty prompt loads, `keep_alive: 0` unloads), /api/embed and
/api/ps (`size_vram`, and `expires_at`, which moves on every request and so tells the agent when
a model was last used). Loading a model allocates its VRAM on the simulated GPU; unloading and
keep-alive expiry free it, so the agent's VRAM accounting can be checked against it.

The model registry is a catalog: a few real models with realistic sizes, and any other
`name:tag` as a small generic model so tests can invent names. A bare name (no tag) that is not
in the catalog does not exist, and pulling it fails as pulling an unknown model does.

Where it differs from Ollama: it never evicts one of its models to make room for another
(a load that does not fit fails with an out-of-memory error), and a model is whole on one GPU.

Run as `python -m vram_operator.simulation.fake_ollama --port 0 --gpu-state PATH`; the first
line on stdout is `listening on http://HOST:PORT`. On SIGTERM or SIGINT it frees its VRAM. A
SIGKILL leaves its allocations in the state file, like any killed process in this simulation,
so at start it frees what an earlier server on the same port left behind: the GPU memory a real
driver returns when a process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import glob
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from vram_operator.api import parse_bytes, parse_duration

from .gpu import GIB, SimulatedDevice, SimulatedGPUs, SimulatedOutOfMemory, UnknownGPU

VERSION = "0.9.6"
"""The Ollama version it reports."""

DEFAULT_KEEP_ALIVE_SECONDS = 300.0
FOREVER = dt.timedelta(days=106_751)
"""What Ollama reports for keep_alive -1: the longest Go duration, about 292 years."""

DEFAULT_CONTEXT = 4096
PULL_STEPS = 10
NOT_IN_REGISTRY = "pull model manifest: file does not exist"
_SMALL_LAYERS = (("template", 1_400), ("license", 7_700), ("params", 110))

Clock = Callable[[], dt.datetime]
Json = dict[str, Any]


@dataclass(frozen=True)
class CatalogModel:
    """A model as the registry and the GGUF header describe it, plus the VRAM it takes."""

    size: int
    """Bytes on disk (what /api/tags reports)."""
    size_vram: int
    """Bytes on the GPU once loaded at the default context (what /api/ps reports)."""
    family: str = "llama"
    parameter_size: str = "1B"
    quantization_level: str = "Q4_K_M"
    parameter_count: int = 1_000_000_000
    context_length: int = 131_072
    block_count: int = 16
    embedding_length: int = 2048
    head_count: int = 32
    head_count_kv: int = 8
    embedding: bool = False
    """An embedding model: loaded through /api/embed, refused by generate and chat."""

    def digest(self, name: str) -> str:
        """A stable sha256-looking digest per model name."""
        return hashlib.sha256(f"{name}/{self.size}".encode()).hexdigest()

    def details(self) -> Json:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


GENERIC = CatalogModel(size=700_000_000, size_vram=1 * GIB)
"""What any `name:tag` that the catalog does not list is."""

DEFAULT_CATALOG: dict[str, CatalogModel] = {
    "llama3.2:1b": CatalogModel(
        size=1_321_098_329,
        size_vram=2 * GIB,
        parameter_size="1.2B",
        quantization_level="Q8_0",
        parameter_count=1_235_814_432,
    ),
    "llama3.2:3b": CatalogModel(
        size=2_019_393_189,
        size_vram=int(3.2 * GIB),
        parameter_size="3.2B",
        parameter_count=3_212_749_888,
        block_count=28,
        embedding_length=3072,
        head_count=24,
    ),
    "llama3.1:8b-instruct-q4_K_M": CatalogModel(
        size=4_920_753_328,
        size_vram=6 * GIB,
        parameter_size="8.0B",
        parameter_count=8_030_261_248,
        block_count=32,
        embedding_length=4096,
    ),
    "qwen2.5:7b": CatalogModel(
        size=4_683_087_332,
        size_vram=int(5.5 * GIB),
        family="qwen2",
        parameter_size="7.6B",
        parameter_count=7_615_616_512,
        context_length=32_768,
        block_count=28,
        embedding_length=3584,
        head_count=28,
        head_count_kv=4,
    ),
    "nomic-embed-text:latest": CatalogModel(
        size=274_302_450,
        size_vram=int(0.6 * GIB),
        family="nomic-bert",
        parameter_size="137M",
        quantization_level="F16",
        parameter_count=136_727_040,
        context_length=2048,
        block_count=12,
        embedding_length=768,
        head_count=12,
        head_count_kv=12,
        embedding=True,
    ),
}


def normalize(name: str) -> str:
    """Ollama's short form of a model name: the tag defaults to `latest`."""
    name = name.strip()
    return name if _has_tag(name) else f"{name}:latest"


def _has_tag(name: str) -> bool:
    return ":" in name.rsplit("/", 1)[-1]


def lookup(catalog: dict[str, CatalogModel], name: str) -> CatalogModel | None:
    """The model a registry would serve for `name`, or None where it has no such model."""
    found = catalog.get(normalize(name))
    if found is not None:
        return found
    return GENERIC if _has_tag(name.strip()) else None


def load_catalog(source: str) -> dict[str, CatalogModel]:
    """The default catalog with entries from JSON (inline, or a file path) added or replaced.

    JSON: `{"name:tag": {"size": "1.3G", "size_vram": "2Gi", "family": "llama", ...}}`, sizes
    as byte counts or quantities, other fields as in CatalogModel.
    """
    text = source if source.lstrip().startswith("{") else Path(source).read_text()
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("a catalog is a JSON object of model name to model")
    catalog = dict(DEFAULT_CATALOG)
    for name, fields in raw.items():
        values = dict(fields)
        for key in ("size", "size_vram"):
            if key not in values:
                raise ValueError(f"catalog model {name!r} needs {key}")
            values[key] = parse_bytes(values[key])
        catalog[normalize(name)] = CatalogModel(**values)
    return catalog


def parse_keep_alive(value: Any, default: float) -> float:
    """Seconds a model stays loaded after a request: inf for forever, 0 to unload now.

    Accepts what Ollama accepts: a number of seconds, a duration string ("5m", "1h30m"), a
    number in a string, and any negative value for forever; absent means the server default.
    """
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError(f"keep_alive must be a duration or a number, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            negative = text.startswith("-")
            try:
                seconds = parse_duration(text.removeprefix("-"))
            except ValueError as err:
                raise ValueError(f"keep_alive: {err}") from None
            seconds = -seconds if negative else seconds
    else:
        raise ValueError(f"keep_alive must be a duration or a number, got {value!r}")
    return math.inf if seconds < 0 else seconds


@dataclass(frozen=True)
class OllamaConfig:
    """Switches for slowness and failure."""

    delay_seconds: float = 0.0
    """Added before every request is handled."""
    pull_seconds: float = 0.0
    """How long a pull takes."""
    load_seconds: float = 0.0
    """How long a load takes; its VRAM is held from the start."""
    fail_pull: frozenset[str] = frozenset()
    """Models whose pull fails halfway with a network error."""
    fail_load: frozenset[str] = frozenset()
    """Models whose load fails as a crashing runner does."""
    crash_after_pull_percent: float | None = None
    """The process exits (os._exit) once a pull has streamed this much of its main layer."""
    keep_alive_seconds: float = DEFAULT_KEEP_ALIVE_SECONDS
    """The default keep_alive, as OLLAMA_KEEP_ALIVE sets it."""


@dataclass
class _Loaded:
    model: CatalogModel
    gpu_uuid: str
    context_length: int
    expires_at: dt.datetime


class _LoadError(Exception):
    """A load that failed; the message is what Ollama would send back, with a 500."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _timestamp(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _json_response(body: Json, status: int = 200) -> web.Response:
    """JSON as Ollama (Go) writes it: compact."""
    return web.json_response(body, status=status, dumps=_compact)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _line(value: Json) -> bytes:
    """One line of an NDJSON stream."""
    return _compact(value).encode() + b"\n"


def _error(message: str, status: int) -> web.Response:
    return _json_response({"error": message}, status)


class FakeOllama:
    """One fake Ollama server's state; `app()` serves it.

    `owner` prefixes the owner name of each loaded model's VRAM (`<owner>:<model>`); start it
    with `pid:<pid>:` to have the GPU source report that pid. `clock` is injectable so tests
    can move time past a keep-alive without waiting.
    """

    def __init__(
        self,
        gpus: SimulatedGPUs,
        owner: str,
        catalog: dict[str, CatalogModel] | None = None,
        config: OllamaConfig | None = None,
        clock: Clock = _utcnow,
    ) -> None:
        self.gpus = gpus
        self.owner = owner
        self.catalog = DEFAULT_CATALOG if catalog is None else catalog
        self.config = OllamaConfig() if config is None else config
        self._clock = clock
        self._pulled: dict[str, tuple[CatalogModel, dt.datetime]] = {}
        self._loaded: dict[str, _Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def app(self) -> web.Application:
        """The aiohttp application; its cleanup frees every model's VRAM."""
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/pull", self._pull)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/embed", self._embed)
        app.cleanup_ctx.append(self._lifetime)
        return app

    def model_owner(self, name: str) -> str:
        """The owner name under which a loaded model holds its VRAM."""
        return f"{self.owner}:{normalize(name)}"

    def expire(self) -> None:
        """Unload every model whose keep-alive has run out and that no request is using."""
        now = self._clock()
        for name, loaded in list(self._loaded.items()):
            if loaded.expires_at <= now and not self._lock(name).locked():
                self._drop(name)

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        reaper = asyncio.create_task(self._reap())
        yield
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        self._loaded.clear()
        self.gpus.release(glob.escape(self.owner) + ":*")

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.expire()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if self.config.delay_seconds:
            await asyncio.sleep(self.config.delay_seconds)
        self.expire()
        response: web.StreamResponse = await handler(request)
        return response

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _drop(self, name: str) -> None:
        loaded = self._loaded.pop(name)
        self.gpus.set_allocation(loaded.gpu_uuid, self.model_owner(name), 0)

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response({"version": VERSION})

    async def _tags(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": _timestamp(modified),
                "size": model.size,
                "digest": model.digest(name),
                "details": model.details(),
            }
            for name, (model, modified) in sorted(
                self._pulled.items(), key=lambda item: item[1][1], reverse=True
            )
        ]
        return _json_response({"models": models})

    async def _ps(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": name,
                "model": name,
                "size": loaded.model.size_vram,
                "digest": loaded.model.digest(name),
                "details": loaded.model.details(),
                "expires_at": _timestamp(loaded.expires_at),
                "size_vram": loaded.model.size_vram,
                "context_length": loaded.context_length,
            }
            for name, loaded in self._loaded.items()
        ]
        return _json_response({"models": models})

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        requested = str(body.get("model") or body.get("name") or "")
        if not requested.strip():
            return _error("invalid model name", 400)
        async with contextlib.aclosing(self._pull_events(requested)) as events:
            if body.get("stream") is False:
                async for event in events:
                    if "error" in event:
                        return _error(event["error"], 500)
                return _json_response({"status": "success"})
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            async for event in events:
                await response.write(_line(event))
        await response.write_eof()
        return response

    async def _pull_events(self, requested: str) -> AsyncGenerator[Json, None]:
        """Ollama's pull progress; an error ends the stream as an `error` object, as Ollama does."""
        config = self.config
        name = normalize(requested)
        yield {"status": "pulling manifest"}
        model = lookup(self.catalog, requested)
        if model is None:
            yield {"error": NOT_IN_REGISTRY}
            return
        digest = model.digest(name)
        small_total = sum(size for _, size in _SMALL_LAYERS)
        main_total = max(model.size - small_total, 1)
        step_seconds = config.pull_seconds / PULL_STEPS
        for step in range(1, PULL_STEPS + 1):
            await asyncio.sleep(step_seconds)
            percent = 100 * step / PULL_STEPS
            if name in config.fail_pull and percent > 50:
                yield {
                    "error": f"max retries exceeded: read tcp: connection reset by peer "
                    f"(simulated failure pulling {name})"
                }
                return
            yield {
                "status": f"pulling {digest[:12]}",
                "digest": f"sha256:{digest}",
                "total": main_total,
                "completed": main_total * step // PULL_STEPS,
            }
            crash_at = config.crash_after_pull_percent
            if crash_at is not None and percent >= crash_at:
                sys.stderr.write(f"fake ollama: simulated crash at {percent:.0f}% of {name}\n")
                sys.stderr.flush()
                os._exit(1)
        for label, size in _SMALL_LAYERS:
            layer = hashlib.sha256(f"{digest}/{label}".encode()).hexdigest()
            yield {
                "status": f"pulling {layer[:12]}",
                "digest": f"sha256:{layer}",
                "total": size,
                "completed": size,
            }
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        self._pulled[name] = (model, self._clock())
        yield {"status": "success"}

    async def _show(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        requested = str(body.get("model") or body.get("name") or "")
        if not requested.strip():
            return _error("model is required", 400)
        pulled = self._pulled.get(normalize(requested))
        if pulled is None:
            return _error(f"model '{requested}' not found", 404)
        model, modified = pulled
        name = normalize(requested)
        arch = model.family
        return _json_response(
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n',
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": model.details(),
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": model.parameter_count,
                    f"{arch}.context_length": model.context_length,
                    f"{arch}.embedding_length": model.embedding_length,
                    f"{arch}.block_count": model.block_count,
                    f"{arch}.attention.head_count": model.head_count,
                    f"{arch}.attention.head_count_kv": model.head_count_kv,
                },
                "capabilities": ["embedding"] if model.embedding else ["completion"],
                "modified_at": _timestamp(modified),
            }
        )

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """generate and chat: load, unload, or answer a prompt with a short canned reply."""
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        requested, name, keep_alive, failure = self._resolve(body)
        if failure is not None:
            return failure
        if chat:
            messages = body.get("messages")
            last = messages[-1] if isinstance(messages, list) and messages else None
            prompt = str(last.get("content") or "") if isinstance(last, dict) else ""
        else:
            prompt = str(body.get("prompt") or "")
        if not prompt and keep_alive == 0:
            await self._unload(name)
            return _json_response(self._reply(requested, chat, "", "unload"))
        model = self._pulled[name][0]
        if model.embedding:
            return _error(f'"{requested}" does not support {"chat" if chat else "generate"}', 400)
        started = time.monotonic()
        try:
            load_seconds = await self._ensure_loaded(name, body.get("options"), keep_alive)
        except _LoadError as err:
            return _error(str(err), 500)
        if not prompt:
            return _json_response(self._reply(requested, chat, "", "load"))
        words = f"This is a simulated reply from {name}.".split(" ")

        def final(text: str) -> Json:
            self._touch(name, keep_alive)
            return self._reply(requested, chat, text, "stop") | {
                "total_duration": int((time.monotonic() - started) * 1e9),
                "load_duration": int(load_seconds * 1e9),
                "prompt_eval_count": len(prompt.split()),
                "prompt_eval_duration": 1_000_000,
                "eval_count": len(words),
                "eval_duration": 10_000_000 * len(words),
            }

        if body.get("stream") is False:
            return _json_response(final(" ".join(words)))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for index, word in enumerate(words):
            chunk = self._reply(requested, chat, word if index == 0 else f" {word}", None)
            await response.write(_line(chunk))
        await response.write(_line(final("")))
        await response.write_eof()
        return response

    async def _embed(self, request: web.Request) -> web.Response:
        """An empty input loads the model; text gets deterministic unit-length vectors."""
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        requested, name, keep_alive, failure = self._resolve(body)
        if failure is not None:
            return failure
        raw_input = body.get("input")
        texts = [raw_input] if isinstance(raw_input, str) and raw_input else raw_input or []
        try:
            await self._ensure_loaded(name, body.get("options"), keep_alive)
        except _LoadError as err:
            return _error(str(err), 500)
        self._touch(name, keep_alive)
        size = self._pulled[name][0].embedding_length
        return _json_response(
            {"model": requested, "embeddings": [_vector(str(text), size) for text in texts]}
        )

    def _resolve(self, body: Json) -> tuple[str, str, float, web.Response | None]:
        """The requested name, its short form, the keep-alive, or the error response."""
        requested = str(body.get("model") or "")
        name = normalize(requested)
        if not requested.strip():
            return requested, name, 0.0, _error("model is required", 400)
        if name not in self._pulled:
            message = f'model "{requested}" not found, try pulling it first'
            return requested, name, 0.0, _error(message, 404)
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"), self.config.keep_alive_seconds)
        except ValueError as err:
            return requested, name, 0.0, _error(str(err), 400)
        return requested, name, keep_alive, None

    def _reply(self, requested: str, chat: bool, text: str, reason: str | None) -> Json:
        reply: Json = {"model": requested, "created_at": _timestamp(self._clock())}
        if chat:
            reply["message"] = {"role": "assistant", "content": text}
        else:
            reply["response"] = text
        reply["done"] = reason is not None
        if reason is not None:
            reply["done_reason"] = reason
        return reply

    async def _ensure_loaded(self, name: str, options: Any, keep_alive: float) -> float:
        """Load `name` unless it is loaded; returns the seconds spent loading."""
        async with self._lock(name):
            if name in self._loaded:
                self._touch(name, keep_alive)
                return 0.0
            if name in self.config.fail_load:
                raise _LoadError(
                    f"llama runner process has terminated: exit status 2 "
                    f"(simulated failure loading {name})"
                )
            model = self._pulled[name][0]
            options = options if isinstance(options, dict) else {}
            try:
                device = self._choose_gpu(model, options.get("main_gpu"))
                self.gpus.allocate(device.uuid, self.model_owner(name), model.size_vram)
            except (SimulatedOutOfMemory, UnknownGPU) as err:
                raise _LoadError(f"llama runner process has terminated: {err}") from err
            try:
                await asyncio.sleep(self.config.load_seconds)
            except BaseException:
                self.gpus.set_allocation(device.uuid, self.model_owner(name), 0)
                raise
            context = options.get("num_ctx")
            self._loaded[name] = _Loaded(
                model=model,
                gpu_uuid=device.uuid,
                context_length=int(context)
                if context
                else min(DEFAULT_CONTEXT, model.context_length),
                expires_at=self._clock(),
            )
            self._touch(name, keep_alive)
            return self.config.load_seconds

    def _choose_gpu(self, model: CatalogModel, main_gpu: Any) -> SimulatedDevice:
        """options.main_gpu where given, else the first GPU with room, else the emptiest."""
        if main_gpu is not None:
            return self.gpus.device(main_gpu)
        devices = self.gpus.devices()
        fitting = [device for device in devices if device.free_bytes >= model.size_vram]
        return fitting[0] if fitting else max(devices, key=lambda device: device.free_bytes)

    def _touch(self, name: str, keep_alive: float) -> None:
        loaded = self._loaded.get(name)
        if loaded is None:
            return
        now = self._clock()
        loaded.expires_at = now + (
            FOREVER if math.isinf(keep_alive) else dt.timedelta(seconds=keep_alive)
        )

    async def _unload(self, name: str) -> None:
        async with self._lock(name):
            if name in self._loaded:
                self._drop(name)


async def _body(request: web.Request) -> Json | web.Response:
    """The JSON object of a request, or the 400 Ollama sends for a missing or broken one."""
    text = await request.text()
    if not text.strip():
        return _error("missing request body", 400)
    try:
        body = json.loads(text)
    except ValueError as err:
        return _error(str(err), 400)
    if not isinstance(body, dict):
        return _error("request body must be a JSON object", 400)
    return body


def _vector(text: str, size: int) -> list[float]:
    seed = hashlib.sha256(text.encode()).digest()
    raw = [seed[i % len(seed)] - 127.5 for i in range(size)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket, bound first so a port-0 server knows its port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so the servers shut down through their cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve(app: web.Application, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve on `sock` until `stop` is set, announcing the URL as the first stdout line.

    Stopping runs the application's cleanup, which frees the simulated VRAM.
    """
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"listening on http://{shown}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vram_operator.simulation.fake_ollama",
        description="A fake Ollama server whose models occupy a simulated GPU.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument(
        "--gpu-state",
        default=os.environ.get("VRAM_SIM_GPU_STATE"),
        help="simulated GPU state file (default: $VRAM_SIM_GPU_STATE)",
    )
    parser.add_argument("--catalog", help="JSON, inline or a file, adding to the default catalog")
    parser.add_argument("--delay-seconds", type=float, default=0.0, help="added to every request")
    parser.add_argument("--pull-seconds", type=float, default=0.0)
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--fail-pull", action="append", default=[], metavar="MODEL")
    parser.add_argument("--fail-load", action="append", default=[], metavar="MODEL")
    parser.add_argument(
        "--crash-after-pull-percent",
        type=float,
        metavar="N",
        help="exit abruptly once a pull has streamed N%% of its main layer",
    )
    parser.add_argument(
        "--keep-alive", default="5m", help="default keep_alive, as OLLAMA_KEEP_ALIVE (5m)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.gpu_state:
        parser.error("--gpu-state (or VRAM_SIM_GPU_STATE) is required")
    try:
        config = OllamaConfig(
            delay_seconds=args.delay_seconds,
            pull_seconds=args.pull_seconds,
            load_seconds=args.load_seconds,
            fail_pull=frozenset(normalize(m) for m in args.fail_pull),
            fail_load=frozenset(normalize(m) for m in args.fail_load),
            crash_after_pull_percent=args.crash_after_pull_percent,
            keep_alive_seconds=parse_keep_alive(args.keep_alive, DEFAULT_KEEP_ALIVE_SECONDS),
        )
        catalog = load_catalog(args.catalog) if args.catalog else DEFAULT_CATALOG
        gpus = SimulatedGPUs(args.gpu_state)
        gpus.devices()
        sock = bind(args.host, args.port)
    except (OSError, ValueError, TypeError) as err:
        print(f"fake ollama: {err}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    gpus.release(f"pid:*:ollama:{port}:*")
    fake = FakeOllama(gpus, f"pid:{os.getpid()}:ollama:{port}", catalog, config)

    async def run() -> None:
        await serve(fake.app(), sock, stop_on_signals())

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
