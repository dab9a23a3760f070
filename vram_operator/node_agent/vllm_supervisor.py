"""`vram-operator vllm-supervisor`: one `vllm serve` process per model, inside the vLLM sidecar.

vLLM serves one model per process, so the sidecar runs this supervisor and the node agent asks
it, over HTTP on localhost, to fetch, start and stop models. Each child gets its own port from
`--port-range` on 127.0.0.1, `--gpu-memory-utilization` = the model's VRAM budget over the
GPU's total (the rule in `vram_operator.api.budget`), and with sleep mode
`--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`, which vLLM needs to expose /sleep,
/wake_up and /is_sleeping. Each child runs in its own process group, so stopping it also stops
the engine processes vLLM forks.

The GPU: the agent names it by UUID; vLLM 0.11 accepts only integer indices in
CUDA_VISIBLE_DEVICES (vllm/platforms/interface.py), so the supervisor looks the UUID up among
the devices this container sees (NVML, or `--simulate-gpus`) and passes that index, with
CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA counts as NVML does. A GPU the container does not see is
refused with 400.

Serving: clients reach every model through one port per node, the serving proxy
(`--serve-host`/`--serve-port`), at `http://ADDRESS:PORT/{key}` (OpenAI base URL: that + /v1);
each entry's `endpoint` says so. See `build_proxy_app` for why. The proxy holds requests off a
model that is asleep or draining (503, Retry-After), and a sleep first drains: no new requests,
then waits (`--drain-timeout`) until none is in flight, because vLLM 0.11 dies when it sleeps
under requests or gets one while asleep.

A child that exits on its own is reported as `failed` (or `exited`, for exit code 0) with its
exit code and its last output lines -- never restarted silently: the agent decides what happens
next. On SIGTERM or SIGINT the supervisor stops and reaps every child before it exits.

HTTP API (JSON; errors are `{"message": "..."}`):

    GET    /health                  200 {"status": "ok", "version", "models": <count>}
    GET    /models                  200 {"models": [<entry>, ...]}
    GET    /models/{key}            200 <entry> | 404
    PUT    /models/{key}            body {"model", "gpuUuid", "gpuTotalBytes", "vramBytes",
                                    "args": [...], "sleepMode": bool}
                                    202 <entry> starting (or failed, if it could not start)
                                    200 <entry> when this key already runs the same model
                                    400 invalid body, a budget above the GPU's total, or a
                                        GPU this container does not see
                                    409 the key runs something else: DELETE it first
                                    503 no free port left in --port-range
    DELETE /models/{key}            200 <entry> after SIGTERM, wait, SIGKILL, reap | 404
    POST   /models/{key}/sleep?level=1   200 <entry> sleeping, after draining; 409 when
                                    requests are still in flight after --drain-timeout
    POST   /models/{key}/wake_up         200 <entry> running (proxies vLLM's /wake_up)
    GET    /models/{key}/metrics    200 text/plain, the child's Prometheus /metrics
    POST   /downloads               body {"model"}: fetch its files into the Hugging Face
                                    cache with --download-command; 202 <download>
    GET    /downloads?model=M       200 <download> | 404
    GET    /estimate?model=M[&contextLength=N][&maxNumBatchedTokens=T][&maxNumSeqs=S]
                                    200 {"bytes", "method", "detail", "parameters"}: the vLLM
                                    budget (weights + KV cache + activation peak) from the
                                    model's files here | 404 when they are not here

    <entry> = {"key", "model", "port", "pid", "state", "endpoint", "gpuUuid", "deviceIndex",
               "gpuMemoryUtilization", "vramBytes", "vramSource", "footprintBytes",
               "residentBytes", "sleepMode", "inFlight", "draining", "exitCode", "message",
               "startedAt"}
    vramBytes: measured on the GPU for the child's processes while running where NVML shows
    them (vramSource "measured"), else the accounting rule's footprint ("footprint").
    <download> = {"model", "state": downloading|done|failed, "completedBytes", "totalBytes",
                  "percent", "path", "message"}
    state: starting -> running <-> sleeping; failed or exited when the process ended by itself.

PUT returns at once; the agent polls GET /models/{key} until the child answers vLLM's /health
(running), exits (failed, with its output) or misses `--startup-timeout` (killed, failed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from vram_operator import __version__
from vram_operator.api import Backend
from vram_operator.api.budget import footprint_bytes, vllm_utilization_milli
from vram_operator.api.modeldeployment import owned_message, supervisor_owned
from vram_operator.node_agent.backends.vllm import request_activity
from vram_operator.node_agent.estimate import (
    VLLM_MAX_NUM_BATCHED_TOKENS,
    VLLM_MAX_NUM_SEQS,
    VLLMSizes,
    vllm_estimate_path,
)
from vram_operator.node_agent.monitors.gpu import (
    GPUReading,
    GPUSource,
    NoGPUSource,
    detect_gpu_source,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 8900
DEFAULT_PORT_RANGE = "8100-8199"
DEFAULT_STARTUP_TIMEOUT = 600.0
DEFAULT_SERVE_PORT = 8000
DRAIN_TIMEOUT = 60.0
"""Seconds a sleep waits for the model's in-flight requests to finish."""
STOP_TIMEOUT = 15.0
"""Seconds a child has to exit after SIGTERM before it gets SIGKILL."""
TAIL_LINES = 20
"""Output lines kept per child, reported as the message when it fails."""
_LINE_LIMIT = 500
_CHILD_HOST = "127.0.0.1"


class ChildState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    SLEEPING = "sleeping"
    EXITED = "exited"
    FAILED = "failed"


_LIVE = (ChildState.STARTING, ChildState.RUNNING, ChildState.SLEEPING)


class SupervisorError(Exception):
    """A request the supervisor refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def gpu_memory_utilization(vram_bytes: int, gpu_total_bytes: int) -> float:
    """vLLM's --gpu-memory-utilization for a budget, by the rule in `vram_operator.api.budget`.

    Raises ValueError for a budget larger than vLLM may be given on this GPU.
    """
    return vllm_utilization_milli(vram_bytes, gpu_total_bytes) / 1000


class StartRequest(BaseModel):
    """The body of PUT /models/{key}."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    model: str = Field(min_length=1)
    gpu_uuid: str | None = None
    gpu_total_bytes: int = Field(gt=0)
    vram_bytes: int = Field(gt=0)
    args: list[str] = Field(default_factory=list)
    sleep_mode: bool = False


@dataclass(frozen=True)
class ChildSpec:
    """What a child runs; two PUTs with equal specs are the same request."""

    model: str
    gpu_uuid: str | None
    utilization: float
    vram_bytes: int
    args: tuple[str, ...]
    sleep_mode: bool
    device_index: int | None = None
    """The GPU's index as this container enumerates its devices; CUDA_VISIBLE_DEVICES."""

    @classmethod
    def from_request(cls, request: StartRequest) -> ChildSpec:
        for arg in request.args:
            owned = supervisor_owned(arg)
            if owned is not None:
                raise SupervisorError(400, f"{owned_message(arg, owned)}; remove it from args")
        try:
            utilization = gpu_memory_utilization(request.vram_bytes, request.gpu_total_bytes)
        except ValueError as err:
            raise SupervisorError(400, str(err)) from None
        return cls(
            model=request.model,
            gpu_uuid=request.gpu_uuid,
            utilization=utilization,
            vram_bytes=footprint_bytes(Backend.VLLM, request.vram_bytes, request.gpu_total_bytes),
            args=tuple(request.args),
            sleep_mode=request.sleep_mode,
        )


@dataclass
class Child:
    """One `vllm serve` process and what the supervisor knows about it."""

    key: str
    spec: ChildSpec
    port: int
    state: ChildState = ChildState.STARTING
    process: asyncio.subprocess.Process | None = None
    exit_code: int | None = None
    message: str | None = None
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stopping: bool = False
    failure: str | None = None
    """Set by the supervisor when it kills a child for not becoming healthy."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    in_flight: int = 0
    """Requests the serving proxy is passing to this child right now."""
    draining: bool = False
    """Set while a sleep waits for in-flight requests: the proxy takes no new ones."""

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def accepts_requests(self) -> bool:
        """Whether the proxy may pass a request on: never to a sleeping or draining engine,
        which vLLM 0.11 does not guard against (a request reaching it kills it)."""
        return self.state is ChildState.RUNNING and not self.draining and not self.stopping

    def to_json(
        self, endpoint: str | None = None, measured_bytes: int | None = None
    ) -> dict[str, Any]:
        """The listing entry. vramBytes is the memory measured on the GPU for the child's
        processes where it can be (running), else what the accounting rule charges."""
        measured = measured_bytes if self.state is ChildState.RUNNING else None
        return {
            "key": self.key,
            "model": self.spec.model,
            "port": self.port,
            "pid": self.pid,
            "state": self.state.value,
            "endpoint": endpoint if self.state in _LIVE else None,
            "gpuUuid": self.spec.gpu_uuid,
            "deviceIndex": self.spec.device_index,
            "gpuMemoryUtilization": self.spec.utilization,
            "vramBytes": measured if measured is not None else self.spec.vram_bytes,
            "vramSource": "measured" if measured is not None else "footprint",
            "footprintBytes": self.spec.vram_bytes,
            "residentBytes": measured_bytes,
            "sleepMode": self.spec.sleep_mode,
            "inFlight": self.in_flight,
            "draining": self.draining,
            "exitCode": self.exit_code,
            "message": self.message,
            "startedAt": self.started_at.isoformat(),
        }


def parse_port_range(text: str) -> range:
    """`8100-8199` as the range of ports it names, both ends included."""
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError(f"port range {text!r} is not FIRST-LAST, e.g. 8100-8199") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"port range {text!r} must lie within 1-65535, first <= last")
    return range(first, last + 1)


def _port_range_argument(text: str) -> range:
    try:
        return parse_port_range(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((_CHILD_HOST, port))
        except OSError:
            return False
    return True


# Resolved before any fork: the forked child then only makes one libc call.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


_SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|API_KEY|ACCESS_KEY", re.I)
"""Environment variables a vLLM child never inherits (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)."""


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL it if the supervisor itself dies uncleanly."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _signal_group(process: asyncio.subprocess.Process, signum: int) -> None:
    """Signal the child's process group (it leads one); a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def visible_index(reading: GPUReading, gpu_uuid: str) -> int:
    """The index of GPU `gpu_uuid` among the devices this container sees, for
    CUDA_VISIBLE_DEVICES; 400 when the container does not see it (the agent chose a GPU its
    vLLM sidecar was not given) or it is a MIG instance, which vLLM 0.11 cannot select by an
    integer."""
    for gpu in reading.gpus:
        if gpu.uuid != gpu_uuid:
            continue
        if gpu.parent_uuid is not None:
            raise SupervisorError(
                400,
                f"{gpu_uuid} is a MIG instance: vLLM 0.11 takes only integer device indices "
                "in CUDA_VISIBLE_DEVICES, which cannot name a MIG instance",
            )
        return gpu.index
    seen = ", ".join(f"{g.index}: {g.uuid}" for g in reading.gpus) or "none"
    why = f" ({'; '.join(reading.unavailable)})" if reading.unavailable else ""
    raise SupervisorError(
        400,
        f"GPU {gpu_uuid} is not visible in the vLLM container, which sees {seen}{why}; "
        "give the vLLM sidecar every GPU of the node (the chart's default) or place the "
        "model on one of these",
    )


def _in_group(pid: int, leader: int) -> bool:
    if pid == leader:
        return True
    try:
        return os.getpgid(pid) == leader
    except (ProcessLookupError, PermissionError, OSError):
        return False


def measure_children(reading: GPUReading, children: Sequence[Child]) -> dict[str, int]:
    """GPU memory per child key: what its process group holds on its GPU, by NVML's
    per-process figures (the engine core is a forked process of the group).

    A child none of whose processes appears is left out: NVML in a container often reports
    host PIDs, which match nothing here; the entry then shows the accounting figure.
    """
    measured: dict[str, int] = {}
    for child in children:
        uuid, leader = child.spec.gpu_uuid, child.pid
        if uuid is None or leader is None or child.state not in _LIVE:
            continue
        held = [
            process.used_bytes
            for process in reading.processes.get(uuid, [])
            if process.pid > 0 and process.used_bytes is not None and _in_group(process.pid, leader)
        ]
        if held:
            measured[child.key] = sum(held)
    return measured


class DownloadState(StrEnum):
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"


def default_download_command() -> list[str]:
    """The download command of the real sidecar: huggingface_hub, as vLLM itself uses it."""
    return [sys.executable, "-m", "vram_operator.node_agent.vllm_download"]


@dataclass
class Download:
    """One model's files being fetched into this container's Hugging Face cache by the
    download command (`COMMAND MODEL`, printing JSON lines {"completedBytes", "totalBytes"}
    and at the end {"path"}; exit 0 when every file is there)."""

    model: str
    state: DownloadState = DownloadState.DOWNLOADING
    completed_bytes: int = 0
    total_bytes: int | None = None
    path: str | None = None
    message: str | None = None
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))

    @property
    def percent(self) -> int:
        if self.state is DownloadState.DONE:
            return 100
        if not self.total_bytes:
            return 0
        return min(99, self.completed_bytes * 100 // self.total_bytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "state": self.state.value,
            "completedBytes": self.completed_bytes,
            "totalBytes": self.total_bytes,
            "percent": self.percent,
            "path": self.path,
            "message": self.message,
        }

    def take_line(self, text: str) -> None:
        try:
            report = json.loads(text)
        except ValueError:
            report = None
        if not isinstance(report, dict):
            self.tail.append(text[:_LINE_LIMIT])
            return
        if isinstance(report.get("completedBytes"), int):
            self.completed_bytes = max(self.completed_bytes, report["completedBytes"])
        if isinstance(report.get("totalBytes"), int):
            self.total_bytes = report["totalBytes"]
        if isinstance(report.get("path"), str):
            self.path = report["path"]

    async def cancel(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class ProcessManager:
    """Starts, watches and stops the children; knows nothing of HTTP requests."""

    def __init__(
        self,
        command: Sequence[str],
        ports: range,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        health_interval: float = 0.25,
        output: TextIO | None = None,
        port_is_free: Callable[[int], bool] = _port_is_free,
        gpu_source: GPUSource | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
        download_command: Sequence[str] | None = None,
        endpoint_base: str | None = None,
    ) -> None:
        self.command = list(command)
        self.gpu_source: GPUSource = gpu_source or NoGPUSource("no GPU source configured")
        self.drain_timeout = drain_timeout
        self.download_command = list(download_command or default_download_command())
        self.endpoint_base = endpoint_base
        """The serving proxy's URL (http://POD_IP:PORT); a model answers under /{key}."""
        self.downloads: dict[str, Download] = {}
        self.ports = ports
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.health_interval = health_interval
        self.children: dict[str, Child] = {}
        self._output = output if output is not None else sys.stderr
        self._port_is_free = port_is_free
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._proxy_session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    @property
    def proxy_session(self) -> aiohttp.ClientSession:
        """For the serving proxy: no total time limit (generations stream for minutes), bytes
        passed on as they come (no decompression)."""
        if self._proxy_session is None or self._proxy_session.closed:
            self._proxy_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                auto_decompress=False,
            )
        return self._proxy_session

    def endpoint(self, key: str) -> str | None:
        """Where clients reach the model under `key`: its OpenAI base URL is this + /v1."""
        if self.endpoint_base is None:
            return None
        return f"{self.endpoint_base}/{quote(key, safe='')}"

    async def entries(self, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The listing entries, with each child's memory measured on its GPU."""
        children = [self.children[k] for k in (keys or list(self.children)) if k in self.children]
        measured: dict[str, int] = {}
        if any(c.state is ChildState.RUNNING and c.spec.gpu_uuid for c in children):
            reading = await asyncio.to_thread(self.gpu_source.read)
            measured = measure_children(reading, children)
        return [c.to_json(self.endpoint(c.key), measured.get(c.key)) for c in children]

    async def entry(self, key: str) -> dict[str, Any]:
        found = await self.entries([key])
        if not found:
            raise SupervisorError(404, f"no model {key}")
        return found[0]

    async def start(self, key: str, spec: ChildSpec) -> tuple[Child, bool]:
        """Start a child for `key`, or return the one already running the same spec.

        Returns the child and whether it is new. A finished child under the key is replaced:
        that is the agent asking again, not a silent restart.
        """
        if spec.gpu_uuid:
            reading = await asyncio.to_thread(self.gpu_source.read)
            spec = replace(spec, device_index=visible_index(reading, spec.gpu_uuid))
        async with self._lock:
            existing = self.children.get(key)
            if existing is not None and existing.state in _LIVE and not existing.stopping:
                if existing.spec == spec:
                    return existing, False
                raise SupervisorError(
                    409,
                    f"{key} already runs {existing.spec.model} with utilization "
                    f"{existing.spec.utilization}; DELETE it before starting something else",
                )
            child = Child(key=key, spec=spec, port=self._free_port())
            self.children[key] = child
            await self._spawn(child)
            return child, True

    def _free_port(self) -> int:
        taken = {c.port for c in self.children.values() if c.state in _LIVE}
        for port in self.ports:
            if port not in taken and self._port_is_free(port):
                return port
        raise SupervisorError(
            503, f"no free port in {self.ports.start}-{self.ports.stop - 1} for another model"
        )

    def argv(self, child: Child) -> list[str]:
        spec = child.spec
        # The user's flags first: argparse keeps the last value of a flag, so the
        # supervisor's own always win even over a spelling the checks did not foresee.
        argv = [
            *self.command,
            spec.model,
            *spec.args,
            "--host",
            _CHILD_HOST,
            "--port",
            str(child.port),
            "--gpu-memory-utilization",
            f"{spec.utilization:.3f}",
        ]
        if spec.sleep_mode:
            argv.append("--enable-sleep-mode")
        return argv

    def environment(self, spec: ChildSpec) -> dict[str, str]:
        # No credentials: the supervisor's pull has fetched every file the child reads, and a
        # model's own code (--trust-remote-code, where a policy allows it) must not see them.
        env = {k: v for k, v in os.environ.items() if not _SECRET_ENV.search(k)}
        if spec.device_index is not None:
            # An integer index: vLLM 0.11 parses every entry with int() (platforms/interface.py,
            # issues #20939, #13815), so a UUID here kills every start. CUDA enumerates in
            # NVML's (PCI bus) order only when told to, and the index comes from NVML.
            env["CUDA_VISIBLE_DEVICES"] = str(spec.device_index)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if spec.sleep_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    async def _spawn(self, child: Child) -> None:
        argv = self.argv(child)
        log.info("starting %s: %s", child.key, shlex.join(argv))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.environment(child.spec),
                process_group=0,  # its own group to signal; the supervisor's session
                preexec_fn=_die_with_parent,
            )
        except OSError as err:
            child.state = ChildState.FAILED
            child.message = f"cannot start {shlex.join(argv)}: {err}"
            child.ended.set()
            log.error("%s: %s", child.key, child.message)
            return
        child.process = process
        child.tasks = [
            asyncio.create_task(self._watch(child, process), name=f"watch {child.key}"),
            asyncio.create_task(self._await_health(child, process), name=f"health {child.key}"),
        ]

    async def _watch(self, child: Child, process: asyncio.subprocess.Process) -> None:
        """Collect the child's output until it exits, then reap it and record how it ended."""
        assert process.stdout is not None  # spawned with stdout=PIPE
        reader = asyncio.create_task(self._collect(child, process.stdout))
        code = await process.wait()
        # vLLM's engine processes share the group; none may outlive the server.
        _signal_group(process, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, timeout=5)
        child.exit_code = code
        if child.stopping:
            child.state = ChildState.EXITED
            child.message = None
        else:
            how = _describe_exit(code)
            reason = child.failure or f"vllm serve ended by itself ({how})"
            output = "\n".join(child.tail)
            child.state = (
                ChildState.EXITED if code == 0 and not child.failure else ChildState.FAILED
            )
            child.message = f"{reason}; last output:\n{output}" if output else reason
            log.error("%s: %s", child.key, reason)
        child.ended.set()

    async def _collect(self, child: Child, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", errors="replace").rstrip()[:_LINE_LIMIT]
            child.tail.append(text)
            self._output.write(f"[{child.key}] {text}\n")
            self._output.flush()

    async def _await_health(self, child: Child, process: asyncio.subprocess.Process) -> None:
        """Poll the child's /health until it answers 200, it ends, or the startup timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        url = f"http://{_CHILD_HOST}:{child.port}/health"
        while not child.ended.is_set():
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as answer:
                    if answer.status == 200:
                        if child.state is ChildState.STARTING:
                            child.state = ChildState.RUNNING
                            log.info("%s is serving on port %d", child.key, child.port)
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if loop.time() >= deadline:
                child.failure = f"no healthy answer on /health within {self.startup_timeout:g}s"
                await self._terminate(process, child)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.ended.wait(), self.health_interval)

    async def _terminate(self, process: asyncio.subprocess.Process, child: Child) -> None:
        """SIGTERM the group, SIGKILL it after the stop timeout; returns once reaped."""
        _signal_group(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(child.ended.wait(), self.stop_timeout)
        except TimeoutError:
            log.warning("%s ignored SIGTERM for %gs; killing it", child.key, self.stop_timeout)
            _signal_group(process, signal.SIGKILL)
            await child.ended.wait()

    async def stop(self, key: str) -> Child | None:
        """Stop and reap the child under `key` and forget it; None if there is none."""
        child = self.children.get(key)
        if child is None:
            return None
        child.stopping = True
        if child.process is not None and not child.ended.is_set():
            await self._terminate(child.process, child)
        for task in child.tasks:
            task.cancel()
        await asyncio.gather(*child.tasks, return_exceptions=True)
        if self.children.get(key) is child:
            del self.children[key]
        return child

    async def shutdown(self) -> None:
        """Stop every child (in parallel) and close the HTTP session."""
        await asyncio.gather(*(self.stop(key) for key in list(self.children)))
        for job in self.downloads.values():
            await job.cancel()
        for session in (self._session, self._proxy_session):
            if session is not None:
                await session.close()

    def _live(self, key: str) -> Child:
        child = self.children.get(key)
        if child is None:
            raise SupervisorError(404, f"no model {key}")
        if child.state not in (ChildState.RUNNING, ChildState.SLEEPING):
            raise SupervisorError(409, f"{key} is {child.state.value}, not serving")
        return child

    async def _child_request(
        self, child: Child, method: str, path: str, time_limit: float
    ) -> tuple[int, str]:
        url = f"http://{_CHILD_HOST}:{child.port}{path}"
        try:
            async with self.session.request(
                method, url, timeout=aiohttp.ClientTimeout(total=time_limit)
            ) as answer:
                return answer.status, await answer.text()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise SupervisorError(
                502, f"{child.key}: vLLM did not answer {path}: {err!r}"
            ) from None

    async def sleep(self, key: str, level: int) -> Child:
        """Park the model (level 1: weights to host RAM) through vLLM's /sleep."""
        child = self._live(key)
        if not child.spec.sleep_mode:
            raise SupervisorError(409, f"{key} was started without sleep mode")
        if child.state is ChildState.SLEEPING:
            return child
        child.draining = True
        try:
            await self._drain(child)
            status, text = await self._child_request(child, "POST", f"/sleep?level={level}", 300)
            if status != 200:
                raise SupervisorError(502, f"{key}: vLLM /sleep answered {status}: {text[:500]}")
            child.state = ChildState.SLEEPING
        finally:
            child.draining = False
        return child

    async def _drain(self, child: Child) -> None:
        """Wait, at most --drain-timeout, until no request runs in the engine: none passing
        through the proxy, and vllm:num_requests_running + waiting at 0 in its /metrics.

        vLLM 0.11 puts the engine to sleep under running requests without a guard, and that
        kills it (vLLM issues #28714, #45520); the proxy takes no new request meanwhile.
        Raises 409 (and the model keeps serving) when requests are still running at the end.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while True:
            engine = 0.0
            if child.in_flight == 0:
                status, text = await self._child_request(child, "GET", "/metrics", 10)
                try:
                    engine = request_activity(text)[1] if status == 200 else 1.0
                except ValueError:
                    engine = 1.0
                if engine == 0:
                    return
            if loop.time() >= deadline:
                busy = child.in_flight or int(engine)
                raise SupervisorError(
                    409,
                    f"{child.key} still has {busy} request(s) in flight after "
                    f"{self.drain_timeout:g}s; not sleeping it (vLLM would crash)",
                )
            await asyncio.sleep(min(self.health_interval, 0.2))

    async def wake(self, key: str) -> Child:
        """Bring a sleeping model back onto the GPU through vLLM's /wake_up."""
        child = self._live(key)
        if child.state is ChildState.RUNNING:
            return child
        status, text = await self._child_request(child, "POST", "/wake_up", 300)
        if status != 200:
            raise SupervisorError(502, f"{key}: vLLM /wake_up answered {status}: {text[:500]}")
        child.state = ChildState.RUNNING
        return child

    async def metrics(self, key: str) -> str:
        child = self._live(key)
        status, text = await self._child_request(child, "GET", "/metrics", 10)
        if status != 200:
            raise SupervisorError(502, f"{key}: vLLM /metrics answered {status}")
        return text

    def download(self, model: str) -> Download:
        """Start fetching `model`'s files (or return the fetch under way). A local path is
        never fetched: it is there or it is not."""
        job = self.downloads.get(model)
        if job is not None and job.state is DownloadState.DOWNLOADING:
            return job
        if model.startswith("/"):
            found = Path(model).exists()
            job = Download(
                model,
                state=DownloadState.DONE if found else DownloadState.FAILED,
                path=model if found else None,
                message=None if found else f"{model} does not exist in the vLLM container",
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
                process_group=0,  # its own group to signal; the supervisor's session
                preexec_fn=_die_with_parent,
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
            log.info("downloaded %s to %s", job.model, job.path)
            return
        job.state = DownloadState.FAILED
        output = "\n".join(job.tail)
        job.message = f"downloading {job.model} failed ({_describe_exit(code)})" + (
            f": {output}" if output else ""
        )
        log.error("%s", job.message)


# --- model files ------------------------------------------------------------------------------


def huggingface_hub_cache() -> Path:
    """Where Hugging Face keeps downloads: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def local_model_path(model: str, hub_cache: Path | None = None) -> Path | None:
    """The files of `model` in this container: an existing path, or the Hugging Face cache's
    snapshot that refs/main points at (else the newest one); None when absent."""
    if model.startswith("/"):
        path = Path(model)
        return path if path.exists() else None
    repo = (hub_cache or huggingface_hub_cache()) / ("models--" + model.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if pinned.is_dir():
            return pinned
    if not snapshots.is_dir():
        return None
    candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


# --- HTTP -------------------------------------------------------------------------------------

MANAGER: web.AppKey[ProcessManager] = web.AppKey("manager", ProcessManager)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except SupervisorError as err:
        return _error(err.status, err.message)
    return response


async def _health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return web.json_response(
        {"status": "ok", "version": __version__, "models": len(manager.children)}
    )


async def _list(request: web.Request) -> web.Response:
    return web.json_response({"models": await request.app[MANAGER].entries()})


async def _get(request: web.Request) -> web.Response:
    return web.json_response(await request.app[MANAGER].entry(request.match_info["key"]))


async def _put(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    try:
        body = await request.json()
        start = StartRequest.model_validate(body)
    except json.JSONDecodeError as err:
        return _error(400, f"body is not JSON: {err}")
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return _error(400, f"{where}: {first['msg']}")
    manager = request.app[MANAGER]
    child, created = await manager.start(key, ChildSpec.from_request(start))
    return web.json_response(await manager.entry(child.key), status=202 if created else 200)


async def _delete(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    child = await request.app[MANAGER].stop(key)
    if child is None:
        return _error(404, f"no model {key}")
    return web.json_response(child.to_json())  # gone: no endpoint, no measurement


async def _sleep(request: web.Request) -> web.Response:
    level_text = request.query.get("level", "1")
    if level_text not in ("1", "2"):
        return _error(400, f"sleep level must be 1 or 2, got {level_text!r}")
    manager = request.app[MANAGER]
    child = await manager.sleep(request.match_info["key"], int(level_text))
    return web.json_response(await manager.entry(child.key))


async def _wake(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    child = await manager.wake(request.match_info["key"])
    return web.json_response(await manager.entry(child.key))


async def _metrics(request: web.Request) -> web.Response:
    text = await request.app[MANAGER].metrics(request.match_info["key"])
    return web.Response(text=text, content_type="text/plain")


async def _estimate(request: web.Request) -> web.Response:
    model = request.query.get("model", "")
    if not model:
        return _error(400, "query parameter model is required")
    numbers: dict[str, int] = {}
    for name in ("contextLength", "maxNumBatchedTokens", "maxNumSeqs"):
        text = request.query.get(name)
        if text is None:
            continue
        if not text.isdigit() or int(text) == 0:
            return _error(400, f"{name} must be a positive integer, got {text!r}")
        numbers[name] = int(text)
    sizes = VLLMSizes(
        max_model_len=numbers.get("contextLength"),
        max_num_batched_tokens=numbers.get("maxNumBatchedTokens", VLLM_MAX_NUM_BATCHED_TOKENS),
        max_num_seqs=numbers.get("maxNumSeqs", VLLM_MAX_NUM_SEQS),
    )
    path = await asyncio.to_thread(local_model_path, model)
    if path is None:
        return _error(404, f"the files of {model} are not in this container; POST /downloads")
    try:
        estimate = await asyncio.to_thread(vllm_estimate_path, path, sizes)
    except OSError as err:
        return _error(404, f"cannot read {path}: {err}")
    return web.json_response(
        {
            "bytes": estimate.bytes,
            "method": estimate.method,
            "detail": estimate.detail,
            "parameters": estimate.parameters,
        }
    )


async def _start_download(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError as err:
        return _error(400, f"body is not JSON: {err}")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        return _error(400, "model: a non-empty string is required")
    job = request.app[MANAGER].download(model)
    return web.json_response(job.to_json(), status=202)


async def _get_download(request: web.Request) -> web.Response:
    model = request.query.get("model", "")
    job = request.app[MANAGER].downloads.get(model)
    if job is None:
        return _error(404, f"no download of {model!r}; POST /downloads first")
    return web.json_response(job.to_json())


def build_app(manager: ProcessManager) -> web.Application:
    """The supervisor's HTTP API over `manager`; the app's cleanup stops every child."""
    app = web.Application(middlewares=[_errors])
    app[MANAGER] = manager

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        await manager.shutdown()

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/health", _health)
    app.router.add_get("/models", _list)
    app.router.add_get("/models/{key}", _get)
    app.router.add_put("/models/{key}", _put)
    app.router.add_delete("/models/{key}", _delete)
    app.router.add_post("/models/{key}/sleep", _sleep)
    app.router.add_post("/models/{key}/wake_up", _wake)
    app.router.add_get("/models/{key}/metrics", _metrics)
    app.router.add_get("/estimate", _estimate)
    app.router.add_post("/downloads", _start_download)
    app.router.add_get("/downloads", _get_download)
    return app


# --- the serving proxy ------------------------------------------------------------------------
#
# Why one per-node port in front of every child, rather than each child on the pod IP:
# - vLLM 0.11 has no guard against a request reaching a sleeping engine, or running while it
#   is put to sleep: either kills it. Only something in the request path can hold requests
#   off a sleeping model and count the ones in flight before /sleep; the supervisor is that.
# - Sleep mode needs VLLM_SERVER_DEV_MODE=1, which also opens /collective_rpc, /sleep and
#   /reset_prefix_cache to whoever reaches the port. The children stay on 127.0.0.1 and the
#   proxy passes on only the serving API (_SERVED).
# - One port per node is one containerPort and one NetworkPolicy rule, instead of a range.
# The cost is one local hop in Python; bodies and server-sent events are streamed through
# chunk by chunk, never buffered whole.

_SERVED_PREFIXES = ("v1/", "v2/")
_SERVED_PATHS = frozenset(
    {
        "health",
        "ping",
        "version",
        "metrics",
        "tokenize",
        "detokenize",
        "pooling",
        "classify",
        "score",
        "rerank",
        "invocations",
    }
)
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
        "host",
        "content-length",
    }
)


def _openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    kind = {404: "NotFoundError", 503: "ServiceUnavailableError"}.get(status, "BadGatewayError")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


async def _proxy(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    key, tail = request.match_info["key"], request.match_info["tail"]
    child = manager.children.get(key)
    if child is None:
        return _openai_error(404, f"no model {key} on this node")
    if not (tail.startswith(_SERVED_PREFIXES) or tail in _SERVED_PATHS):
        return _openai_error(404, f"/{tail} is not served")
    if not child.accepts_requests:
        why = "draining for sleep" if child.draining else child.state.value
        return _openai_error(503, f"{key} is {why}", headers={"Retry-After": "1"})
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    url = f"http://{_CHILD_HOST}:{child.port}/{tail}"
    child.in_flight += 1
    response: web.StreamResponse | None = None
    try:
        body = await request.read()
        async with manager.proxy_session.request(
            request.method, url, params=request.query, headers=headers, data=body or None
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP},
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as err:
        if response is not None and response.prepared:
            raise  # the answer had begun: the client sees it cut short
        return _openai_error(502, f"{key}: vLLM did not answer: {err!r}")
    finally:
        child.in_flight -= 1


def build_proxy_app(manager: ProcessManager) -> web.Application:
    """The serving proxy: /{key}/{vLLM path}, e.g. /ns.qwen/v1/chat/completions."""
    app = web.Application(client_max_size=64 * 2**20)
    app[MANAGER] = manager
    app.router.add_route("*", "/{key}/{tail:.*}", _proxy)
    return app


def advertised_address(serve_host: str) -> str:
    """The address to report for a wildcard `serve_host`: this machine's outward address
    (the route towards a TEST-NET address; no packet is sent), else loopback."""
    if serve_host not in ("0.0.0.0", "::", ""):
        return serve_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
    return address if not address.startswith("127.") and address != "0.0.0.0" else "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator vllm-supervisor",
        description="Start and stop one `vllm serve` per model on request of the node agent.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on; 0 picks a free one"
    )
    parser.add_argument(
        "--vllm-command",
        default="vllm serve",
        help="the command that serves one model; the model and flags are appended",
    )
    parser.add_argument(
        "--port-range",
        type=_port_range_argument,
        default=parse_port_range(DEFAULT_PORT_RANGE),
        help=f"ports for the vLLM servers (default {DEFAULT_PORT_RANGE})",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=DEFAULT_STARTUP_TIMEOUT,
        help="seconds a server has to answer /health before it is killed as failed",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT,
        help="seconds between SIGTERM and SIGKILL when stopping a server",
    )
    parser.add_argument(
        "--serve-host",
        default="0.0.0.0",
        help="address the serving proxy listens on, in front of every model (default 0.0.0.0)",
    )
    parser.add_argument(
        "--serve-port",
        type=int,
        default=DEFAULT_SERVE_PORT,
        help=f"port of the serving proxy; 0 picks a free one (default {DEFAULT_SERVE_PORT})",
    )
    parser.add_argument(
        "--advertise-host",
        default=os.environ.get("POD_IP") or None,
        help="address reported in each model's endpoint (default $POD_IP, else this "
        "machine's outward address)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT,
        help="seconds a sleep waits for in-flight requests before it is refused",
    )
    parser.add_argument(
        "--download-command",
        default=None,
        help="the command that fetches a model's files (the model is appended; default: "
        "huggingface_hub through vram_operator.node_agent.vllm_download)",
    )
    parser.add_argument(
        "--simulate-gpus",
        metavar="STATE_FILE",
        default=None,
        help="read GPUs from a simulated GPU state file instead of NVML (tests and demos only)",
    )
    return parser


def _gpu_source(args: argparse.Namespace) -> GPUSource:
    if args.simulate_gpus:
        from vram_operator.simulation.gpu_source import SimulatedGPUSource

        return SimulatedGPUSource(args.simulate_gpus)
    return detect_gpu_source()


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, then stop every child."""
    source = _gpu_source(args)
    manager = ProcessManager(
        shlex.split(args.vllm_command),
        args.port_range,
        startup_timeout=args.startup_timeout,
        stop_timeout=args.stop_timeout,
        gpu_source=source,
        drain_timeout=args.drain_timeout,
        download_command=shlex.split(args.download_command) if args.download_command else None,
    )
    runner = web.AppRunner(build_app(manager), handle_signals=False, access_log=None)
    proxy = web.AppRunner(build_proxy_app(manager), handle_signals=False, access_log=None)
    await runner.setup()
    await proxy.setup()
    try:
        serving = socket.create_server((args.serve_host, args.serve_port), reuse_port=False)
        await web.SockSite(proxy, serving).start()
        advertise = args.advertise_host or advertised_address(args.serve_host)
        shown = f"[{advertise}]" if ":" in advertise else advertise
        manager.endpoint_base = f"http://{shown}:{serving.getsockname()[1]}"
        sock = socket.create_server((args.host, args.port))
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        print(f"listening on http://{host}:{port}", flush=True)
        log.info("models answer under %s/<key>/v1", manager.endpoint_base)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping %d model server(s)", len(manager.children))
    finally:
        await proxy.cleanup()
        await runner.cleanup()
        source.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not shlex.split(args.vllm_command):
        build_parser().error("--vllm-command is empty")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s vllm-supervisor: %(message)s"
    )
    try:
        asyncio.run(serve(args))
    except OSError as err:
        print(f"vllm-supervisor: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
