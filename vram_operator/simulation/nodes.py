"""Simulated GPU nodes as real processes: a fake Ollama, the real vLLM supervisor running the
fake vLLM, optionally the real diffusion server with fake pipelines (`diffusion=True`), and the
real agent, all on loopback and sharing one simulated GPU state file.

The integration tests and the demo both start nodes this way, so what the demo shows is
what the tests check.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from .gpu import SimulatedGPUs

GiB = 2**30
BACKEND_NICENESS = 10
"""The backends of a simulated node (fake Ollama, the vLLM supervisor and its fake vLLM
servers, the diffusion server) run at this niceness. Every process of a simulated node stays
in the starting process's session (its own process group, to be signalled): Linux's
autogroup scheduler shares the CPU equally between sessions, so one session per process gave
each of ~100 fake vLLM start-ups (~0.7 CPU s each) as much CPU as the API server, which
starved it and stalled heartbeats past their grace. Together in one session they stand for
other machines' work: the control plane (API server, etcd, the operator, each a session of
its own) keeps its share, and within the session the agents, whose heartbeats the operator
judges nodes by, go before the backends."""
_LISTENING = re.compile(r"listening on (http://[0-9.]+:[0-9]+)")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """A child process with its output in a log file, stopped by pid."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None,
        niceness: int = 0,
        own_session: bool = True,
    ) -> None:
        """`own_session`: a session of its own (a scheduling autogroup, and no terminal's
        Ctrl-C); else only a process group of its own in the caller's session."""
        self.name = name
        self.argv = list(argv)
        self.niceness = niceness
        self.own_session = own_session
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        # nice(1) execs the program: the pid stays the program's. Children inherit it.
        nice = ["nice", "-n", str(self.niceness)] if self.niceness else []
        self.proc = subprocess.Popen(
            [*nice, *self.argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=self.own_session,
            process_group=None if self.own_session else 0,
        )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 20) -> re.Match[str]:
        """Wait until the log holds a line matching pattern; fail with the log tail if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = pattern.search(text)
            if match:
                return match
            if not self.alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


class SimulatedNode:
    """One GPU node: simulated GPUs, fake backends and a real agent process."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        kubeconfig: str,
        gpu_sizes: Sequence[int] = (24 * GiB,),
        agent_args: Sequence[str] = (),
        ollama_args: Sequence[str] = (),
        vllm: bool = True,
        vllm_ports: str = "8100-8199",
        env: Mapping[str, str] | None = None,
        diffusion: bool = False,
    ) -> None:
        """`env` is added to every process's environment (`PYTHONPATH` set to another
        checkout runs that checkout's code)."""
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = kubeconfig
        self.gpu_sizes = list(gpu_sizes)
        self.agent_args = list(agent_args)
        self.ollama_args = list(ollama_args)
        self.vllm = vllm
        self.vllm_ports = vllm_ports
        self.diffusion = diffusion
        self.diffusion_url = ""
        self.diffusion_serve_url = ""
        self.gpu_state = self.dir / "gpus.json"
        self.env = {
            **os.environ,
            "VRAM_SIM_GPU_STATE": str(self.gpu_state),
            # The node's own Hugging Face cache, where the fake downloads put model files.
            "HF_HOME": str(self.dir / "huggingface"),
            **(env or {}),
        }
        self.ollama_url = f"http://127.0.0.1:{free_port()}"
        self.supervisor_url = ""
        self.metrics_port = free_port()
        self.ollama: ManagedProcess | None = None
        self.supervisor: ManagedProcess | None = None
        self.diffusion_server: ManagedProcess | None = None
        self.agent: ManagedProcess | None = None

    @property
    def gpus(self) -> SimulatedGPUs:
        return SimulatedGPUs(self.gpu_state)

    def start(self) -> SimulatedNode:
        SimulatedGPUs.create(
            self.gpu_state, node=self.name, count=len(self.gpu_sizes), sizes=self.gpu_sizes
        )
        self.start_ollama()
        if self.vllm:
            port = free_port()
            self.supervisor = ManagedProcess(
                f"{self.name}/vllm-supervisor",
                self.supervisor_argv(port),
                self.dir / "vllm-supervisor.log",
                self.env,
                BACKEND_NICENESS,
                own_session=False,
            )
            self.supervisor.start()
            self.supervisor_url = f"http://127.0.0.1:{port}"
        if self.diffusion:
            self.start_diffusion()
        self.start_agent()
        return self

    def supervisor_argv(self, port: int) -> list[str]:
        """The vLLM supervisor's command line: the real supervisor running the fake vLLM."""
        fake_vllm = f"{shlex.quote(sys.executable)} -m vram_operator.simulation.fake_vllm"
        return [
            sys.executable,
            "-m",
            "vram_operator",
            "vllm-supervisor",
            "--port",
            str(port),
            "--vllm-command",
            f"{fake_vllm} serve",
            "--port-range",
            self.vllm_ports,
            "--simulate-gpus",
            str(self.gpu_state),
            "--download-command",
            f"{shlex.quote(sys.executable)} -m vram_operator.simulation.fake_hf_download",
            "--serve-port",
            str(free_port()),
        ]

    def start_diffusion(self) -> None:
        """The real diffusion server with fake pipelines on this node's simulated GPUs."""
        port, serve_port = free_port(), free_port()
        self.diffusion_server = ManagedProcess(
            f"{self.name}/diffusion-server",
            [
                sys.executable,
                "-m",
                "vram_operator",
                "diffusion-server",
                "--simulate",
                str(self.gpu_state),
                "--port",
                str(port),
                "--serve-host",
                "127.0.0.1",
                "--serve-port",
                str(serve_port),
                "--advertise-host",
                "127.0.0.1",
                "--default-steps",
                "4",
            ],
            self.dir / "diffusion-server.log",
            self.env,
            BACKEND_NICENESS,
            own_session=False,
        )
        self.diffusion_server.start()
        self.diffusion_server.wait_for_line(_LISTENING)
        self.diffusion_url = f"http://127.0.0.1:{port}"
        self.diffusion_serve_url = f"http://127.0.0.1:{serve_port}"

    def start_ollama(self) -> None:
        """Start (or restart) the fake Ollama on this node's fixed port."""
        if self.ollama is not None:
            self.ollama.stop()  # reaps a crashed one and closes its log
        self.ollama = ManagedProcess(
            f"{self.name}/ollama",
            [
                sys.executable,
                "-m",
                "vram_operator.simulation.fake_ollama",
                "--port",
                self.ollama_url.rsplit(":", 1)[1],
                "--gpu-state",
                str(self.gpu_state),
                *self.ollama_args,
            ],
            self.dir / "ollama.log",
            self.env,
            BACKEND_NICENESS,
            own_session=False,
        )
        self.ollama.start()
        self.ollama.wait_for_line(_LISTENING)

    def start_agent(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "vram_operator",
            "agent",
            "--node",
            self.name,
            "--kubeconfig",
            self.kubeconfig,
            "--simulate-gpus",
            str(self.gpu_state),
            "--ollama-url",
            self.ollama_url,
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-host",
            "127.0.0.1",
            *(["--vllm-supervisor-url", self.supervisor_url] if self.supervisor_url else []),
            *(["--diffusion-server-url", self.diffusion_url] if self.diffusion_url else []),
            *self.agent_args,
        ]
        self.agent = ManagedProcess(
            f"{self.name}/agent", argv, self.dir / "agent.log", self.env, own_session=False
        )
        self.agent.start()

    def processes(self) -> list[ManagedProcess]:
        processes = (self.agent, self.supervisor, self.diffusion_server, self.ollama)
        return [p for p in processes if p is not None]

    def stop(self) -> None:
        for process in self.processes():
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.processes())
