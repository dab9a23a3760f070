"""The vLLM supervisor as a real process, running fake `vllm serve` children on a simulated GPU,
driven by the agent's VLLMBackend over HTTP. No Kubernetes involved."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from vram_operator.api import ModelState
from vram_operator.node_agent.backends import (
    AiohttpTransport,
    BackendError,
    LoadRequest,
    RetryPolicy,
    VLLMBackend,
)
from vram_operator.simulation.fake_vllm import INSTANCE_OVERHEAD_BYTES, SLEEP_RESIDUAL
from vram_operator.simulation.gpu import GIB, SimulatedGPUs

pytestmark = pytest.mark.integration

TOTAL = 24 * GIB
FAKE_VLLM = shlex.join([sys.executable, "-m", "vram_operator.simulation.fake_vllm", "serve"])
FAKE_DOWNLOAD = shlex.join([sys.executable, "-m", "vram_operator.simulation.fake_hf_download"])
START_TIMEOUT = 30.0


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting for a reaper that is not us."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return False


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@dataclass
class Supervisor:
    """A running `vllm-supervisor` process and the simulated GPU it serves."""

    process: subprocess.Popen[bytes]
    url: str
    gpus: SimulatedGPUs
    log: Path
    child_pids: set[int] = field(default_factory=set)
    gpu: int = 0
    """The GPU `request` places models on."""

    @property
    def uuid(self) -> str:
        return self.gpus.devices()[self.gpu].uuid

    def held(self) -> dict[str, int]:
        return dict(self.gpus.devices()[self.gpu].allocations)

    def backend(self, load_timeout: float = START_TIMEOUT) -> VLLMBackend:
        return VLLMBackend(
            self.url,
            retry=RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1),
            load_timeout=load_timeout,
            poll_interval=0.1,
        )

    def request(self, key: str, vram: int, sleep_mode: bool = True) -> LoadRequest:
        return LoadRequest(
            key=key,
            model="Qwen/Qwen2.5-0.5B-Instruct",
            gpu_uuid=self.uuid,
            gpu_total_bytes=TOTAL,
            vram_bytes=vram,
            args=("--max-model-len=4096",),
            sleep_mode=sleep_mode,
        )

    async def entries(self) -> dict[str, dict[str, Any]]:
        """GET /models, remembering every pid seen so teardown can make sure they are gone."""
        transport = AiohttpTransport()
        try:
            response = await transport.request("GET", f"{self.url}/models")
        finally:
            await transport.aclose()
        models = json.loads(response.body)["models"]
        self.child_pids.update(int(m["pid"]) for m in models if m["pid"])
        return {str(m["key"]): m for m in models}


StartSupervisor = Callable[..., Supervisor]


@pytest.fixture
def start_supervisor(tmp_path: Path) -> Iterator[StartSupervisor]:
    """Start supervisors (each with its own simulated GPU); all are stopped, and any child
    they left is killed, at teardown -- also when the test failed."""
    started: list[tuple[Supervisor, contextlib.ExitStack]] = []

    def start(
        startup_timeout: float = START_TIMEOUT,
        vllm_command: str = FAKE_VLLM,
        gpu_count: int = 1,
        extra: tuple[str, ...] = (),
        **env: str,
    ) -> Supervisor:
        index = len(started)
        state = tmp_path / f"gpus-{index}.json"
        gpus = SimulatedGPUs.create(state, node=f"node-{index}", count=gpu_count, total_bytes=TOTAL)
        base = random.randrange(20000, 29000, 100)
        stack = contextlib.ExitStack()
        log = tmp_path / f"supervisor-{index}.log"
        process = stack.enter_context(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vram_operator.node_agent.vllm_supervisor",
                    "--port",
                    "0",
                    "--vllm-command",
                    vllm_command,
                    "--port-range",
                    f"{base}-{base + 99}",
                    "--startup-timeout",
                    str(startup_timeout),
                    "--stop-timeout",
                    "1",
                    "--simulate-gpus",
                    str(state),
                    "--serve-port",
                    "0",
                    "--download-command",
                    FAKE_DOWNLOAD,
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=stack.enter_context(log.open("wb")),
                env={
                    **os.environ,
                    "VRAM_SIM_GPU_STATE": str(state),
                    "HF_HOME": str(tmp_path / f"hf-{index}"),
                    **env,
                },
            )
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 20)
        line = process.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            process.kill()
            stack.close()
            pytest.fail(f"supervisor did not start: {line!r}\n{log.read_text()}")
        supervisor = Supervisor(process, line.split()[-1], gpus, log)
        started.append((supervisor, stack))
        return supervisor

    try:
        yield start
    finally:
        for supervisor, stack in started:
            process = supervisor.process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for pid in supervisor.child_pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            stack.close()


async def test_a_model_runs_with_its_budget_and_parks_in_host_ram(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        info = await backend.load(supervisor.request("ns.qwen", 6 * GIB))
        assert info.state is ModelState.LOADED
        (entry,) = (await supervisor.entries()).values()
        pid, port = int(entry["pid"]), entry["port"]
        assert entry["gpuMemoryUtilization"] == 0.25
        budget = int(0.25 * TOTAL)
        full = budget + INSTANCE_OVERHEAD_BYTES
        assert supervisor.held() == {f"pid:{pid}:vllm:{port}": full}
        assert info.vram_bytes == full

        again = await backend.load(supervisor.request("ns.qwen", 6 * GIB))  # idempotent
        assert again.state is ModelState.LOADED
        assert int((await supervisor.entries())["ns.qwen"]["pid"]) == pid

        await backend.park("ns.qwen", "Qwen/Qwen2.5-0.5B-Instruct")
        residual = INSTANCE_OVERHEAD_BYTES + math.ceil(budget * SLEEP_RESIDUAL)
        assert sum(supervisor.held().values()) == residual
        (parked,) = await backend.list_resident()
        assert parked.state is ModelState.SLEEPING

        await backend.wake("ns.qwen", "Qwen/Qwen2.5-0.5B-Instruct")
        assert sum(supervisor.held().values()) == full
        (woken,) = await backend.list_resident()
        assert woken.state is ModelState.LOADED
        assert woken.last_access is not None

        await backend.unload("ns.qwen", "Qwen/Qwen2.5-0.5B-Instruct")
        assert supervisor.held() == {}
        assert not alive(pid)
        assert await backend.list_resident() == []
    finally:
        await backend.aclose()


async def test_a_child_out_of_memory_fails_with_the_cuda_message_and_stays_down(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor()
    supervisor.gpus.pressure(supervisor.uuid, 20 * GIB, label="other-tenant")
    backend = supervisor.backend()
    try:
        with pytest.raises(BackendError, match="CUDA out of memory") as caught:
            await backend.load(supervisor.request("ns.big", 8 * GIB))
        assert not caught.value.retryable
        entry = (await supervisor.entries())["ns.big"]
        assert (entry["state"], entry["exitCode"]) == ("failed", 1)
        pid = int(entry["pid"])
        assert not alive(pid)
        await asyncio.sleep(1.0)  # long enough for a restart loop to show itself
        after = (await supervisor.entries())["ns.big"]
        assert (after["state"], after["pid"]) == ("failed", pid)
        (failed,) = await backend.list_resident()
        assert failed.state is ModelState.FAILED
        assert failed.message is not None
        assert "torch.OutOfMemoryError" in failed.message
        assert supervisor.held() == {"external:other-tenant": 20 * GIB}
    finally:
        await backend.aclose()


async def test_a_child_that_dies_is_reported_not_restarted(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        await backend.load(supervisor.request("ns.q", 2 * GIB, sleep_mode=False))
        pid = int((await supervisor.entries())["ns.q"]["pid"])
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not alive(pid))

        entry = (await supervisor.entries())["ns.q"]
        deadline = time.monotonic() + 10
        while entry["state"] != "failed" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            entry = (await supervisor.entries())["ns.q"]
        assert entry["state"] == "failed"
        assert "killed by SIGKILL" in str(entry["message"])
        assert entry["pid"] == pid
        with pytest.raises(BackendError, match=r"ns\.q is failed, not serving"):
            await backend.park("ns.q", "Qwen/Qwen2.5-0.5B-Instruct")
    finally:
        await backend.aclose()


async def test_a_child_that_never_gets_healthy_is_killed_as_failed(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor(startup_timeout=1.0, VRAM_SIM_VLLM_STARTUP_SECONDS="30")
    backend = supervisor.backend()
    try:
        with pytest.raises(BackendError, match=r"no healthy answer on /health within 1s"):
            await backend.load(supervisor.request("ns.slow", 2 * GIB))
        pid = int((await supervisor.entries())["ns.slow"]["pid"])
        assert not alive(pid)
        assert supervisor.held() == {}
    finally:
        await backend.aclose()


async def test_bad_requests_are_refused_with_a_message(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        with pytest.raises(BackendError, match="does not fit") as too_big:
            await backend.load(supervisor.request("ns.huge", TOTAL + 1))
        assert too_big.value.status == 400
        await backend.load(supervisor.request("ns.a", 2 * GIB, sleep_mode=False))
        with pytest.raises(BackendError, match="started without sleep mode"):
            await backend.park("ns.a", "Qwen/Qwen2.5-0.5B-Instruct")
        other = LoadRequest(
            key="ns.a", model="Other/Model", gpu_total_bytes=TOTAL, vram_bytes=2 * GIB
        )
        with pytest.raises(BackendError, match="DELETE it before") as conflict:
            await backend.load(other)
        assert conflict.value.status == 409
    finally:
        await backend.aclose()


async def test_estimate_reads_model_headers_in_the_sidecar(
    start_supervisor: StartSupervisor, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [64, 64], "data_offsets": [0, 8192]}})
    raw = header.encode()
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8192)
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        estimate = await backend.estimate(str(model_dir))
        assert estimate is not None
        assert (estimate.method, estimate.parameters) == ("safetensors-header", 4096)
        assert await backend.estimate("Nobody/Has-This-Model") is None
    finally:
        await backend.aclose()


async def test_sigterm_stops_and_reaps_every_child(start_supervisor: StartSupervisor) -> None:
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        await backend.load(supervisor.request("ns.a", 4 * GIB))
        await backend.load(supervisor.request("ns.b", 4 * GIB, sleep_mode=False))
        await backend.park("ns.a", "Qwen/Qwen2.5-0.5B-Instruct")
    finally:
        await backend.aclose()
    pids = [int(e["pid"]) for e in (await supervisor.entries()).values()]
    assert len(pids) == 2
    assert all(alive(pid) for pid in pids)

    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.process.wait(timeout=20) == 0
    assert [pid for pid in pids if alive(pid)] == []
    assert supervisor.held() == {}
    assert "stopping 2 model server(s)" in supervisor.log.read_text()


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("engine", engine.pid, flush=True)
time.sleep(60)
"""


async def test_a_child_ignoring_sigterm_is_killed_with_its_process_group(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor(vllm_command=shlex.join([sys.executable, "-c", STUBBORN]))
    backend = supervisor.backend(load_timeout=0.5)
    try:
        with pytest.raises(BackendError, match="still starting"):
            await backend.load(supervisor.request("ns.stubborn", GIB))
        pid = int((await supervisor.entries())["ns.stubborn"]["pid"])
        assert wait_until(lambda: "[ns.stubborn] engine" in supervisor.log.read_text())
        line = next(
            line
            for line in supervisor.log.read_text().splitlines()
            if line.startswith("[ns.stubborn] engine")
        )
        engine = int(line.split()[-1])
        assert alive(pid)
        assert alive(engine)

        await backend.unload("ns.stubborn", "Qwen/Qwen2.5-0.5B-Instruct")  # SIGTERM, then SIGKILL
        assert not alive(pid)
        assert wait_until(lambda: not alive(engine))
        assert "ignored SIGTERM" in supervisor.log.read_text()
    finally:
        await backend.aclose()


async def test_a_command_that_cannot_start_fails_with_the_reason(
    start_supervisor: StartSupervisor, tmp_path: Path
) -> None:
    supervisor = start_supervisor(vllm_command=f"{tmp_path}/no-vllm-here serve")
    backend = supervisor.backend()
    try:
        with pytest.raises(BackendError, match=r"cannot start .*No such file") as caught:
            await backend.load(supervisor.request("ns.none", GIB))
        assert not caught.value.retryable
        entry = (await supervisor.entries())["ns.none"]
        assert (entry["state"], entry["pid"]) == ("failed", None)
    finally:
        await backend.aclose()


# --- issue 8: device index, endpoint, visibility, drain, measurement, pull, flags -------------


def outward_address() -> str | None:
    """This machine's non-loopback address, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


async def chat(endpoint: str, content: str = "hi") -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{endpoint}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}]},
        ) as answer,
    ):
        return answer.status, await answer.json(content_type=None)


async def test_a_model_on_the_second_gpu_gets_an_integer_index_and_answers_at_its_endpoint(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor(gpu_count=2)
    supervisor.gpu = 1
    backend = supervisor.backend()
    try:
        info = await backend.load(supervisor.request("ns.second", 4 * GIB, sleep_mode=False))
        assert info.state is ModelState.LOADED
        entry = (await supervisor.entries())["ns.second"]
        assert entry["deviceIndex"] == 1  # what vLLM 0.11 can parse, never the UUID
        assert supervisor.gpus.devices()[0].allocations == {}
        assert list(supervisor.held()) == [f"pid:{entry['pid']}:vllm:{entry['port']}"]
        assert info.endpoint == entry["endpoint"]
        assert info.endpoint is not None
        host = info.endpoint.split("//", 1)[1].rsplit(":", 1)[0]
        outward = outward_address()
        if outward is not None:  # else the machine has only loopback: the endpoint is there
            assert host == outward, "the endpoint must be reachable from outside the pod"
        status, body = await chat(info.endpoint)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].startswith("This is a simulated reply")
    finally:
        await backend.aclose()


async def test_a_gpu_the_container_does_not_see_is_refused(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        request = supervisor.request("ns.elsewhere", GIB)
        request = LoadRequest(**{**request.__dict__, "gpu_uuid": "GPU-not-in-this-container"})
        with pytest.raises(BackendError, match="not visible in the vLLM container") as caught:
            await backend.load(request)
        assert caught.value.status == 400
        assert await supervisor.entries() == {}
    finally:
        await backend.aclose()


async def test_sleep_drains_requests_first_and_a_sleeping_model_gets_none(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor(VRAM_SIM_VLLM_REQUEST_SECONDS="1.5")
    backend = supervisor.backend()
    try:
        info = await backend.load(supervisor.request("ns.busy", 2 * GIB))
        assert info.endpoint is not None
        pid = int((await supervisor.entries())["ns.busy"]["pid"])
        running = asyncio.create_task(chat(info.endpoint))
        await asyncio.sleep(0.4)  # the request is in the engine now
        await backend.park("ns.busy", "Qwen/Qwen2.5-0.5B-Instruct")
        status, _ = await running
        assert status == 200, "the in-flight request finished before the engine slept"
        assert running.done()
        entry = (await supervisor.entries())["ns.busy"]
        assert entry["state"] == "sleeping"

        status, body = await chat(info.endpoint)  # would kill vLLM 0.11; the proxy holds it
        assert status == 503
        assert "sleeping" in body["error"]["message"]
        assert alive(pid)

        await backend.wake("ns.busy", "Qwen/Qwen2.5-0.5B-Instruct")
        assert (await chat(info.endpoint))[0] == 200
        assert "EngineDeadError" not in supervisor.log.read_text()
    finally:
        await backend.aclose()


async def test_reported_vram_is_what_the_process_holds(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        await backend.load(supervisor.request("ns.m", 2 * GIB, sleep_mode=False))
        entry = (await supervisor.entries())["ns.m"]
        owner = f"pid:{entry['pid']}:vllm:{entry['port']}"
        assert entry["vramSource"] == "measured"
        supervisor.gpus.set_allocation(supervisor.uuid, owner, 3 * GIB)  # it grew
        (info,) = await backend.list_resident()
        assert info.vram_bytes == 3 * GIB
        assert (await supervisor.entries())["ns.m"]["footprintBytes"] != 3 * GIB
    finally:
        await backend.aclose()


async def test_pull_downloads_with_progress_and_then_the_estimate_reads_the_files(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor(VRAM_SIM_VLLM_DOWNLOAD_SECONDS="1")
    backend = supervisor.backend()
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    try:
        assert await backend.estimate(model) is None  # nothing here before the pull
        progress: list[int] = []
        await backend.pull(model, progress.append)
        assert progress[-1] == 100
        assert progress == sorted(progress)
        assert len(progress) >= 2, "progress was reported while downloading"
        long = await backend.estimate(model)
        short = await backend.estimate(model, args=["--max-model-len=1024"])
        assert long is not None
        assert short is not None
        assert short.bytes < long.bytes  # --max-model-len reaches the KV cache
        assert "activation peak" in long.detail
        with pytest.raises(BackendError, match="RepositoryNotFoundError") as caught:
            await backend.pull("missing/model", lambda _: None)
        assert not caught.value.retryable
    finally:
        await backend.aclose()


async def test_an_unknown_vllm_flag_fails_the_start_with_argparses_message(
    start_supervisor: StartSupervisor,
) -> None:
    supervisor = start_supervisor()
    backend = supervisor.backend()
    try:
        request = supervisor.request("ns.flag", GIB)
        request = LoadRequest(**{**request.__dict__, "args": ("--no-such-vllm-flag",)})
        with pytest.raises(BackendError, match="unrecognized arguments: --no-such-vllm-flag"):
            await backend.load(request)
        assert (await supervisor.entries())["ns.flag"]["exitCode"] == 2
    finally:
        await backend.aclose()
