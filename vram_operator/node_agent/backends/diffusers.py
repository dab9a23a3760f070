"""Stable Diffusion pipelines in our diffusion server (see vram_operator.diffusion.server).

- pull: POST /downloads fetches the pipeline's files into the sidecar's Hugging Face cache;
  this client polls GET /downloads, reporting the bytes as progress.
- load: PUT /pipelines/{key} with spec.diffusers (which travels as flags in
  `LoadRequest.args`, `DiffusersOptions.as_args`), then polls GET /pipelines/{key} until it
  is loaded or failed. An unsupported pipeline or out-of-memory fails for good; the server's
  message lists the families it supports.
- park/wake: the pipeline to host RAM and back (POST .../park, .../wake).
- residency: GET /pipelines; VRAM is what the pipeline holds plus its activation peak
  (measured once it made an image), last access the server's time of the last image.
- estimate: GET /estimate reads the safetensors headers in the sidecar at the dtype and
  resolution asked for.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Literal
from urllib.parse import quote

from pydantic import Field

from vram_operator.api import Assignment, Backend, BackendHealth, ModelState
from vram_operator.api.diffusion import DiffusersOptions
from vram_operator.node_agent.estimate import Estimate

from . import sidecar
from .base import (
    AiohttpTransport,
    BackendError,
    JSONEndpoint,
    LoadRequest,
    ProgressCallback,
    ResidentInfo,
    RetryPolicy,
    Transport,
    follow_download,
    parse_as,
    utcnow,
)

DEFAULT_URL = "http://127.0.0.1:8950"
LOAD_TIMEOUT = 900.0
"""Seconds a load may take: reading several GB of weights and moving them to the GPU."""
MOVE_TIMEOUT = 300.0
"""Seconds parking or waking may take, waiting for the image being made first."""
_PERMANENT_DOWNLOAD_ERRORS = (
    "RepositoryNotFoundError",
    "GatedRepoError",
    "RevisionNotFoundError",
    "is not a folder",
)

_STATES = {
    "loading": ModelState.LOADING,
    "loaded": ModelState.LOADED,
    "parked": ModelState.SLEEPING,
    "failed": ModelState.FAILED,
}


class _Entry(sidecar.Entry):
    key: str
    model: str
    state: Literal["loading", "loaded", "parked", "failed"]
    gpu_uuid: str | None = None
    vram_bytes: int | None = Field(default=None, ge=0)
    message: str | None = None
    permanent: bool = False
    endpoint: str | None = None
    last_access: dt.datetime | None = None


class _Entries(sidecar.Shape):
    pipelines: list[_Entry]


def backend_args(assignment: Assignment) -> list[str]:
    """The backend arguments of an assignment: `vllm serve` flags, or spec.diffusers as
    flags (`DiffusersOptions.as_args`)."""
    if assignment.vllm is not None:
        return list(assignment.vllm.args)
    if assignment.backend is Backend.DIFFUSERS:
        return (assignment.diffusers or DiffusersOptions()).as_args()
    return []


def options_from(args: Sequence[str], context: str) -> DiffusersOptions:
    try:
        return DiffusersOptions.from_args(args)
    except ValueError as err:
        raise BackendError(f"invalid diffusers options: {err}", context=context) from None


class DiffusersBackend:
    """Diffusion pipelines, several per GPU, through the diffusion server on localhost."""

    kind = Backend.DIFFUSERS
    can_park = True
    lays_out_itself = False  # each pipeline goes on the GPU the load names

    def __init__(
        self,
        server_url: str = DEFAULT_URL,
        transport: Transport | None = None,
        retry: RetryPolicy | None = None,
        load_timeout: float = LOAD_TIMEOUT,
        poll_interval: float = 0.5,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.base_url = server_url.rstrip("/")
        self._transport: Transport = transport or AiohttpTransport()
        self._api = JSONEndpoint(
            self._transport, retry or RetryPolicy(), self.base_url, "diffusion-server"
        )
        self._load_timeout = load_timeout
        self._poll_interval = poll_interval
        self._clock = clock

    def _path(self, key: str, suffix: str = "") -> str:
        return f"/pipelines/{quote(key, safe='')}{suffix}"

    async def health(self) -> BackendHealth:
        return await sidecar.health(self._api, Backend.DIFFUSERS, "diffusion server")

    async def list_resident(self) -> list[ResidentInfo]:
        entries = parse_as(
            _Entries, await self._api.call("GET", "/pipelines"), "diffusion-server /pipelines"
        )
        return [self._info(entry) for entry in entries.pipelines]

    def _info(self, entry: _Entry) -> ResidentInfo:
        return ResidentInfo(
            model=entry.model,
            key=entry.key,
            vram_bytes=entry.vram_bytes,
            gpu_uuid=entry.gpu_uuid,
            state=_STATES[entry.state],
            last_access=entry.last_access,
            message=entry.message,
            endpoint=entry.endpoint,
        )

    async def pull(self, model: str, on_progress: ProgressCallback) -> None:
        context = f"diffusers pull {model}"
        await follow_download(
            self._api,
            await self._api.call("POST", "/downloads", {"model": model}),
            on_progress,
            self._poll_interval,
            _PERMANENT_DOWNLOAD_ERRORS,
            context,
        )

    async def load(self, request: LoadRequest) -> ResidentInfo:
        context = f"diffusers load {request.key}"
        options = options_from(request.args, context)
        body = {
            "model": request.model,
            "gpuUuid": request.gpu_uuid,
            "vramBytes": request.vram_bytes,
            "options": options.to_k8s(),
        }
        entry = parse_as(
            _Entry, await self._api.call("PUT", self._path(request.key), body), context
        )
        entry = await sidecar.poll_while(
            self._api,
            self._path(request.key),
            entry,
            "loading",
            give_up_after=self._load_timeout,
            interval=self._poll_interval,
            context=context,
        )
        if entry.state == "parked":
            await self.wake(request.key, request.model)
            entry = parse_as(_Entry, await self._api.call("GET", self._path(request.key)), context)
        if entry.state != "loaded":
            message = entry.message or f"the pipeline is {entry.state}"
            # Forget the failed entry, so that a retry loads afresh.
            await self.unload(request.key, request.model)
            raise BackendError(message, retryable=not entry.permanent, context=context)
        return self._info(entry)

    async def unload(self, key: str, model: str) -> None:
        await sidecar.delete(self._api, self._path(key), MOVE_TIMEOUT)

    async def park(self, key: str, model: str) -> None:
        await self._api.call("POST", self._path(key, "/park"), time_limit=MOVE_TIMEOUT)

    async def wake(self, key: str, model: str) -> None:
        await self._api.call("POST", self._path(key, "/wake"), time_limit=MOVE_TIMEOUT)

    async def estimate(
        self, model: str, context_length: int | None = None, *, args: Sequence[str] = ()
    ) -> Estimate | None:
        """Weights at the dtype plus the activation peak at the resolution, from the headers
        in the sidecar; None when the files are not there. `context_length` means nothing to
        a diffusion model."""
        context = f"diffusers estimate {model}"
        options = options_from(args, context)
        query = {"model": model, "options": json.dumps(options.to_k8s())}
        return await sidecar.estimate(self._api, query, context)

    async def aclose(self) -> None:
        await self._transport.aclose()
