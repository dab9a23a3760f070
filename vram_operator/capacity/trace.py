"""Request traces: read and write them, generate seeded ones, convert the Azure Functions trace.

A trace is a list of requests (time in seconds, model, optional token count), in time order.
On disk it is CSV with a `time,model[,tokens]` header or JSON Lines with those keys; a time
is seconds from any origin or an ISO 8601 timestamp (then counted from the first one).

The generators draw Poisson arrivals, each for a model picked by Zipf popularity over a seeded
ranking of the models, optionally with a diurnal swing of the rate, and optionally with bursts:
at random moments a random model (most often one from the long tail) is asked for at a high
rate for a while, the way a batch job or a demo hits a model nobody used a minute before.

The Azure Functions 2019 trace (`invocations_per_function_md.anon.dNN.csv`: HashOwner,
HashApp, HashFunction, Trigger, then one column per minute 1..1440 with invocation counts) is
the shape the serverless-LLM literature (ServerlessLLM, OSDI'24) replays as multi-model load:
functions are ranked by total invocations and the i-th is mapped to the i-th model, and each
minute's invocations are spread uniformly (seeded) over that minute.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


class TraceError(ValueError):
    """A trace file or generator setting that cannot be used; the message says where."""


@dataclass
class Trace:
    """Requests in time order, as parallel lists (a million requests stay cheap)."""

    times: list[float] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    tokens: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.times)

    @property
    def duration(self) -> float:
        return self.times[-1] - self.times[0] if self.times else 0.0

    @classmethod
    def from_requests(cls, requests: Iterable[tuple[float, str, int | None]]) -> Trace:
        """From (time, model, tokens) tuples in any order; sorted by time, stably."""
        ordered = sorted(requests, key=lambda r: r[0])
        return cls(
            times=[r[0] for r in ordered],
            models=[r[1] for r in ordered],
            tokens=[r[2] for r in ordered],
        )


def _time(raw: Any, origin: list[float], where: str) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    else:
        text = str(raw).strip()
        try:
            value = float(text)
        except ValueError:
            try:
                stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise TraceError(f"{where}: time {raw!r} is neither seconds nor ISO 8601") from None
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.UTC)
            if not origin:
                origin.append(stamp.timestamp())
            value = stamp.timestamp() - origin[0]
    if not math.isfinite(value):
        raise TraceError(f"{where}: time {raw!r} is not finite")
    return value


def _tokens(raw: Any, where: str) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: tokens {raw!r} is not a whole number") from None
    if value < 0:
        raise TraceError(f"{where}: tokens must be >= 0, got {value}")
    return value


def read_trace(path: str | Path) -> Trace:
    """A trace from a .csv or .jsonl/.ndjson/.json file (by suffix)."""
    path = Path(path)
    origin: list[float] = []
    requests: list[tuple[float, str, int | None]] = []
    with open(path, newline="") as handle:
        if path.suffix in (".jsonl", ".ndjson", ".json"):
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{where}: {exc.msg}") from None
                if not isinstance(row, dict) or "time" not in row or "model" not in row:
                    raise TraceError(f"{where}: an object with `time` and `model` is needed")
                requests.append(
                    (
                        _time(row["time"], origin, where),
                        str(row["model"]),
                        _tokens(row.get("tokens"), where),
                    )
                )
        else:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"time", "model"} <= set(reader.fieldnames):
                raise TraceError(f"{path}: a CSV header with `time` and `model` is needed")
            for number, row in enumerate(reader, 2):
                where = f"{path}:{number}"
                requests.append(
                    (
                        _time(row["time"], origin, where),
                        row["model"],
                        _tokens(row.get("tokens"), where),
                    )
                )
    return Trace.from_requests(requests)


def write_trace(trace: Trace, path: str | Path) -> None:
    """Write as CSV, or as JSON Lines when the name ends in .jsonl or .ndjson."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        if path.suffix in (".jsonl", ".ndjson"):
            for time, model, tokens in zip(trace.times, trace.models, trace.tokens, strict=True):
                row: dict[str, Any] = {"time": round(time, 3), "model": model}
                if tokens is not None:
                    row["tokens"] = tokens
                handle.write(json.dumps(row) + "\n")
            return
        _write_csv(trace, handle)


def _write_csv(trace: Trace, handle: IO[str]) -> None:
    writer = csv.writer(handle)
    with_tokens = any(t is not None for t in trace.tokens)
    writer.writerow(["time", "model", "tokens"] if with_tokens else ["time", "model"])
    for time, model, tokens in zip(trace.times, trace.models, trace.tokens, strict=True):
        row = [f"{time:.3f}", model]
        if with_tokens:
            row.append("" if tokens is None else str(tokens))
        writer.writerow(row)


@dataclass(frozen=True)
class Workload:
    """A seeded synthetic workload; see the module docstring."""

    alpha: float = 0.8
    """Zipf exponent of model popularity (0.8 flat-ish, 1.1 steep)."""
    rate: float = 1.0
    """Mean requests per second (before bursts)."""
    duration: float = 3600.0
    """Seconds of trace."""
    diurnal_amplitude: float = 0.0
    """0..1: the rate swings between (1-a) and (1+a) times `rate` over `period` seconds."""
    period: float = 86400.0
    burst_every: float = 0.0
    """Mean seconds between bursts; 0: no bursts."""
    burst_seconds: float = 120.0
    burst_rate: float = 1.0
    """Requests per second to the burst's model while it lasts."""
    mean_tokens: int = 0
    """When > 0, each request carries a token count drawn around this mean."""

    def __post_init__(self) -> None:
        checks = (
            ("alpha", self.alpha >= 0),
            ("rate", self.rate > 0),
            ("duration", self.duration > 0),
            ("diurnal_amplitude", 0 <= self.diurnal_amplitude <= 1),
            ("period", self.period > 0),
            ("burst_every", self.burst_every >= 0),
            ("burst_seconds", self.burst_seconds > 0),
            ("burst_rate", self.burst_rate > 0),
            ("mean_tokens", self.mean_tokens >= 0),
        )
        for name, ok in checks:
            if not ok:
                raise TraceError(f"{name}: {getattr(self, name)} is out of range")


def _arrivals(rng: random.Random, rate: float, start: float, end: float) -> list[float]:
    times = []
    time = start + rng.expovariate(rate)
    while time < end:
        times.append(time)
        time += rng.expovariate(rate)
    return times


def generate(models: Sequence[str], workload: Workload, seed: int) -> Trace:
    """A seeded trace over `models` (their popularity ranking is a seeded shuffle)."""
    if not models:
        raise TraceError("models: at least one model is needed")
    rng = random.Random(seed)
    ranked = list(models)
    rng.shuffle(ranked)
    cumulative = list(
        itertools.accumulate(1.0 / (i**workload.alpha) for i in range(1, len(ranked) + 1))
    )
    peak = workload.rate * (1 + workload.diurnal_amplitude)
    times = _arrivals(rng, peak, 0.0, workload.duration)
    if workload.diurnal_amplitude > 0:
        omega = 2 * math.pi / workload.period
        keep = [
            t
            for t in times
            if rng.random() * peak
            < workload.rate * (1 + workload.diurnal_amplitude * math.sin(omega * t))
        ]
        times = keep
    names = rng.choices(ranked, cum_weights=cumulative, k=len(times))
    requests = list(zip(times, names, strict=True))
    if workload.burst_every > 0:
        for start in _arrivals(rng, 1.0 / workload.burst_every, 0.0, workload.duration):
            model = rng.choice(ranked)
            end = min(workload.duration, start + workload.burst_seconds)
            requests.extend((t, model) for t in _arrivals(rng, workload.burst_rate, start, end))
    tokens: list[int | None]
    requests.sort(key=lambda r: r[0])
    if workload.mean_tokens:
        mean = workload.mean_tokens
        tokens = [max(1, int(rng.expovariate(1.0 / mean))) for _ in requests]
    else:
        tokens = [None] * len(requests)
    return Trace([r[0] for r in requests], [r[1] for r in requests], tokens)


AZURE_FIXED_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")


def convert_azure(
    paths: Sequence[str | Path],
    models: Sequence[str],
    *,
    seed: int = 0,
    scale: float = 1.0,
    minutes: int | None = None,
) -> Trace:
    """Azure Functions per-minute invocation counts mapped to models by popularity rank.

    `paths` are day files in order (day k starts at k * 86400 s). A function is identified by
    (owner, app, function); the most invoked is mapped to models[0], the next to models[1], and
    so on; functions beyond len(models) are dropped. `scale` keeps each invocation with that
    probability (the trace has billions); `minutes` cuts each day after that many minutes.
    """
    if not models:
        raise TraceError("models: at least one model is needed")
    if not 0 < scale <= 1:
        raise TraceError(f"scale: must be in (0, 1], got {scale}")
    counts: dict[tuple[str, str, str], dict[int, int]] = {}
    for day, path in enumerate(paths):
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or tuple(header[:3]) != AZURE_FIXED_COLUMNS[:3]:
                raise TraceError(
                    f"{path}: not the Azure Functions layout "
                    f"(header {', '.join(AZURE_FIXED_COLUMNS)}, 1..1440)"
                )
            first = 4 if len(header) > 3 and header[3] == "Trigger" else 3
            minute_columns = [int(c) for c in header[first:]]
            for number, row in enumerate(reader, 2):
                function = (row[0], row[1], row[2])
                per_minute = counts.setdefault(function, {})
                for column, cell in zip(minute_columns, row[first:], strict=False):
                    if minutes is not None and column > minutes:
                        break
                    if not cell or cell == "0":
                        continue
                    try:
                        value = int(float(cell))
                    except ValueError:
                        raise TraceError(
                            f"{path}:{number}: count {cell!r} is not a number"
                        ) from None
                    slot = day * 1440 + column - 1
                    per_minute[slot] = per_minute.get(slot, 0) + value
    ranked = sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    rng = random.Random(seed)
    requests: list[tuple[float, str, int | None]] = []
    for (_, per_minute), model in zip(ranked, models, strict=False):
        for slot, count in per_minute.items():
            kept = count if scale >= 1 else sum(1 for _ in range(count) if rng.random() < scale)
            requests.extend((60.0 * (slot + rng.random()), model, None) for _ in range(kept))
    return Trace.from_requests(requests)


def resolve(trace: Trace, keys: Sequence[str], refs: Sequence[str]) -> tuple[list[int], list[str]]:
    """Each request's model as an index into `keys`, and the names matching none.

    A trace names a model by its key (namespace.name), its name, or its spec.model.
    """
    lookup: dict[str, int] = {}
    for index, (key, ref) in enumerate(zip(keys, refs, strict=True)):
        lookup.setdefault(ref, index)
        lookup.setdefault(key.split(".", 1)[-1], index)
    for index, key in enumerate(keys):
        lookup[key] = index
    indices: list[int] = []
    unknown: set[str] = set()
    for name in trace.models:
        index = lookup.get(name, -1)
        if index < 0:
            unknown.add(name)
        indices.append(index)
    return indices, sorted(unknown)
