"""Ollama through its HTTP API (docs/api.md in the Ollama repository).

- pull: POST /api/pull streams NDJSON progress per layer; the percentage reported is bytes
  completed over bytes known across layers, never decreasing, 100 only on `success`. A model
  that /api/tags already lists is not pulled again, so a node without registry access can
  still load what it has.
- load: POST /api/generate with no prompt and `keep_alive` (seconds; -1 holds the model until
  the agent unloads it), `options.main_gpu` set to the chosen GPU's index.
- unload: the same with `keep_alive: 0`.
- residency: GET /api/ps. Its `size_vram` is the VRAM the model really takes, and replaces any
  estimate. Ollama does not report which GPU holds a model.
- last access: /api/ps has no access time, but `expires_at` is reset to now + keep_alive by
  every request that uses the model. So whenever a model's `expires_at` changes between two
  listings it was used in between, and its last access becomes now (to the listing interval's
  precision). A change in either direction counts: a client sending a shorter keep_alive moves
  it back. A model seen for the first time counts as accessed then, so an agent restart does
  not make every model look cold.
- estimate: POST /api/show (parameter count, quantization, attention sizes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vram_operator.api import Backend, BackendHealth, ModelState
from vram_operator.node_agent.estimate import Estimate, from_ollama_show

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

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:11434"
LOAD_TIMEOUT = 600.0
"""Seconds a load may take: reading tens of GiB from a slow disk onto the GPU."""
PULL_IDLE_TIMEOUT = 300.0
"""Seconds a pull may go without a progress line before it counts as stalled."""
KEEP_FOREVER = -1
"""Ollama's keep_alive for "until unloaded"."""


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Version(_Shape):
    version: str


class _Named(_Shape):
    name: str


class _Tags(_Shape):
    models: list[_Named] | None = None


class _Running(_Named):
    size_vram: int = Field(ge=0)
    expires_at: dt.datetime | None = None


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
    """Ollama's canonical name: `llama3.2` is `llama3.2:latest`."""
    name = model.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


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

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        transport: Transport | None = None,
        retry: RetryPolicy | None = None,
        load_timeout: float = LOAD_TIMEOUT,
        pull_idle_timeout: float = PULL_IDLE_TIMEOUT,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport: Transport = transport or AiohttpTransport()
        self._retry = retry or RetryPolicy()
        self._api = JSONEndpoint(self._transport, self._retry, self.base_url, "ollama")
        self._load_timeout = load_timeout
        self._pull_idle_timeout = pull_idle_timeout
        self._clock = clock
        self._seen: dict[str, tuple[dt.datetime | None, dt.datetime]] = {}
        """Per model: the expires_at last listed, and the access time derived from it."""

    async def health(self) -> BackendHealth:
        try:
            answer = parse_as(
                _Version, await self._api.call("GET", "/api/version"), "ollama version"
            )
        except BackendError as err:
            return BackendHealth(
                name=Backend.OLLAMA, healthy=False, endpoint=self.base_url, message=str(err)
            )
        return BackendHealth(
            name=Backend.OLLAMA, healthy=True, endpoint=self.base_url, version=answer.version
        )

    async def list_pulled(self) -> list[str]:
        """Models on the node's disk (/api/tags), by canonical name."""
        tags = parse_as(_Tags, await self._api.call("GET", "/api/tags"), "ollama /api/tags")
        return [normalize(entry.name) for entry in tags.models or []]

    async def list_resident(self) -> list[ResidentInfo]:
        ps = parse_as(_Ps, await self._api.call("GET", "/api/ps"), "ollama /api/ps")
        now = self._clock()
        seen: dict[str, tuple[dt.datetime | None, dt.datetime]] = {}
        resident = []
        for entry in ps.models or []:
            name = normalize(entry.name)
            previous = self._seen.get(name)
            if previous is not None and previous[0] == entry.expires_at:
                last_access = previous[1]
            else:
                last_access = now
            seen[name] = (entry.expires_at, last_access)
            resident.append(
                ResidentInfo(
                    model=name,
                    key=None,
                    vram_bytes=entry.size_vram,
                    gpu_uuid=None,
                    state=ModelState.LOADED,
                    last_access=last_access,
                    expires_at=entry.expires_at,
                )
            )
        self._seen = seen
        return resident

    async def pull(self, model: str, on_progress: ProgressCallback) -> None:
        progress = PullProgress(on_progress)
        if normalize(model) in await self.list_pulled():
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
        async with contextlib.aclosing(lines):
            async for line in lines:
                event = parse_as(_PullEvent, decode_json(line, context), context)
                if event.error:
                    raise BackendError(event.error, context=context)
                if event.digest and event.total:
                    progress.layer(event.digest, event.total, event.completed or 0)
                if event.status == "success":
                    progress.finished()
                    return
        raise BackendError(
            "the progress stream ended before success", retryable=True, context=context
        )

    async def load(self, request: LoadRequest) -> ResidentInfo:
        options = dict(request.options)
        if request.gpu_index is not None:
            options["main_gpu"] = request.gpu_index
        body: dict[str, Any] = {
            "model": request.model,
            "prompt": "",
            "stream": False,
            "keep_alive": KEEP_FOREVER
            if request.keep_alive_seconds is None
            else request.keep_alive_seconds,
        }
        if options:
            body["options"] = options
        try:
            answer = await self._api.call(
                "POST", "/api/generate", body, time_limit=self._load_timeout
            )
            parse_as(_Done, answer, f"ollama load {request.model}")
        except BackendError as err:
            if err.status != 400 or "does not support" not in err.message:
                raise
            # An embedding model refuses generate; an empty /api/embed request loads it.
            embed = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
            await self._api.call(
                "POST", "/api/embed", {**embed, "input": []}, time_limit=self._load_timeout
            )
        name = normalize(request.model)
        for info in await self.list_resident():
            if info.model == name:
                return info
        raise BackendError(
            "the model is not in /api/ps after loading", context=f"ollama load {request.model}"
        )

    async def unload(self, key: str, model: str) -> None:
        try:
            await self._api.call("POST", "/api/generate", {"model": model, "keep_alive": 0})
        except BackendError as err:
            if err.status != 404:  # a model Ollama does not even have is not loaded either
                raise
        self._seen.pop(normalize(model), None)

    async def park(self, key: str, model: str) -> None:
        raise BackendError("Ollama has no host-RAM tier; unload the model instead")

    async def wake(self, key: str, model: str) -> None:
        raise BackendError("Ollama has no host-RAM tier; load the model instead")

    async def estimate(self, model: str, context_length: int | None = None) -> Estimate | None:
        """From /api/show; None when the model is not pulled or its metadata gives no size."""
        try:
            show = await self._api.call("POST", "/api/show", {"model": model})
        except BackendError as err:
            if err.status == 404:
                return None
            raise
        if not isinstance(show, Mapping):
            raise BackendError(
                "answered an unexpected shape: not an object", context=f"ollama /api/show {model}"
            )
        try:
            return from_ollama_show(show, num_ctx=context_length)
        except ValueError as err:
            log.warning("cannot estimate %s from /api/show: %s", model, err)
            return None

    async def aclose(self) -> None:
        await self._transport.aclose()
