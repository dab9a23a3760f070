"""vLLM through our supervisor in the vLLM sidecar (see vllm_supervisor for its HTTP API).

- pull: POST /downloads fetches the model's files into the sidecar's Hugging Face cache, and
  this client polls GET /downloads until they are all there, reporting the bytes as progress.
  A load then starts from local files, so a large download never runs into the start-up
  timeout, and /estimate can read the headers.
- load: PUT /models/{key} starts a `vllm serve` sized to the model's VRAM budget, then this
  client polls GET /models/{key} until it serves, fails (with vLLM's last output as the
  message) or the load timeout passes.
- park/wake: vLLM sleep level 1 (weights to host RAM, KV cache dropped) and /wake_up; the
  supervisor drains the model's requests before it sleeps.
- residency: GET /models; the VRAM of a model is what its processes hold on the GPU where the
  supervisor can measure it, else the accounting rule's footprint; `endpoint` is where
  clients reach it.
- last access: from each running server's Prometheus /metrics. A change in the count of
  finished requests (vllm:request_success_total), or any request running or waiting, means the
  model was used since the last listing, and its last access becomes now. A model seen for the
  first time counts as accessed then.
- estimate: GET /estimate reads the model's safetensors or GGUF headers where its files are,
  in the vLLM container: the budget (weights + KV cache for --max-model-len + activation peak
  for --max-num-batched-tokens), without the per-instance overhead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Callable, Sequence
from typing import Literal
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field

from vram_operator.api import Backend, BackendHealth, ModelState
from vram_operator.node_agent.estimate import Estimate, vllm_sizes_from_args

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
    raise_for_status,
    utcnow,
)

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8900"
LOAD_TIMEOUT = 900.0
"""Seconds a load may take; above the supervisor's own start-up timeout (600 s by default)."""
SLEEP_TIMEOUT = 420.0
"""Seconds parking or waking may take: draining requests (the supervisor's --drain-timeout)
and copying tens of GiB between host and GPU."""
_PERMANENT_DOWNLOAD_ERRORS = (
    "RepositoryNotFoundError",
    "GatedRepoError",
    "RevisionNotFoundError",
    "does not exist",
)
_NOT_RETRYABLE = re.compile(r"exit code 2\b|cannot start|out of memory", re.I)
"""How a child's end reads when starting it again on this GPU would end the same way."""
METRICS_TIMEOUT = 5.0

_STATES = {
    "starting": ModelState.LOADING,
    "running": ModelState.LOADED,
    "sleeping": ModelState.SLEEPING,
    "exited": ModelState.FAILED,
    "failed": ModelState.FAILED,
}
_FINISHED = "vllm:request_success_total"
_IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")


class _Entry(sidecar.Entry):
    key: str
    model: str
    state: Literal["starting", "running", "sleeping", "exited", "failed"]
    gpu_uuid: str | None = None
    vram_bytes: int | None = Field(default=None, ge=0)
    message: str | None = None
    endpoint: str | None = None


class _Entries(sidecar.Shape):
    models: list[_Entry]


def request_activity(metrics_text: str) -> tuple[float, float]:
    """(finished requests, requests running or waiting) from vLLM's Prometheus text.

    Raises ValueError for text that is not the Prometheus exposition format.
    """
    finished = 0.0
    in_flight = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == _FINISHED:
                finished += sample.value
            elif sample.name in _IN_FLIGHT:
                in_flight += sample.value
    return finished, in_flight


class VLLMBackend:
    """vLLM models, one server each, through the supervisor on localhost."""

    kind = Backend.VLLM
    can_park = True
    lays_out_itself = False  # each server runs on the GPU the supervisor gives it

    def __init__(
        self,
        supervisor_url: str = DEFAULT_URL,
        transport: Transport | None = None,
        retry: RetryPolicy | None = None,
        load_timeout: float = LOAD_TIMEOUT,
        poll_interval: float = 0.25,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.base_url = supervisor_url.rstrip("/")
        self._transport: Transport = transport or AiohttpTransport()
        self._retry = retry or RetryPolicy()
        self._api = JSONEndpoint(self._transport, self._retry, self.base_url, "vllm-supervisor")
        self._load_timeout = load_timeout
        self._poll_interval = poll_interval
        self._clock = clock
        self._activity: dict[str, tuple[float, dt.datetime]] = {}
        """Per key: finished requests at the last listing, and the access time derived."""

    def _path(self, key: str, suffix: str = "") -> str:
        return f"/models/{quote(key, safe='')}{suffix}"

    async def health(self) -> BackendHealth:
        return await sidecar.health(self._api, Backend.VLLM, "supervisor")

    async def list_resident(self) -> list[ResidentInfo]:
        entries = parse_as(
            _Entries, await self._api.call("GET", "/models"), "vllm-supervisor /models"
        )
        now = self._clock()
        serving = [entry for entry in entries.models if entry.state in ("running", "sleeping")]
        readings = await asyncio.gather(*(self._access(entry, now) for entry in serving))
        self._activity = {
            entry.key: reading for entry, reading in zip(serving, readings, strict=True)
        }
        return [
            self._info(entry, self._activity[entry.key][1] if entry.key in self._activity else None)
            for entry in entries.models
        ]

    async def _access(self, entry: _Entry, now: dt.datetime) -> tuple[float, dt.datetime]:
        """Fold a running model's metrics into (finished count, last access)."""
        previous = self._activity.get(entry.key)
        if entry.state == "sleeping" and previous is not None:
            return previous  # a sleeping server serves nothing
        url = f"{self.base_url}{self._path(entry.key, '/metrics')}"
        try:
            response = await self._transport.request("GET", url, time_limit=METRICS_TIMEOUT)
            raise_for_status(response, f"vllm {entry.key} /metrics")
            finished, in_flight = request_activity(response.body.decode("utf-8", "replace"))
        except (BackendError, ValueError) as err:
            # Access times are a hint for eviction; a missed reading keeps the last one.
            log.info("no request metrics for %s: %s", entry.key, err)
            return previous if previous is not None else (0.0, now)
        if previous is None or finished != previous[0] or in_flight > 0:
            return finished, now
        return previous

    def _info(self, entry: _Entry, last_access: dt.datetime | None) -> ResidentInfo:
        return ResidentInfo(
            model=entry.model,
            key=entry.key,
            vram_bytes=entry.vram_bytes,
            gpu_uuid=entry.gpu_uuid,
            state=_STATES[entry.state],
            last_access=last_access,
            message=entry.message,
            endpoint=entry.endpoint,
        )

    async def pull(self, model: str, on_progress: ProgressCallback) -> None:
        """Fetch the model's files into the sidecar; returns once all are there."""
        context = f"vllm pull {model}"
        try:
            answer = await self._api.call("POST", "/downloads", {"model": model})
        except BackendError as err:
            if err.status == 404 and "/downloads" in err.context:
                on_progress(100)  # a supervisor without downloads: vllm serve fetches them
                return
            raise
        await follow_download(
            self._api,
            answer,
            on_progress,
            self._poll_interval,
            _PERMANENT_DOWNLOAD_ERRORS,
            context,
        )

    async def load(self, request: LoadRequest) -> ResidentInfo:
        context = f"vllm load {request.key}"
        if not request.vram_bytes or not request.gpu_total_bytes:
            raise BackendError(
                "vLLM needs the model's VRAM budget and the GPU's total memory to size "
                "--gpu-memory-utilization",
                context=context,
            )
        body = {
            "model": request.model,
            "gpuUuid": request.gpu_uuid,
            "gpuTotalBytes": request.gpu_total_bytes,
            "vramBytes": request.vram_bytes,
            "args": list(request.args),
            "sleepMode": request.sleep_mode,
        }
        entry = parse_as(
            _Entry, await self._api.call("PUT", self._path(request.key), body), context
        )
        entry = await sidecar.poll_while(
            self._api,
            self._path(request.key),
            entry,
            "starting",
            give_up_after=self._load_timeout,
            interval=self._poll_interval,
            context=context,
        )
        if entry.state == "sleeping":
            await self.wake(request.key, request.model)
            entry = parse_as(_Entry, await self._api.call("GET", self._path(request.key)), context)
        if entry.state != "running":
            message = entry.message or f"vllm serve is {entry.state}"
            # Exit code 2 is argparse refusing the command line (engine/arg_utils.py), a
            # command that cannot start is a broken install, and CUDA out of memory on this
            # GPU is the operator's to place elsewhere: asking this GPU again gets the same.
            # Anything else (a port taken meanwhile, a crash) may pass, and is retried.
            raise BackendError(
                message, retryable=not _NOT_RETRYABLE.search(message), context=context
            )
        return self._info(entry, self._clock())

    async def unload(self, key: str, model: str) -> None:
        await sidecar.delete(self._api, self._path(key), 60.0)
        self._activity.pop(key, None)

    async def park(self, key: str, model: str) -> None:
        """Sleep level 1: weights to host RAM, KV cache dropped; waking takes about a second."""
        await self._api.call("POST", self._path(key, "/sleep?level=1"), time_limit=SLEEP_TIMEOUT)

    async def wake(self, key: str, model: str) -> None:
        await self._api.call("POST", self._path(key, "/wake_up"), time_limit=SLEEP_TIMEOUT)

    async def estimate(
        self, model: str, context_length: int | None = None, *, args: Sequence[str] = ()
    ) -> Estimate | None:
        """The model's vLLM budget from its file headers in the vLLM container; None when
        they are not there. `context_length` (else --max-model-len in `args`) sizes the KV
        cache, --max-num-batched-tokens and --max-num-seqs in `args` the activation peak."""
        sizes = vllm_sizes_from_args(args)
        query: dict[str, str | int] = {"model": model}
        context = context_length if context_length is not None else sizes.max_model_len
        if context is not None:
            query["contextLength"] = context
        query["maxNumBatchedTokens"] = sizes.max_num_batched_tokens
        query["maxNumSeqs"] = sizes.max_num_seqs
        return await sidecar.estimate(self._api, query, f"vllm-supervisor estimate {model}")

    async def aclose(self) -> None:
        await self._transport.aclose()
