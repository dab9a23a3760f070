"""What every model backend offers the agent, and the HTTP plumbing the backends share.

A backend is an inference server beside the agent (Ollama, or vLLM through our supervisor).
The agent drives it only through `ModelBackend`, so its residency logic never sees HTTP.

Failures become `BackendError`, carrying the backend's own message (which the agent copies into
the model's Failed state) and whether trying again may help. Transport failures -- connection
refused, timeouts, 5xx -- are retryable and retried a bounded number of times with backoff;
4xx answers and garbage (invalid JSON, the wrong shape) are not: asking again gets the same.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlencode

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from vram_operator.api import Backend, BackendHealth, ModelState
from vram_operator.node_agent.estimate import Estimate

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_TIMEOUT = 10.0
"""Seconds for a request that should answer at once (listing, health, unload)."""

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection; the backends are on localhost, so this is generous."""

_SNIPPET = 300


class BackendError(Exception):
    """A backend call that failed. `message` is the backend's own text where it sent one."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        context: str = "",
    ) -> None:
        super().__init__(f"{context}: {message}" if context else message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.context = context


@dataclass(frozen=True)
class ResidentInfo:
    """A model a backend holds, as the backend reports it."""

    model: str
    key: str | None
    """The assignment key where the backend knows it (vLLM), else None (Ollama)."""
    vram_bytes: int | None
    """Measured by the backend; for a sleeping vLLM model, what it takes once woken."""
    gpu_uuid: str | None
    state: ModelState
    last_access: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    message: str | None = None
    """Why it failed, for a model in state Failed."""
    endpoint: str | None = None
    """Where clients reach the model from outside the pod, where the backend says (vLLM:
    `http://POD_IP:PORT/{key}`, its OpenAI base URL being that + /v1); None if unknown."""
    request_rate: float | None = None
    """Requests per second lately, where the gateways count them (`node_agent.demand`)."""
    in_use: int | None = None
    """Requests running on it or waiting for it at the gateways, where they report it."""


@dataclass(frozen=True)
class LoadRequest:
    """Everything a backend needs to put one model on one GPU."""

    key: str
    model: str
    gpu_uuid: str | None = None
    gpu_index: int | None = None
    gpu_total_bytes: int | None = None
    vram_bytes: int | None = None
    keep_alive_seconds: float | None = None
    """Ollama unloads the model after this much idle time; None keeps it until unloaded."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Ollama model options (num_ctx, ...)."""
    args: Sequence[str] = ()
    """Extra `vllm serve` arguments."""
    sleep_mode: bool = False
    """Start vLLM with sleep mode, so the model can be parked in host RAM."""

    @property
    def context_length(self) -> int | None:
        """The context the deployment asks for: Ollama's num_ctx or vLLM's --max-model-len."""
        num_ctx = self.options.get("num_ctx")
        if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) and num_ctx > 0:
            return num_ctx
        for index, arg in enumerate(self.args):
            flag, _, value = arg.partition("=")
            if flag != "--max-model-len":
                continue
            if not value and index + 1 < len(self.args):
                value = self.args[index + 1]
            return int(value) if value.isdigit() and int(value) > 0 else None
        return None


ProgressCallback = Callable[[int], None]
"""Receives a download percentage, 0-100, never decreasing."""


class ModelBackend(Protocol):
    """One inference server, as the agent drives it."""

    @property
    def kind(self) -> Backend: ...

    @property
    def can_park(self) -> bool:
        """Whether park/wake move a model to host RAM and back (vLLM sleep level 1)."""
        ...

    @property
    def lays_out_itself(self) -> bool:
        """Whether the server picks the GPUs a model goes on (Ollama spreads over every GPU it
        sees, most free first): the GPU the operator named is then where the model is charged,
        not where it lands, so room for a load is counted over the whole node."""
        ...

    async def health(self) -> BackendHealth:
        """Whether the server answers; never raises."""
        ...

    async def list_resident(self) -> list[ResidentInfo]: ...

    async def pull(self, model: str, on_progress: ProgressCallback) -> None:
        """Make the model's files present, reporting progress; returns at 100%."""
        ...

    async def load(self, request: LoadRequest) -> ResidentInfo:
        """Load the model onto the GPU; the result carries the VRAM the backend measured."""
        ...

    async def unload(self, key: str, model: str) -> None:
        """Free the model's GPU memory; unloading a model that is not loaded succeeds."""
        ...

    async def park(self, key: str, model: str) -> None: ...

    async def wake(self, key: str, model: str) -> None: ...

    async def estimate(
        self, model: str, context_length: int | None = None, *, args: Sequence[str] = ()
    ) -> Estimate | None:
        """A VRAM estimate from the model's metadata, its KV cache sized for `context_length`
        tokens where given (else the server's default) and, for vLLM, the batch `args` set;
        None when the backend cannot tell."""
        ...

    async def aclose(self) -> None: ...


# --- retries --------------------------------------------------------------------------------


def backoff_delay(
    attempt: int,
    base_delay: float,
    max_delay: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): exponential, capped, jittered.

    The jitter keeps the delay between half and all of the exponential figure, so agents that
    failed together do not retry in lockstep.
    """
    ceiling = min(max_delay, base_delay * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + rng() / 2)


async def with_retries(
    call: Callable[[], Awaitable[T]],
    attempts: int = 3,
    base_delay: float = 0.2,
    max_delay: float = 2.0,
) -> T:
    """Run `call`, retrying retryable BackendErrors up to `attempts` calls in all."""
    attempt = 1
    while True:
        try:
            return await call()
        except BackendError as err:
            if not err.retryable or attempt >= attempts:
                raise
        await asyncio.sleep(backoff_delay(attempt, base_delay, max_delay))
        attempt += 1


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a backend tries before reporting a failure."""

    attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 2.0

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(call, self.attempts, self.base_delay, self.max_delay)


# --- HTTP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """An HTTP answer, read whole."""

    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Transport(Protocol):
    """The I/O under a backend client, so tests can put a fake in its place."""

    async def request(
        self, method: str, url: str, json: Any = None, time_limit: float = DEFAULT_TIMEOUT
    ) -> Response:
        """One request; raises a retryable BackendError when no answer comes."""
        ...

    def stream_lines(
        self, method: str, url: str, json: Any = None, idle_limit: float = DEFAULT_TIMEOUT
    ) -> AsyncGenerator[bytes, None]:
        """The non-empty lines of a streamed 2xx answer (NDJSON); other statuses raise."""
        ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """The real transport: one aiohttp session, created on first use inside the event loop."""

    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def request(
        self, method: str, url: str, json: Any = None, time_limit: float = DEFAULT_TIMEOUT
    ) -> Response:
        limits = aiohttp.ClientTimeout(total=time_limit, sock_connect=self._connect_timeout)
        try:
            async with self._client().request(method, url, json=json, timeout=limits) as answer:
                return Response(answer.status, await answer.read())
        except TimeoutError:
            raise BackendError(
                f"no answer within {time_limit:g}s", retryable=True, context=f"{method} {url}"
            ) from None
        except aiohttp.ClientError as exc:
            raise BackendError(
                _describe_client_error(exc), retryable=True, context=f"{method} {url}"
            ) from None

    async def stream_lines(
        self, method: str, url: str, json: Any = None, idle_limit: float = DEFAULT_TIMEOUT
    ) -> AsyncGenerator[bytes, None]:
        limits = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=idle_limit
        )
        context = f"{method} {url}"
        try:
            async with self._client().request(method, url, json=json, timeout=limits) as answer:
                if not 200 <= answer.status < 300:
                    raise_for_status(Response(answer.status, await answer.read()), context)
                async for line in answer.content:
                    if line.strip():
                        yield line
        except TimeoutError:
            raise BackendError(
                f"stream stalled for {idle_limit:g}s", retryable=True, context=context
            ) from None
        except aiohttp.ClientError as exc:
            raise BackendError(
                _describe_client_error(exc), retryable=True, context=context
            ) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe_client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def error_text(body: bytes) -> str:
    """The message in an error body: Ollama's {"error"}, FastAPI's {"detail"}, our {"message"},
    or the text itself, shortened."""
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        for key in ("error", "message", "detail"):
            value = decoded.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return str(value["message"])
    text = body.decode("utf-8", errors="replace").strip()
    return _shorten(text) if text else "(empty body)"


def raise_for_status(response: Response, context: str) -> None:
    """Raise a BackendError for a non-2xx answer; only 5xx is worth retrying."""
    if response.ok:
        return
    raise BackendError(
        error_text(response.body),
        retryable=response.status >= 500,
        status=response.status,
        context=f"{context} answered HTTP {response.status}",
    )


def decode_json(body: bytes, context: str) -> Any:
    """The JSON in a body, or a BackendError quoting the garbage."""
    try:
        return json.loads(body)
    except ValueError:
        snippet = _shorten(body.decode("utf-8", errors="replace"))
        raise BackendError(f"answered invalid JSON: {snippet!r}", context=context) from None


@dataclass(frozen=True)
class JSONEndpoint:
    """A JSON HTTP API under one base URL, called with the backend's retry policy."""

    transport: Transport
    retry: RetryPolicy
    base_url: str
    label: str
    """Names the API in error messages, e.g. `ollama`."""

    async def call(
        self, method: str, path: str, body: Any = None, time_limit: float = DEFAULT_TIMEOUT
    ) -> Any:
        """One request with retries; returns the decoded JSON answer."""
        url = f"{self.base_url}{path}"
        context = f"{self.label} {method} {path}"

        async def attempt() -> Any:
            response = await self.transport.request(method, url, json=body, time_limit=time_limit)
            raise_for_status(response, context)
            return decode_json(response.body, context)

        return await self.retry.run(attempt)


def parse_as(model: type[M], data: Any, context: str) -> M:
    """Validate decoded JSON against the shape we rely on, or explain what is wrong with it."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the answer"
        raise BackendError(
            f"answered an unexpected shape: {where}: {first['msg']}", context=context
        ) from None


def _shorten(text: str) -> str:
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


PULL_STALL_TIMEOUT = 600.0
"""Seconds a download may go without progress before the pull fails (retryably)."""


class DownloadJob(BaseModel):
    """A download as our sidecars (the vLLM supervisor, the diffusion server) report it."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    model: str
    state: Literal["downloading", "done", "failed"]
    completed_bytes: int = Field(default=0, ge=0)
    total_bytes: int | None = None
    percent: int = Field(default=0, ge=0, le=100)
    message: str | None = None


async def follow_download(
    api: JSONEndpoint,
    answer: Any,
    on_progress: ProgressCallback,
    poll_interval: float,
    permanent_marks: Sequence[str],
    context: str,
) -> None:
    """Poll a sidecar's `/downloads` job from its first `answer` until it ends, reporting
    progress; a stall past PULL_STALL_TIMEOUT is retryable, a message carrying one of
    `permanent_marks` (the hub's RepositoryNotFoundError, ...) is not."""
    job = parse_as(DownloadJob, answer, context)
    loop = asyncio.get_running_loop()
    shown = 0
    progress_at = loop.time()
    last_bytes = job.completed_bytes
    while job.state == "downloading":
        if job.percent > shown:
            shown = job.percent
            on_progress(shown)
        if job.completed_bytes != last_bytes:
            last_bytes, progress_at = job.completed_bytes, loop.time()
        elif loop.time() - progress_at > PULL_STALL_TIMEOUT:
            raise BackendError(
                f"no download progress for {PULL_STALL_TIMEOUT:g}s", retryable=True, context=context
            )
        await asyncio.sleep(poll_interval)
        answer = await api.call("GET", f"/downloads?{urlencode({'model': job.model})}")
        job = parse_as(DownloadJob, answer, context)
    if job.state == "failed":
        message = job.message or "the download failed"
        permanent = any(mark in message for mark in permanent_marks)
        raise BackendError(message, retryable=not permanent, context=context)
    on_progress(100)
