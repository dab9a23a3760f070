"""Simulated GPUs of one node, shared between processes through a JSON state file.

The agent, the fake Ollama and every fake vLLM on a simulated node open the same file, so VRAM
one of them allocates is what the others, and the agent's GPU source, see as used. Every
read-modify-write holds an exclusive `flock` on a lock file beside the state file, and the state
file is replaced atomically, so a reader never sees half a write and a process killed mid-write
leaves the previous state.

Memory is held by *owners*, free-form names. Two conventions:
- `pid:<n>:...` names the process holding the memory; the GPU source reports it as that pid
  (other owners as pid 0), as NVML lists compute processes.
- `external:...` is memory held by processes the agent does not manage (see `pressure`).

The state file alone, with nothing of the API models: every fake vLLM imports this module when
it starts, once per model, and the API models would cost each start about 0.4 s of CPU; the
agent's GPU source over it is `gpu_source`, and the command line imports the byte quantities
when it runs.

Unlike a real GPU, nothing frees an owner's memory when its process dies: a backend that was
killed leaves its allocations behind until someone calls `release`. The fake servers release
their own stale allocations when they start, which is what a real GPU does for a dead process.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

GIB = 2**30
DEFAULT_TOTAL_BYTES = 80 * GIB
DEFAULT_NAME = "Simulated H100 80GB"
DEFAULT_TEMPERATURE = 40
SOURCE_NAME = "simulated"
EXTERNAL_PREFIX = "external:"

_PID_OWNER = re.compile(r"^pid:(\d+)(?::|$)")
_T = TypeVar("_T")
State = dict[str, Any]


class SimulatedOutOfMemory(Exception):
    """An allocation that does not fit, worded as CUDA words it so log matchers treat it alike."""

    def __init__(self, device: SimulatedDevice, requested_bytes: int) -> None:
        self.uuid = device.uuid
        self.requested_bytes = requested_bytes
        self.free_bytes = device.free_bytes
        self.total_bytes = device.total_bytes
        super().__init__(
            f"CUDA out of memory. Tried to allocate {requested_bytes / GIB:.2f} GiB; "
            f"GPU {device.index} ({device.uuid}) has a total capacity of "
            f"{device.total_bytes / GIB:.2f} GiB of which {device.free_bytes / GIB:.2f} GiB free"
        )


class UnknownGPU(LookupError):
    """A GPU reference (UUID or index) that the state file does not hold."""


@dataclass(frozen=True)
class SimulatedDevice:
    """One simulated GPU and who holds its memory."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    temperature_celsius: int
    allocations: dict[str, int]
    """Bytes held, by owner."""

    @property
    def used_bytes(self) -> int:
        return sum(self.allocations.values())

    @property
    def free_bytes(self) -> int:
        return max(self.total_bytes - self.used_bytes, 0)


def simulated_uuid(node: str, index: int) -> str:
    """A stable UUID for a node's GPU, spelled as NVML spells one (GPU-xxxxxxxx-xxxx-...).

    Stable so that a re-created state file, or the same demo run twice, keeps GPU identities.
    """
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'vram-operator-simulated-gpu/{node}/{index}')}"


def pid_of(owner: str) -> int:
    """The pid an owner name carries (`pid:<n>:...`), else 0."""
    match = _PID_OWNER.match(owner)
    return int(match.group(1)) if match else 0


class SimulatedGPUs:
    """The simulated GPUs of one node, as stored in the state file at `path`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        node: str,
        count: int | None = None,
        total_bytes: int = DEFAULT_TOTAL_BYTES,
        name: str = DEFAULT_NAME,
        temperature: int = DEFAULT_TEMPERATURE,
        sizes: Sequence[int] | None = None,
    ) -> SimulatedGPUs:
        """Write a state file of empty GPUs, replacing any previous one.

        Either `count` GPUs of `total_bytes` each (one by default), or one GPU per entry of
        `sizes`, for a node whose GPUs differ; `count`, if also given, must agree.
        """
        if sizes is None:
            sizes = [total_bytes] * (1 if count is None else count)
        elif count is not None and count != len(sizes):
            raise ValueError(f"count={count} disagrees with {len(sizes)} sizes")
        if not sizes:
            raise ValueError("a simulated node needs at least one GPU")
        if any(size <= 0 for size in sizes):
            raise ValueError(f"GPU memory must be positive, got {list(sizes)}")
        gpus = cls(path)
        state: State = {
            "node": node,
            "gpus": [
                {
                    "index": index,
                    "uuid": simulated_uuid(node, index),
                    "name": name,
                    "total_bytes": size,
                    "temperature_celsius": temperature,
                    "allocations": {},
                }
                for index, size in enumerate(sizes)
            ],
        }
        with gpus._locked(fcntl.LOCK_EX):
            gpus._write(state)
        return gpus

    def devices(self) -> list[SimulatedDevice]:
        """Every GPU, by index."""
        with self._locked(fcntl.LOCK_SH):
            return _devices(self._read())

    def device(self, ref: str | int) -> SimulatedDevice:
        """The GPU a UUID or index names (CUDA_VISIBLE_DEVICES and Ollama's main_gpu use both)."""
        return _find(self.devices(), ref, self.path)

    def allocations(self) -> dict[str, dict[str, int]]:
        """Bytes held by owner, by GPU UUID."""
        return {device.uuid: dict(device.allocations) for device in self.devices()}

    def allocate(self, ref: str | int, owner: str, nbytes: int) -> None:
        """Add `nbytes` to what `owner` holds on a GPU; SimulatedOutOfMemory if they do not fit."""
        _check_size(nbytes)

        def change(state: State) -> None:
            device, entry = _entry(state, ref, self.path)
            if nbytes > device.free_bytes:
                raise SimulatedOutOfMemory(device, nbytes)
            entry["allocations"][owner] = entry["allocations"].get(owner, 0) + nbytes

        self._update(change)

    def set_allocation(self, ref: str | int, owner: str, nbytes: int) -> None:
        """Resize what `owner` holds on a GPU (0 frees it); growth must fit in free memory."""
        _check_size(nbytes)

        def change(state: State) -> None:
            device, entry = _entry(state, ref, self.path)
            held = device.allocations.get(owner, 0)
            if nbytes - held > device.free_bytes:
                raise SimulatedOutOfMemory(device, nbytes - held)
            if nbytes:
                entry["allocations"][owner] = nbytes
            else:
                entry["allocations"].pop(owner, None)

        self._update(change)

    def release(self, owner: str) -> int:
        """Free everything an owner holds on every GPU; returns the bytes freed.

        `owner` may be a shell-style pattern (`pid:*:vllm:8001`), so a restarted server can
        free what an earlier process of its kind left behind without knowing that pid.
        """

        def change(state: State) -> int:
            freed = 0
            for entry in state["gpus"]:
                held: dict[str, int] = entry["allocations"]
                for name in [n for n in held if fnmatch.fnmatchcase(n, owner)]:
                    freed += held.pop(name)
            return freed

        return self._update(change)

    def pressure(self, ref: str | int, nbytes: int, label: str = "pressure") -> None:
        """Hold `nbytes` as a process the agent does not manage would (owner `external:<label>`).

        Setting, not adding: calling it again moves the pressure to the new figure; 0 lifts it.
        """
        self.set_allocation(ref, EXTERNAL_PREFIX + label, nbytes)

    @contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def _update(self, change: Callable[[State], _T]) -> _T:
        with self._locked(fcntl.LOCK_EX):
            state = self._read()
            result = change(state)
            self._write(state)
            return result

    def _read(self) -> State:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no simulated GPU state at {self.path}; create one with "
                f"`python -m vram_operator.simulation.gpu create --node NODE {self.path}`"
            ) from None
        try:
            state: State = json.loads(text)
            _devices(state)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{self.path} is not a simulated GPU state file: {err!r}") from err
        return state

    def _write(self, state: State) -> None:
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w") as handle:
                json.dump(state, handle, indent=2, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _check_size(nbytes: int) -> None:
    if nbytes < 0:
        raise ValueError(f"an allocation cannot be negative, got {nbytes}")


def _devices(state: Any) -> list[SimulatedDevice]:
    return [
        SimulatedDevice(
            index=int(entry["index"]),
            uuid=str(entry["uuid"]),
            name=str(entry["name"]),
            total_bytes=int(entry["total_bytes"]),
            temperature_celsius=int(entry["temperature_celsius"]),
            allocations={str(k): int(v) for k, v in entry["allocations"].items()},
        )
        for entry in state["gpus"]
    ]


def _find(devices: list[SimulatedDevice], ref: str | int, path: Path) -> SimulatedDevice:
    for device in devices:
        if device.uuid == ref or str(device.index) == str(ref).strip():
            return device
    known = ", ".join(f"{d.index} ({d.uuid})" for d in devices)
    raise UnknownGPU(f"no simulated GPU {ref!r} in {path}; it holds {known}")


def _entry(state: State, ref: str | int, path: Path) -> tuple[SimulatedDevice, dict[str, Any]]:
    device = _find(_devices(state), ref, path)
    entry: dict[str, Any] = next(e for e in state["gpus"] if e["uuid"] == device.uuid)
    return device, entry


def _describe(devices: list[SimulatedDevice]) -> str:
    from vram_operator.api import format_bytes  # the CLI's only: see the module's docstring

    lines: list[str] = []
    for device in devices:
        lines.append(
            f"{device.index} {device.uuid} {device.name}: "
            f"{format_bytes(device.used_bytes)} used of {format_bytes(device.total_bytes)}, "
            f"{format_bytes(device.free_bytes)} free"
        )
        lines.extend(
            f"    {owner}: {format_bytes(held)}"
            for owner, held in sorted(device.allocations.items())
        )
    return "\n".join(lines)


def _size(text: str) -> int:
    from vram_operator.api import parse_bytes  # the CLI's only: see the module's docstring

    return parse_bytes(text)


def _sizes(text: str) -> list[int]:
    return [_size(part) for part in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    """`create` a node's GPUs, add `external` pressure, or `show` who holds what."""
    parser = argparse.ArgumentParser(
        prog="python -m vram_operator.simulation.gpu",
        description="Simulated GPUs for tests and demos: a JSON state file shared by processes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="write a state file of empty GPUs")
    create.add_argument("--node", required=True, help="node name; the GPU UUIDs derive from it")
    create.add_argument("--count", type=int, help="number of GPUs (default 1)")
    create.add_argument(
        "--total",
        type=_sizes,
        default=[DEFAULT_TOTAL_BYTES],
        help="memory of each GPU: 24Gi, or one figure per GPU: 24Gi,80Gi (default 80Gi)",
    )
    create.add_argument("--name", default=DEFAULT_NAME)
    create.add_argument("--temperature", type=int, default=DEFAULT_TEMPERATURE)
    external = commands.add_parser(
        "external", help="hold memory as a process the agent does not manage (0 lifts it)"
    )
    external.add_argument("--uuid", required=True, help="GPU UUID or index")
    external.add_argument("--bytes", type=_size, required=True, help="e.g. 10Gi")
    external.add_argument("--label", default="cli", help="owner becomes external:<label>")
    commands.add_parser("show", help="print each GPU and who holds its memory")
    for command in commands.choices.values():
        command.add_argument("path", metavar="PATH", help="the state file")
    args = parser.parse_args(argv)

    try:
        if args.command == "create":
            if len(args.total) == 1:
                gpus = SimulatedGPUs.create(
                    args.path, args.node, args.count, args.total[0], args.name, args.temperature
                )
            else:
                gpus = SimulatedGPUs.create(
                    args.path,
                    args.node,
                    args.count,
                    name=args.name,
                    temperature=args.temperature,
                    sizes=args.total,
                )
            print("\n".join(device.uuid for device in gpus.devices()))
        elif args.command == "external":
            gpus = SimulatedGPUs(args.path)
            gpus.pressure(args.uuid, args.bytes, args.label)
            print(_describe(gpus.devices()))
        else:
            print(_describe(SimulatedGPUs(args.path).devices()))
    except (OSError, ValueError, LookupError, SimulatedOutOfMemory) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
