"""Measure the decision paths and the local control plane, and write BENCHMARKS.md.

Run: `python bench/run.py` (after scripts/test.sh or scripts/demo.sh has set things up).
Numbers are medians of repeated runs on this machine; they are never asserted in tests.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks_md import stamp, write_preamble

from vram_operator.api import GPU, Assignment, Backend, GPUNode, ModelState, Priority
from vram_operator.operator.placement import (
    NodeView,
    PlacementConfig,
    PlacementRequest,
    Reservations,
)
from vram_operator.policy.eviction import EvictionConfig, Resident, plan_room

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


def bench_convergence(models: int = 40, nodes: int = 3) -> list[tuple[str, str]]:
    """Apply `models` small Ollama models at once to simulated nodes; time each until Ready."""
    import tempfile

    from kubernetes import client, config

    from vram_operator.localcluster import LocalControlPlane
    from vram_operator.simulation.cluster import (
        SimulatedCluster,
        install_crds,
        install_trusted_policy,
    )

    with tempfile.TemporaryDirectory() as workdir, LocalControlPlane() as cp:
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        cluster = SimulatedCluster(api, str(cp.kubeconfig), Path(workdir))
        try:
            install_crds(api)
            install_trusted_policy(api)
            for n in range(nodes):
                cluster.add_node(
                    f"bench-{n}", gpu_sizes=[24 * GiB], agent_args=["--report-interval", "2"]
                )
            cluster.start_operator()
            custom = client.CustomObjectsApi(api)
            created: dict[str, float] = {}
            for i in range(models):
                name = f"bench-{i}"
                custom.create_namespaced_custom_object(
                    "vram.dev",
                    "v1alpha1",
                    "default",
                    "modeldeployments",
                    {
                        "apiVersion": "vram.dev/v1alpha1",
                        "kind": "ModelDeployment",
                        "metadata": {"name": name},
                        "spec": {"model": f"bench-{i}:1b", "backend": "ollama", "vram": "1Gi"},
                    },
                )
                created[name] = time.monotonic()
            ready: dict[str, float] = {}
            deadline = time.monotonic() + 300
            while len(ready) < models and time.monotonic() < deadline:
                listing: Any = custom.list_namespaced_custom_object(
                    "vram.dev", "v1alpha1", "default", "modeldeployments"
                )
                for item in listing["items"]:
                    name = item["metadata"]["name"]
                    conditions = (item.get("status") or {}).get("conditions", [])
                    if name not in ready and any(
                        c["type"] == "Ready" and c["status"] == "True" for c in conditions
                    ):
                        ready[name] = time.monotonic() - created[name]
                time.sleep(0.2)
        finally:
            cluster.stop()
            api.close()
    latencies = sorted(ready.values())
    if len(latencies) < models:
        return [(f"{models} models applied at once, {nodes} nodes", f"only {len(latencies)} Ready")]
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    return [
        (
            f"apply → Ready, {models} models at once on {nodes} simulated nodes (p50 / p95)",
            f"{statistics.median(latencies):.1f} s / {p95:.1f} s",
        ),
        (f"all {models} Ready", f"{latencies[-1]:.1f} s"),
    ]


def main() -> int:
    rows = [*bench_placement(), *bench_eviction(), *bench_control_plane(), *bench_convergence()]
    lines = [
        "# Benchmarks",
        "",
        "Written by `python bench/run.py`; medians of repeated runs. Never asserted in tests.",
        "",
        *stamp(),
        "",
        "| what | median |",
        "| --- | --- |",
        *(f"| {what} | {value} |" for what, value in rows),
        "",
        "Model load bandwidth on a real GPU is not measured here: no GPU was lent to the",
        "session that wrote this file (see the device tool's status in the issue notes).",
        "",
    ]
    write_preamble(lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
