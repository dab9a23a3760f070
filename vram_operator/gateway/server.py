"""The gateway's HTTP server: the OpenAI and Ollama APIs in front of every resident model.

Served:
- OpenAI: GET /v1/models; POST /v1/chat/completions, /v1/completions, /v1/embeddings, and for
  diffusion models /v1/images/generations and /v1/images/edits (JSON with a base64 image, or
  multipart as OpenAI's clients send it), sent to the pipeline's endpoint on the diffusion
  server. A
  vLLM-backed model is forwarded to its endpoint's /v1; an Ollama-backed one to Ollama's own
  OpenAI-compatible /v1 (openai/openai.go in Ollama v0.12.3), so neither is translated.
- Ollama: POST /api/chat, /api/generate, /api/embed (Ollama-backed models only: the gateway
  does not translate Ollama's API for vLLM); GET /api/tags, /api/ps, /api/version, and `/`.
  Ollama's management endpoints (pull, push, create, copy, delete, show, blobs) are not
  served: models are managed through ModelDeployments by the agent.
- GET /healthz, /readyz (the first list of both kinds is in), /metrics, /demand.

The body is forwarded as the client sent it but for `model`, rewritten to the name the backend
serves, so tools, tool_choice and fields the gateway has never heard of pass through; for
Ollama, `keep_alive` and the runner options (num_ctx, num_batch, num_gpu, main_gpu, use_mmap,
num_thread) are dropped, because Ollama would act on them behind the agent: a keep_alive
expires or unloads the model (server/routes.go, sched.go), a runner option that differs
reloads it (sched.go needsReload). Responses, streamed (SSE or NDJSON) or not, are passed on
chunk by chunk.

A request whose model has no ready replica waits in a bounded queue per model (`admit`) until
the view reports one or `queue_timeout` passes (503 with Retry-After); a full queue is 429. A
connection failure before the first byte, or a 503 from a backend that is going to sleep, sends
the request to another ready replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vram_operator.api import Backend

from . import protocol
from .demand import DemandLedger
from .metrics import GatewayMetrics
from .routing import Picker, Replica, Target, admit, resolve, timed_out
from .view import ClusterView

log = logging.getLogger(__name__)

RUNNER_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread"}
)
"""Ollama's runner options (api/types.go Runner, v0.12.3): a request that sets one differently
from the loaded runner reloads the model (server/sched.go needsReload)."""
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
    }
)
_ERROR_BODY_LIMIT = 1 << 20
_FILES = "vram_gateway_files"
"""Where a multipart request (OpenAI's /v1/images/edits) keeps its files for forwarding."""


@dataclass(frozen=True)
class _File:
    field: str
    filename: str
    content_type: str
    data: bytes


async def _form_fields(request: web.Request) -> dict[str, Any]:
    """A multipart body's plain fields; its files go on the request under _FILES."""
    form = await request.post()
    fields: dict[str, Any] = {}
    files: list[_File] = []
    for name, value in form.items():
        if isinstance(value, web.FileField):
            files.append(_File(name, value.filename, value.content_type, value.file.read()))
        else:
            fields[name] = value
    request[_FILES] = files
    return fields


SYNC_WAIT_SECONDS = 10.0
"""How long a request that arrives before the first list waits for it."""


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's settings; the command line overrides these defaults."""

    queue_size: int = 100
    """Requests that may wait per model for a ready replica; one more gets 429."""
    queue_timeout: float = 120.0
    """Seconds a request waits for a ready replica before 503."""
    heartbeat_grace: float = 30.0
    """Seconds without an agent report after which a node's replicas get no requests."""
    connect_timeout: float = 5.0
    """Seconds to connect to a backend before trying another replica."""
    read_timeout: float = 600.0
    """Seconds a backend may stay silent mid-answer."""
    identity: str = ""
    """This replica's name in /demand (the pod name)."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


class Gateway:
    """The server's state: the view, the picker, the ledger, the metrics and one HTTP client."""

    def __init__(
        self,
        view: ClusterView,
        config: GatewayConfig | None = None,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.view = view
        self.config = config or GatewayConfig()
        self.metrics = metrics or GatewayMetrics()
        self.demand = DemandLedger()
        self.picker = Picker()
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._session: aiohttp.ClientSession | None = None
        self.identity = self.config.identity or socket.gethostname()

    # ---- application -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        openai = [
            ("/v1/chat/completions", "openai"),
            ("/v1/completions", "openai"),
            ("/v1/embeddings", "openai"),
            ("/v1/images/generations", "openai"),
            ("/v1/images/edits", "openai"),
        ]
        for path, api in openai:
            app.router.add_post(path, self._forwarder(api, path))
        for path in ("/api/chat", "/api/generate", "/api/embed"):
            app.router.add_post(path, self._forwarder("ollama", path))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/", self._root)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/demand", self._demand)
        app.router.add_route("*", "/api/{rest:.*}", self._not_served)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, app: web.Application) -> Any:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )
        # No connection limit: the queue bounds what waits, and the backends bound what runs.
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=False
        )
        yield
        await self._session.close()

    # ---- listings ----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        await self._await_sync()
        return _json(protocol.openai_models(self.view.targets))

    async def _tags(self, request: web.Request) -> web.Response:
        await self._await_sync()
        return _json(protocol.ollama_tags(self.view.targets))

    async def _ps(self, request: web.Request) -> web.Response:
        await self._await_sync()
        until = self._clock() + dt.timedelta(days=365)
        return _json(protocol.ollama_ps(self.view.targets, until))

    async def _version(self, request: web.Request) -> web.Response:
        return _json({"version": protocol.OLLAMA_VERSION})

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")  # what Ollama's clients probe for

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.view.synced.is_set():
            return web.Response(text="ok")
        return web.Response(status=503, text="waiting for the first list of the cluster")

    async def _metrics(self, request: web.Request) -> web.Response:
        # Ready replicas are a figure of the view, not of requests: set at scrape time.
        gauge = self.metrics.ready_replicas
        gauge.clear()
        for target in self.view.targets.values():
            gauge.labels(target.namespace, target.name).set(len(target.ready))
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def _demand(self, request: web.Request) -> web.Response:
        return _json(self.demand.snapshot(self.identity, self._clock()))

    async def _not_served(self, request: web.Request) -> web.Response:
        message = (
            f"{request.method} {request.path} is not served by the vram-operator gateway: "
            "models are pulled, created and deleted through ModelDeployments"
        )
        return _json(protocol.ollama_error(message), status=404)

    async def _await_sync(self) -> None:
        if not self.view.synced.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.view.synced.wait(), SYNC_WAIT_SECONDS)

    # ---- forwarding --------------------------------------------------------------------

    def _forwarder(self, api: str, path: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._forward(request, api, path)

        return handle

    def _error(self, api: str, status: int, message: str, retry_after: int = 0) -> web.Response:
        body = (
            protocol.ollama_error(message)
            if api == "ollama"
            else protocol.openai_error(status, message)
        )
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return _json(body, status=status, headers=headers)

    async def _forward(self, request: web.Request, api: str, path: str) -> web.StreamResponse:
        started = time.monotonic()
        try:
            if request.content_type.startswith("multipart/"):
                body = await _form_fields(request)
            else:
                body = json.loads(await request.read())
        except ValueError as err:
            return self._error(api, 400, f"invalid JSON body: {err}")
        if not isinstance(body, dict):
            return self._error(api, 400, "the body must be a JSON object")
        requested = body.get("model")
        if not isinstance(requested, str) or not requested.strip():
            return self._error(api, 400, "model is required")
        await self._await_sync()
        resolution = resolve(requested, self.view.targets)
        if resolution.target is None:
            self.metrics.unknown.labels(resolution.reason).inc()
            message = protocol.not_found_message(
                requested, resolution.reason, resolution.candidates
            )
            return self._error(api, 404, message)
        target = resolution.target
        labels = (target.namespace, target.name)
        if api == "ollama" and target.backend is not Backend.OLLAMA:
            message = (
                f"{target.key} is served by {target.backend.value}; call it through the "
                "OpenAI API (/v1/chat/completions, /v1/completions, /v1/embeddings)"
            )
            self.metrics.requests.labels(*labels, path, "400").inc()
            return self._error(api, 400, message)
        if (target.backend is Backend.DIFFUSERS) != path.startswith("/v1/images/"):
            message = (
                f"{target.key} is a diffusion model: call /v1/images/generations or /edits"
                if target.backend is Backend.DIFFUSERS
                else f"{target.key} is served by {target.backend.value}, which makes no images"
            )
            self.metrics.requests.labels(*labels, path, "400").inc()
            return self._error(api, 400, message)
        self.demand.arrived(target, self._clock())
        self.metrics.last_request.labels(*labels).set(time.time())
        response = await self._route(request, api, path, body, target, started)
        self.metrics.requests.labels(*labels, path, str(response.status)).inc()
        return response

    async def _route(
        self,
        request: web.Request,
        api: str,
        path: str,
        body: dict[str, Any],
        target: Target,
        started: float,
    ) -> web.StreamResponse:
        labels = (target.namespace, target.name)
        current = self.view.targets.get(target.key, target)
        if not current.ready:
            waited = await self._wait_ready(api, current)
            if isinstance(waited, web.Response):
                return waited
            current = waited
        tried: set[str] = set()
        last_failure = ""
        while True:
            replica = self.picker.pick(current.ready, tried)
            if replica is None:
                return self._error(
                    api, 502, f"no replica of {target.key} answered: {last_failure}", 1
                )
            tried.add(replica.id)
            self.picker.begin(replica)
            self.demand.in_flight(target, +1)
            self.metrics.in_flight.labels(*labels).inc()
            try:
                outcome = await self._send(request, api, path, body, replica, target, started)
            finally:
                self.picker.end(replica)
                self.demand.in_flight(target, -1)
                self.metrics.in_flight.labels(*labels).dec()
            if isinstance(outcome, web.StreamResponse):
                return outcome
            last_failure = outcome
            self.metrics.retries.labels(*labels).inc()
            log.info("%s on %s failed before its first byte: %s", target.key, replica.node, outcome)
            current = self.view.targets.get(target.key, current)

    async def _wait_ready(self, api: str, target: Target) -> Target | web.Response:
        """Hold the request until `target` has a ready replica, or answer why not."""
        labels = (target.namespace, target.name)
        config = self.config
        admission = admit(
            self.demand.waiting_for(target), config.queue_size, target, config.queue_timeout
        )
        if not admission.wait:
            reason = "queue_full" if admission.status == 429 else "no_replicas"
            self.metrics.rejected.labels(*labels, reason).inc()
            return self._error(api, admission.status, admission.message, admission.retry_after)
        self.demand.waiting(target, +1)
        self.metrics.queued.labels(*labels).inc()
        began = time.monotonic()
        deadline = began + config.queue_timeout
        outcome = "timeout"
        try:
            while True:
                current = self.view.targets.get(target.key)
                if current is None:
                    outcome = "gone"
                    return self._error(api, 404, f"{target.key} was deleted while waiting")
                if current.ready:
                    outcome = "served"
                    return current
                left = deadline - time.monotonic()
                if left <= 0:
                    answer = timed_out(current, config.queue_timeout)
                    return self._error(api, answer.status, answer.message, answer.retry_after)
                await self.view.changed(within=left)
        finally:
            self.demand.waiting(target, -1)
            self.metrics.queued.labels(*labels).dec()
            self.metrics.cold_waits.labels(*labels, outcome).inc()
            self.metrics.queue_wait.labels(*labels).observe(time.monotonic() - began)

    async def _send(
        self,
        request: web.Request,
        api: str,
        path: str,
        body: dict[str, Any],
        replica: Replica,
        target: Target,
        started: float,
    ) -> web.StreamResponse | str:
        """Forward to one replica: the response, or why it failed before its first byte."""
        assert self._session is not None
        outgoing = dict(body)
        outgoing["model"] = replica.served_model
        if api == "ollama":
            outgoing.pop("keep_alive", None)
            options = outgoing.get("options")
            if isinstance(options, dict):
                outgoing["options"] = {k: v for k, v in options.items() if k not in RUNNER_OPTIONS}
        url = replica.base_url + path
        headers = {"Content-Type": "application/json"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        labels = (target.namespace, target.name)
        self.metrics.backend_requests.labels(*labels, replica.node).inc()
        files: list[_File] | None = request.get(_FILES)
        data: Any = json.dumps(outgoing)
        if files is not None:  # a multipart edit: sent on as multipart, model rewritten
            del headers["Content-Type"]
            data = aiohttp.FormData()
            for name, value in outgoing.items():
                data.add_field(name, str(value))
            for file in files:
                data.add_field(
                    file.field, file.data, filename=file.filename, content_type=file.content_type
                )
        try:
            upstream = await self._session.post(url, data=data, headers=headers)
        except (aiohttp.ClientConnectionError, TimeoutError) as err:
            return f"{replica.node}: {err!r}"
        async with upstream:
            self.metrics.ttfb.labels(*labels).observe(time.monotonic() - started)
            if upstream.status == 503 and len(target.ready) > 1:
                # vLLM's serving proxy holds requests off a model that is draining for sleep.
                return f"{replica.node}: 503 {await upstream.text()}"
            if upstream.status >= 400:
                raw = await upstream.content.read(_ERROR_BODY_LIMIT)
                if protocol.is_error_shape(raw, api):
                    return web.Response(
                        body=raw, status=upstream.status, content_type="application/json"
                    )
                wrapped = protocol.wrap_error(upstream.status, raw, api, replica.backend.value)
                return _json(wrapped, status=upstream.status)
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP},
            )
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as err:
                # The answer had begun: it cannot go elsewhere; the client sees it cut short.
                log.warning("%s on %s broke mid-answer: %r", target.key, replica.node, err)
                return response
            await response.write_eof()
            return response
