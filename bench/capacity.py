"""Compare the eviction policies in the capacity simulator, and time the simulator itself.

Run: `python bench/capacity.py --write` (after scripts/test.sh has set up .venv; the plot needs
the `plots` extra). One run of each, not a median: the simulator is deterministic for a seed,
so the worker processes (`--jobs`) change the wall time only, never a figure.

The comparison: three seeded traces (Zipf 0.8, Zipf 1.1, bursty) at 1 request/s for 8 hours,
each over three clusters of 80 GiB GPUs in nodes of four (`examples/capacity/cluster.yaml`'s
speeds): 4 GPUs serving 50 seeded ModelDeployments, 8 serving 100, 16 serving 200 (the
`simulate catalog --seed 1` models, 0.5-40 GiB), so that in every cluster more than half of the
catalog's bytes fit at once. Every policy replays the same trace. Then a sensitivity table on
the 8-GPU cluster: the request rate and the agents' minimum residency rule (fixed, or ended
once a model has served its requests, with requests of two lengths), the settings the outcome
depends on most. `--write` puts the figures into BENCHMARKS.md's "## Capacity"
section, leaving the others.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from benchmarks_md import stamp, write_section

from vram_operator.capacity.cluster import (
    ClusterSpec,
    SimModel,
    catalog,
    load_cluster,
    models_from_documents,
)
from vram_operator.capacity.report import markdown, plot_results
from vram_operator.capacity.simulator import (
    OPERATOR,
    OPERATOR_LRU2,
    POLICY_NAMES,
    Result,
    Simulation,
)
from vram_operator.capacity.trace import Trace, Workload, generate
from vram_operator.policy.eviction import EvictionConfig

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Capacity"
HOURS = 8.0
RATE = 1.0
SIZES = ((4, 50), (8, 100), (16, 200))
"""(GPUs, models): the catalog is about 1.76 times the GPU memory in each."""
SHOWN = ("Zipf 0.8", 8)
DEFAULT = EvictionConfig.policy
SENSITIVITY_POLICIES = (
    "lru",
    "hybrid",
    "cost",
    OPERATOR,
    OPERATOR_LRU2,
    "oracle-rate",
    "oracle-lfu",
    "offline",
)
SENSITIVITY_RATES = (0.5, 1.0, 2.0)
SENSITIVITY_RULES: tuple[tuple[str, dict[str, object]], ...] = (
    ("fixed 120 s", {"gateway_demand": False}),
    ("served, 5 s requests", {}),
    ("served, 30 s requests", {"request_seconds": 30.0}),
)
"""The agents' minimum residency: 120 s from the load with no demand figures, or ended once
a model has served its requests (with requests of two lengths)."""


PROSE = (
    "### Why this scenario",
    "",
    "- Traffic: the traces measured before (0.5 request/s for 4 h over 200 models) gave each "
    "model about 36 requests, too few for any frequency figure. Each trace here is a working "
    f"day, {HOURS:g} h at {RATE:g} request/s: {RATE * HOURS * 3600 / 200:.0f} requests per "
    f"model on average at 200 models and {RATE * HOURS * 3600 / 50:.0f} at 50, thousands "
    "for the head of the Zipf curve and tens for its tail, the shape of "
    "multi-model load (a few models take most requests, a long tail is asked for now and "
    "then) that the Azure Functions trace shows and the serverless-LLM work replays. It is "
    "not denser because every miss is a load of 2 to 40 s: loads per second are the rate "
    "times the miss ratio, and at a much higher rate the GPUs spend much of their time "
    "loading, not a cluster anyone would run.",
    "- Clusters: the catalog grows with the cluster, 12.5 models per GPU, so that the GPUs "
    "hold more than half of its bytes at every size (the scenario lines say how much): a cluster"
    " bought to hold most of its hot set, where the choice of victim matters. With 200 models"
    " on 8 GPUs, as measured before, the GPUs hold about a quarter of the catalog and about "
    "half of all requests miss whatever the policy.",
    "- Settings: the agents' defaults and `examples/capacity/cluster.yaml`'s speeds; the same"
    " trace for every policy, one run. Nothing was chosen per policy.",
    "",
    "### What the figures say",
    "",
    "1. With the gateways' demand, as the chart gives the agents, a model's minimum residency "
    "ends once it has served its requests and none runs or waits (`eviction.is_young`); the "
    "fixed 120 s from its load holds only where no demand figure says otherwise. That rule is "
    "what lets a frequency or cost order work: under the fixed rule every freshly loaded "
    "model is protected whatever it is worth, and the first model such an order would evict "
    "is exactly the one just loaded for a single request, so it must evict an older, more "
    "valuable one instead. LRU loses little either way (a model just loaded is its most "
    "recent anyway). Without `--no-sensitivity` the script compares the fixed rule with the "
    "served one at three request rates.",
    "2. `cost` is GreedyDual-Size-Frequency made a pure function: a model's price is its "
    "priority weight x decayed request rate x the seconds to bring it back (its wake where it "
    "can park, else its load), what its eviction costs in loads to come; room is made with "
    "the set of victims whose summed price is least (`eviction.cheapest_cover`, a "
    "minimum-cost cover of the bytes needed), on the GPU where that sum is least. Picking "
    "victims coldest per byte first, as before, could take one large model where two small "
    "ones asked for as rarely cost less to bring back. It is the agents' default "
    "`--eviction-policy`, which decides what they demote under memory pressure.",
    "3. `operator-lru2` and `operator` are what decides in a cluster with a gateway: since the"
    " agents no longer evict an assigned model for another (issue 7), the operator's `place`, "
    "told the model is demanded, picks the GPU and the models to swap out, and `plan_parking` "
    "parks those that can sleep. `operator` is its default, `--swap-order cost`, which prices "
    "each replica as the agents' `cost` rule does (`placement.swap_figures`: the rate from the"
    " growth of the gateways' request counts, its load time estimated from its size) and "
    "keeps a replica as long as the agents' served rule says it is young; `operator-lru2` is "
    "`--swap-order lru2` (lowest priority first, then LRU-2, the minimum residency from the "
    "last use). The lines above say how the two compare here; the local control plane "
    '("Residency" below) measures both orders on real processes.',
    "4. The offline reference is not an optimum: with models of different sizes and load "
    "costs, evicting the model needed furthest ahead can cost more than a price-aware choice,"
    " and it leaves requests unserved like any other rule; where a policy came below it the "
    "lines above count the cells. Its lead elsewhere comes from knowing when each next "
    "request arrives, which no online rule can (the true rates alone, `oracle-rate` and "
    "`oracle-lfu`, do not close it).",
    "5. The rate the `cost` rule weighs is the same figure in the simulator and in a "
    "cluster: request counts decayed with a 600 s half-life (`eviction.DecayedRates`), from the"
    " trace here and, in a cluster, from the growth of the gateways' request counts, which the "
    "agent reads with `--gateway-demand-url` (`node_agent/demand.py`) and the operator from "
    "its own reads of every gateway replica, with each model's requests running or waiting "
    "(`inFlight` plus `waiting`). Without a gateway there is neither: `cost` reads "
    "1 / idle time instead (recency times cost per byte) and the fixed minimum residency "
    "holds.",
    "6. Unserved requests: an incoming model displaces only models of its own priority or "
    "lower, so a low-priority model waits, and is given up after 600 s, while GPUs hold idle "
    "normal ones; most of them are a few large low models (the lines above name the 4-GPU "
    "ones). A rule that gives up low models first (`cost` weighs a low model half as much as "
    "a normal one) leaves less room held by low models for such a model to take, so it "
    "leaves more of them waiting: the unserved lines above count the cells. A policy's "
    "cold-load seconds leave out the loads its unserved requests would have needed: read "
    "them with the unserved counts beside them.",
    "",
    "`cost` is the agents' default (`--eviction-policy`, the chart's `agent.policy`) and the "
    "operator's default swap order (`--swap-order`, the chart's "
    "`operator.placement.swapOrder`), `lru2` on request.",
)


def workloads(rate: float) -> dict[str, Workload]:
    """The three traces at `rate` requests/s; bursts add a random model at the same rate."""
    duration = HOURS * 3600
    return {
        "Zipf 0.8": Workload(alpha=0.8, rate=rate, duration=duration),
        "Zipf 1.1": Workload(alpha=1.1, rate=rate, duration=duration),
        "bursty": Workload(
            alpha=0.8,
            rate=rate,
            duration=duration,
            burst_every=900,
            burst_seconds=300,
            burst_rate=rate,
        ),
    }


def _models(count: int, seed: int) -> list[SimModel]:
    return models_from_documents(catalog(count, seed))


def _share(base: ClusterSpec, gpus: int, count: int, seed: int) -> str:
    held = sum(sum(node.gpu_bytes) for node in base.with_gpus(gpus).nodes)
    return f"{100 * held / sum(m.vram_bytes for m in _models(count, seed)):.0f}%"


def _trace(models: Sequence[SimModel], workload: Workload, seed: int) -> Trace:
    return generate([m.key for m in models], workload, seed)


def _run(job: tuple[ClusterSpec, int, Workload, int, str]) -> Result:
    cluster, count, workload, seed, policy = job
    models = _models(count, seed)
    result = Simulation(cluster, models, _trace(models, workload, seed), policy).run()
    result.events.clear()
    return result


def _cell(r: Result, lru: Result) -> str:
    ratio = r.cold_load_seconds / lru.cold_load_seconds
    return f"{ratio:.2f} ({100 * r.warm_ratio:.0f}%, {r.unserved})"


def _goals(results: dict[str, Result], policy: str) -> tuple[bool, bool, bool]:
    mine = results[policy].cold_load_seconds
    return (
        mine <= 0.8 * results["lru"].cold_load_seconds,
        mine <= 0.8 * results["ollama"].cold_load_seconds,
        mine <= 1.15 * results["offline"].cold_load_seconds,
    )


def compare(
    seed: int, base: ClusterSpec, pool: ProcessPoolExecutor
) -> tuple[list[str], list[Result], list[dict[str, Result]]]:
    cells = [
        (name, gpus, count, workload)
        for name, workload in workloads(RATE).items()
        for gpus, count in SIZES
    ]
    jobs = [
        (base.with_gpus(gpus), count, workload, seed, policy)
        for _, gpus, count, workload in cells
        for policy in POLICY_NAMES
    ]
    flat = list(pool.map(_run, jobs))
    rows = [("trace", "GPUs / models", "requests", "lru cold-load s", *POLICY_NAMES)]
    met = {policy: [0, 0, 0] for policy in (OPERATOR, DEFAULT, OPERATOR_LRU2)}
    goal_rows = [
        ("trace", "GPUs", "policy", "<= 0.8 x lru", "<= 0.8 x ollama", "<= 1.15 x offline")
    ]
    shown: list[Result] = []
    for index, (name, gpus, count, _) in enumerate(cells):
        chunk = flat[index * len(POLICY_NAMES) : (index + 1) * len(POLICY_NAMES)]
        results = {r.policy: r for r in chunk}
        for r in chunk:
            assert r.critical_evictions == 0, r.policy
            assert r.overcommits == 0, r.policy
        lru = results["lru"]
        rows.append(
            (
                name,
                f"{gpus} / {count}",
                str(lru.requests),
                f"{lru.cold_load_seconds:.0f}",
                *(_cell(results[p], lru) for p in POLICY_NAMES),
            )
        )
        for policy in met:
            flags = _goals(results, policy)
            for i, flag in enumerate(flags):
                met[policy][i] += flag
            mine = results[policy].cold_load_seconds
            goal_rows.append(
                (
                    name,
                    str(gpus),
                    policy,
                    f"{'yes' if flags[0] else 'no'} ({mine / lru.cold_load_seconds:.2f})",
                    f"{'yes' if flags[1] else 'no'} "
                    f"({mine / results['ollama'].cold_load_seconds:.2f})",
                    f"{'yes' if flags[2] else 'no'} "
                    f"({mine / results['offline'].cold_load_seconds:.2f})",
                )
            )
        if (name, gpus) == SHOWN:
            shown = chunk
    total = len(cells)
    detail = [("policy", "cold starts", "wakes", "cold-load s", "warm hits", "added p99 s")]
    detail += [
        (
            r.policy,
            str(r.cold_starts),
            str(r.wakes),
            f"{r.cold_load_seconds:.0f}",
            f"{100 * r.warm_ratio:.1f}%",
            f"{r.latency(0.99):.1f}",
        )
        for r in shown
    ]
    lines = [markdown(rows), ""]
    lines += [f"{SHOWN[0]} on {SHOWN[1]} GPUs in detail:", "", markdown(detail), ""]
    lines.append(
        "The goal per cell (the policy's cold-load seconds over the reference's in brackets):"
    )
    lines += ["", markdown(goal_rows), ""]
    every = [
        {r.policy: r for r in flat[i * len(POLICY_NAMES) : (i + 1) * len(POLICY_NAMES)]}
        for i in range(total)
    ]
    for reference in ("cost", OPERATOR, OPERATOR_LRU2, "oracle-rate", "oracle-lfu", "offline"):
        ratios = [c[reference].cold_load_seconds / c["lru"].cold_load_seconds for c in every]
        lines.append(
            f"- `{reference}` against LRU over the {total} cells: "
            f"{min(ratios):.2f}-{max(ratios):.2f}"
        )

    def fewer(policy: str, than: str) -> int:
        return sum(c[policy].cold_load_seconds < c[than].cold_load_seconds for c in every)

    def unserved_more(policy: str, than: str) -> int:
        return sum(c[policy].unserved > c[than].unserved for c in every)

    lines += [
        f"- `cost` had fewer cold-load seconds than `hybrid`, the agents' former default, in "
        f"{fewer('cost', 'hybrid')}/{total} cells; `operator`, the operator's default order, "
        f"than `operator-lru2` in {fewer(OPERATOR, OPERATOR_LRU2)}/{total}",
        f"- below the offline reference: `cost` in {fewer('cost', 'offline')}/{total} cells, "
        f"`operator` in {fewer(OPERATOR, 'offline')}/{total}",
        f"- `oracle-rate` (the cost rule with the true rates) had more cold-load seconds than "
        f"`cost` in {fewer('cost', 'oracle-rate')}/{total} cells, and than `oracle-lfu` (the "
        f"true rates alone) in {fewer('oracle-lfu', 'oracle-rate')}/{total}",
        f"- more requests unserved than LRU: `cost` in {unserved_more('cost', 'lru')}/{total} "
        f"cells, `operator` in {unserved_more(OPERATOR, 'lru')}/{total}, `operator-lru2` in "
        f"{unserved_more(OPERATOR_LRU2, 'lru')}/{total}, `offline` in "
        f"{unserved_more('offline', 'lru')}/{total}",
    ]
    for index, (name, gpus, count, _) in enumerate(cells):
        lru = every[index]["lru"]
        if lru.unserved and lru.unserved >= 0.02 * lru.requests:
            key, many = max(lru.unserved_by_model.items(), key=lambda item: item[1])
            model = next(m for m in _models(count, seed) if m.key == key)
            lines.append(
                f"- unserved, {name} on {gpus} GPUs: {many} of LRU's {lru.unserved} are requests "
                f"for {key} ({model.priority}, {model.vram_bytes / 2**30:.0f} GiB, "
                f"{model.backend}), which may displace only low models and finds no GPU with "
                "that much held by them"
            )
    labels = {
        OPERATOR_LRU2: f"`{OPERATOR_LRU2}` (the operator's `--swap-order lru2`)",
        OPERATOR: f"`{OPERATOR}` (the operator's default swap order, `cost`)",
        DEFAULT: f"`{DEFAULT}` (the agents' default eviction policy)",
    }
    for policy, (lru_met, ollama_met, offline_met) in met.items():
        label = labels[policy]
        lines.append(
            f"- {label} met: >= 20% fewer cold-load seconds than LRU in {lru_met}/{total} "
            f"cells, than Ollama's rule in {ollama_met}/{total}, within 15% of the offline "
            f"reference in {offline_met}/{total}"
        )
    return lines, shown, every


def sensitivity(seed: int, base: ClusterSpec, pool: ProcessPoolExecutor) -> list[str]:
    gpus, count = 8, 100
    grid = [
        (name, rate, rule)
        for name in ("Zipf 0.8", "Zipf 1.1")
        for rate in SENSITIVITY_RATES
        for rule, _ in SENSITIVITY_RULES
    ]
    settings = dict(SENSITIVITY_RULES)
    jobs = [
        (
            replace(base.with_gpus(gpus), **settings[rule]),  # type: ignore[arg-type]
            count,
            workloads(rate)[name],
            seed,
            policy,
        )
        for name, rate, rule in grid
        for policy in SENSITIVITY_POLICIES
    ]
    flat = list(pool.map(_run, jobs))
    rows = [
        (
            "trace",
            "requests/s",
            "minimum residency",
            "lru cold-load s",
            *(p for p in SENSITIVITY_POLICIES if p != "lru"),
        )
    ]
    width = len(SENSITIVITY_POLICIES)
    for index, (name, rate, rule) in enumerate(grid):
        results = {r.policy: r for r in flat[index * width : (index + 1) * width]}
        lru = results["lru"]
        rows.append(
            (
                name,
                f"{rate:g}",
                rule,
                f"{lru.cold_load_seconds:.0f} ({100 * lru.warm_ratio:.0f}%, {lru.unserved})",
                *(_cell(results[p], lru) for p in SENSITIVITY_POLICIES if p != "lru"),
            )
        )
    lines = [markdown(rows), ""]
    for rule, _ in SENSITIVITY_RULES:
        picked = [
            {r.policy: r for r in flat[i * width : (i + 1) * width]}
            for i, (_, _, r) in enumerate(grid)
            if r == rule
        ]
        for policy in ("cost", OPERATOR, "oracle-lfu"):
            lru_ratios = [c[policy].cold_load_seconds / c["lru"].cold_load_seconds for c in picked]
            off_ratios = [
                c[policy].cold_load_seconds / c["offline"].cold_load_seconds for c in picked
            ]
            lines.append(
                f"- minimum residency {rule}, `{policy}`: {min(lru_ratios):.2f}-"
                f"{max(lru_ratios):.2f} x LRU, >= 20% fewer cold-load seconds than LRU in "
                f"{sum(x <= 0.8 for x in lru_ratios)}/{len(picked)} rows; "
                f"{min(off_ratios):.2f}-{max(off_ratios):.2f} x offline, within 15% of it in "
                f"{sum(x <= 1.15 for x in off_ratios)}/{len(picked)}"
            )
    return lines


SPEED_POLICIES = (DEFAULT, OPERATOR)
"""The agents' default and the operator's default swap-out, each timed on every GPU count."""


def speed(requests: int, seed: int, base: ClusterSpec, gpus: int, policy: str = DEFAULT) -> str:
    """Wall seconds, in this process (one core), for `requests` over 200 models on `gpus`."""
    models = _models(200, seed)
    workload = Workload(alpha=1.1, rate=requests / (24 * 3600), duration=24 * 3600)
    trace = _trace(models, workload, seed)
    started, cpu = time.perf_counter(), time.process_time()
    result = Simulation(base.with_gpus(gpus), models, trace, policy).run()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return (
        f"{len(trace)} requests over 200 models (Zipf 1.1, 24 h) on {gpus} GPUs, {policy}: "
        f"{cpu:.1f} s of CPU time on one core, {seconds:.1f} s of wall time "
        f"({result.cold_starts} cold starts, {100 * result.warm_ratio:.2f}% warm)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument(
        "--speed-gpus", default="32,16", help="GPU counts for the speed figure (32: all fits)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--no-sensitivity", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    base = load_cluster(ROOT / "examples" / "capacity" / "cluster.yaml")
    shares = ", ".join(f"{_share(base, g, n, args.seed)} ({g} GPUs / {n} models)" for g, n in SIZES)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        table, shown, _ = compare(args.seed, base, pool)
        compare_seconds = time.perf_counter() - started
        print(f"comparison: {compare_seconds:.0f} s", file=sys.stderr)
        extra = [] if args.no_sensitivity else sensitivity(args.seed, base, pool)
    counts = [int(g) for g in args.speed_gpus.split(",")]
    rates = [speed(args.requests, args.seed, base, g, p) for g in counts for p in SPEED_POLICIES]
    try:
        plot_results(shown, ROOT / "docs")
        plotted = f"docs/simulate.png is the {SHOWN[0]}, {SHOWN[1]} GPU run."
    except RuntimeError as exc:
        plotted = f"no plot: {exc}"
    command = f"python bench/capacity.py --seed {args.seed} --requests {args.requests}"
    command += f" --speed-gpus {args.speed_gpus} --jobs {args.jobs}"
    command += " --no-sensitivity" if args.no_sensitivity else ""
    lines = [
        f"{SECTION}: eviction policies on seeded traces (capacity simulator)",
        "",
        "Written by `python bench/capacity.py --write`; one deterministic run of every policy "
        "on the same traces. Never asserted in tests.",
        "",
        *stamp(),
        f"- command: `{command} --write`",
        f"- GPU memory over the catalog's bytes: {shares}",
        f"- scenario: each trace {HOURS:g} h at {RATE:g} request/s, seed {args.seed} (bursty: "
        "Zipf 0.8 plus, every 15 min on average, a random model asked for at the same rate "
        "for 5 min); 4 GPUs serving 50 ModelDeployments, 8 serving 100, 16 serving 200 "
        f"(`simulate catalog --seed {args.seed}`: 0.5-40 GiB, 70% Ollama, 30% vLLM with "
        "sleep mode, 2 critical, 10% high, 20% low); nodes of four 80 GiB GPUs, 512 GiB host "
        "RAM, disk 2 GiB/s, host RAM 16 GiB/s, load start 2 s (Ollama) / 20 s (vLLM), wake "
        "0.5 s plus size / 16 GiB/s, each request running 5 s on its model, the agents reading"
        " the gateways' demand (so a model's minimum residency, 120 s from its load, ends once "
        "it has served its requests and none runs or waits), waiting requests given up after "
        "600 s",
        "",
        "Each cell: cold-load seconds (disk loads plus wakes) relative to LRU on the same "
        "trace, then (warm-hit ratio, unserved requests). Critical evictions and "
        "over-commits were 0 in every run (checked by the script). `oracle-rate` is the "
        "`cost` rule told each model's true rate over the whole trace, `oracle-lfu` evicts "
        "the lowest true rate (blind to size and cost), `offline` the model needed furthest "
        "ahead: none of the three can run online. `operator` (the default) and `operator-lru2` "
        "are not agent policies but the operator's own swap-out for waiting requests, which a "
        "cluster with a gateway runs, by its two `--swap-order`s (point 3 below).",
        "",
        *table,
        f"- the comparison took {compare_seconds:.0f} s of wall time on {args.jobs} processes",
    ]
    lines += [f"- speed: {rate}" for rate in rates]
    if extra:
        lines += [
            "",
            "Sensitivity, 8 GPUs / 100 models, the same seed: the request rate (8 h each) and "
            "the agents' minimum residency rule (fixed: 120 s from the load, no demand figures; "
            "served: ended once the model has served its requests, which run 5 s or 30 s); "
            "cells as above, LRU's absolute "
            "figure with its (warm-hit ratio, unserved requests).",
            "",
            *extra,
        ]
    lines += ["", *PROSE]
    lines += [
        "",
        f"{plotted} The offline reference evicts the model needed furthest ahead: with models "
        "of different sizes and load costs that is a strong heuristic, not a proven optimum.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
