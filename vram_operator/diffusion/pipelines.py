"""The pipelines one diffusion server holds, and the downloads into its cache; no HTTP here.

States: loading -> loaded <-> parked; failed when loading (or waking) failed. Each pipeline
does one thing at a time (a load, an image, a park, a wake) under its own lock, so a park
waits for the image being made, and `queued` counts the requests waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vram_operator.api.diffusion import DiffusersOptions
from vram_operator.node_agent.estimate import Estimate
from vram_operator.node_agent.monitors.gpu import GPUSource, NoGPUSource
from vram_operator.node_agent.vllm_supervisor import Download, DownloadState, local_model_path

from .estimate import estimate_pipeline
from .family import Detected, UnsupportedModel, detect_folder
from .metrics import DiffusionMetrics
from .runtime import Handle, ImageJob, PipelineError, PipelineSpec, Runtime, StepCallback

log = logging.getLogger(__name__)


class PipelineState(StrEnum):
    LOADING = "loading"
    LOADED = "loaded"
    PARKED = "parked"
    FAILED = "failed"


class ServerError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def default_download_command() -> list[str]:
    return [sys.executable, "-m", "vram_operator.diffusion.download"]


@dataclass
class Pipeline:
    key: str
    model: str
    options: DiffusersOptions
    gpu_uuid: str | None
    device_index: int | None
    vram_budget: int | None
    state: PipelineState = PipelineState.LOADING
    detected: Detected | None = None
    estimate: Estimate | None = None
    handle: Handle | None = None
    message: str | None = None
    permanent: bool = False
    loaded_at: dt.datetime | None = None
    last_access: dt.datetime | None = None
    load_seconds: float | None = None
    images: int = 0
    queued: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None

    @property
    def resolution(self) -> int | None:
        if self.options.resolution:
            return self.options.resolution
        return self.detected.default_resolution if self.detected else None

    @property
    def vram_bytes(self) -> int | None:
        """What the pipeline takes on the GPU: what it holds plus the activation peak of one
        image; while parked, what it will take once woken."""
        if self.handle is None:
            return None
        held = self.handle.held_bytes if self.state is PipelineState.LOADED else 0
        if self.state is PipelineState.PARKED:
            held = self.handle.host_bytes
        return held + self.handle.peak_bytes

    def to_json(self, endpoint_base: str | None) -> dict[str, Any]:
        detected = self.detected
        return {
            "key": self.key,
            "model": self.model,
            "state": self.state.value,
            "gpuUuid": self.gpu_uuid,
            "deviceIndex": self.device_index,
            "family": detected.family.value if detected else None,
            "inpainting": detected.inpainting if detected else None,
            "textToImage": detected.text_to_image if detected else None,
            "pipelineClass": detected.pipeline_class if detected else None,
            "resolution": self.resolution,
            "options": self.options.to_k8s(),
            "vramBytes": self.vram_bytes,
            "heldBytes": self.handle.held_bytes if self.handle else None,
            "peakBytes": self.handle.peak_bytes if self.handle else None,
            "hostBytes": self.handle.host_bytes if self.handle else None,
            "estimateBytes": self.estimate.bytes if self.estimate else None,
            "estimateDetail": self.estimate.detail if self.estimate else None,
            "images": self.images,
            "queued": self.queued,
            "loadSeconds": self.load_seconds,
            "loadedAt": _iso(self.loaded_at),
            "lastAccess": _iso(self.last_access),
            "message": self.message,
            "permanent": self.permanent,
            "endpoint": f"{endpoint_base}/pipelines/{self.key}" if endpoint_base else None,
        }


class PipelineManager:
    """Loads, parks, wakes and unloads pipelines through a runtime; runs their images."""

    def __init__(
        self,
        runtime: Runtime,
        gpu_source: GPUSource | None = None,
        metrics: DiffusionMetrics | None = None,
        download_command: Sequence[str] | None = None,
        hub_cache: Path | None = None,
        device: str = "cuda",
        pid: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.pid = os.getpid() if pid is None else pid
        """The process whose GPU memory NVML (or the simulated GPU) attributes to this server."""
        self.gpu_source: GPUSource = gpu_source or NoGPUSource("no GPU source configured")
        self.metrics = metrics or DiffusionMetrics()
        self.download_command = list(download_command or default_download_command())
        self.hub_cache = hub_cache
        self.device = device
        self.pipelines: dict[str, Pipeline] = {}
        self.downloads: dict[str, Download] = {}

    # --- files ---------------------------------------------------------------------------

    def folder(self, model: str) -> Path:
        folder = local_model_path(model, self.hub_cache)
        if folder is None:
            raise ServerError(404, f"the files of {model} are not here; POST /downloads first")
        return folder

    def estimate(self, model: str, options: DiffusersOptions) -> tuple[Estimate, Detected]:
        folder = self.folder(model)
        try:
            return estimate_pipeline(folder, options), detect_folder(folder)
        except UnsupportedModel as err:
            raise ServerError(422, str(err)) from None

    def process_bytes(self) -> tuple[str, dict[str, int]]:
        """(the GPU source's name, GPU memory this process holds per GPU UUID, as NVML sees
        it): all pipelines together, with the CUDA context and the allocator's cache."""
        reading = self.gpu_source.read()
        held = {
            uuid: sum(p.used_bytes or 0 for p in processes if p.pid == self.pid)
            for uuid, processes in reading.processes.items()
        }
        return reading.source, {uuid: n for uuid, n in held.items() if n}

    # --- residency -----------------------------------------------------------------------

    def device_index(self, gpu_uuid: str | None) -> int | None:
        """The index of the GPU this container sees under that UUID; None on the CPU."""
        if self.device == "cpu":
            return None
        reading = self.gpu_source.read()
        if gpu_uuid is None:
            if not reading.gpus:
                raise ServerError(400, "this container sees no GPU")
            return reading.gpus[0].index
        for gpu in reading.gpus:
            if gpu.uuid == gpu_uuid:
                return gpu.index
        seen = ", ".join(g.uuid for g in reading.gpus) or "none"
        raise ServerError(400, f"GPU {gpu_uuid} is not visible in this container (it sees {seen})")

    def start(
        self,
        key: str,
        model: str,
        options: DiffusersOptions,
        gpu_uuid: str | None,
        vram_budget: int | None,
    ) -> tuple[Pipeline, bool]:
        """Begin loading; (the pipeline, whether a new load started)."""
        current = self.pipelines.get(key)
        if current is not None and current.state is not PipelineState.FAILED:
            if current.model == model and current.options == options:
                return current, False
            raise ServerError(409, f"{key} holds {current.model} with other options; DELETE it")
        index = self.device_index(gpu_uuid)
        pipeline = Pipeline(key, model, options, gpu_uuid, index, vram_budget)
        self.pipelines[key] = pipeline
        pipeline.task = asyncio.create_task(self._load(pipeline), name=f"load {key}")
        return pipeline, True

    async def _load(self, pipeline: Pipeline) -> None:
        started = time.monotonic()
        async with pipeline.lock:
            try:
                folder = self.folder(pipeline.model)
                pipeline.detected = detect_folder(folder)
                pipeline.estimate = estimate_pipeline(folder, pipeline.options)
                spec = PipelineSpec(
                    key=pipeline.key,
                    model=pipeline.model,
                    folder=folder,
                    detected=pipeline.detected,
                    options=pipeline.options,
                    estimate=pipeline.estimate,
                    device_index=pipeline.device_index,
                    gpu_uuid=pipeline.gpu_uuid,
                )
                pipeline.handle = await asyncio.to_thread(self.runtime.load, spec)
            except (UnsupportedModel, ServerError, PipelineError) as err:
                self._failed(pipeline, err)
                return
            except Exception as err:  # a runtime's own failure: report it, keep serving
                log.exception("loading %s failed", pipeline.key)
                self._failed(pipeline, PipelineError(f"{type(err).__name__}: {err}"))
                return
        pipeline.state = PipelineState.LOADED
        pipeline.loaded_at = pipeline.last_access = _now()
        pipeline.load_seconds = round(time.monotonic() - started, 3)
        self._gauge(pipeline)
        log.info(
            "loaded %s (%s) in %.1fs: %s",
            pipeline.key,
            pipeline.detected.describe() if pipeline.detected else pipeline.model,
            pipeline.load_seconds,
            pipeline.vram_bytes,
        )

    def _failed(self, pipeline: Pipeline, err: Exception) -> None:
        pipeline.state = PipelineState.FAILED
        pipeline.message = getattr(err, "message", None) or str(err)
        pipeline.permanent = isinstance(err, UnsupportedModel) or bool(
            getattr(err, "permanent", False)
        )
        log.error("%s: %s", pipeline.key, pipeline.message)
        self._gauge(pipeline)

    def get(self, key: str) -> Pipeline:
        pipeline = self.pipelines.get(key)
        if pipeline is None:
            raise ServerError(404, f"no pipeline {key}")
        return pipeline

    async def unload(self, key: str) -> Pipeline:
        pipeline = self.get(key)
        if pipeline.task is not None and not pipeline.task.done():
            pipeline.task.cancel()
            await asyncio.gather(pipeline.task, return_exceptions=True)
        async with pipeline.lock:
            if pipeline.handle is not None:
                await asyncio.to_thread(self.runtime.unload, pipeline.handle)
                pipeline.handle = None
        self.pipelines.pop(key, None)
        self.metrics.forget(key)
        return pipeline

    async def park(self, key: str) -> Pipeline:
        pipeline = self.get(key)
        async with pipeline.lock:
            if pipeline.state is PipelineState.PARKED:
                return pipeline
            handle = self._ready(pipeline)
            await asyncio.to_thread(self.runtime.park, handle)
            pipeline.state = PipelineState.PARKED
        self._gauge(pipeline)
        return pipeline

    async def wake(self, key: str) -> Pipeline:
        pipeline = self.get(key)
        async with pipeline.lock:
            if pipeline.state is not PipelineState.PARKED:
                self._ready(pipeline)
                return pipeline
            assert pipeline.handle is not None  # a parked pipeline has one
            try:
                await asyncio.to_thread(self.runtime.wake, pipeline.handle)
            except PipelineError as err:
                raise ServerError(507 if err.permanent else 503, err.message) from None
            pipeline.state = PipelineState.LOADED
        self._gauge(pipeline)
        return pipeline

    def _ready(self, pipeline: Pipeline) -> Handle:
        if pipeline.state is not PipelineState.LOADED or pipeline.handle is None:
            raise ServerError(409, f"{pipeline.key} is {pipeline.state.value}, not loaded")
        return pipeline.handle

    # --- images --------------------------------------------------------------------------

    def find(self, name: str) -> Pipeline:
        """A pipeline by key, else by model name."""
        if name in self.pipelines:
            return self.pipelines[name]
        for pipeline in self.pipelines.values():
            if pipeline.model == name:
                return pipeline
        known = ", ".join(sorted(self.pipelines)) or "none"
        raise ServerError(404, f"no pipeline {name!r} is loaded here (loaded: {known})")

    async def images(self, pipeline: Pipeline, jobs: Sequence[ImageJob]) -> list[bytes]:
        """Make the images one after another (the activation peak is one image's)."""
        pipeline.queued += 1
        self.metrics.queue.labels(pipeline.model).inc()
        waiting = True
        try:
            async with pipeline.lock:
                waiting = False
                pipeline.queued -= 1
                self.metrics.queue.labels(pipeline.model).dec()
                handle = self._ready(pipeline)
                images = []
                for job in jobs:
                    try:
                        png = await asyncio.to_thread(
                            self.runtime.generate, handle, job, self._step_observer(pipeline)
                        )
                    except PipelineError as err:
                        raise ServerError(507 if err.permanent else 500, err.message) from None
                    images.append(png)
                    pipeline.images += 1
                    self.metrics.images.labels(pipeline.model).inc()
                pipeline.last_access = _now()
                self._gauge(pipeline)
                return images
        finally:
            if waiting:  # cancelled while queued
                pipeline.queued -= 1
                self.metrics.queue.labels(pipeline.model).dec()

    def _step_observer(self, pipeline: Pipeline) -> StepCallback:
        histogram = self.metrics.step_seconds.labels(pipeline.model)

        def observe(_step: int, seconds: float) -> None:
            histogram.observe(seconds)

        return observe

    def _gauge(self, pipeline: Pipeline) -> None:
        self.metrics.set_pipeline(pipeline.key, pipeline.state.value, pipeline.vram_bytes or 0)

    # --- downloads -----------------------------------------------------------------------

    def download(self, model: str) -> Download:
        """Start fetching a model's files (or return the fetch under way); a local path is
        there or it is not."""
        job = self.downloads.get(model)
        if job is not None and job.state is DownloadState.DOWNLOADING:
            return job
        if model.startswith("/"):
            found = Path(model).is_dir()
            job = Download(
                model,
                state=DownloadState.DONE if found else DownloadState.FAILED,
                path=model if found else None,
                message=None if found else f"{model} is not a folder in the diffusion container",
            )
            self.downloads[model] = job
            return job
        job = Download(model)
        self.downloads[model] = job
        job.task = asyncio.create_task(self._fetch(job), name=f"download {model}")
        return job

    async def _fetch(self, job: Download) -> None:
        argv = [*self.download_command, job.model]
        log.info("downloading %s: %s", job.model, shlex.join(argv))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                process_group=0,  # its own group to signal; the server's session
                env={**os.environ, "HF_HUB_CACHE": str(self.hub_cache)} if self.hub_cache else None,
            )
        except OSError as err:
            job.state = DownloadState.FAILED
            job.message = f"cannot start {shlex.join(argv)}: {err}"
            return
        job.process = process
        assert process.stdout is not None  # spawned with stdout=PIPE
        while line := await process.stdout.readline():
            job.take_line(line.decode("utf-8", errors="replace").strip())
        code = await process.wait()
        if code == 0:
            job.state = DownloadState.DONE
            job.completed_bytes = max(job.completed_bytes, job.total_bytes or 0)
            return
        job.state = DownloadState.FAILED
        output = "\n".join(job.tail)
        job.message = f"downloading {job.model} failed (exit code {code})" + (
            f": {output}" if output else ""
        )
        log.error("%s", job.message)

    async def close(self) -> None:
        for job in self.downloads.values():
            await job.cancel()
        for key in list(self.pipelines):
            with contextlib.suppress(Exception):
                await self.unload(key)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
