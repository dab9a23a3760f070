"""Measure the decision paths and the local control plane, and write BENCHMARKS.md.

Run: `python bench/run.py` (after scripts/test.sh or scripts/demo.sh has set things up).
Numbers are medians of repeated runs on this machine; they are never asserted in tests.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vram_operator.api import GPU, Assignment, Backend, GPUNode, ModelState, Priority
from vram_operator.node_agent.eviction import EvictionConfig, Resident, plan_room
from vram_operator.operator.placement import (
    NodeView,
    PlacementConfig,
    PlacementRequest,
    Reservations,
)

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def median_seconds(func: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _views(nodes: int, gpus: int, models_per_gpu: int, now: dt.datetime) -> list[NodeView]:
    views = []
    for n in range(nodes):
        gpu_list = tuple(
            GPU(
                index=g,
                uuid=f"GPU-{n}-{g}",
                name="bench",
                total_bytes=80 * GiB,
                used_bytes=0,
                free_bytes=80 * GiB,
            )
            for g in range(gpus)
        )
        assignments = {
            f"ns.m-{n}-{g}-{m}": Assignment(
                namespace="ns",
                name=f"m-{n}-{g}-{m}",
                model="bench:1b",
                backend=Backend.OLLAMA,
                priority=list(Priority)[m % 4],
                gpu_uuid=f"GPU-{n}-{g}",
                vram_bytes=4 * GiB,
            )
            for g in range(gpus)
            for m in range(models_per_gpu)
        }
        node = GPUNode(metadata={"name": f"node-{n}"})
        view = NodeView.from_objects(node, {"kubernetes.io/hostname": f"node-{n}"})
        views.append(
            NodeView(
                name=view.name,
                labels=view.labels,
                heartbeat=now,
                gpus=gpu_list,
                assignments=assignments,
            )
        )
    return views


def bench_placement() -> list[tuple[str, str]]:
    now = dt.datetime.now(dt.UTC)
    rows = []
    for nodes in (10, 100, 500):
        views = _views(nodes, gpus=8, models_per_gpu=4, now=now)
        request = PlacementRequest(key="ns.new", vram_bytes=6 * GiB, replicas=3)

        def one(views: list[NodeView] = views, request: PlacementRequest = request) -> None:
            Reservations().place_and_reserve(request, views, PlacementConfig(), now)

        seconds = median_seconds(one, repeat=15)
        rows.append(
            (
                f"place 3 replicas among {nodes} nodes x 8 GPUs ({nodes * 32} assignments)",
                f"{seconds * 1000:.1f} ms",
            )
        )
    return rows


def bench_eviction() -> list[tuple[str, str]]:
    rows = []
    now = time.time()
    for count in (10, 100, 1000):
        residents = [
            Resident(
                key=f"m{i}",
                priority=list(Priority)[i % 4],
                vram_bytes=(i % 7 + 1) * GiB,
                state=ModelState.LOADED,
                loaded_at=now - 3600,
                last_access=now - i * 10,
            )
            for i in range(count)
        ]

        def one(residents: list[Resident] = residents) -> None:
            plan_room(
                residents,
                needed_bytes=20 * GiB,
                free_bytes=GiB,
                now=now,
                config=EvictionConfig(),
                incoming_priority=Priority.HIGH,
            )

        seconds = median_seconds(one, repeat=25)
        rows.append((f"plan_room over {count} resident models", f"{seconds * 1000:.2f} ms"))
    return rows


def bench_control_plane() -> list[tuple[str, str]]:
    from vram_operator.localcluster import LocalControlPlane

    samples = []
    for _ in range(3):
        started = time.perf_counter()
        with LocalControlPlane():
            samples.append(time.perf_counter() - started)
    return [("local control plane warm start to /readyz", f"{statistics.median(samples):.1f} s")]


def main() -> int:
    rows = [*bench_placement(), *bench_eviction(), *bench_control_plane()]
    cpu = subprocess.run(
        ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    lines = [
        "# Benchmarks",
        "",
        "Written by `python bench/run.py`; medians of repeated runs. Never asserted in tests.",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {cpu or 'unknown CPU'}, "
        f"Python {platform.python_version()}",
        "",
        "| what | median |",
        "| --- | --- |",
        *(f"| {what} | {value} |" for what, value in rows),
        "",
        "Model load bandwidth on a real GPU is not measured here: no GPU was lent to the",
        "session that wrote this file (see the device tool's status in the issue notes).",
        "",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
