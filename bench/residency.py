"""Residency driven by demand against fixed residency: a seeded Zipf trace replayed through the
gateway, warm-hit ratio and latency per request, both in one run.

One scenario, two runs on fresh local control planes: `--models` Ollama ModelDeployments
(seeded sizes of 2 to 10 GiB, `replicas: 1`) on 2 simulated nodes of 4 x 24 GiB GPUs (8 GPUs),
the fake Ollama loading in `--load-seconds`, created most popular first (the trace's own
counts: the fixed run keeps the best set that fits, an oracle's choice); then the trace goes
through one gateway, each request sent at its time.

- fixed: `replicas: 1` for the most popular models that fit (first fit over the 8 GPUs, by the
  operator's own accounting), `replicas: 0` for the rest (the gateway answers them 503 at once);
  the operator without a demand source;
- demand: the operator reads the gateway's /demand (--gateway-demand-url): a request for a
  model with no room swaps out the settled ones whose eviction costs least in loads to come
  (`--swap-order cost`, the default; young ones stay: requests running or waiting, or loaded
  within `--min-residency` and not asked for since);
- demand-lru2: the same with `--swap-order lru2` (the one asked for least
  recently before its last request, none used within `--min-residency`).

Warm hit: answered 200 in under 1 s (a load takes `--load-seconds`). Added latency: the time
the client waited, less nothing (the fake Ollama answers in milliseconds). `--write` puts the
figures into BENCHMARKS.md ("## Residency" section); they are never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from benchmarks_md import stamp, write_section
from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vram_operator.api import GROUP, VERSION, Backend  # noqa: E402
from vram_operator.api.budget import footprint_bytes, reserve_bytes  # noqa: E402
from vram_operator.capacity.trace import Workload, generate  # noqa: E402
from vram_operator.localcluster import LocalControlPlane  # noqa: E402
from vram_operator.simulation.cluster import (  # noqa: E402
    SimulatedCluster,
    install_crds,
    install_trusted_policy,
)

SECTION = "## Residency"
NAMESPACE = "default"
GIB = 2**30
WARM_SECONDS = 1.0


def models_for(count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    return {f"m{i:03d}": rng.choice((2, 4, 6, 8, 10)) * GIB for i in range(count)}


def fits(order: Sequence[str], models: dict[str, int]) -> set[str]:
    """The models, most popular first, that first fit places on 8 GPUs of 24 GiB."""
    room = [24 * GIB - reserve_bytes(256 * 2**20)] * 8
    chosen = set()
    for name in order:
        need = footprint_bytes(Backend.OLLAMA, models[name], 24 * GIB)
        gpu = next((i for i, free in enumerate(room) if free >= need), None)
        if gpu is not None:
            room[gpu] -= need
            chosen.add(name)
    return chosen


def _wait(what: str, probe: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.5)


async def replay(url: str, requests: Sequence[tuple[float, str]]) -> list[tuple[float, int]]:
    """Each request at its time; (seconds the client waited, HTTP status) per request."""
    results: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        start = time.monotonic()

        async def one(index: int, at: float, model: str) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            sent = time.monotonic()
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            try:
                async with http.post(url + "/v1/chat/completions", json=body) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:
                status = -1
            results[index] = (time.monotonic() - sent, status)

        await asyncio.gather(*(one(i, t, m) for i, (t, m) in enumerate(requests)))
    return results


def run(label: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    models = models_for(args.models, args.seed)
    trace = generate(
        list(models), Workload(alpha=args.alpha, rate=args.rate, duration=args.duration), args.seed
    )
    counts = collections.Counter(trace.models)
    order = sorted(models, key=lambda m: (-counts[m], m))
    fitting = fits(order, models) if label == "fixed" else set(models)
    swap_order = "lru2" if label == "demand-lru2" else "cost"
    catalog = workdir / "catalog.json"
    catalog.write_text(
        json.dumps({f"{m}:1b": {"size": s // 2, "size_vram": s} for m, s in models.items()})
    )
    with LocalControlPlane() as cp:
        assert cp.kubeconfig is not None
        api = config.new_client_from_config(  # type: ignore[no-untyped-call,unused-ignore]
            config_file=str(cp.kubeconfig)
        )
        custom = client.CustomObjectsApi(api)
        cluster = SimulatedCluster(api, str(cp.kubeconfig), workdir)
        try:
            install_crds(api)
            install_trusted_policy(api)
            for index in range(2):
                cluster.add_node(
                    f"node-{index}",
                    gpu_sizes=[24 * GIB] * 4,
                    agent_args=("--report-interval", "1", "--ollama-max-loaded-models", "64"),
                    ollama_args=(
                        "--catalog",
                        str(catalog),
                        "--load-seconds",
                        str(args.load_seconds),
                        "--max-loaded-models",
                        "64",
                    ),
                )
            _, url = cluster.start_gateway(
                "--heartbeat-grace",
                "8",
                "--queue-timeout",
                str(args.queue_timeout),
                "--queue-size",
                "1000",
            )
            demand = (
                [
                    "--gateway-demand-url",
                    url + "/demand",
                    "--demand-interval",
                    "0.5",
                    "--min-residency",
                    str(args.min_residency),
                    "--swap-order",
                    swap_order,
                ]
                if label != "fixed"
                else []
            )
            operator = cluster.start_operator("--heartbeat-grace", "8", *demand)
            for name in order:
                manifest = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ModelDeployment",
                    "metadata": {"name": name, "namespace": NAMESPACE},
                    "spec": {
                        "model": f"{name}:1b",
                        "backend": "ollama",
                        "vram": models[name],
                        "replicas": 1 if name in fitting else 0,
                    },
                }
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, "modeldeployments", manifest
                )

            def settled() -> bool:
                listing: Any = custom.list_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, "modeldeployments"
                )
                items = listing["items"]
                if len(items) < len(models):
                    return False
                for item in items:
                    placements = (item.get("status") or {}).get("placements") or []
                    if any(p.get("state") not in ("Loaded",) for p in placements):
                        return False
                    if not (item.get("status") or {}).get("conditions"):
                        return False
                return True

            _wait("every model settled", settled, timeout=300)
            listing: Any = custom.list_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "modeldeployments"
            )
            resident = sum(
                1 for item in listing["items"] if (item.get("status") or {}).get("readyReplicas")
            )
            print(f"[{label}] {resident} of {len(models)} resident; replaying", flush=True)
            requests = list(zip(trace.times, trace.models, strict=True))
            results = asyncio.run(replay(url, requests))
            log = operator.log_path.read_text(errors="replace")
            if args.logs is not None:
                kept = args.logs / label
                for path in workdir.rglob("*.log"):
                    target = kept / path.relative_to(workdir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                (kept / "requests.jsonl").write_text(
                    "".join(
                        json.dumps({"at": at, "model": m, "waited": w, "status": code}) + "\n"
                        for (at, m), (w, code) in zip(requests, results, strict=True)
                    )
                )
        finally:
            cluster.stop()
            api.close()
    ok = [s for s, code in results if code == 200]
    warm = sum(1 for s, code in results if code == 200 and s < WARM_SECONDS)
    return {
        "label": label,
        "requests": len(results),
        "resident": resident,
        "warm": warm,
        "ok": len(ok),
        "mean_ok": statistics.fmean(ok) if ok else float("nan"),
        "mean_all": statistics.fmean(s for s, _ in results),
        "p99_ok": sorted(ok)[int(0.99 * (len(ok) - 1))] if ok else float("nan"),
        "swaps": log.count("swapping "),
        "refused": sum(
            1 for line in log.splitlines() if "to place it afresh (InsufficientVRAM" in line
        ),
    }


def section(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[str]:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    command = " ".join(["python", "bench/residency.py", *sys.argv[1:]])
    lines = [
        f"{SECTION}: demand-driven residency against fixed, on a seeded Zipf trace",
        "",
        "Written by `python bench/residency.py --write`; one run of each. Never asserted in tests.",
        "",
        *stamp(),
        "- every process shares this machine with the API server",
        f"- command: `{command}` (code at {commit}{' + working tree' if dirty else ''})",
        f"- scenario: {args.models} Ollama models of 2-10 GiB (seed {args.seed}) created most "
        "popular first (by the trace's counts) on 2 simulated nodes x 4 x 24 GiB GPUs; fixed: "
        "`replicas: 1` for those first fit places, `replicas: 0` for the rest; demand: "
        "`replicas: 1` for all, the operator reading the gateway's demand and swapping out by "
        "`--swap-order cost` (demand) or `lru2` (demand-lru2); fake Ollama load "
        f"{args.load_seconds:g} s; Zipf alpha {args.alpha} at {args.rate:g} req/s for "
        f"{args.duration:g} s through one gateway (queue timeout {args.queue_timeout:g} s); "
        f"demand run: --min-residency {args.min_residency:g}",
        "",
        "| figure | " + " | ".join(r["label"] for r in rows) + " |",
        "| --- | " + " | ".join("---" for _ in rows) + " |",
    ]
    figures = [
        ("models resident before the trace", lambda r: f"{r['resident']}/{args.models}"),
        ("requests", lambda r: str(r["requests"])),
        ("warm hits (200 in < 1 s)", lambda r: f"{r['warm'] / r['requests']:.1%}"),
        ("answered 200", lambda r: f"{r['ok'] / r['requests']:.1%}"),
        ("mean latency, answered", lambda r: f"{r['mean_ok']:.2f} s"),
        ("p99 latency, answered", lambda r: f"{r['p99_ok']:.2f} s"),
        ("mean latency, every request (a 503 counts its wait)", lambda r: f"{r['mean_all']:.2f} s"),
        ("swap-outs", lambda r: str(r["swaps"])),
        ("loads the agent refused (InsufficientVRAM), placed afresh", lambda r: str(r["refused"])),
    ]
    for name, cell in figures:
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in rows) + " |")
    by_label = {r["label"]: r for r in rows}
    if "fixed" in by_label and ({"demand", "demand-lru2"} & by_label.keys()):
        lines += ["", reading(args, by_label)]
    return [*lines, ""]


def reading(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> str:
    """What the runs say, with their figures."""
    fixed = runs["fixed"]
    text = (
        f"What it says: the fixed run is an oracle (it knew the trace's popularity and kept the "
        f"{fixed['resident']} most popular models that fit), so its "
        f"{fixed['warm'] / fixed['requests']:.1%} of requests are warm and the rest, for models "
        "it gave `replicas: 0`, are refused."
    )
    orders = {
        "demand": "the settled models whose eviction costs least in loads to come (`cost`: "
        "priority weight x the rate of the gateway's counts x its load time estimated from its "
        "size)",
        "demand-lru2": "the settled one asked for least recently before its last request "
        "(`lru2`), else the least recently used",
    }
    for label, order in orders.items():
        run = runs.get(label)
        if run is None:
            continue
        text += (
            f" `{label}` answered {run['ok'] / run['requests']:.1%} without knowing the trace, "
            f"{run['warm'] / run['requests']:.1%} warm, with {run['swaps']} swap-outs for "
            f"{run['requests']} requests, each request for a model with no room swapping out "
            f"{order}."
        )
    asked = fixed["requests"] / args.models
    text += (
        f" On a trace this short ({asked:.1f} requests per model) most models are asked for "
        "once or twice, so a swap order has little history to go on. A request that misses "
        f"waits a {args.load_seconds:g} s load plus the operator's read of the gateway's demand "
        f"and the agent's report; those past the {args.queue_timeout:g} s queue timeout are "
        "refused."
    )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=1.1)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of trace")
    parser.add_argument("--load-seconds", type=float, default=2.0)
    parser.add_argument("--queue-timeout", type=float, default=30.0)
    parser.add_argument("--min-residency", type=float, default=10.0)
    parser.add_argument("--runs", default="fixed,demand,demand-lru2")
    parser.add_argument("--write", action="store_true")
    parser.add_argument(
        "--logs", type=Path, help="keep each run's process logs and per-request results here"
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label in args.runs.split(","):
            workdir = Path(root) / label
            workdir.mkdir()
            with contextlib.chdir(workdir):
                rows.append(run(label, args, workdir))
            print(rows[-1], flush=True)
    lines = section(args, rows)
    print("\n".join(lines))
    if args.write:
        write_section(SECTION, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
