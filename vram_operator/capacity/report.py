"""Tables for the terminal, the capacity sweep, and PNG plots (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import ClusterSpec, SimModel
from .simulator import Result, Simulation
from .trace import Trace

GIB = 2**30


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _relative(value: float, base: Result | None) -> str:
    if base is None or base.cold_load_seconds <= 0:
        return "-"
    return f"{value / base.cold_load_seconds:.2f}"


def table(results: Sequence[Result]) -> str:
    """One row per policy, cold-load seconds also relative to lru and to the offline reference."""
    lru = next((r for r in results if r.policy == "lru"), None)
    offline = next((r for r in results if r.policy == "offline"), None)
    head = (
        "policy",
        "warm hits",
        "cold starts",
        "wakes",
        "cold-load s",
        "vs lru",
        "vs offline",
        "added p50/p99/p99.9 s",
        "unserved",
        "critical evictions",
    )
    rows = [head]
    for r in results:
        latency = "/".join(f"{r.latency(q):.1f}" for q in (0.5, 0.99, 0.999))
        rows.append(
            (
                r.policy,
                f"{100 * r.warm_ratio:.1f}%",
                str(r.cold_starts),
                str(r.wakes),
                f"{r.cold_load_seconds:.0f}",
                _relative(r.cold_load_seconds, lru),
                _relative(r.cold_load_seconds, offline),
                latency,
                str(r.unserved),
                str(r.critical_evictions),
            )
        )
    return markdown(rows)


def markdown(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, padded so it also reads on a terminal."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class SweepPoint:
    gpus: int
    result: Result


def sweep(
    cluster: ClusterSpec,
    models: Sequence[SimModel],
    trace: Trace,
    policy: str,
    counts: Sequence[int],
    *,
    rate_half_life: float = 600.0,
) -> list[SweepPoint]:
    """The same trace and policy on the cluster resized to each GPU count."""
    return [
        SweepPoint(
            n,
            Simulation(
                cluster.with_gpus(n), models, trace, policy, rate_half_life=rate_half_life
            ).run(),
        )
        for n in counts
    ]


def smallest(points: Sequence[SweepPoint], warm: float, p99: float | None) -> SweepPoint | None:
    """The fewest GPUs meeting the warm-hit target (and the p99 added-latency one if given)."""
    for point in sorted(points, key=lambda p: p.gpus):
        r = point.result
        if r.warm_ratio >= warm and (p99 is None or r.latency(0.99) <= p99) and not r.unserved:
            return point
    return None


def sweep_table(points: Sequence[SweepPoint]) -> str:
    rows = [("GPUs", "warm hits", "cold-load s", "added p99 s", "unserved")]
    for p in points:
        r = p.result
        rows.append(
            (
                str(p.gpus),
                f"{100 * r.warm_ratio:.1f}%",
                f"{r.cold_load_seconds:.0f}",
                f"{r.latency(0.99):.1f}",
                str(r.unserved),
            )
        )
    return markdown(rows)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable(
            "PNG plots need matplotlib: pip install 'vram-operator[plots]'"
        ) from None
    return plt


def plot_results(results: Sequence[Result], directory: str | Path) -> list[Path]:
    """memory.png (GPU memory held over time per policy) and cold-load.png; their paths."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figure, (memory, cold) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=80)
    for r in results:
        hours = [t / 3600 for t, _ in r.samples]
        share = [100 * held / r.capacity_bytes for _, held in r.samples]
        memory.plot(hours, share, label=r.policy, linewidth=1)
    memory.set_xlabel("hours into the trace")
    memory.set_ylabel("GPU memory held (%)")
    memory.set_ylim(0, 100)
    memory.legend(fontsize=7, loc="lower right")
    memory.set_title("GPU memory over time", fontsize=10)
    names = [r.policy for r in results]
    cold.bar(names, [r.cold_load_seconds / 3600 for r in results], color="tab:orange")
    cold.set_ylabel("cold-load hours")
    cold.set_title("load and wake time, summed", fontsize=10)
    cold.tick_params(axis="x", labelsize=8, labelrotation=30)
    figure.tight_layout()
    path = directory / "simulate.png"
    figure.savefig(path)
    plt.close(figure)
    return [path]


def plot_sweep(points: Sequence[SweepPoint], directory: str | Path) -> Path:
    """sweep.png: warm-hit ratio and p99 added latency against the GPU count."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figure, hits = plt.subplots(figsize=(6, 3.6), dpi=80)
    gpus = [p.gpus for p in points]
    hits.plot(gpus, [100 * p.result.warm_ratio for p in points], marker="o", label="warm hits")
    hits.set_xlabel("GPUs")
    hits.set_ylabel("warm hits (%)")
    latency = hits.twinx()
    latency.plot(gpus, [p.result.latency(0.99) for p in points], color="tab:red", marker="s")
    latency.set_ylabel("p99 added latency (s)", color="tab:red")
    figure.tight_layout()
    path = directory / "sweep.png"
    figure.savefig(path)
    plt.close(figure)
    return path
