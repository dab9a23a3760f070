"""A fake Ollama server: Ollama 0.12.3's HTTP API, with models loaded into the simulated GPU.

It speaks the endpoints the agent uses as Ollama documents and answers them (docs/api.md in
the Ollama repository): /api/version, /api/tags, /api/pull (NDJSON progress), /api/show,
/api/create, /api/generate and /api/chat (an empty prompt loads, `keep_alive: 0` unloads),
/api/embed and /api/ps (`size`, `size_vram`, `context_length`, and `expires_at`, which moves on
every request and so tells the agent when a model was last used). Loading a model allocates its
VRAM on the simulated GPUs; unloading and keep-alive expiry free it, so the agent's VRAM
accounting can be checked against it.

It is as strict as Ollama 0.12.3 where that matters to the agent; each behaviour names the
upstream file it follows (github.com/ollama/ollama at tag v0.12.3):

- names (types/model/name.go, server/routes.go getExistingName): `host/namespace/model:tag`
  with defaults `registry.ollama.ai`, `library`, `latest`; matched without case; /api/ps and
  /api/tags list the short form (DisplayShortest) in the case the model was first pulled with.
- runners (server/sched.go): one runner per weights file, so a model and models created from
  it share one. A request whose runner options (num_ctx, num_batch, num_gpu, main_gpu,
  use_mmap, num_thread; api/types.go Runner) differ from the running ones reloads it
  (needsReload): unload, then load again with the new options; `loads` counts runner starts.
  Options come from the defaults, then the model's parameters, then the request
  (routes.go modelOptions).
- its own eviction (sched.go processPending, findRunnerToUnload): a new model that does not
  fit fully beside the loaded ones, or one beyond OLLAMA_MAX_LOADED_MODELS (0 means 3 per GPU),
  unloads a loaded runner first: the idle one with the shortest keep-alive, ties by name,
  else the shortest even if busy; and again until it fits or nothing else is loaded. The
  first model on an empty server is loaded even if it does not fit: the layers that do not
  fit stay in host memory (llm/server.go createLayout), so /api/ps shows size_vram < size.
- layout (llm/server.go createLayout, assignLayers): GPUs by free memory, most first; a model
  goes on as few of them as hold it, layer by layer, and may be split across several. main_gpu
  chooses nothing. num_gpu caps the layers on GPUs (0: all in host memory).
- unload (routes.go GenerateHandler, sched.go expireRunner and processCompleted): an empty
  prompt with keep_alive 0 answers at once; the runner keeps its memory and its /api/ps entry
  until it has exited, `unload_seconds` later (after any request still using it).
- context (envconfig ContextLength, api/types.go DefaultOptions): num_ctx defaults to 4096;
  the KV cache, and so the VRAM, grows with it up to the model's trained context.
- /api/show (routes.go GetModelInfo, getModelData): without `verbose` the metadata arrays
  (per-layer head_count_kv) come back null; with it, whole.
- errors: `{"error": "..."}` with Ollama's status codes (404 for a model not pulled, 400 for a
  bad request or name, 500 for a failed load or pull).

The model registry is a catalog: a few real models with realistic sizes, and any other
`name:tag` as a small generic model so tests can invent names. A bare name (no tag) that is not
in the catalog does not exist, and pulling it fails as pulling an unknown model does.

The OpenAI-compatible API (openai/openai.go, middleware/openai.go): /v1/models,
/v1/chat/completions, /v1/completions (a string prompt only, issue #5259) and /v1/embeddings,
streamed as server-sent events ending `data: [DONE]` or not, errors in openai.NewError's shape.
With `tools`, the simulated model calls the first one (arguments filled per required
parameter), in /api/chat as `message.tool_calls` and in /v1 as `tool_calls` with
finish_reason `tool_calls`. Replies are deterministic: the same words for a model every time.

Where it is simpler than Ollama: layers are equal slices of the model; host memory for
offloaded layers is not accounted; a request holds its runner only while it is answered.

Run as `python -m vram_operator.simulation.fake_ollama --port 0 --gpu-state PATH`; the first
line on stdout is `listening on http://HOST:PORT`. On SIGTERM or SIGINT it frees its VRAM. A
SIGKILL leaves its allocations in the state file, like any killed process in this simulation,
so at start it frees what an earlier server on the same port left behind: the GPU memory a real
driver returns when a process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from vram_operator.api import parse_bytes

from .gpu import GIB, SimulatedDevice, SimulatedGPUs, SimulatedOutOfMemory
from .serving import bind, serve, stop_on_signals

VERSION = "0.12.3"
"""The Ollama version it reports (the chart pins this one)."""

DEFAULT_KEEP_ALIVE_SECONDS = 300.0
FOREVER = dt.timedelta(days=106_751)
"""What Ollama reports for keep_alive -1: the longest Go duration, about 292 years."""

DEFAULT_CONTEXT = 4096
"""num_ctx when nothing sets it (envconfig.ContextLength, v0.12.3)."""
DEFAULT_UNLOAD_SECONDS = 0.2
"""How long a runner keeps its memory after an unload was answered."""
MODELS_PER_GPU = 3
"""OLLAMA_MAX_LOADED_MODELS=0 means 3 runners per GPU (sched.go defaultModelsPerGPU)."""
CHART_MAX_LOADED_MODELS = 16
"""What the chart sets OLLAMA_MAX_LOADED_MODELS to; the command line's default."""
PULL_STEPS = 10
NOT_IN_REGISTRY = "pull model manifest: file does not exist"
INVALID_NAME = "invalid model name"
_SMALL_LAYERS = (("template", 1_400), ("license", 7_700), ("params", 110))

RUNNER_DEFAULTS: dict[str, Any] = {
    "num_ctx": DEFAULT_CONTEXT,
    "num_batch": 512,
    "num_gpu": -1,
    "main_gpu": 0,
    "use_mmap": None,
    "num_thread": 0,
}
"""The options a runner is started with (api/types.go Runner and DefaultOptions, v0.12.3)."""
_INT_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep"}
_INT_OPTIONS |= {"seed", "num_predict", "top_k", "repeat_last_n"}
_FLOAT_OPTIONS = {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty"}
_FLOAT_OPTIONS |= {"presence_penalty", "frequency_penalty"}

Clock = Callable[[], dt.datetime]
Json = dict[str, Any]


# --- names (types/model/name.go) -------------------------------------------------------------
# Written here again rather than imported from the agent's backend: the fake checks the client,
# so it must not share the client's mistakes.


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """Equal for names Ollama matches (Name.EqualFold)."""
        return "/".join((self.host, self.namespace, self.model, self.tag)).lower()

    @property
    def short(self) -> str:
        """Name.DisplayShortest."""
        if self.host.lower() != "registry.ollama.ai":
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != "library":
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def valid(self) -> bool:
        """Name.IsValid: every part present, of allowed characters and length."""
        patterns = (
            (self.host, r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"),
            (self.namespace, r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"),
            (self.model, r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
            (self.tag, r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
        )
        return all(re.fullmatch(pattern, part) for part, pattern in patterns)


def parse_name(text: str) -> ModelName:
    """ParseName: ParseNameBare, then the defaults for missing parts."""
    rest, tag = text, ""
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
        rest, tag = rest or "!MISSING!", tag or "!MISSING!"
    parts = rest.split("/")
    if len(parts) > 3:  # the host keeps every slash left of namespace/model
        parts = ["/".join(parts[:-2]), *parts[-2:]]
    parts = [part or "!MISSING!" for part in parts] if len(parts) > 1 else parts
    host = parts[0].split("://", 1)[-1] if len(parts) == 3 else ""
    namespace = parts[-2] if len(parts) >= 2 else ""
    return ModelName(
        host or "registry.ollama.ai", namespace or "library", parts[-1], tag or "latest"
    )


def normalize(name: str) -> str:
    """Ollama's short form of a model name: the tag defaults to `latest`."""
    return parse_name(name.strip()).short


def _key(name: str) -> str:
    return parse_name(name.strip()).key


def _has_tag(name: str) -> bool:
    return ":" in name.rsplit("/", 1)[-1]


# --- the catalog ------------------------------------------------------------------------------


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
    head_count_kv: int | tuple[int, ...] = 8
    """KV heads, one figure or one per layer (hybrid and OpenELM-style models)."""
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

    def kv_bytes_per_token(self) -> int:
        """f16 K and V over all layers for one token."""
        heads = self.head_count_kv
        per_layer = list(heads) if isinstance(heads, tuple) else [heads] * self.block_count
        head_dim = self.embedding_length // max(self.head_count, 1)
        return sum(per_layer) * head_dim * 2 * 2

    def size_at(self, num_ctx: int) -> int:
        """Bytes the runner takes at `num_ctx`: `size_vram` at the default context, the KV cache
        growing or shrinking with the context, which Ollama caps at the trained one."""
        default = min(DEFAULT_CONTEXT, self.context_length)
        context = min(num_ctx, self.context_length)
        grown = self.size_vram + self.kv_bytes_per_token() * (context - default)
        return max(grown, self.size_vram // 2)


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


def lookup(catalog: dict[str, CatalogModel], name: str) -> CatalogModel | None:
    """The model a registry would serve for `name`, or None where it has no such model."""
    wanted = _key(name)
    for listed, model in catalog.items():
        if _key(listed) == wanted:
            return model
    return GENERIC if _has_tag(name.strip()) else None


def load_catalog(source: str) -> dict[str, CatalogModel]:
    """The default catalog with entries from JSON (inline, or a file path) added or replaced.

    JSON: `{"name:tag": {"size": "1.3G", "size_vram": "2Gi", "family": "llama", ...}}`, sizes
    as byte counts or quantities, other fields as in CatalogModel (head_count_kv a number or a
    list, one per layer).
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
        if isinstance(values.get("head_count_kv"), list):
            values["head_count_kv"] = tuple(values["head_count_kv"])
        catalog[normalize(name)] = CatalogModel(**values)
    return catalog


# --- keep_alive (api/types.go Duration.UnmarshalJSON) -----------------------------------------

_GO_DURATION = re.compile(r"^[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|ms|s|m|h))+$")
_GO_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, default: float) -> float:
    """Seconds a model stays loaded after a request: inf for forever, 0 to unload now.

    As Ollama reads it: a JSON number is seconds; a string is a Go duration (`5m`, `1h30m`, `0`;
    a bare number other than 0 is "missing unit"); anything negative is forever; absent means
    the server default. Other JSON types are refused.
    """
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        kind = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}
        raise ValueError(f"Unsupported type: '{kind.get(type(value), type(value).__name__)}'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value
        if text.lstrip("+-") == "0":
            seconds = 0.0
        elif re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", text):
            raise ValueError(f'time: missing unit in duration "{text}"')
        elif not _GO_DURATION.fullmatch(text):
            raise ValueError(f'time: invalid duration "{text}"')
        else:
            seconds = sum(float(n) * _GO_UNITS[u] for n, u in _GO_DURATION_PART.findall(text))
            seconds = -seconds if text.startswith("-") else seconds
    return math.inf if seconds < 0 else seconds


def parse_env_keep_alive(text: str) -> float:
    """OLLAMA_KEEP_ALIVE as envconfig.KeepAlive reads it: a Go duration, else whole seconds
    (so the chart's "-1" works); negative is forever; anything else keeps the 5m default."""
    try:
        return parse_keep_alive(text, DEFAULT_KEEP_ALIVE_SECONDS)
    except ValueError:
        pass
    if re.fullmatch(r"[-+]?\d+", text.strip()):
        seconds = float(int(text))
        return math.inf if seconds < 0 else seconds
    return DEFAULT_KEEP_ALIVE_SECONDS


# --- the server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OllamaConfig:
    """Switches for slowness, failure and the server settings the fake honours."""

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
    unload_seconds: float = DEFAULT_UNLOAD_SECONDS
    """How long an unloaded runner keeps its memory and its /api/ps entry."""
    max_loaded_models: int = 0
    """OLLAMA_MAX_LOADED_MODELS; 0 is Ollama's own default, 3 per GPU."""


@dataclass
class _Pulled:
    """A model on disk: a pulled one, or one /api/create made from it (same weights)."""

    name: str
    model: CatalogModel
    modified: dt.datetime
    blob: str
    """The weights file; runners are keyed by it (sched.go `loaded[ModelPath]`)."""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Runner:
    """One loaded model: a runner process of Ollama's."""

    name: str
    """The short name of the model it was started for (/api/ps `name`, Model.ShortName)."""
    blob: str
    model: CatalogModel
    options: dict[str, Any]
    session: float
    """Seconds it stays after its last request (keep_alive); 0 once it is to be unloaded."""
    expires_at: dt.datetime
    size: int
    placement: dict[str, int] = field(default_factory=dict)
    """Bytes on each GPU, by UUID; the rest of `size` is in host memory."""
    refs: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    unloading: bool = False

    @property
    def size_vram(self) -> int:
        return sum(self.placement.values())


class _LoadError(Exception):
    """A load that failed; the message is what Ollama would send back, with `status`."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


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


def runner_options(parameters: dict[str, Any], request: Any) -> dict[str, Any]:
    """The runner options of a request: defaults, then the model's, then the request's
    (routes.go modelOptions; api/types.go FromMap refuses a non-number for a number option)."""
    options = dict(RUNNER_DEFAULTS)
    for source in (parameters, request if isinstance(request, dict) else {}):
        for key, value in source.items():
            if value is None:
                continue
            if key in _INT_OPTIONS:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise _LoadError(f'option "{key}" must be of type integer')
                value = int(value)
            elif key in _FLOAT_OPTIONS and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise _LoadError(f'option "{key}" must be of type float32')
            elif key == "use_mmap" and not isinstance(value, bool):
                raise _LoadError(f'option "{key}" must be of type boolean')
            if key in RUNNER_DEFAULTS:
                options[key] = value
    options["num_ctx"] = max(options["num_ctx"], 4)  # sched.go GetRunner
    return options


def needs_reload(running: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """sched.go needsReload: any runner option differs, except that a request's num_gpu -1
    (the default, "as many layers as fit") accepts whatever the runner has."""
    running, wanted = dict(running), dict(wanted)
    if wanted["num_gpu"] < 0:
        running["num_gpu"] = wanted["num_gpu"] = -1
    return running != wanted


class FakeOllama:
    """One fake Ollama server's state; `app()` serves it.

    `owner` prefixes the owner name of each runner's VRAM (`<owner>:<model>`); start it with
    `pid:<pid>:` to have the GPU source report that pid. `clock` is injectable so tests can
    move time past a keep-alive without waiting (the unload delay runs on the event loop).
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
        self._pulled: dict[str, _Pulled] = {}
        """By name key (ModelName.key)."""
        self._loaded: dict[str, _Runner] = {}
        """By weights file, as sched.go keys `loaded`."""
        self._scheduler: asyncio.Lock | None = None
        self._unloads: set[asyncio.Task[None]] = set()
        self.loads: collections.Counter[str] = collections.Counter()
        """Runner starts per model name: a reload counts again."""
        self._fail_pull = {_key(name) for name in self.config.fail_pull}
        self._fail_load = {_key(name) for name in self.config.fail_load}

    def app(self) -> web.Application:
        """The aiohttp application; its cleanup frees every model's VRAM."""
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/pull", self._pull)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/create", self._create)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/embed", self._embed)
        app.router.add_get("/v1/models", self._openai_models)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_post("/v1/completions", self._openai_completions)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.cleanup_ctx.append(self._lifetime)
        return app

    def model_owner(self, name: str) -> str:
        """The owner name under which a runner started for `name` holds its VRAM."""
        return f"{self.owner}:{normalize(name)}"

    def expire(self) -> None:
        """Start unloading every idle runner whose keep-alive has run out."""
        now = self._clock()
        for runner in list(self._loaded.values()):
            if runner.ready.is_set() and runner.refs == 0 and runner.expires_at <= now:
                self._begin_unload(runner)

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        reaper = asyncio.create_task(self._reap())
        yield
        reaper.cancel()
        for task in [reaper, *self._unloads]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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

    # ---- scheduling (server/sched.go) ---------------------------------------------------------

    def _max_runners(self) -> int:
        configured = self.config.max_loaded_models
        return configured if configured > 0 else MODELS_PER_GPU * len(self.gpus.devices())

    def _begin_unload(self, runner: _Runner) -> None:
        """expireRunner: once no request uses it, the runner exits `unload_seconds` later."""
        runner.session = 0.0
        runner.expires_at = min(runner.expires_at, self._clock())
        if runner.unloading or runner.refs > 0 or not runner.ready.is_set():
            return  # the request holding it unloads it when done (`_release`)
        runner.unloading = True
        task = asyncio.create_task(self._finish_unload(runner))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _finish_unload(self, runner: _Runner) -> None:
        try:
            await asyncio.sleep(self.config.unload_seconds)
        finally:
            self._drop(runner)

    def _drop(self, runner: _Runner) -> None:
        for uuid in runner.placement:
            self.gpus.set_allocation(uuid, f"{self.owner}:{runner.name}", 0)
        if self._loaded.get(runner.blob) is runner:
            del self._loaded[runner.blob]
        runner.gone.set()
        runner.ready.set()  # settled: nobody waits for a load that will not come

    def _victim(self) -> _Runner:
        """findRunnerToUnload: by keep-alive, shortest first (0 for one already going), then by
        weights path; the first idle one, else the first."""
        runners = sorted(self._loaded.values(), key=lambda r: (r.session, r.blob))
        return next((r for r in runners if r.refs == 0), runners[0])

    async def _evict(self, runner: _Runner, why: str) -> None:
        _log(f"unloading {runner.name}: {why}")
        self._begin_unload(runner)
        await runner.gone.wait()

    def _layout(self, size: int, layers: int, num_gpu: int, full: bool) -> dict[str, int] | None:
        """createLayout/assignLayers: `layers` equal slices onto as few GPUs as hold them, most
        free memory first; None when `full` and not every layer fits."""
        if num_gpu == 0:  # every layer in host memory, by request
            return {}
        slices = [size // layers + (1 if i < size % layers else 0) for i in range(layers)]
        wanted = layers if num_gpu < 0 else min(num_gpu, layers)
        devices = sorted(self.gpus.devices(), key=lambda d: d.free_bytes, reverse=True)
        best: tuple[int, dict[str, int]] = (0, {})
        for count in range(1, len(devices) + 1):
            placed, placement = _fill(slices[:wanted], devices[:count])
            if placed > best[0]:
                best = (placed, placement)
            if placed == wanted:
                break
        if full and best[0] < wanted:
            return None
        return best[1]

    async def _runner_for(self, pulled: _Pulled, options: dict[str, Any]) -> tuple[_Runner, float]:
        """A running runner for `pulled` with `options`, started (after reloads and evictions)
        when there is none; returns it with a reference held, and the seconds spent loading."""
        running = self._loaded.get(pulled.blob)
        if (
            running is not None
            and running.ready.is_set()
            and not running.unloading
            and not needs_reload(running.options, options)
        ):
            running.refs += 1
            return running, 0.0
        if self._scheduler is None:
            self._scheduler = asyncio.Lock()
        async with self._scheduler:  # processPending: one load at a time
            while True:
                running = self._loaded.get(pulled.blob)
                if running is not None:
                    await running.ready.wait()
                    if running.unloading or running.gone.is_set():
                        await running.gone.wait()
                        continue
                    if not needs_reload(running.options, options):
                        running.refs += 1
                        return running, 0.0
                    changed = sorted(k for k in options if options[k] != running.options.get(k))
                    await self._evict(running, f"reload with new runner options {changed}")
                    continue
                if len(self._loaded) >= self._max_runners():
                    await self._evict(self._victim(), "max loaded models reached")
                    continue
                size = pulled.model.size_at(options["num_ctx"])
                layers = pulled.model.block_count + 1
                placement = self._layout(size, layers, options["num_gpu"], bool(self._loaded))
                if placement is None:
                    await self._evict(self._victim(), f"{pulled.name} does not fit beside it")
                    continue
                started = time.monotonic()
                runner = await self._start(pulled, options, size, placement)
                return runner, time.monotonic() - started

    async def _start(
        self, pulled: _Pulled, options: dict[str, Any], size: int, placement: dict[str, int]
    ) -> _Runner:
        runner = _Runner(
            name=pulled.name,
            blob=pulled.blob,
            model=pulled.model,
            options=options,
            session=self.config.keep_alive_seconds,
            expires_at=self._clock() + _duration(self.config.keep_alive_seconds),
            size=size,
        )
        self._loaded[runner.blob] = runner
        owner = f"{self.owner}:{runner.name}"
        try:
            for uuid, nbytes in placement.items():
                self.gpus.set_allocation(uuid, owner, nbytes)
                runner.placement[uuid] = nbytes
        except SimulatedOutOfMemory as err:  # something else took the memory meanwhile
            self._drop(runner)
            raise _LoadError(f"llama runner process has terminated: {err}") from err
        self.loads[runner.name] += 1
        where = "partly on CPU" if runner.size_vram < size else "on GPU"
        _log(f"loading {runner.name} ({where}, num_ctx {options['num_ctx']})")
        try:
            await asyncio.sleep(self.config.load_seconds)
            if _key(pulled.name) in self._fail_load:
                raise _LoadError(
                    f"llama runner process has terminated: exit status 2 "
                    f"(simulated failure loading {pulled.name})"
                )
        except BaseException:
            self._drop(runner)
            raise
        runner.refs += 1
        runner.ready.set()
        return runner

    def _release(self, runner: _Runner, keep_alive: float | None) -> None:
        """A request is done with its runner: keep_alive restarts (useLoadedRunner then the
        finished-request timer), and a runner marked for unloading goes once idle."""
        runner.refs -= 1
        if keep_alive is not None and runner.session > 0:
            runner.session = keep_alive
        if runner.refs > 0:
            return
        if runner.session <= 0:
            self._begin_unload(runner)
            return
        runner.expires_at = self._clock() + _duration(runner.session)

    # ---- endpoints ---------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response({"version": VERSION})

    async def _tags(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": pulled.name,
                "model": pulled.name,
                "modified_at": _timestamp(pulled.modified),
                "size": pulled.model.size,
                "digest": pulled.model.digest(pulled.name),
                "details": pulled.model.details(),
            }
            for pulled in sorted(self._pulled.values(), key=lambda p: p.modified, reverse=True)
        ]
        return _json_response({"models": models})

    async def _ps(self, request: web.Request) -> web.Response:
        runners = sorted(self._loaded.values(), key=lambda r: r.expires_at, reverse=True)
        models = [
            {
                "name": runner.name,
                "model": runner.name,
                "size": runner.size,
                "digest": runner.model.digest(runner.name),
                "details": runner.model.details(),
                "expires_at": _timestamp(runner.expires_at),
                "size_vram": runner.size_vram,
                "context_length": runner.options["num_ctx"],
            }
            for runner in runners
        ]
        return _json_response({"models": models})

    def _find(self, requested: str) -> _Pulled | None:
        return self._pulled.get(_key(requested))

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        requested = str(body.get("model") or body.get("name") or "")
        if not parse_name(requested).valid:
            return _error(INVALID_NAME, 400)
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
        existing = self._find(requested)
        name = existing.name if existing is not None else normalize(requested)
        yield {"status": "pulling manifest"}
        model = lookup(self.catalog, requested)
        if model is None:
            yield {"error": NOT_IN_REGISTRY}
            return
        digest = model.digest(normalize(requested).lower())
        small_total = sum(size for _, size in _SMALL_LAYERS)
        main_total = max(model.size - small_total, 1)
        step_seconds = config.pull_seconds / PULL_STEPS
        for step in range(1, PULL_STEPS + 1):
            await asyncio.sleep(step_seconds)
            percent = 100 * step / PULL_STEPS
            if _key(requested) in self._fail_pull and percent > 50:
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
        self._pulled[_key(name)] = _Pulled(name, model, self._clock(), blob=f"sha256-{digest}")
        yield {"status": "success"}

    async def _create(self, request: web.Request) -> web.StreamResponse:
        """/api/create from an existing model with parameters (server/create.go): the new
        model shares the weights; a `from` not on disk is pulled first (model.go
        parseFromModel)."""
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        target = str(body.get("model") or body.get("name") or "")
        if not parse_name(target).valid:
            return _error(INVALID_NAME, 400)
        source = str(body.get("from") or "")
        if not source:
            return _error("neither 'from' or 'files' was specified", 400)
        if not parse_name(source).valid:
            return _error(INVALID_NAME, 400)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            return _error("json: cannot unmarshal parameters into map[string]any", 400)
        base = self._find(source)
        if base is None:
            async with contextlib.aclosing(self._pull_events(source)) as events:
                async for event in events:
                    if "error" in event:
                        return _error(event["error"], 500)
            base = self._find(source)
            assert base is not None
        existing = self._find(target)
        name = existing.name if existing is not None else normalize(target)
        self._pulled[_key(name)] = _Pulled(
            name=name,
            model=base.model,
            modified=self._clock(),
            blob=base.blob,
            parameters={**base.parameters, **parameters},
        )
        statuses = [
            {"status": "using existing layer sha256:" + base.blob.removeprefix("sha256-")},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        if body.get("stream") is False:
            return _json_response(statuses[-1])
        return web.Response(
            body=b"".join(_line(event) for event in statuses),
            content_type="application/x-ndjson",
        )

    async def _show(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        requested = str(body.get("model") or body.get("name") or "")
        if not requested.strip():
            return _error("model is required", 400)
        pulled = self._find(requested)
        if pulled is None:
            return _error(f"model '{requested}' not found", 404)
        model = pulled.model
        arch = model.family
        verbose = body.get("verbose") is True
        kv_heads: Any = model.head_count_kv
        if isinstance(kv_heads, tuple):
            # getModelData: without verbose, arrays are not read and marshal as null.
            kv_heads = list(kv_heads) if verbose else None
        parameters = ['stop                           "<|eot_id|>"']
        parameters += [f"{key:<30} {json.dumps(value)}" for key, value in pulled.parameters.items()]
        modelfile = f'# Modelfile generated by "ollama show"\nFROM {pulled.name}\n' + "".join(
            f"PARAMETER {key} {json.dumps(value)}\n" for key, value in pulled.parameters.items()
        )
        return _json_response(
            {
                "license": "",
                "modelfile": modelfile,
                "parameters": "\n".join(parameters),
                "template": "{{ .Prompt }}",
                "details": model.details(),
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": model.parameter_count,
                    f"{arch}.context_length": model.context_length,
                    f"{arch}.embedding_length": model.embedding_length,
                    f"{arch}.block_count": model.block_count,
                    f"{arch}.attention.head_count": model.head_count,
                    f"{arch}.attention.head_count_kv": kv_heads,
                    "tokenizer.ggml.tokens": ["<s>", "</s>", "hello"] if verbose else None,
                },
                "capabilities": ["embedding"] if model.embedding else ["completion"],
                "modified_at": _timestamp(pulled.modified),
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
        requested = str(body.get("model") or "")
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"), math.nan)
        except ValueError as err:
            return _error(str(err), 400)
        pulled = self._find(requested) if parse_name(requested).valid else None
        if pulled is None:
            return _error(f"model '{requested}' not found", 404)
        if chat:
            messages = body.get("messages")
            last = messages[-1] if isinstance(messages, list) and messages else None
            prompt = str(last.get("content") or "") if isinstance(last, dict) else ""
        else:
            prompt = str(body.get("prompt") or "")
        if not prompt and keep_alive == 0:
            running = self._loaded.get(pulled.blob)
            if running is not None:
                self._begin_unload(running)
            return _json_response(self._reply(requested, chat, "", "unload"))
        if pulled.model.embedding:
            return _error(f'"{requested}" does not support {"chat" if chat else "generate"}', 400)
        started = time.monotonic()
        try:
            options = runner_options(pulled.parameters, body.get("options"))
            runner, load_seconds = await self._runner_for(pulled, options)
        except _LoadError as err:
            return _error(str(err), err.status)
        session = None if math.isnan(keep_alive) else keep_alive
        if not prompt:
            self._release(runner, session)
            return _json_response(self._reply(requested, chat, "", "load"))
        words = f"This is a simulated reply from {pulled.name}.".split(" ")
        calls = _tool_calls(body.get("tools")) if chat else []
        if calls:  # the model calls a tool instead of answering in words
            words = []

        def final(text: str) -> Json:
            reply = self._reply(requested, chat, text, "stop")
            if calls and body.get("stream") is False:
                reply["message"]["tool_calls"] = calls
            return reply | {
                "total_duration": int((time.monotonic() - started) * 1e9),
                "load_duration": int(load_seconds * 1e9),
                "prompt_eval_count": len(prompt.split()),
                "prompt_eval_duration": 1_000_000,
                "eval_count": len(words),
                "eval_duration": 10_000_000 * len(words),
            }

        try:
            if body.get("stream") is False:
                return _json_response(final(" ".join(words)))
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            for index, word in enumerate(words):
                chunk = self._reply(requested, chat, word if index == 0 else f" {word}", None)
                await response.write(_line(chunk))
            if calls:  # streamed as one chunk once parsed (server/routes.go ChatHandler)
                chunk = self._reply(requested, chat, "", None)
                chunk["message"]["tool_calls"] = calls
                await response.write(_line(chunk))
            await response.write(_line(final("")))
            await response.write_eof()
            return response
        finally:
            self._release(runner, session)

    async def _embed(self, request: web.Request) -> web.Response:
        """An empty input loads the model; text gets deterministic unit-length vectors."""
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        requested = str(body.get("model") or "")
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"), math.nan)
        except ValueError as err:
            return _error(str(err), 400)
        pulled = self._find(requested) if parse_name(requested).valid else None
        if pulled is None:
            return _error(f'model "{requested}" not found, try pulling it first', 404)
        raw_input = body.get("input")
        texts = [raw_input] if isinstance(raw_input, str) and raw_input else raw_input or []
        try:
            options = runner_options(pulled.parameters, body.get("options"))
            runner, _ = await self._runner_for(pulled, options)
        except _LoadError as err:
            return _error(str(err), err.status)
        self._release(runner, None if math.isnan(keep_alive) else keep_alive)
        size = pulled.model.embedding_length
        return _json_response(
            {"model": requested, "embeddings": [_vector(str(text), size) for text in texts]}
        )

    # ---- the OpenAI-compatible API (openai/openai.go and middleware/openai.go, v0.12.3) -------
    # Ollama serves it by rewriting each request into its own (/api/chat, /api/generate,
    # /api/embed) and the answer back; errors are openai.NewError's shape, `code` null.

    async def _openai_models(self, request: web.Request) -> web.Response:
        """ToListCompletion: the models /api/tags lists, `owned_by` their namespace."""
        pulled = sorted(self._pulled.values(), key=lambda p: p.modified, reverse=True)
        data = [
            {
                "id": p.name,
                "object": "model",
                "created": int(p.modified.timestamp()),
                "owned_by": parse_name(p.name).namespace,
            }
            for p in pulled
        ]
        return _json_response({"object": "list", "data": data})

    async def _openai_runner(
        self, request: web.Request
    ) -> tuple[Json, _Pulled, _Runner] | web.Response:
        """The body, the model and a runner holding a reference, or the OpenAI-shaped error."""
        try:
            body = json.loads(await request.text())
        except ValueError as err:
            return _openai_error(400, str(err))
        if not isinstance(body, dict):
            return _openai_error(400, "invalid request")
        requested = str(body.get("model") or "")
        pulled = self._find(requested) if parse_name(requested).valid else None
        if pulled is None:
            return _openai_error(404, f"model '{requested}' not found")
        try:
            runner, _ = await self._runner_for(pulled, runner_options(pulled.parameters, None))
        except _LoadError as err:
            return _openai_error(err.status, str(err))
        return body, pulled, runner

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        """ChatMiddleware: ToChatCompletion, or ToChunk per streamed word then [DONE]."""
        found = await self._openai_runner(request)
        if isinstance(found, web.Response):
            return found
        body, pulled, runner = found
        try:
            if pulled.model.embedding:
                return _openai_error(400, f'"{body["model"]}" does not support chat')
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _openai_error(400, "[] is too short - 'messages'")
            calls = _tool_calls(body.get("tools"))
            words = [] if calls else f"This is a simulated reply from {pulled.name}.".split(" ")
            prompt = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
            openai_calls = [
                {
                    "id": "call_" + hashlib.sha256(json.dumps(c).encode()).hexdigest()[:8],
                    "index": index,
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _compact(c["function"]["arguments"]),
                    },
                }
                for index, c in enumerate(calls)
            ]
            reason = "tool_calls" if calls else "stop"
            usage = _usage(prompt, words)
            chat_id = f"chatcmpl-{len(prompt) % 1000}"
            head = {
                "id": chat_id,
                "created": int(self._clock().timestamp()),
                "model": body["model"],
                "system_fingerprint": "fp_ollama",
            }
            if not body.get("stream"):
                message: Json = {"role": "assistant", "content": " ".join(words)}
                if openai_calls:
                    message["tool_calls"] = openai_calls
                choice = {"index": 0, "message": message, "finish_reason": reason}
                return _json_response(
                    {"object": "chat.completion", **head, "choices": [choice], "usage": usage}
                )
            deltas: list[Json] = [
                {"role": "assistant", "content": w if i == 0 else f" {w}"}
                for i, w in enumerate(words)
            ]
            if openai_calls:
                deltas.append({"role": "assistant", "content": "", "tool_calls": openai_calls})
            deltas.append({"role": "assistant", "content": ""})
            chunks = [
                {
                    "object": "chat.completion.chunk",
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "finish_reason": reason if i == len(deltas) - 1 else None,
                        }
                    ],
                }
                for i, delta in enumerate(deltas)
            ]
            return await _sse(request, chunks, head, usage, body.get("stream_options"))
        finally:
            self._release(runner, None)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        """CompletionsMiddleware: ToCompletion, or ToCompleteChunk per word then [DONE].
        The prompt must be a string (openai.go CompletionRequest, issue #5259)."""
        found = await self._openai_runner(request)
        if isinstance(found, web.Response):
            return found
        body, pulled, runner = found
        try:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return _openai_error(
                    400,
                    "json: cannot unmarshal array into Go struct field "
                    "CompletionRequest.prompt of type string",
                )
            if pulled.model.embedding:
                return _openai_error(400, f'"{body["model"]}" does not support generate')
            words = f"This is a simulated reply from {pulled.name}.".split(" ")
            limit = body.get("max_tokens")
            reason = "stop"
            if isinstance(limit, int) and limit < len(words):
                words, reason = words[: max(limit, 0)], "length"
            head = {
                "id": f"cmpl-{len(prompt) % 1000}",
                "created": int(self._clock().timestamp()),
                "model": body["model"],
                "system_fingerprint": "fp_ollama",
            }
            usage = _usage(prompt, words)
            if not body.get("stream"):
                choice = {"text": " ".join(words), "index": 0, "finish_reason": reason}
                return _json_response(
                    {"object": "text_completion", **head, "choices": [choice], "usage": usage}
                )
            texts = [w if i == 0 else f" {w}" for i, w in enumerate(words)] + [""]
            chunks = [
                {
                    "object": "text_completion",
                    **head,
                    "choices": [
                        {
                            "text": text,
                            "index": 0,
                            "finish_reason": reason if i == len(texts) - 1 else None,
                        }
                    ],
                }
                for i, text in enumerate(texts)
            ]
            return await _sse(request, chunks, head, usage, body.get("stream_options"))
        finally:
            self._release(runner, None)

    async def _openai_embeddings(self, request: web.Request) -> web.Response:
        """EmbeddingsMiddleware: input a string or a list of strings; ToEmbeddingList."""
        found = await self._openai_runner(request)
        if isinstance(found, web.Response):
            return found
        body, pulled, runner = found
        self._release(runner, None)
        raw = body.get("input")
        if raw is None or raw == "" or raw == []:
            return _openai_error(400, "invalid input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _openai_error(400, "invalid input")
        size = pulled.model.embedding_length
        data = [
            {"object": "embedding", "embedding": _vector(text, size), "index": index}
            for index, text in enumerate(texts)
        ]
        tokens = sum(max(len(text.split()), 1) for text in texts)
        return _json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

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


def _fill(slices: list[int], devices: list[SimulatedDevice]) -> tuple[int, dict[str, int]]:
    """greedyFit: layers onto the devices in turn while each has room; how many went on."""
    placement: dict[str, int] = {}
    free = [device.free_bytes for device in devices]
    index = placed = 0
    for size in slices:
        while index < len(devices) and free[index] < size:
            index += 1
        if index == len(devices):
            break
        free[index] -= size
        uuid = devices[index].uuid
        placement[uuid] = placement.get(uuid, 0) + size
        placed += 1
    return placed, placement


def _duration(seconds: float) -> dt.timedelta:
    return FOREVER if math.isinf(seconds) else dt.timedelta(seconds=seconds)


def _log(message: str) -> None:
    sys.stderr.write(f"fake ollama: {message}\n")
    sys.stderr.flush()


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


def _openai_error(status: int, message: str) -> web.Response:
    """openai.NewError (openai/openai.go, v0.12.3): the type by status, `code` null."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    error = {"message": message, "type": kind, "param": None, "code": None}
    return _json_response({"error": error}, status)


def _usage(prompt: str, words: list[str]) -> Json:
    prompt_tokens = max(len(prompt.split()), 1)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(words),
        "total_tokens": prompt_tokens + len(words),
    }


async def _sse(
    request: web.Request, chunks: list[Json], head: Json, usage: Json, stream_options: Any
) -> web.StreamResponse:
    """Server-sent events as the OpenAI middleware writes them: `data: {json}` per chunk, a
    usage chunk with no choices when stream_options.include_usage, then `data: [DONE]`."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(b"data: " + _compact(chunk).encode() + b"\n\n")
    if isinstance(stream_options, dict) and stream_options.get("include_usage"):
        last = {**chunks[-1], "choices": [], "usage": usage} | {"object": chunks[-1]["object"]}
        await response.write(b"data: " + _compact(last).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _tool_calls(tools: Any) -> list[Json]:
    """The simulated model's answer to a request with tools: it calls the first function,
    with a value for each required parameter (api/types.go ToolCall: `function` with `index`,
    `name` and `arguments` as an object). No tools, no call."""
    if not isinstance(tools, list) or not tools:
        return []
    first: Json = tools[0] if isinstance(tools[0], dict) else {}
    function: Json = first["function"] if isinstance(first.get("function"), dict) else {}
    name = str(function.get("name") or "")
    if not name:
        return []
    parameters: Json = (
        function["parameters"] if isinstance(function.get("parameters"), dict) else {}
    )
    properties: Json = parameters.get("properties") or {}
    defaults = {"integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}
    arguments = {
        key: defaults.get(str((properties.get(key) or {}).get("type")), "simulated")
        for key in parameters.get("required") or []
    }
    return [{"function": {"index": 0, "name": name, "arguments": arguments}}]


def _vector(text: str, size: int) -> list[float]:
    seed = hashlib.sha256(text.encode()).digest()
    raw = [seed[i % len(seed)] - 127.5 for i in range(size)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


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
    parser.add_argument(
        "--unload-seconds",
        type=float,
        default=DEFAULT_UNLOAD_SECONDS,
        help="how long an unloaded runner keeps its memory (%(default)s)",
    )
    parser.add_argument(
        "--max-loaded-models",
        type=int,
        default=CHART_MAX_LOADED_MODELS,
        help="OLLAMA_MAX_LOADED_MODELS; 0 is Ollama's default, 3 per GPU (default: the "
        "chart's %(default)s)",
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
            keep_alive_seconds=parse_env_keep_alive(args.keep_alive),
            unload_seconds=args.unload_seconds,
            max_loaded_models=args.max_loaded_models,
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
