"""Ollama through its HTTP API (docs/api.md in the Ollama repository; behaviour as of v0.12.3,
the version the chart pins).

- names: Ollama fills in `registry.ollama.ai/library/...:latest`, compares names without case
  and lists the short form (ollama_names.py). Every name it answers is read that way, and
  `list_resident` reports each model under the name it was asked to load, so the agent's
  verbatim comparison with spec.model holds (`Llama3.2:1B`, `library/llama3.2:1b`, a
  tagless `mymodel`). A name this backend never loaded is reported in the short form (or, for
  a derived model, as the model it derives from).
- pull: POST /api/pull streams NDJSON progress per layer; the percentage reported is bytes
  completed over bytes known across layers, never decreasing, 100 only on `success`. A model
  that /api/tags already lists is not pulled again, so a node without registry access can
  still load what it has. A model the registry does not have ("pull model manifest: file does
  not exist") or an invalid name is a permanent failure (retryable=False); a broken download
  is retryable.
- options: Ollama reloads a runner whenever a request's runner options (num_ctx, num_batch,
  num_gpu, main_gpu, use_mmap, num_thread) differ from the loaded ones (server/sched.go
  needsReload), and an ordinary client request carries none. Options sent with our load
  alone would therefore be dropped by the first client request, which reloads the model with
  the defaults. So `ollama.options` become a model of their own: /api/create makes
  `<model>:<tag>-vram-<hash>` from the requested model with the options as its parameters
  (weights shared, nothing copied), we load that, and every request for it gets the same
  options from its Modelfile: no reload. Server-wide settings cannot do this (only num_ctx
  has one, OLLAMA_CONTEXT_LENGTH, and it is per server, not per model). Clients must call
  the derived name (`served_name`); a request for the plain name shares the weights' runner
  (runners are keyed by the weights file) and reloads it with the defaults, which
  `list_resident` reports in the model's message. We never send main_gpu: in 0.12 Ollama
  lays a model out over the GPUs with the most free memory itself (llm/server.go
  createLayout), so it chose nothing, and it only made our requests differ from clients'.
- load: POST /api/generate with no prompt and `keep_alive` (seconds; -1 holds the model until
  the agent unloads it). A keep_alive of 0 is refused: on an empty prompt it means unload.
- Ollama's own decisions: it unloads idle models by itself when a new load does not fit
  (server/sched.go findRunnerToUnload), whatever OLLAMA_MAX_LOADED_MODELS says, and may put
  part of a model in host memory (size_vram < size in /api/ps). A model this backend loaded
  that /api/ps no longer lists is reported by `vanished()`; one partly on the CPU is reported
  with the message "partly on CPU: X of Y in VRAM". /api/ps names no GPU, and a model may be
  split across several, so `gpu_uuid` stays None.
- unload: the same generate with `keep_alive: 0`. Ollama answers at once and the runner exits
  later (after in-flight requests finish, then the process is killed and waited for), so
  `unload` waits, bounded, until /api/ps no longer lists the model: only then is its memory
  free for the next load.
- last access: /api/ps has no access time, but `expires_at` is reset to now + keep_alive by
  every request that uses the model. So whenever a model's `expires_at` changes between two
  listings it was used in between, and its last access becomes now (to the listing interval's
  precision). A change in either direction counts: a client sending a shorter keep_alive moves
  it back. A model seen for the first time counts as accessed then, so an agent restart does
  not make every model look cold.
- estimate: POST /api/show with `verbose: true` (without it Ollama drops per-layer arrays such
  as head_count_kv, and the KV cache could not be sized), at the context the server will
  allocate: num_ctx from the options, else the Modelfile, else the version's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vram_operator.api import Backend, BackendHealth, ModelState, format_bytes
from vram_operator.node_agent.estimate import (
    Estimate,
    default_ollama_context,
    from_ollama_show,
)

from .base import (
    AiohttpTransport,
    BackendError,
    JSONEndpoint,
    LoadRequest,
    ProgressCallback,
    ResidentInfo,
    RetryPolicy,
    Transport,
    decode_json,
    parse_as,
    utcnow,
)
from .ollama_names import (
    base_of_derived,
    derived_model_name,
    normalize_model_name,
    parse_model_name,
    same_model,
    short_model_name,
)

log = logging.getLogger(__name__)

__all__ = [
    "OllamaBackend",
    "PullProgress",
    "derived_model_name",
    "normalize_model_name",
    "same_model",
    "served_name",
    "short_model_name",
]

DEFAULT_URL = "http://127.0.0.1:11434"
LOAD_TIMEOUT = 600.0
"""Seconds a load may take: reading tens of GiB from a slow disk onto the GPU."""
PULL_IDLE_TIMEOUT = 300.0
"""Seconds a pull may go without a progress line before it counts as stalled."""
UNLOAD_TIMEOUT = 30.0
"""Seconds `unload` waits for /api/ps to drop the model. Ollama unloads once in-flight requests
end, kills the runner and waits for it; then it waits up to 5 s for the GPU's free memory to
recover (server/sched.go waitForVRAMRecovery)."""
UNLOAD_POLL = 0.1
"""Seconds between two /api/ps listings while waiting for an unload."""
KEEP_FOREVER = -1
"""Ollama's keep_alive for "until unloaded"."""
PERMANENT = "permanent: not retried until the spec or the node changes"
_NOT_IN_REGISTRY = "file does not exist"
_INVALID_NAME = "invalid model name"


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Version(_Shape):
    version: str


class _Named(_Shape):
    name: str


class _Tags(_Shape):
    models: list[_Named] | None = None


class _Running(_Named):
    size: int | None = Field(default=None, ge=0)
    size_vram: int = Field(ge=0)
    expires_at: dt.datetime | None = None
    context_length: int | None = None


class _Ps(_Shape):
    models: list[_Running] | None = None


class _Done(_Shape):
    done: bool


class _PullEvent(_Shape):
    status: str | None = None
    digest: str | None = None
    total: int | None = Field(default=None, ge=0)
    completed: int | None = Field(default=None, ge=0)
    error: str | None = None


def normalize(model: str) -> str:
    """Ollama's short name: `llama3.2` is `llama3.2:latest` (see ollama_names)."""
    return short_model_name(model)


def served_name(model: str, options: Mapping[str, Any]) -> str:
    """The name clients must call to use `model` as loaded with `options`: the model itself
    when there are none, else the derived model carrying them as parameters."""
    return derived_model_name(model, options) if options else short_model_name(model)


def permanent_error(message: str, context: str = "", status: int | None = None) -> BackendError:
    """A failure that asking again cannot mend (the agent ends the replica Failed)."""
    return BackendError(f"{message} ({PERMANENT})", retryable=False, status=status, context=context)


def _partial_note(size: int | None, size_vram: int) -> str | None:
    if size is None or size_vram >= size:
        return None
    return f"partly on CPU: {format_bytes(size_vram)} of {format_bytes(size)} in VRAM"


@dataclass
class _Loaded:
    """A model this backend loaded: what it was asked for and what it made Ollama load."""

    requested: str
    served: str
    expires_at: dt.datetime | None = None
    """expires_at when /api/ps last listed it."""


class PullProgress:
    """Turns per-layer pull events into one percentage that never goes back.

    Layers appear as their download starts, so the byte total can grow and the raw ratio drop;
    the reported figure holds at its highest. It stays below 100 until Ollama says `success`.
    """

    def __init__(self, report: ProgressCallback) -> None:
        self._report = report
        self._layers: dict[str, tuple[int, int]] = {}
        self._last = -1

    def layer(self, digest: str, total: int, completed: int) -> None:
        self._layers[digest] = (total, min(completed, total))
        all_total = sum(t for t, _ in self._layers.values())
        if all_total:
            done = sum(c for _, c in self._layers.values())
            self._emit(min(99, math.floor(100 * done / all_total)))

    def finished(self) -> None:
        self._emit(100)

    def _emit(self, percent: int) -> None:
        if percent > self._last:
            self._last = percent
            self._report(percent)


class OllamaBackend:
    """The Ollama sidecar, driven through its HTTP API."""

    kind = Backend.OLLAMA
    can_park = False
    lays_out_itself = True
    """llm/server.go createLayout (0.12) puts a model on the GPUs with the most free memory,
    split over several when none holds it alone; nothing in a request names a GPU."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        transport: Transport | None = None,
        retry: RetryPolicy | None = None,
        load_timeout: float = LOAD_TIMEOUT,
        pull_idle_timeout: float = PULL_IDLE_TIMEOUT,
        clock: Callable[[], dt.datetime] = utcnow,
        unload_timeout: float = UNLOAD_TIMEOUT,
        unload_poll: float = UNLOAD_POLL,
        total_vram_bytes: int | None = None,
        max_loaded_models: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._max_loaded_models = max_loaded_models
        """The server's OLLAMA_MAX_LOADED_MODELS, reported so the operator never places more
        (Ollama has no API that tells it)."""
        self._transport: Transport = transport or AiohttpTransport()
        self._retry = retry or RetryPolicy()
        self._api = JSONEndpoint(self._transport, self._retry, self.base_url, "ollama")
        self._load_timeout = load_timeout
        self._pull_idle_timeout = pull_idle_timeout
        self._clock = clock
        self._unload_timeout = unload_timeout
        self._unload_poll = unload_poll
        self._total_vram_bytes = total_vram_bytes
        """All GPUs' memory together, which sizes the default context from Ollama 0.15.5."""
        self._version: str | None = None
        self._seen: dict[str, tuple[dt.datetime | None, dt.datetime]] = {}
        """Per listed name (normalized): the expires_at last listed and the access time."""
        self._loaded: dict[str, _Loaded] = {}
        """Models this backend loaded, by the normalized requested name."""
        self._vanished: dict[str, ResidentInfo] = {}
        """Models this backend loaded that /api/ps stopped listing, by normalized name."""

    # ---- names ----------------------------------------------------------------------------

    def served_name(self, model: str) -> str:
        """The name Ollama holds `model` under: the derived model when it was loaded with
        options (clients must call that name to keep them), else its short name."""
        loaded = self._loaded.get(normalize_model_name(model))
        return loaded.served if loaded is not None else short_model_name(model)

    def _identify(self, listed: str) -> tuple[str, _Loaded | None]:
        """The name to report for a /api/ps entry, and our record of it if we loaded it."""
        for loaded in self._loaded.values():
            if same_model(loaded.served, listed) or same_model(loaded.requested, listed):
                return loaded.requested, loaded
        base = base_of_derived(listed)
        return (base if base is not None else short_model_name(listed)), None

    # ---- health and listings --------------------------------------------------------------

    async def health(self) -> BackendHealth:
        try:
            answer = parse_as(
                _Version, await self._api.call("GET", "/api/version"), "ollama version"
            )
        except BackendError as err:
            return BackendHealth(
                name=Backend.OLLAMA, healthy=False, endpoint=self.base_url, message=str(err)
            )
        self._version = answer.version
        return BackendHealth(
            name=Backend.OLLAMA,
            healthy=True,
            endpoint=self.base_url,
            version=answer.version,
            max_models=self._max_loaded_models,
        )

    async def list_pulled(self) -> list[str]:
        """Models on the node's disk (/api/tags), in the short form."""
        tags = parse_as(_Tags, await self._api.call("GET", "/api/tags"), "ollama /api/tags")
        return [short_model_name(entry.name) for entry in tags.models or []]

    async def _is_pulled(self, model: str) -> bool:
        return any(same_model(model, name) for name in await self.list_pulled())

    async def _ps(self) -> list[_Running]:
        ps = parse_as(_Ps, await self._api.call("GET", "/api/ps"), "ollama /api/ps")
        return list(ps.models or [])

    async def list_resident(self) -> list[ResidentInfo]:
        """What /api/ps lists, each under the name it was asked to load (see module doc).

        A model partly in host memory carries the message "partly on CPU: X of Y in VRAM"; one
        running under its plain name although it was loaded with options (a client reloaded
        it with the defaults) says so. Models this backend loaded that the listing lacks are
        remembered for `vanished()`.
        """
        entries = await self._ps()
        now = self._clock()
        seen: dict[str, tuple[dt.datetime | None, dt.datetime]] = {}
        resident = []
        present: set[str] = set()
        for entry in entries:
            listed_key = normalize_model_name(entry.name)
            previous = self._seen.get(listed_key)
            if previous is not None and previous[0] == entry.expires_at:
                last_access = previous[1]
            else:
                last_access = now
            seen[listed_key] = (entry.expires_at, last_access)
            name, loaded = self._identify(entry.name)
            notes = [_partial_note(entry.size, entry.size_vram)]
            if loaded is not None:
                present.add(normalize_model_name(loaded.requested))
                loaded.expires_at = entry.expires_at
                if not same_model(loaded.served, entry.name):
                    notes.append(
                        f"running as {short_model_name(entry.name)} with Ollama's default "
                        f"options: a request for that name reloaded it; clients must call "
                        f"{loaded.served} to keep ollama.options"
                    )
            message = "; ".join(note for note in notes if note) or None
            resident.append(
                ResidentInfo(
                    model=name,
                    key=None,
                    vram_bytes=entry.size_vram,
                    gpu_uuid=None,
                    state=ModelState.LOADED,
                    last_access=last_access,
                    expires_at=entry.expires_at,
                    message=message,
                )
            )
        self._seen = seen
        for key, loaded in self._loaded.items():
            if key in present:
                self._vanished.pop(key, None)
            elif key not in self._vanished:
                self._vanished[key] = self._gone(loaded, now)
        return resident

    def _gone(self, loaded: _Loaded, now: dt.datetime) -> ResidentInfo:
        if loaded.expires_at is not None and loaded.expires_at <= now:
            why = "its keep_alive ran out"
        else:
            why = (
                "Ollama unloaded it: it evicts idle models when a new load does not fit, "
                "whatever OLLAMA_MAX_LOADED_MODELS says"
            )
        return ResidentInfo(
            model=loaded.requested,
            key=None,
            vram_bytes=None,
            gpu_uuid=None,
            state=ModelState.EVICTED,
            expires_at=loaded.expires_at,
            message=f"no longer in /api/ps: {why}",
        )

    def vanished(self) -> list[ResidentInfo]:
        """Models this backend loaded that Ollama unloaded on its own, as of the last
        `list_resident` (state Evicted, the message says why); cleared by load and unload."""
        return list(self._vanished.values())

    # ---- pull -----------------------------------------------------------------------------

    async def pull(self, model: str, on_progress: ProgressCallback) -> None:
        if not parse_model_name(model).is_valid:
            raise permanent_error(f"{model!r} is not a valid Ollama model name", "ollama pull")
        progress = PullProgress(on_progress)
        if await self._is_pulled(model):
            progress.finished()
            return
        await self._retry.run(lambda: self._pull_once(model, progress))

    async def _pull_once(self, model: str, progress: PullProgress) -> None:
        context = f"ollama pull {model}"
        lines = self._transport.stream_lines(
            "POST",
            f"{self.base_url}/api/pull",
            json={"model": model, "stream": True},
            idle_limit=self._pull_idle_timeout,
        )
        try:
            async with contextlib.aclosing(lines):
                async for line in lines:
                    event = parse_as(_PullEvent, decode_json(line, context), context)
                    if event.error:
                        raise self._pull_error(event.error, context)
                    if event.digest and event.total:
                        progress.layer(event.digest, event.total, event.completed or 0)
                    if event.status == "success":
                        progress.finished()
                        return
        except BackendError as err:
            if err.status == 400 and _INVALID_NAME in err.message:
                raise permanent_error(err.message, context, err.status) from None
            raise
        raise BackendError(
            "the progress stream ended before success", retryable=True, context=context
        )

    @staticmethod
    def _pull_error(message: str, context: str) -> BackendError:
        """A registry that has no such model is final (server/images.go pullModelManifest
        turns its 404 into "pull model manifest: file does not exist"); anything else in the
        stream is a download that broke and may go through next time."""
        if _NOT_IN_REGISTRY in message:
            return permanent_error(f"{message}: the registry has no such model", context)
        return BackendError(message, retryable=True, context=context)

    # ---- load -----------------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> ResidentInfo:
        context = f"ollama load {request.model}"
        if request.keep_alive_seconds is not None and request.keep_alive_seconds <= 0:
            raise permanent_error(
                "keep_alive 0 on a load is an unload in Ollama; keepAlive must be positive",
                context,
            )
        key = normalize_model_name(request.model)
        resident_before = {k for k in self._loaded if k != key and k not in self._vanished}
        served = await self._prepare(request.model, dict(request.options))
        body: dict[str, Any] = {
            "model": served,
            "prompt": "",
            "stream": False,
            "keep_alive": KEEP_FOREVER
            if request.keep_alive_seconds is None
            else request.keep_alive_seconds,
        }
        try:
            answer = await self._api.call(
                "POST", "/api/generate", body, time_limit=self._load_timeout
            )
            parse_as(_Done, answer, context)
        except BackendError as err:
            if err.status != 400 or "does not support" not in err.message:
                raise
            # An embedding model refuses generate; an empty /api/embed request loads it.
            embed = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
            await self._api.call(
                "POST", "/api/embed", {**embed, "input": []}, time_limit=self._load_timeout
            )
        self._loaded[key] = _Loaded(requested=request.model, served=served)
        self._vanished.pop(key, None)
        for info in await self.list_resident():
            if info.model == request.model:
                evicted = [self._vanished[k].model for k in resident_before if k in self._vanished]
                if evicted:
                    log.warning(
                        "Ollama unloaded %s on its own while loading %s",
                        ", ".join(evicted),
                        request.model,
                    )
                return info
        self._loaded.pop(key, None)
        self._vanished.pop(key, None)
        raise BackendError(
            f"{served} is not in /api/ps after loading", retryable=True, context=context
        )

    async def _prepare(self, model: str, options: dict[str, Any]) -> str:
        """The name to load: the model itself, or the derived model carrying `options`,
        created when missing (see the module doc for why options are not sent per request)."""
        if not options:
            return model
        served = derived_model_name(model, options)
        if await self._is_pulled(served):
            return served
        body = {"model": served, "from": model, "parameters": options, "stream": False}
        try:
            await self._api.call("POST", "/api/create", body, time_limit=self._load_timeout)
        except BackendError as err:
            if err.status == 400:
                raise permanent_error(
                    f"cannot create {served} from {model} with ollama.options {options}: "
                    f"{err.message}",
                    f"ollama create {served}",
                    err.status,
                ) from None
            raise
        log.info("created %s from %s with options %s", served, model, options)
        return served

    # ---- unload ---------------------------------------------------------------------------

    async def unload(self, key: str, model: str) -> None:
        """Ask Ollama to unload every runner holding `model` (under its own name, or as our
        derived model), then wait until /api/ps lists none of them, so their memory is free."""
        wanted = normalize_model_name(model)
        self._loaded.pop(wanted, None)
        self._vanished.pop(wanted, None)
        names = [entry.name for entry in await self._ps() if self._holds(entry.name, wanted)]
        for name in names:
            try:
                await self._api.call("POST", "/api/generate", {"model": name, "keep_alive": 0})
            except BackendError as err:
                if err.status != 404:  # a model Ollama does not even have is not loaded either
                    raise
        if names:
            await self._wait_gone(wanted, model)

    @staticmethod
    def _holds(listed: str, wanted: str) -> bool:
        base = base_of_derived(listed)
        return normalize_model_name(listed) == wanted or (
            base is not None and normalize_model_name(base) == wanted
        )

    async def _wait_gone(self, wanted: str, model: str) -> None:
        deadline = time.monotonic() + self._unload_timeout
        while True:
            if not any(self._holds(entry.name, wanted) for entry in await self._ps()):
                self._seen = {k: v for k, v in self._seen.items() if k != wanted}
                return
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"still in /api/ps {self._unload_timeout:g}s after the unload request "
                    "(a request in flight holds it, or the runner does not exit)",
                    retryable=True,
                    context=f"ollama unload {model}",
                )
            await asyncio.sleep(self._unload_poll)

    async def park(self, key: str, model: str) -> None:
        raise BackendError("Ollama has no host-RAM tier; unload the model instead")

    async def wake(self, key: str, model: str) -> None:
        raise BackendError("Ollama has no host-RAM tier; load the model instead")

    # ---- estimate -------------------------------------------------------------------------

    async def estimate(
        self, model: str, context_length: int | None = None, *, args: Sequence[str] = ()
    ) -> Estimate | None:
        """From the verbose /api/show; None when the model is not pulled or its metadata gives
        no size. `context_length` is the deployment's num_ctx; without it the Modelfile's,
        else the server version's default (4096 in 0.12)."""
        context = f"ollama /api/show {model}"
        try:
            show = await self._api.call("POST", "/api/show", {"model": model, "verbose": True})
        except BackendError as err:
            if err.status == 404:
                return None
            raise
        if not isinstance(show, Mapping):
            raise BackendError("answered an unexpected shape: not an object", context=context)
        if self._version is None:
            await self.health()
        default = default_ollama_context(self._version, self._total_vram_bytes)
        try:
            return from_ollama_show(show, num_ctx=context_length, default_context=default)
        except ValueError as err:
            log.warning("cannot estimate %s from /api/show: %s", model, err)
            return None

    async def aclose(self) -> None:
        await self._transport.aclose()
