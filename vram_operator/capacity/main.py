"""`vram-operator simulate`: replay traces, sweep capacity, make and convert traces."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from vram_operator.policy.eviction import EvictionConfig

from .cluster import ClusterSpec, DescriptionError, SimModel, catalog, load_cluster, load_models
from .report import PlotsUnavailable, plot_results, plot_sweep, smallest, sweep, sweep_table, table
from .simulator import POLICY_NAMES, Result, SimulationError, simulate
from .trace import TraceError, Workload, convert_azure, generate, read_trace, write_trace


def _inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", help="cluster file (YAML): nodes, GPU sizes, speeds")
    parser.add_argument(
        "--models", nargs="+", default=[], help="ModelDeployment YAML files or folders"
    )
    parser.add_argument(
        "--from-cluster",
        action="store_true",
        help="read ModelDeployments and GPUNodes from the cluster (--kubeconfig); --cluster "
        "then only gives speeds and settings",
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--trace", required=True, help="trace: .csv or .jsonl (time,model,tokens)")
    parser.add_argument(
        "--rate-half-life",
        type=float,
        default=600.0,
        help="seconds: half-life of the request rates the cost policy reads",
    )
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots there (needs [plots])")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator simulate",
        description="Replay a request trace against a described cluster with the operator's "
        "placement and the agent's eviction, per policy; sweep capacity; make traces.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="replay a trace under each policy and compare")
    _inputs(run)
    run.add_argument(
        "--policy",
        dest="policies",
        action="append",
        choices=POLICY_NAMES,
        help=f"repeatable; default all: {', '.join(POLICY_NAMES)}",
    )
    run.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    capacity = commands.add_parser("sweep", help="GPUs 1..N: warm hits and p99 added latency")
    _inputs(capacity)
    capacity.add_argument("--policy", default=EvictionConfig.policy, choices=POLICY_NAMES)
    capacity.add_argument("--gpus", default="1-16", help="counts: 1-16 or 2,4,8")
    capacity.add_argument("--target-warm", type=float, default=0.99, help="warm-hit ratio")
    capacity.add_argument("--target-p99", type=float, default=None, help="added seconds")
    make = commands.add_parser("trace", help="write a seeded synthetic trace")
    make.add_argument("--models", nargs="+", default=[], help="ModelDeployments to name")
    make.add_argument("--count", type=int, default=0, help="or this many catalog models")
    make.add_argument("--alpha", type=float, default=0.8, help="Zipf exponent")
    make.add_argument("--rate", type=float, default=0.5, help="requests per second")
    make.add_argument("--duration", type=float, default=4 * 3600.0, help="seconds")
    make.add_argument("--diurnal", type=float, default=0.0, help="rate swing, 0..1")
    make.add_argument("--burst-every", type=float, default=0.0, help="mean seconds, 0: none")
    make.add_argument("--burst-seconds", type=float, default=300.0)
    make.add_argument("--burst-rate", type=float, default=0.5, help="requests per second")
    make.add_argument("--tokens", type=int, default=0, help="mean tokens per request, 0: none")
    make.add_argument("--seed", type=int, default=1)
    make.add_argument("-o", "--output", required=True)
    azure = commands.add_parser("azure", help="convert Azure Functions per-minute counts")
    azure.add_argument("files", nargs="+", help="invocations_per_function_md.anon.dNN.csv")
    azure.add_argument("--models", nargs="+", required=True, help="most popular first")
    azure.add_argument("--scale", type=float, default=1.0, help="keep this share")
    azure.add_argument("--minutes", type=int, default=None, help="first minutes of each day")
    azure.add_argument("--seed", type=int, default=0)
    azure.add_argument("-o", "--output", required=True)
    models = commands.add_parser("catalog", help="write seeded ModelDeployments, 0.5-40 GiB")
    models.add_argument("--count", type=int, default=200)
    models.add_argument("--seed", type=int, default=1)
    models.add_argument("-o", "--output", required=True)
    return parser


def _load(args: argparse.Namespace) -> tuple[ClusterSpec, list[SimModel]]:
    base = load_cluster(args.cluster) if args.cluster else None
    if args.from_cluster:
        from .live import read_cluster

        return read_cluster(args.kubeconfig, base)
    if base is None or not args.models:
        raise DescriptionError("--cluster and --models are required (or --from-cluster)")
    return base, load_models(args.models)


def _counts(text: str) -> list[int]:
    if "-" in text:
        low, high = (int(part) for part in text.split("-", 1))
        return list(range(low, high + 1))
    return [int(part) for part in text.split(",")]


def _summary(result: Result) -> dict[str, object]:
    return {
        "policy": result.policy,
        "requests": result.requests,
        "warmRatio": result.warm_ratio,
        "coldStarts": result.cold_starts,
        "wakes": result.wakes,
        "coldLoadSeconds": result.cold_load_seconds,
        "addedLatency": {str(q): result.latency(q) for q in (0.5, 0.99, 0.999)},
        "unserved": result.unserved,
        "evictions": result.evictions,
        "criticalEvictions": result.critical_evictions,
        "overcommits": result.overcommits,
        "wallSeconds": result.wall_seconds,
    }


def _run(args: argparse.Namespace) -> int:
    cluster, models = _load(args)
    trace = read_trace(args.trace)
    policies = args.policies or list(POLICY_NAMES)
    print(
        f"{len(trace)} requests over {trace.duration / 3600:.1f} h, {len(models)} models, "
        f"{cluster.gpu_count} GPUs on {len(cluster.nodes)} nodes",
        file=sys.stderr,
    )
    results = simulate(
        cluster,
        models,
        trace,
        policies,
        rate_half_life=args.rate_half_life,
        progress=lambda r: print(f"  {r.policy}: {r.wall_seconds:.1f} s", file=sys.stderr),
    )
    if results and results[0].unmatched:
        print(f"{results[0].unmatched} requests name no known model; skipped", file=sys.stderr)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([_summary(r) for r in results], indent=2) + "\n")
    if args.plots:
        for path in plot_results(results, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    cluster, models = _load(args)
    trace = read_trace(args.trace)
    points = sweep(
        cluster, models, trace, args.policy, _counts(args.gpus), rate_half_life=args.rate_half_life
    )
    print(sweep_table(points))
    best = smallest(points, args.target_warm, args.target_p99)
    target = f"{100 * args.target_warm:g}% warm hits"
    if args.target_p99 is not None:
        target += f" and p99 added latency <= {args.target_p99:g} s"
    if best is None:
        print(f"no cluster size tried meets {target}")
    else:
        print(f"smallest cluster meeting {target}: {best.gpus} GPUs ({args.policy})")
    if args.plots:
        print(f"wrote {plot_sweep(points, args.plots)}", file=sys.stderr)
    return 0 if best is not None else 1


def _names(args: argparse.Namespace) -> list[str]:
    if args.models:
        return [m.key for m in load_models(args.models)]
    if args.count > 0:
        return [f"default.{obj['metadata']['name']}" for obj in catalog(args.count, args.seed)]
    raise TraceError("--models or --count is required")


def _trace(args: argparse.Namespace) -> int:
    workload = Workload(
        alpha=args.alpha,
        rate=args.rate,
        duration=args.duration,
        diurnal_amplitude=args.diurnal,
        burst_every=args.burst_every,
        burst_seconds=args.burst_seconds,
        burst_rate=args.burst_rate,
        mean_tokens=args.tokens,
    )
    trace = generate(_names(args), workload, args.seed)
    write_trace(trace, args.output)
    print(f"wrote {len(trace)} requests to {args.output}", file=sys.stderr)
    return 0


def _azure(args: argparse.Namespace) -> int:
    names = [m.key for m in load_models(args.models)]
    trace = convert_azure(args.files, names, seed=args.seed, scale=args.scale, minutes=args.minutes)
    write_trace(trace, args.output)
    print(f"wrote {len(trace)} requests to {args.output}", file=sys.stderr)
    return 0


def _catalog(args: argparse.Namespace) -> int:
    with open(args.output, "w") as handle:
        yaml.safe_dump_all(catalog(args.count, args.seed), handle, sort_keys=False)
    print(f"wrote {args.count} ModelDeployments to {args.output}", file=sys.stderr)
    return 0


COMMANDS = {"run": _run, "sweep": _sweep, "trace": _trace, "azure": _azure, "catalog": _catalog}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DescriptionError, TraceError, SimulationError, PlotsUnavailable, OSError) as exc:
        print(f"vram-operator simulate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
