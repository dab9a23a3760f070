"""Measure a seeded burst of ModelDeployments on simulated nodes, against the code before.

Run: `python bench/burst.py` (after scripts/test.sh or scripts/demo.sh has set things up).
The same seeded burst (`vram_operator.simulation.burst`: Ollama and vLLM models, all four
priorities, some with 2 replicas, asking `--oversubscription` times the cluster's VRAM) is
applied at once twice, each time on a fresh local control plane with the current CRDs:
once with the operator, agents, vLLM supervisors and fake backends of this working tree, and
once with those of `--baseline` (a git worktree of that commit, put first on PYTHONPATH).
`vram_operator.simulation.audit` records every object version and samples the simulated GPUs
meanwhile. `--write` puts the figures into BENCHMARKS.md; they are never asserted in tests.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks_md import stamp, write_section
from kubernetes import client, config

from vram_operator.api import GROUP, VERSION
from vram_operator.localcluster import LocalControlPlane
from vram_operator.localcluster.controlplane import memory_dir
from vram_operator.simulation.audit import Audit
from vram_operator.simulation.burst import PENDING_REASONS, BurstModel, burst, ollama_catalog
from vram_operator.simulation.burst import settled as is_settled
from vram_operator.simulation.cluster import (
    SimulatedCluster,
    install_crds,
    install_trusted_policy,
)
from vram_operator.simulation.nodes import BACKEND_NICENESS, GiB, SimulatedNode

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "default"
MDEPS = "modeldeployments"
REPORT_INTERVAL = 1.0
HEARTBEAT_GRACE = 8.0
SECTION = "## Burst"
"""The heading that starts this script's section of BENCHMARKS.md."""

Body = dict[str, Any]


@dataclass
class Outcome:
    """The figures of one run."""

    label: str
    seconds: float
    """From the first apply until every object settled, or until the cap."""
    settled: bool
    unsettled: int
    apply_seconds: float
    assignments: int
    """Assignment keys added to GPUNode specs, over every recorded GPUNode version."""
    placed_counter: float | None
    """The operator's vram_operator_placements_total{outcome="placed"}, when it answered."""
    ready_latencies: list[float]
    status_latencies: list[float]
    """Per object: from its apply until the first version with a status."""
    ready: int
    pending: int
    other: int
    stale: list[str]
    overfull: list[str]
    held_twice: list[str]
    audit_errors: list[str]
    dead: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per component over the run (`cpu_by_component`)."""


CPU_GROUPS = (
    ("API server and etcd", "api"),
    ("operator", "operator"),
    ("agents", "agent"),
    ("vLLM supervisors with their fake vLLM servers", "vllm-supervisor"),
    ("fake Ollama", "ollama"),
    ("this script (applies, lists, records every version)", "script"),
)
"""The components whose CPU time the run reports, by the key `cpu_by_component` files under."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (the name before it may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of these processes, of the children they reaped and of their live descendants.

    Reaped children are in the parent's cutime/cstime, so a vLLM server started and stopped
    during the run still counts towards its supervisor.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks = 0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        fields = _stat_fields(pid)
        if fields is None:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        todo.extend(children.get(pid, []))
    return ticks / _CLOCK_TICKS


def cpu_by_component(cp: LocalControlPlane, cluster: SimulatedCluster) -> dict[str, float]:
    """CPU seconds each component has used since it started, read before anything stops."""
    by_kind: dict[str, list[int]] = {"api": cp.pids, "operator": []}
    for process in cluster.operators:
        if process.pid is not None:
            by_kind["operator"].append(process.pid)
    for node in cluster.nodes.values():
        for process in node.processes():
            if process.pid is not None:
                by_kind.setdefault(process.name.rsplit("/", 1)[-1], []).append(process.pid)
    own = os.times()
    figures = {kind: cpu_seconds(pids) for kind, pids in by_kind.items()}
    figures["script"] = own.user + own.system
    return figures


def _condition(body: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), {})


def _is_ready(body: Mapping[str, Any]) -> bool:
    return _condition(body, "Ready").get("status") == "True"


def _is_pending(body: Mapping[str, Any]) -> bool:
    scheduled = _condition(body, "Scheduled")
    return scheduled.get("status") == "False" and scheduled.get("reason") in PENDING_REASONS


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of `values` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A detached git worktree of `ref` in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vram-baseline-") as parent:
        path = Path(parent) / "src"
        _git("worktree", "add", "--detach", "--quiet", str(path), ref)
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False
            )


def _python(env: Mapping[str, str], *args: str) -> str:
    """Run this interpreter with `env` added, from the current directory; its stdout."""
    return subprocess.run(
        [sys.executable, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def code_in_use(env: Mapping[str, str]) -> Path:
    """Where the `vram_operator` that processes started with `env` import lives."""
    where = _python(env, "-c", "import vram_operator; print(vram_operator.__file__)")
    return Path(where.strip()).parent.parent


def supervisor_flags(env: Mapping[str, str]) -> frozenset[str]:
    """The long options `vram-operator vllm-supervisor` takes in the code `env` runs."""
    helptext = _python(env, "-m", "vram_operator", "vllm-supervisor", "--help")
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", helptext))


def node_class_for(flags: frozenset[str]) -> type[SimulatedNode]:
    """A SimulatedNode whose vLLM supervisor is given only the options it takes (an older
    supervisor lacks the simulation options of the current one; each takes a value)."""

    class CheckoutNode(SimulatedNode):
        def supervisor_argv(self, port: int) -> list[str]:
            argv = super().supervisor_argv(port)
            head, options = argv[:4], argv[4:]
            kept: list[str] = []
            for flag, value in zip(options[::2], options[1::2], strict=True):
                if flag in flags:
                    kept.extend((flag, value))
            return [*head, *kept]

    return CheckoutNode


def _wait(what: str, probe: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.3)


def _assignments_written(gpunodes: Sequence[tuple[float, Body]]) -> int:
    """Assignment keys that appear in a GPUNode's spec, counted at each appearance."""
    seen: dict[str, set[str]] = {}
    written = 0
    for _, body in sorted(gpunodes, key=lambda item: item[0]):
        name = body["metadata"]["name"]
        keys = set((body.get("spec") or {}).get("assignments") or {})
        written += len(keys - seen.get(name, set()))
        seen[name] = keys
    return written


def _placed_counter(port: str | None) -> float | None:
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    match = re.search(r'^vram_operator_placements_total\{[^}]*"placed"[^}]*\}\s+(\S+)', text, re.M)
    return float(match.group(1)) if match else None


def run_once(
    label: str,
    models: Sequence[BurstModel],
    nodes: int,
    gpu_bytes: int,
    cap: float,
    workdir: Path,
    env: Mapping[str, str],
) -> Outcome:
    """Apply the burst to a fresh simulated cluster running the code `env` selects."""
    # Every process starts in `workdir`: `python -m` puts its directory first on sys.path,
    # and from this checkout's root that would shadow a PYTHONPATH that selects another.
    with contextlib.chdir(workdir):
        code = code_in_use(env)
        expected = Path(env.get("PYTHONPATH", ROOT)).resolve()
        if code.resolve() != expected:
            raise RuntimeError(f"{label}: processes would run the code in {code}, not {expected}")
        print(f"[{label}] running the code in {code}", flush=True)
        # Compiled once for both runs alike: with PYTHONDONTWRITEBYTECODE set, every process
        # of every simulated node would compile the package again.
        compileall.compile_dir(str(code / "vram_operator"), quiet=1)
        return _run(label, models, nodes, gpu_bytes, cap, workdir, env)


def _run(
    label: str,
    models: Sequence[BurstModel],
    nodes: int,
    gpu_bytes: int,
    cap: float,
    workdir: Path,
    env: Mapping[str, str],
) -> Outcome:
    node_class = node_class_for(supervisor_flags(env))
    keys = {m.ollama_model: f"{NAMESPACE}.{m.name}" for m in models if m.ollama_model}
    replicas = {f"{NAMESPACE}.{m.name}": int(m.spec.get("replicas", 1)) for m in models}
    catalog = ollama_catalog(models, workdir / "catalog.json")
    with LocalControlPlane() as cp:
        assert cp.kubeconfig is not None
        api = config.new_client_from_config(  # type: ignore[no-untyped-call,unused-ignore]
            config_file=str(cp.kubeconfig)
        )
        custom = client.CustomObjectsApi(api)
        cluster = SimulatedCluster(api, str(cp.kubeconfig), workdir, env=env, node_class=node_class)
        audit = Audit(api, lambda: dict(cluster.nodes), lambda: keys)
        try:
            install_crds(api)
            install_trusted_policy(api)
            print(f"[{label}] starting {nodes} nodes", flush=True)
            for index in range(nodes):
                cluster.add_node(
                    f"node-{index}",
                    gpu_sizes=[gpu_bytes],
                    agent_args=("--report-interval", str(REPORT_INTERVAL)),
                    ollama_args=("--catalog", str(catalog)),
                )
            operator = cluster.start_operator("--heartbeat-grace", str(HEARTBEAT_GRACE))

            def reported() -> bool:
                listing: Any = custom.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
                return sum(bool(item.get("status")) for item in listing["items"]) == nodes

            _wait("every agent to report", reported, timeout=60 + 6 * nodes)
            _wait(
                "the operator to start",
                lambda: "operator state rebuilt" in operator.log_path.read_text(errors="replace"),
                timeout=60,
            )
            audit.start()
            print(f"[{label}] applying {len(models)} ModelDeployments", flush=True)
            applied: dict[str, float] = {}
            first = time.monotonic()
            for model in models:
                manifest: Body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ModelDeployment",
                    "metadata": {"name": model.name, "namespace": NAMESPACE},
                    "spec": dict(model.spec),
                }
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, MDEPS, manifest)
                applied[f"{NAMESPACE}.{model.name}"] = time.monotonic()
            apply_seconds = time.monotonic() - first
            bodies: dict[str, Body] = {}
            done = False
            while True:
                listing: Any = custom.list_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, MDEPS
                )
                bodies = {item["metadata"]["name"]: item for item in listing["items"]}
                elapsed = time.monotonic() - first
                waiting = sum(not is_settled(b) for b in bodies.values())
                waiting += len(models) - len(bodies)
                if waiting == 0:
                    done = True
                    break
                if elapsed > cap:
                    break
                print(f"[{label}] {elapsed:5.0f} s: {waiting} not settled", flush=True)
                time.sleep(1.0)
            seconds = min(time.monotonic() - first, cap) if not done else elapsed
            cpu = cpu_by_component(cp, cluster)
            audit.sample()
            audit.stop()
            ready_at: dict[str, float] = {}
            status_at: dict[str, float] = {}
            for stamp, body in sorted(audit.deployments, key=lambda item: item[0]):
                meta = body["metadata"]
                key = f"{meta['namespace']}.{meta['name']}"
                if key in applied and key not in status_at and body.get("status"):
                    status_at[key] = stamp - applied[key]
                if key in applied and key not in ready_at and _is_ready(body):
                    ready_at[key] = stamp - applied[key]
            dead = [
                p.name
                for p in [
                    *cluster.operators,
                    *(q for n in cluster.nodes.values() for q in n.processes()),
                ]
                if not p.alive()
            ]
            port = operator.argv[operator.argv.index("--metrics-port") + 1]
            return Outcome(
                label=label,
                seconds=seconds,
                settled=done,
                unsettled=waiting,
                apply_seconds=apply_seconds,
                assignments=_assignments_written(audit.gpunodes),
                placed_counter=_placed_counter(port),
                ready_latencies=list(ready_at.values()),
                status_latencies=list(status_at.values()),
                ready=sum(_is_ready(b) for b in bodies.values()),
                pending=sum(_is_pending(b) for b in bodies.values()),
                other=sum(not _is_ready(b) and not _is_pending(b) for b in bodies.values()),
                stale=audit.stale_ready_claims(REPORT_INTERVAL),
                overfull=audit.overfull_reports(),
                held_twice=audit.held_twice(replicas),
                audit_errors=[repr(e) for e in audit.errors],
                dead=dead,
                cpu=cpu,
            )
        finally:
            audit.stop()
            cluster.stop()
            api.close()


def rows(outcomes: Sequence[Outcome], count: int) -> list[tuple[str, list[str]]]:
    def settle(o: Outcome) -> str:
        if o.settled:
            return f"{o.seconds:.1f} s"
        return f"not settled after {o.seconds:.0f} s ({o.unsettled} of {count} not settled)"

    def spread(values: Sequence[float], none: str) -> str:
        if not values:
            return none
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        return f"{p50:.1f} s / {p99:.1f} s (n={len(values)})"

    def placements(o: Outcome) -> str:
        counter = "" if o.placed_counter is None else f"; operator counted {o.placed_counter:.0f}"
        return f"{o.assignments / o.seconds:.1f}/s ({o.assignments} written{counter})"

    def listed(problems: Sequence[str], what: str, separator: str = " ") -> str:
        if not problems:
            return "0"
        distinct = len({problem.split(separator, 1)[0] for problem in problems})
        return f"{len(problems)} ({distinct} {what})"

    table = [
        ("first apply → every object settled", [settle(o) for o in outcomes]),
        (f"apply of all {count} objects took", [f"{o.apply_seconds:.1f} s" for o in outcomes]),
        ("assignments written per second", [placements(o) for o in outcomes]),
        (
            "apply → first status, p50 / p99",
            [spread(o.status_latencies, "no status") for o in outcomes],
        ),
        (
            "apply → first Ready, p50 / p99",
            [spread(o.ready_latencies, "none Ready") for o in outcomes],
        ),
        (
            "ended Ready / Pending / neither",
            [f"{o.ready} / {o.pending} / {o.other}" for o in outcomes],
        ),
        (
            f"stretches > {REPORT_INTERVAL:g} s a status showed Loaded what its GPU did not hold",
            [listed(o.stale, "ModelDeployments") for o in outcomes],
        ),
        (
            "GPUNode versions reporting more than the GPU holds",
            [listed(o.overfull, "GPUNodes", "@") for o in outcomes],
        ),
        ("models held twice (samples)", [str(len(o.held_twice)) for o in outcomes]),
    ]
    table.extend(
        (f"CPU seconds: {what}", [f"{o.cpu.get(kind, 0.0):.0f}" for o in outcomes])
        for what, kind in CPU_GROUPS
    )
    if any(o.dead for o in outcomes):
        table.append(("processes dead at the end", [", ".join(o.dead) or "none" for o in outcomes]))
    if any(o.audit_errors for o in outcomes):
        table.append(("audit errors", ["; ".join(o.audit_errors) or "none" for o in outcomes]))
    return table


def markdown(
    outcomes: Sequence[Outcome],
    models: Sequence[BurstModel],
    args: argparse.Namespace,
    baseline: str,
) -> list[str]:
    backends = Counter(str(m.spec["backend"]) for m in models)
    doubles = sum(int(m.spec.get("replicas", 1)) > 1 for m in models)
    ollama_replicas = sum(int(m.spec.get("replicas", 1)) for m in models if m.ollama_model)
    ollama_per_node = ollama_replicas / max(args.nodes, 1)
    command = (
        f"python bench/burst.py --count {args.count} --nodes {args.nodes} --seed {args.seed} "
        f"--baseline {args.baseline} --cap {args.cap:g} --write"
    )
    table = rows(outcomes, len(models))
    return [
        f"{SECTION}: {len(models)} models at once on {args.nodes} simulated nodes",
        "",
        "Written by `python bench/burst.py --write`; one run of each, not a median. Never "
        "asserted in tests.",
        "",
        *stamp(),
        f"- command: `{command}`",
        f"- scenario: seed {args.seed}, {len(models)} ModelDeployments "
        f"({backends['ollama']} Ollama, {backends['vllm']} vLLM, {doubles} with 2 replicas) "
        f"asking {args.oversubscription:g}x the VRAM of {args.nodes} nodes with one "
        f"{args.gpu_gib:g} GiB simulated GPU each, applied one after another as fast as the API "
        f"server takes them; agents `--report-interval {REPORT_INTERVAL:g}`, operator "
        f"`--heartbeat-grace {HEARTBEAT_GRACE:g}`; every process of a simulated node and the "
        f"operator share this machine with the API server; the nodes' processes share one "
        f"session (one CPU share under Linux's autogroup scheduler, as other machines' work), "
        f"their backends at niceness {BACKEND_NICENESS} (`vram_operator.simulation.nodes`); "
        f"etcd's data in "
        f"{memory_dir() or 'the temp folder (no /dev/shm)'}",
        f"- baseline: the operator, agents, vLLM supervisors and fake backends of {baseline} "
        "(a git worktree on PYTHONPATH), with the current CRDs; each run on a fresh control "
        "plane",
        "",
        "| figure | " + " | ".join(o.label for o in outcomes) + " |",
        "| --- | " + " | ".join("---" for _ in outcomes) + " |",
        *(f"| {what} | " + " | ".join(values) + " |" for what, values in table),
        "",
        "Settled: Ready, or short of replicas for a reason capacity gives, with every placed "
        "replica Loaded (`vram_operator.simulation.burst.settled`). The truth figures come from "
        "`vram_operator.simulation.audit` over every recorded object version, not only the last.",
        "",
        "CPU seconds: each component's processes, the children they reaped and their live "
        "descendants, from /proc, since each started (the nodes and the operator start before "
        "the first apply), read when every object settled or at the cap; the machine has "
        f"{os.cpu_count()} cores' worth per second of wall time.",
        *(
            [
                "",
                "The fake backends run from each commit too, so the runs differ in more than the "
                "operator and agents: the current fake Ollama evicts beyond "
                "OLLAMA_MAX_LOADED_MODELS (16 by default, the chart's setting) as Ollama does, "
                f"{baseline}'s never did. With about {ollama_per_node:.0f} Ollama replicas "
                "asked per node the current run sees such evictions, which the operator "
                "withdraws and places afresh (`NotResident` in its log); that churn is in its "
                "figures.",
            ]
            if baseline != "-"
            else []
        ),
        "",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=300, help="ModelDeployments in the burst")
    parser.add_argument("--nodes", type=int, default=10, help="simulated nodes, one GPU each")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gpu-gib", type=float, default=24, help="each node's GPU, GiB")
    parser.add_argument("--oversubscription", type=float, default=1.5)
    parser.add_argument("--cap", type=float, default=180, help="seconds to wait for settling")
    parser.add_argument(
        "--baseline",
        default="a0d6ba7",
        help="the commit to compare with (its operator and agents); 'none' skips it",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep logs here (default: a temp directory)"
    )
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gpu_bytes = int(args.gpu_gib * GiB)
    models = burst(args.count, gpu_bytes, args.nodes, args.seed, args.oversubscription)
    head = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    current = f"current ({head}{' + working tree' if dirty else ''})"
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        plans: list[tuple[str, dict[str, str]]] = [(current, {})]
        baseline = ""
        if args.baseline != "none":
            baseline = _git("rev-parse", "--short", args.baseline)
            source = stack.enter_context(checkout(args.baseline))
            plans.append((f"baseline ({baseline})", {"PYTHONPATH": str(source)}))
        outcomes = []
        for index, (label, env) in enumerate(plans):
            workdir = root / f"run-{index}"
            workdir.mkdir(parents=True, exist_ok=True)
            outcomes.append(run_once(label, models, args.nodes, gpu_bytes, args.cap, workdir, env))
    for outcome in outcomes:
        for what, problems in (
            ("stale Loaded claims", outcome.stale),
            ("overfull GPUNode reports", outcome.overfull),
            ("held twice", outcome.held_twice),
        ):
            for problem in problems[:5]:
                print(f"[{outcome.label}] {what}: {problem}")
    lines = markdown(outcomes, models, args, baseline or "-")
    print("\n".join(lines))
    if args.write:
        write_section(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
