"""BENCHMARKS.md, shared by the bench scripts: each owns one `## ` section (bench/run.py the
part above the first), rewrites only that and keeps the others as they are."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Sequence
from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    """The machine a figure was measured on: architecture, cores, CPU model and Python."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = (line.split(":", 1)[1] for line in cpuinfo if line.startswith("model name"))
            cpu = next(names, "").strip()
    except OSError:
        pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {cpu or 'unknown CPU'}, "
        f"Python {platform.python_version()}"
    )


def stamp() -> list[str]:
    """The date and machine lines every section starts its list with."""
    return [f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC", f"- machine: {machine()}"]


def write_section(heading: str, lines: Sequence[str]) -> None:
    """Replace the section whose heading starts with `heading` (e.g. "## Burst"), or append it."""
    text = PATH.read_text() if PATH.exists() else "# Benchmarks\n"
    start = text.find(f"\n{heading}")
    if start < 0:
        head, tail = text.rstrip("\n"), ""
    else:
        head = text[:start].rstrip("\n")
        following = text.find("\n## ", start + 1)
        tail = "" if following < 0 else text[following:].strip("\n")
    parts = [head, "\n".join(lines).strip("\n")]
    if tail:
        parts.append(tail)
    PATH.write_text("\n\n".join(parts) + "\n")


def write_preamble(lines: Sequence[str]) -> None:
    """Replace what comes before the first `## ` section."""
    text = PATH.read_text() if PATH.exists() else ""
    first = text.find("\n## ")
    sections = "" if first < 0 else text[first:].strip("\n")
    PATH.write_text("\n".join(lines).rstrip("\n") + ("\n\n" + sections if sections else "") + "\n")
