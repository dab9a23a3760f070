"""Host memory and memory pressure, read from /proc as `free -b` and the PSI interface show them.

The parsers are pure functions of the file text so they can be tested on real and damaged
contents; `HostMonitor` does the reading and turns every failure into an `unavailable` entry,
because a node agent that stops reporting over one unreadable figure helps nobody.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from pathlib import Path

from vram_operator.api import HostMemory, MemoryPressure, PSIFigures
from vram_operator.api.quantity import MAX_BYTES

MEMINFO = "meminfo"
PSI_MEMORY = "pressure/memory"

_KIB = 1024
_PSI_KINDS = ("some", "full")
_PSI_AVERAGES = ("avg10", "avg60", "avg300")
_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_meminfo(text: str) -> HostMemory:
    """MemTotal and MemAvailable from /proc/meminfo text, in bytes (the kernel writes kB).

    Raises ValueError naming the figure that is missing or malformed.
    """
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in ("MemTotal", "MemAvailable") or key in found:
            continue
        found[key] = _meminfo_bytes(key, rest)
    for key in ("MemTotal", "MemAvailable"):
        if key not in found:
            raise ValueError(f"{key} missing from /proc/meminfo")
    return HostMemory(total_bytes=found["MemTotal"], available_bytes=found["MemAvailable"])


def _meminfo_bytes(key: str, rest: str) -> int:
    parts = rest.split()
    if len(parts) != 2 or parts[1] != "kB":
        raise ValueError(f"{key} in /proc/meminfo is not '<number> kB': {rest.strip()!r}")
    if not _WHOLE.fullmatch(parts[0]):
        raise ValueError(f"{key} in /proc/meminfo is not a number: {parts[0]!r}")
    return min(int(parts[0]) * _KIB, MAX_BYTES)  # a figure past int64 would fail every write


def parse_psi(text: str) -> MemoryPressure:
    """The `some` and `full` lines of /proc/pressure/memory.

    `some` is required; `full` may be absent (it is None then). Unknown keys and lines are
    ignored so that a newer kernel adding figures does not break the agent.
    Raises ValueError naming the figure that is missing or malformed.
    """
    lines: dict[str, PSIFigures] = {}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind in _PSI_KINDS and kind not in lines:
            lines[kind] = _psi_figures(kind, rest)
    if "some" not in lines:
        raise ValueError("memory PSI 'some' line missing from /proc/pressure/memory")
    return MemoryPressure(available=True, some=lines["some"], full=lines.get("full"))


def _psi_figures(kind: str, rest: str) -> PSIFigures:
    values: dict[str, str] = {}
    for item in rest.split():
        name, sep, value = item.partition("=")
        if sep:
            values[name] = value
    averages: dict[str, float] = {}
    for name in _PSI_AVERAGES:
        raw = _psi_value(values, kind, name)
        if not _DECIMAL.fullmatch(raw):
            raise ValueError(f"memory PSI {kind} {name} is not a percentage: {raw!r}")
        averages[name] = float(raw)
    total = _psi_value(values, kind, "total")
    if not _WHOLE.fullmatch(total):
        raise ValueError(f"memory PSI {kind} total is not a whole number: {total!r}")
    return PSIFigures(
        avg10=averages["avg10"],
        avg60=averages["avg60"],
        avg300=averages["avg300"],
        total=min(int(total), MAX_BYTES),
    )


def _psi_value(values: dict[str, str], kind: str, name: str) -> str:
    if name not in values:
        raise ValueError(f"memory PSI {kind} {name} missing from /proc/pressure/memory")
    return values[name]


@dataclass(frozen=True)
class HostReading:
    """One look at host memory; `unavailable` says, per figure, why it could not be read."""

    memory: HostMemory | None
    pressure: MemoryPressure
    unavailable: list[str] = field(default_factory=list)


class HostMonitor:
    """Reads host memory and PSI from a proc root (`/proc`, or a directory of sample files)."""

    def __init__(self, proc: str | Path = "/proc") -> None:
        self._proc = Path(proc)

    def read(self) -> HostReading:
        """Never raises: what cannot be read is None or unavailable, with the reason listed."""
        unavailable: list[str] = []
        memory = self._read_memory(unavailable)
        pressure = self._read_pressure(unavailable)
        return HostReading(memory=memory, pressure=pressure, unavailable=unavailable)

    def _read_memory(self, unavailable: list[str]) -> HostMemory | None:
        path = self._proc / MEMINFO
        try:
            return parse_meminfo(path.read_text(encoding="ascii", errors="replace"))
        except OSError as err:
            unavailable.append(f"host memory: cannot read {path}: {err.strerror or err}")
        except ValueError as err:
            unavailable.append(f"host memory: {err}")
        return None

    def _read_pressure(self, unavailable: list[str]) -> MemoryPressure:
        path = self._proc / PSI_MEMORY
        try:
            pressure = parse_psi(path.read_text(encoding="ascii", errors="replace"))
        except FileNotFoundError:
            unavailable.append(f"memory PSI: kernel has no {path}")
        except OSError as err:
            if err.errno == errno.EOPNOTSUPP:
                # The file exists but reading fails on a kernel booted with psi=0.
                unavailable.append(f"memory PSI: turned off in the kernel (psi=0): {path}")
            else:
                unavailable.append(f"memory PSI: cannot read {path}: {err.strerror or err}")
        except ValueError as err:
            unavailable.append(str(err))
        else:
            if pressure.full is None:
                unavailable.append(f"memory PSI full: missing from {path}")
            return pressure
        return MemoryPressure(available=False)
