"""`vram-operator vllm-supervisor`: one `vllm serve` process per model, inside the vLLM sidecar.

vLLM serves one model per process, so the sidecar runs this supervisor and the node agent asks
it, over HTTP on localhost, to start and stop models. Each child gets its own port from
`--port-range`, `--host 127.0.0.1`, `--gpu-memory-utilization` = the model's VRAM budget over
the GPU's total (rounded up to 3 decimals, at most 0.98), `CUDA_VISIBLE_DEVICES` = the chosen
GPU's UUID, and with sleep mode `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`, which
vLLM needs to expose /sleep, /wake_up and /is_sleeping. Each child runs in its own process
group, so stopping it also stops the engine processes vLLM forks.

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
                                    400 invalid body or a budget above the GPU's total
                                    409 the key runs something else: DELETE it first
                                    503 no free port left in --port-range
    DELETE /models/{key}            200 <entry> after SIGTERM, wait, SIGKILL, reap | 404
    POST   /models/{key}/sleep?level=1   200 <entry> sleeping (proxies vLLM's /sleep)
    POST   /models/{key}/wake_up         200 <entry> running (proxies vLLM's /wake_up)
    GET    /models/{key}/metrics    200 text/plain, the child's Prometheus /metrics
    GET    /estimate?model=M[&contextLength=N]
                                    200 {"bytes", "method", "detail", "parameters"} from the
                                    model's files in this container (a path, or the Hugging
                                    Face cache) | 404 when they are not here

    <entry> = {"key", "model", "port", "pid", "state", "gpuUuid", "gpuMemoryUtilization",
               "vramBytes", "sleepMode", "exitCode", "message", "startedAt"}
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
import shlex
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from vram_operator import __version__
from vram_operator.api import Backend
from vram_operator.api.budget import footprint_bytes, vllm_utilization_milli
from vram_operator.api.modeldeployment import SUPERVISOR_OWNED_VLLM_FLAGS
from vram_operator.node_agent.estimate import estimate_path

log = logging.getLogger(__name__)

DEFAULT_PORT = 8900
DEFAULT_PORT_RANGE = "8100-8199"
DEFAULT_STARTUP_TIMEOUT = 600.0
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

    @classmethod
    def from_request(cls, request: StartRequest) -> ChildSpec:
        for arg in request.args:
            flag = arg.split("=", 1)[0]
            if flag in SUPERVISOR_OWNED_VLLM_FLAGS:
                raise SupervisorError(400, f"{flag} is set by the supervisor; remove it from args")
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

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.spec.model,
            "port": self.port,
            "pid": self.pid,
            "state": self.state.value,
            "gpuUuid": self.spec.gpu_uuid,
            "gpuMemoryUtilization": self.spec.utilization,
            "vramBytes": self.spec.vram_bytes,
            "sleepMode": self.spec.sleep_mode,
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


class ProcessManager:
    """Starts, watches and stops the children; knows nothing of HTTP requests."""

    def __init__(
        self,
        command: Sequence[str],
        ports: range,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        health_interval: float = 0.5,
        output: TextIO | None = None,
        port_is_free: Callable[[int], bool] = _port_is_free,
    ) -> None:
        self.command = list(command)
        self.ports = ports
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.health_interval = health_interval
        self.children: dict[str, Child] = {}
        self._output = output if output is not None else sys.stderr
        self._port_is_free = port_is_free
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def start(self, key: str, spec: ChildSpec) -> tuple[Child, bool]:
        """Start a child for `key`, or return the one already running the same spec.

        Returns the child and whether it is new. A finished child under the key is replaced:
        that is the agent asking again, not a silent restart.
        """
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
        argv = [
            *self.command,
            spec.model,
            "--host",
            _CHILD_HOST,
            "--port",
            str(child.port),
            "--gpu-memory-utilization",
            f"{spec.utilization:.3f}",
        ]
        if spec.sleep_mode:
            argv.append("--enable-sleep-mode")
        return argv + list(spec.args)

    def environment(self, spec: ChildSpec) -> dict[str, str]:
        env = dict(os.environ)
        if spec.gpu_uuid:
            env["CUDA_VISIBLE_DEVICES"] = spec.gpu_uuid
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
                start_new_session=True,
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
        if self._session is not None:
            await self._session.close()

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
        status, text = await self._child_request(child, "POST", f"/sleep?level={level}", 300)
        if status != 200:
            raise SupervisorError(502, f"{key}: vLLM /sleep answered {status}: {text[:500]}")
        child.state = ChildState.SLEEPING
        return child

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
    children = request.app[MANAGER].children.values()
    return web.json_response({"models": [child.to_json() for child in children]})


async def _get(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    child = request.app[MANAGER].children.get(key)
    if child is None:
        return _error(404, f"no model {key}")
    return web.json_response(child.to_json())


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
    child, created = await request.app[MANAGER].start(key, ChildSpec.from_request(start))
    return web.json_response(child.to_json(), status=202 if created else 200)


async def _delete(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    child = await request.app[MANAGER].stop(key)
    if child is None:
        return _error(404, f"no model {key}")
    return web.json_response(child.to_json())


async def _sleep(request: web.Request) -> web.Response:
    level_text = request.query.get("level", "1")
    if level_text not in ("1", "2"):
        return _error(400, f"sleep level must be 1 or 2, got {level_text!r}")
    child = await request.app[MANAGER].sleep(request.match_info["key"], int(level_text))
    return web.json_response(child.to_json())


async def _wake(request: web.Request) -> web.Response:
    child = await request.app[MANAGER].wake(request.match_info["key"])
    return web.json_response(child.to_json())


async def _metrics(request: web.Request) -> web.Response:
    text = await request.app[MANAGER].metrics(request.match_info["key"])
    return web.Response(text=text, content_type="text/plain")


async def _estimate(request: web.Request) -> web.Response:
    model = request.query.get("model", "")
    context_text = request.query.get("contextLength")
    if not model:
        return _error(400, "query parameter model is required")
    if context_text is not None and not context_text.isdigit():
        return _error(400, f"contextLength must be a positive integer, got {context_text!r}")
    path = await asyncio.to_thread(local_model_path, model)
    if path is None:
        return _error(404, f"the files of {model} are not in this container")
    context = int(context_text) if context_text else None
    try:
        estimate = await asyncio.to_thread(estimate_path, path, context)
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
    return app


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
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, then stop every child."""
    manager = ProcessManager(
        shlex.split(args.vllm_command),
        args.port_range,
        startup_timeout=args.startup_timeout,
        stop_timeout=args.stop_timeout,
    )
    runner = web.AppRunner(build_app(manager), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        sock = socket.create_server((args.host, args.port))
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        print(f"listening on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping %d model server(s)", len(manager.children))
    finally:
        await runner.cleanup()


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
