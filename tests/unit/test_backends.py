"""Backend clients: Ollama against the in-process fake Ollama, failures through a scripted
transport, the vLLM client against a scripted supervisor, and the supervisor's pure parts."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_operator.api import GPU, Backend, ModelState
from vram_operator.api.budget import VLLM_INSTANCE_OVERHEAD_BYTES
from vram_operator.node_agent.backends import (
    AiohttpTransport,
    BackendError,
    LoadRequest,
    ModelBackend,
    OllamaBackend,
    Response,
    RetryPolicy,
    VLLMBackend,
    with_retries,
)
from vram_operator.node_agent.backends.base import backoff_delay, error_text
from vram_operator.node_agent.backends.ollama import PullProgress
from vram_operator.node_agent.backends.vllm import request_activity
from vram_operator.node_agent.monitors.gpu import GPUReading
from vram_operator.node_agent.vllm_supervisor import (
    Child,
    ChildSpec,
    ProcessManager,
    StartRequest,
    SupervisorError,
    build_app,
    gpu_memory_utilization,
    local_model_path,
    parse_port_range,
    visible_index,
)
from vram_operator.simulation.fake_ollama import FakeOllama, OllamaConfig
from vram_operator.simulation.gpu import GIB, SimulatedGPUs

pytestmark = pytest.mark.unit

FAST = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)
T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    """A settable clock for the backend and the fake server."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


Handler = Callable[[str, str, Any], Response | Exception | list[bytes]]


class ScriptedTransport:
    """A Transport whose answers come from `handler`; it records every call."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls: list[tuple[str, str, Any]] = []

    def _answer(self, method: str, url: str, json: Any) -> Response | list[bytes]:
        self.calls.append((method, url, json))
        result = self.handler(method, url, json)
        if isinstance(result, Exception):
            raise result
        return result

    async def request(
        self, method: str, url: str, json: Any = None, time_limit: float = 10.0
    ) -> Response:
        result = self._answer(method, url, json)
        assert isinstance(result, Response)
        return result

    async def stream_lines(
        self, method: str, url: str, json: Any = None, idle_limit: float = 10.0
    ) -> AsyncGenerator[bytes, None]:
        result = self._answer(method, url, json)
        assert isinstance(result, list)
        for line in result:
            yield line

    async def aclose(self) -> None:
        pass


def ok(body: Any) -> Response:
    return Response(200, json.dumps(body).encode())


REFUSED = BackendError("cannot connect: Connection refused", retryable=True)


class CountingTransport(AiohttpTransport):
    """The real transport, counting requests."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def request(
        self, method: str, url: str, json: Any = None, time_limit: float = 10.0
    ) -> Response:
        self.count += 1
        return await super().request(method, url, json, time_limit)


# --- Ollama against the fake Ollama -------------------------------------------------------------


@dataclass
class OllamaRig:
    backend: OllamaBackend
    fake: FakeOllama
    gpus: SimulatedGPUs
    clock: Clock
    transport: CountingTransport

    def held(self, index: int) -> dict[str, int]:
        return dict(self.gpus.devices()[index].allocations)


async def _ollama_rig(tmp_path: Path, config: OllamaConfig) -> AsyncIterator[OllamaRig]:
    gpus = SimulatedGPUs.create(tmp_path / "gpus.json", node="n1", count=2, total_bytes=24 * GIB)
    clock = Clock()
    fake = FakeOllama(gpus, owner="pid:1:ollama:test", config=config, clock=clock)
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    transport = CountingTransport()
    backend = OllamaBackend(str(server.make_url("")), transport=transport, retry=FAST, clock=clock)
    try:
        yield OllamaRig(backend, fake, gpus, clock, transport)
    finally:
        await backend.aclose()
        await server.close()


@pytest.fixture
async def ollama(tmp_path: Path) -> AsyncIterator[OllamaRig]:
    async for rig in _ollama_rig(tmp_path, OllamaConfig()):
        yield rig


@pytest.fixture
async def failing_ollama(tmp_path: Path) -> AsyncIterator[OllamaRig]:
    config = OllamaConfig(fail_pull=frozenset({"bad:pull"}), fail_load=frozenset({"bad:load"}))
    async for rig in _ollama_rig(tmp_path, config):
        yield rig


async def test_ollama_health_reports_the_version(ollama: OllamaRig) -> None:
    health = await ollama.backend.health()
    assert health.healthy
    assert health.name is Backend.OLLAMA
    assert health.version == "0.12.3"
    assert health.endpoint == ollama.backend.base_url


async def test_pull_progress_rises_monotonically_to_100(ollama: OllamaRig) -> None:
    progress: list[int] = []
    await ollama.backend.pull("llama3.2:1b", progress.append)
    assert progress[-1] == 100
    assert progress == sorted(set(progress))
    assert len(progress) > 5  # intermediate figures, not just the end
    assert "llama3.2:1b" in await ollama.backend.list_pulled()


async def test_pulling_a_model_on_disk_asks_no_registry(ollama: OllamaRig) -> None:
    await ollama.backend.pull("llama3.2:1b", lambda _: None)
    before = ollama.transport.count
    progress: list[int] = []
    await ollama.backend.pull("llama3.2:1b", progress.append)
    assert progress == [100]
    assert ollama.transport.count == before + 1  # only /api/tags


async def test_pull_failure_carries_ollamas_message(failing_ollama: OllamaRig) -> None:
    progress: list[int] = []
    with pytest.raises(BackendError, match="connection reset by peer") as caught:
        await failing_ollama.backend.pull("bad:pull", progress.append)
    assert caught.value.retryable  # a broken download may go through next time
    assert progress
    assert max(progress) < 100


async def test_pulling_an_unknown_model_fails_with_the_registry_message(
    ollama: OllamaRig,
) -> None:
    with pytest.raises(BackendError, match="file does not exist"):
        await ollama.backend.pull("nosuchmodel", lambda _: None)


async def test_load_measures_vram_where_ollama_put_it(ollama: OllamaRig) -> None:
    ollama.gpus.pressure(0, 1 * GIB)  # Ollama 0.12 takes the GPU with the most free memory
    await ollama.backend.pull("llama3.2:1b", lambda _: None)
    info = await ollama.backend.load(
        LoadRequest(key="ns.llama", model="llama3.2:1b", gpu_index=0, vram_bytes=1)
    )
    assert info.model == "llama3.2:1b"
    assert info.state is ModelState.LOADED
    assert info.vram_bytes == 2 * GIB  # measured by Ollama, not the 1-byte request
    assert info.last_access == T0
    assert ollama.held(1) == {"pid:1:ollama:test:llama3.2:1b": 2 * GIB}
    assert ollama.held(0) == {"external:pressure": 1 * GIB}
    forever = dt.timedelta(days=365 * 100)
    assert info.expires_at is not None
    assert info.expires_at - T0 > forever  # keep_alive -1: held until the agent unloads it


async def test_keep_alive_seconds_reach_ollama(ollama: OllamaRig) -> None:
    await ollama.backend.pull("llama3.2:1b", lambda _: None)
    info = await ollama.backend.load(
        LoadRequest(key="k", model="llama3.2:1b", keep_alive_seconds=600)
    )
    assert info.expires_at == T0 + dt.timedelta(seconds=600)


async def test_last_access_moves_only_when_expires_at_changes(ollama: OllamaRig) -> None:
    backend, clock = ollama.backend, ollama.clock
    await backend.pull("llama3.2:1b", lambda _: None)
    await backend.load(LoadRequest(key="k", model="llama3.2:1b", keep_alive_seconds=300))

    clock.advance(60)
    (idle,) = await backend.list_resident()
    assert idle.last_access == T0  # no request since the load

    clock.advance(60)  # a client uses the model
    transport = AiohttpTransport()
    try:
        used = await transport.request(
            "POST",
            f"{backend.base_url}/api/generate",
            json={"model": "llama3.2:1b", "prompt": "hi", "stream": False},
        )
    finally:
        await transport.aclose()
    assert used.ok
    clock.advance(30)
    (after,) = await backend.list_resident()
    assert after.last_access == T0 + dt.timedelta(seconds=150)


async def test_unload_frees_the_gpu_and_tolerates_unknown_models(ollama: OllamaRig) -> None:
    await ollama.backend.pull("llama3.2:1b", lambda _: None)
    await ollama.backend.load(LoadRequest(key="k", model="llama3.2:1b"))
    await ollama.backend.unload("k", "llama3.2:1b")
    assert await ollama.backend.list_resident() == []
    assert ollama.held(0) == {}
    await ollama.backend.unload("k", "never:pulled")  # 404 from Ollama: nothing to unload


async def test_load_failure_is_retried_then_reported_with_the_runner_message(
    failing_ollama: OllamaRig,
) -> None:
    await failing_ollama.backend.pull("bad:load", lambda _: None)
    before = failing_ollama.transport.count
    with pytest.raises(BackendError, match="llama runner process has terminated") as caught:
        await failing_ollama.backend.load(LoadRequest(key="k", model="bad:load"))
    assert caught.value.status == 500
    assert failing_ollama.transport.count - before == FAST.attempts


async def test_load_of_a_model_not_pulled_fails_once_with_404(ollama: OllamaRig) -> None:
    before = ollama.transport.count
    with pytest.raises(BackendError, match="model 'other:tag' not found") as caught:
        await ollama.backend.load(LoadRequest(key="k", model="other:tag"))
    assert caught.value.status == 404
    assert ollama.transport.count - before == 1


async def test_ollama_estimate_comes_from_api_show(ollama: OllamaRig) -> None:
    assert await ollama.backend.estimate("llama3.2:1b") is None  # not pulled yet
    await ollama.backend.pull("llama3.2:1b", lambda _: None)
    estimate = await ollama.backend.estimate("llama3.2:1b")
    assert estimate is not None
    assert estimate.method == "ollama-show"
    assert estimate.parameters == 1_235_814_432
    longer = await ollama.backend.estimate("llama3.2:1b", context_length=16384)
    assert longer is not None
    assert longer.bytes > estimate.bytes


async def test_ollama_cannot_park(ollama: OllamaRig) -> None:
    assert not ollama.backend.can_park
    with pytest.raises(BackendError, match="no host-RAM tier"):
        await ollama.backend.park("k", "llama3.2:1b")
    with pytest.raises(BackendError, match="no host-RAM tier"):
        await ollama.backend.wake("k", "llama3.2:1b")


# --- failures through the real transport ------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_connection_refused_is_retried_a_bounded_number_of_times() -> None:
    transport = CountingTransport()
    backend = OllamaBackend(f"http://127.0.0.1:{_closed_port()}", transport=transport, retry=FAST)
    try:
        with pytest.raises(BackendError, match="cannot connect") as caught:
            await backend.list_resident()
        health = await backend.health()
    finally:
        await backend.aclose()
    assert caught.value.retryable
    assert transport.count == FAST.attempts * 2
    assert not health.healthy
    assert health.message is not None
    assert "cannot connect" in health.message


async def test_a_slow_backend_times_out_as_retryable() -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/slow", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    transport = AiohttpTransport()
    try:
        with pytest.raises(BackendError, match=r"no answer within 0\.05s") as caught:
            await transport.request("GET", str(server.make_url("/slow")), time_limit=0.05)
    finally:
        gate.set()
        await transport.aclose()
        await server.close()
    assert caught.value.retryable


# --- failures through a scripted transport -----------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Response(200, b"<html>proxy error</html>"), "invalid JSON: '<html>proxy error</html>'"),
        (ok({"models": [{"name": "x"}]}), "unexpected shape: models.0.size_vram"),
        (ok([1, 2]), "unexpected shape"),
        (ok({"models": [{"name": "x", "size_vram": -1}]}), "size_vram"),
    ],
)
async def test_garbage_becomes_a_backend_error_without_retries(
    answer: Response, message: str
) -> None:
    transport = ScriptedTransport(lambda *_: answer)
    backend = OllamaBackend("http://ollama", transport=transport, retry=FAST)
    with pytest.raises(BackendError, match=message) as caught:
        await backend.list_resident()
    assert not caught.value.retryable
    assert len(transport.calls) == 1


async def test_5xx_is_retried_until_it_succeeds() -> None:
    answers: list[Response] = [Response(503, b'{"error": "busy"}'), ok({"version": "1.0"})]
    transport = ScriptedTransport(lambda *_: answers.pop(0))
    health = await OllamaBackend("http://ollama", transport=transport, retry=FAST).health()
    assert health.healthy
    assert len(transport.calls) == 2


async def test_4xx_is_not_retried_and_keeps_the_backend_message() -> None:
    transport = ScriptedTransport(lambda *_: Response(400, b'{"error": "invalid model name"}'))
    backend = OllamaBackend("http://ollama", transport=transport, retry=FAST)
    with pytest.raises(BackendError) as caught:
        await backend.load(LoadRequest(key="k", model="x"))
    assert caught.value.message == "invalid model name"
    assert caught.value.status == 400
    assert "answered HTTP 400" in str(caught.value)
    assert len(transport.calls) == 1


async def test_a_pull_stream_that_stops_early_is_retried_and_resumes() -> None:
    streams = [
        [b'{"status":"pulling a","digest":"a","total":100,"completed":40}\n'],
        [
            b'{"status":"pulling a","digest":"a","total":100,"completed":20}\n',
            b'{"status":"pulling a","digest":"a","total":100,"completed":100}\n',
            b'{"status":"success"}\n',
        ],
    ]

    def handler(method: str, url: str, body: Any) -> Response | list[bytes]:
        return ok({"models": []}) if url.endswith("/api/tags") else streams.pop(0)

    progress: list[int] = []
    backend = OllamaBackend("http://ollama", transport=ScriptedTransport(handler), retry=FAST)
    await backend.pull("m:1", progress.append)
    assert progress == [40, 99, 100]


async def test_a_garbage_pull_line_fails_the_pull() -> None:
    def handler(method: str, url: str, body: Any) -> Response | list[bytes]:
        return ok({"models": None}) if url.endswith("/api/tags") else [b"{not json\n"]

    backend = OllamaBackend("http://ollama", transport=ScriptedTransport(handler), retry=FAST)
    with pytest.raises(BackendError, match="invalid JSON"):
        await backend.pull("m:1", lambda _: None)


async def test_with_retries_leaves_other_exceptions_alone() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await with_retries(broken, attempts=5, base_delay=0)
    assert calls == 1


@settings(max_examples=50, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=30),
    base=st.floats(min_value=0, max_value=5),
    cap=st.floats(min_value=0, max_value=10),
    jitter=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_is_exponential_capped_and_jittered(
    attempt: int, base: float, cap: float, jitter: float
) -> None:
    ceiling = min(cap, base * 2 ** (attempt - 1))
    delay = backoff_delay(attempt, base, cap, rng=lambda: jitter)
    assert ceiling / 2 <= delay <= ceiling


def test_pull_progress_never_goes_back() -> None:
    seen: list[int] = []
    progress = PullProgress(seen.append)
    progress.layer("a", 100, 50)  # 50%
    progress.layer("b", 300, 0)  # a second layer appears: 50 of 400 bytes
    progress.layer("b", 300, 300)  # 350 of 400
    progress.layer("a", 100, 100)  # all bytes, but no success yet
    progress.finished()
    assert seen == [50, 87, 99, 100]


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b'{"error": "boom"}', "boom"),
        (b'{"message": "supervisor says no"}', "supervisor says no"),
        (b'{"error": {"message": "openai style"}}', "openai style"),
        (b"plain text", "plain text"),
        (b"", "(empty body)"),
    ],
)
def test_error_text_finds_the_backends_message(body: bytes, text: str) -> None:
    assert error_text(body) == text


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (LoadRequest(key="k", model="m", options={"num_ctx": 8192}), 8192),
        (LoadRequest(key="k", model="m", args=("--max-model-len=4096",)), 4096),
        (
            LoadRequest(key="k", model="m", args=("--dtype", "half", "--max-model-len", "2048")),
            2048,
        ),
        (LoadRequest(key="k", model="m", args=("--max-model-len", "4k")), None),
        (LoadRequest(key="k", model="m"), None),
    ],
)
def test_context_length_of_a_load_request(request_: LoadRequest, expected: int | None) -> None:
    assert request_.context_length == expected


# --- the vLLM client against a scripted supervisor ---------------------------------------------


def entry(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "key": "ns.qwen",
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "port": 8100,
        "pid": 42,
        "state": state,
        "gpuUuid": "GPU-1",
        "gpuMemoryUtilization": 0.25,
        "vramBytes": 6 * GIB,
        "sleepMode": True,
        "exitCode": None,
        "message": None,
    } | extra


METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="q"}} {running}
# TYPE vllm:request_success_total counter
vllm:request_success_total{{finished_reason="stop",model_name="q"}} {stop}
vllm:request_success_total{{finished_reason="length",model_name="q"}} 1.0
"""

VLLM_REQUEST = LoadRequest(
    key="ns.qwen",
    model="Qwen/Qwen2.5-0.5B-Instruct",
    gpu_uuid="GPU-1",
    gpu_total_bytes=24 * GIB,
    vram_bytes=6 * GIB,
    args=("--max-model-len=4096",),
    sleep_mode=True,
)


async def test_vllm_load_puts_the_model_and_polls_until_running() -> None:
    states = ["starting", "starting", "running"]

    def handler(method: str, url: str, body: Any) -> Response:
        if method == "PUT":
            return Response(202, json.dumps(entry(states.pop(0))).encode())
        return ok(entry(states.pop(0)))

    transport = ScriptedTransport(handler)
    backend = VLLMBackend("http://sup", transport=transport, retry=FAST, poll_interval=0)
    info = await backend.load(VLLM_REQUEST)
    assert (info.state, info.vram_bytes, info.key) == (ModelState.LOADED, 6 * GIB, "ns.qwen")
    method, url, body = transport.calls[0]
    assert (method, url) == ("PUT", "http://sup/models/ns.qwen")
    assert body == {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "gpuUuid": "GPU-1",
        "gpuTotalBytes": 24 * GIB,
        "vramBytes": 6 * GIB,
        "args": ["--max-model-len=4096"],
        "sleepMode": True,
    }


async def test_vllm_load_failure_reports_vllms_output() -> None:
    failed = entry("failed", exitCode=1, message="torch.OutOfMemoryError: CUDA out of memory.")
    transport = ScriptedTransport(lambda *_: Response(202, json.dumps(failed).encode()))
    backend = VLLMBackend("http://sup", transport=transport, retry=FAST)
    with pytest.raises(BackendError, match="CUDA out of memory") as caught:
        await backend.load(VLLM_REQUEST)
    assert not caught.value.retryable  # this GPU says the same again; the operator re-places
    assert len(transport.calls) == 1


async def test_vllm_refusing_its_command_line_is_not_retried() -> None:
    failed = entry("failed", exitCode=2, message="exit code 2; vllm serve: error: unrecognized")
    transport = ScriptedTransport(lambda *_: Response(202, json.dumps(failed).encode()))
    backend = VLLMBackend("http://sup", transport=transport, retry=FAST)
    with pytest.raises(BackendError, match="unrecognized") as caught:
        await backend.load(VLLM_REQUEST)
    assert not caught.value.retryable
    assert len(transport.calls) == 1


async def test_vllm_load_that_never_finishes_starting_times_out() -> None:
    transport = ScriptedTransport(lambda *_: ok(entry("starting")))
    backend = VLLMBackend(
        "http://sup", transport=transport, retry=FAST, load_timeout=0.02, poll_interval=0.005
    )
    with pytest.raises(BackendError, match="still starting"):
        await backend.load(VLLM_REQUEST)


async def test_vllm_load_needs_a_budget() -> None:
    backend = VLLMBackend("http://sup", transport=ScriptedTransport(lambda *_: ok({})))
    with pytest.raises(BackendError, match="VRAM budget"):
        await backend.load(LoadRequest(key="k", model="a/b", gpu_total_bytes=GIB))


async def test_vllm_residency_and_last_access_from_metrics() -> None:
    clock = Clock()
    metrics = {"running": 0, "stop": 3}
    listing = [entry("running"), entry("failed", key="ns.dead", message="exit code 1")]

    def handler(method: str, url: str, body: Any) -> Response:
        if url.endswith("/metrics"):
            return Response(200, METRICS.format(**metrics).encode())
        return ok({"models": listing})

    backend = VLLMBackend("http://sup", transport=ScriptedTransport(handler), clock=clock)
    running, dead = await backend.list_resident()
    assert (running.state, running.last_access) == (ModelState.LOADED, T0)
    assert (dead.state, dead.message, dead.last_access) == (ModelState.FAILED, "exit code 1", None)

    clock.advance(10)
    first, _ = await backend.list_resident()
    assert first.last_access == T0  # no request finished, none running

    clock.advance(10)
    metrics["running"] = 1
    second, _ = await backend.list_resident()
    assert second.last_access == T0 + dt.timedelta(seconds=20)

    clock.advance(10)
    metrics.update(running=0, stop=4)
    third, _ = await backend.list_resident()
    assert third.last_access == T0 + dt.timedelta(seconds=30)


async def test_vllm_unreadable_metrics_keep_the_last_access() -> None:
    clock = Clock()
    answers = {"metrics": Response(200, METRICS.format(running=0, stop=1).encode())}

    def handler(method: str, url: str, body: Any) -> Response:
        return (
            answers["metrics"] if url.endswith("/metrics") else ok({"models": [entry("running")]})
        )

    backend = VLLMBackend("http://sup", transport=ScriptedTransport(handler), clock=clock)
    await backend.list_resident()
    clock.advance(5)
    answers["metrics"] = Response(200, b"this is { not prometheus")
    (info,) = await backend.list_resident()
    assert info.last_access == T0


async def test_vllm_park_wake_unload_and_estimate_paths() -> None:
    def handler(method: str, url: str, body: Any) -> Response:
        if url.startswith("http://sup/estimate"):
            if "missing" in url:
                return Response(404, b'{"message": "not here"}')
            found = {"bytes": 5, "method": "safetensors-header", "detail": "d", "parameters": 2}
            return ok(found)
        if method == "DELETE":
            return Response(404, b'{"message": "no model"}')
        return ok(entry("sleeping"))

    transport = ScriptedTransport(handler)
    backend = VLLMBackend("http://sup", transport=transport, retry=FAST)
    assert backend.can_park
    await backend.park("ns/odd key", "m")
    await backend.wake("ns.qwen", "m")
    await backend.unload("ns.qwen", "m")  # 404: already gone
    estimate = await backend.estimate("Qwen/Qwen2.5-0.5B", context_length=2048)
    assert estimate is not None
    assert (estimate.bytes, estimate.method, estimate.parameters) == (5, "safetensors-header", 2)
    assert await backend.estimate("missing/model") is None
    urls = [url for _, url, _ in transport.calls]
    assert urls[:3] == [
        "http://sup/models/ns%2Fodd%20key/sleep?level=1",
        "http://sup/models/ns.qwen/wake_up",
        "http://sup/models/ns.qwen",
    ]
    assert urls[3] == (
        "http://sup/estimate?model=Qwen%2FQwen2.5-0.5B&contextLength=2048"
        "&maxNumBatchedTokens=8192&maxNumSeqs=1024"
    )
    # --max-model-len and the batch limits of the deployment's args reach the estimate
    await backend.estimate(
        "a/b", args=["--max-model-len", "1024", "--max-num-batched-tokens=512", "--max-num-seqs=8"]
    )
    assert transport.calls[-1][1] == (
        "http://sup/estimate?model=a%2Fb&contextLength=1024&maxNumBatchedTokens=512&maxNumSeqs=8"
    )


async def test_vllm_health_and_pull() -> None:
    transport = ScriptedTransport(lambda *_: ok({"status": "ok", "version": "0.1.0", "models": 0}))
    backend = VLLMBackend("http://sup", transport=transport)
    health = await backend.health()
    assert health.healthy
    assert health.version == "vram-operator vllm-supervisor 0.1.0"


async def test_vllm_pull_downloads_with_progress_before_returning() -> None:
    reports = [(0, "downloading"), (40, "downloading"), (40, "downloading"), (100, "done")]

    def handler(method: str, url: str, body: Any) -> Response:
        done, state = reports.pop(0)
        job = {"model": "a/b", "state": state, "completedBytes": done, "totalBytes": 100}
        job["percent"] = done if state == "done" else min(done, 99)
        return Response(202 if method == "POST" else 200, json.dumps(job).encode())

    transport = ScriptedTransport(handler)
    backend = VLLMBackend("http://sup", transport=transport, retry=FAST, poll_interval=0)
    progress: list[int] = []
    await backend.pull("a/b", progress.append)
    assert progress == [40, 100]
    assert transport.calls[0] == ("POST", "http://sup/downloads", {"model": "a/b"})
    assert transport.calls[1][1] == "http://sup/downloads?model=a%2Fb"
    assert reports == []


async def test_vllm_pull_failure_carries_the_hub_message() -> None:
    failed = {"model": "x/y", "state": "failed", "message": "RepositoryNotFoundError: 401"}
    transport = ScriptedTransport(lambda *_: Response(202, json.dumps(failed).encode()))
    backend = VLLMBackend("http://sup", transport=transport, retry=FAST)
    with pytest.raises(BackendError, match="RepositoryNotFoundError") as caught:
        await backend.pull("x/y", lambda _: None)
    assert not caught.value.retryable


def test_request_activity_sums_vllm_counters() -> None:
    assert request_activity(METRICS.format(running=2, stop=5)) == (6.0, 2.0)
    assert request_activity("") == (0.0, 0.0)


# --- the supervisor's pure parts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("vram", "total", "expected"),
    [
        (6 * GIB, 24 * GIB, 0.25),
        (1, 24 * GIB, 0.001),  # rounded up, never 0
        (24 * GIB // 3, 24 * GIB, 0.334),  # 0.3333... rounded up
        (int(0.98 * 24 * GIB), 24 * GIB, 0.98),  # the most vLLM is given
    ],
)
def test_gpu_memory_utilization(vram: int, total: int, expected: float) -> None:
    assert gpu_memory_utilization(vram, total) == expected


def test_a_budget_above_the_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        gpu_memory_utilization(25 * GIB, 24 * GIB)
    with pytest.raises(ValueError, match=r"at most 98\.0%"):
        gpu_memory_utilization(24 * GIB, 24 * GIB)
    request = StartRequest(model="a/b", gpu_total_bytes=GIB, vram_bytes=2 * GIB)
    with pytest.raises(SupervisorError, match="does not fit") as caught:
        ChildSpec.from_request(request)
    assert caught.value.status == 400


def test_supervisor_owned_flags_are_refused() -> None:
    request = StartRequest(model="a/b", gpu_total_bytes=GIB, vram_bytes=GIB // 2, args=["--port=9"])
    with pytest.raises(SupervisorError, match="--port is set by the supervisor"):
        ChildSpec.from_request(request)


def test_child_command_line_and_environment() -> None:
    manager = ProcessManager(["vllm", "serve"], range(8100, 8102), port_is_free=lambda p: True)
    spec = ChildSpec.from_request(
        StartRequest.model_validate(
            {
                "model": "Qwen/Qwen2.5-0.5B",
                "gpuUuid": "GPU-7",
                "gpuTotalBytes": 80 * GIB,
                "vramBytes": 8 * GIB,
                "args": ["--max-model-len=4096"],
                "sleepMode": True,
            }
        )
    )
    child = Child(key="ns.q", spec=spec, port=8101)
    assert manager.argv(child) == [
        "vllm",
        "serve",
        "Qwen/Qwen2.5-0.5B",
        "--max-model-len=4096",  # before the supervisor's own: argparse keeps the last value
        "--host",
        "127.0.0.1",
        "--port",
        "8101",
        "--gpu-memory-utilization",
        "0.100",
        "--enable-sleep-mode",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", "hf_secret")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "x")
        patch.setenv("HF_HOME", "/cache")
        env = manager.environment(replace(spec, device_index=1))
    assert "HF_TOKEN" not in env  # the child never sees credentials; the pull used them
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["HF_HOME"] == "/cache"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"  # vLLM 0.11 int()s every entry: never a UUID
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert spec.vram_bytes == 8 * GIB + VLLM_INSTANCE_OVERHEAD_BYTES


def _gpu(index: int, uuid: str, parent: str | None = None) -> GPU:
    return GPU(
        index=index,
        uuid=uuid,
        name="g",
        total_bytes=GIB,
        used_bytes=0,
        free_bytes=GIB,
        parent_uuid=parent,
    )


def test_visible_index_maps_a_uuid_to_the_containers_index_or_refuses() -> None:
    reading = GPUReading(
        gpus=[_gpu(0, "GPU-a"), _gpu(1, "GPU-b"), _gpu(2, "MIG-c", parent="GPU-z")],
        processes={},
        source="nvml",
    )
    assert visible_index(reading, "GPU-b") == 1
    with pytest.raises(SupervisorError, match="GPU-x is not visible in the vLLM container") as e:
        visible_index(reading, "GPU-x")
    assert e.value.status == 400
    assert "0: GPU-a, 1: GPU-b" in e.value.message
    with pytest.raises(SupervisorError, match="MIG instance"):
        visible_index(reading, "MIG-c")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8100-8199", range(8100, 8200)), ("9000", range(9000, 9001))],
)
def test_port_ranges(text: str, expected: range) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["8199-8100", "a-b", "0-10", "1-70000"])
def test_bad_port_ranges(text: str) -> None:
    with pytest.raises(ValueError, match="port range"):
        parse_port_range(text)


def test_local_model_path_finds_paths_and_the_hugging_face_cache(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "def").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc\n")
    hub = tmp_path / "hub"
    assert local_model_path("Qwen/Qwen2.5-0.5B", hub) == repo / "snapshots" / "abc"
    assert local_model_path("Other/Model", hub) is None
    assert local_model_path(str(tmp_path)) == tmp_path
    assert local_model_path(str(tmp_path / "absent")) is None


@pytest.fixture
async def supervisor_url() -> AsyncIterator[str]:
    """The supervisor's HTTP API in process, over a manager that is never asked to spawn."""
    manager = ProcessManager(["vllm", "serve"], range(8100, 8101))
    server = TestServer(build_app(manager), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("GET", "/models/ns.a", None, 404, "no model ns.a"),
        ("DELETE", "/models/ns.a", None, 404, "no model ns.a"),
        ("POST", "/models/ns.a/sleep?level=1", None, 404, "no model ns.a"),
        ("POST", "/models/ns.a/wake_up", None, 404, "no model ns.a"),
        ("GET", "/models/ns.a/metrics", None, 404, "no model ns.a"),
        ("POST", "/models/ns.a/sleep?level=3", None, 400, "sleep level must be 1 or 2"),
        ("PUT", "/models/ns.a", [], 400, "Input should be a valid dictionary"),
        ("PUT", "/models/ns.a", {"model": "a/b", "gpuTotalBytes": 1}, 400, "vramBytes: Field"),
        ("PUT", "/models/ns.a", {"model": "a/b", "vramBytes": 2, "gpuTotalBytes": 1}, 400, "fit"),
        ("GET", "/estimate", None, 400, "model is required"),
        ("GET", "/estimate?model=a/b&contextLength=x", None, 400, "positive integer"),
        ("GET", "/estimate?model=/no/such/path", None, 404, "not in this container"),
        ("GET", "/estimate?model=a/b&maxNumSeqs=0", None, 400, "positive integer"),
        (
            "PUT",
            "/models/ns.a",
            {"model": "a/b", "gpuUuid": "GPU-x", "vramBytes": 1, "gpuTotalBytes": 10},
            400,
            "GPU-x is not visible in the vLLM container",
        ),
        ("POST", "/downloads", {}, 400, "model: a non-empty string"),
        ("GET", "/downloads?model=a/b", None, 404, "no download"),
    ],
)
async def test_supervisor_refuses_bad_requests_with_a_message(
    supervisor_url: str, method: str, path: str, body: Any, status: int, message: str
) -> None:
    transport = AiohttpTransport()
    try:
        response = await transport.request(method, supervisor_url + path, json=body)
    finally:
        await transport.aclose()
    assert response.status == status
    assert message in json.loads(response.body)["message"]


async def test_supervisor_health_and_empty_listing(supervisor_url: str) -> None:
    backend = VLLMBackend(supervisor_url, retry=FAST)
    try:
        health = await backend.health()
        listed = await backend.list_resident()
    finally:
        await backend.aclose()
    assert health.healthy
    assert listed == []


def test_both_clients_implement_the_backend_protocol() -> None:
    clients: list[ModelBackend] = [OllamaBackend(), VLLMBackend()]
    assert [(c.kind, c.can_park) for c in clients] == [
        (Backend.OLLAMA, False),
        (Backend.VLLM, True),
    ]
