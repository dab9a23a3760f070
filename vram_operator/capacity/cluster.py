"""What the simulator replays against: a described cluster and the models it serves.

A cluster file (YAML) describes nodes by their GPU sizes, host RAM and the two speeds a
model comes back at (disk to GPU, host RAM to GPU), plus the fixed part of a load::

    minResidencySeconds: 120        # the agent's --min-residency
    gatewayDemand: true             # the agents read the gateways' demand (--gateway-demand-url)
    requestSeconds: 5               # how long a request runs on its model (trace without tokens)
    tokensPerSecond: 50             # how fast a request's tokens come (trace with tokens)
    minFree: 256Mi                  # the agent's --min-free
    strategy: binpack               # the operator's placement strategy
    startSeconds: {ollama: 2, vllm: 20}   # fixed part of a cold load, per backend
    wakeSeconds: 0.5                # fixed part of a wake from host RAM
    nodes:
      - name: h100                  # with count > 1: h100-0, h100-1, ...
        count: 2
        gpus: [80Gi, 80Gi, 80Gi, 80Gi]
        hostMemory: 1Ti
        diskBandwidth: 2Gi          # bytes per second, disk to GPU
        hostBandwidth: 16Gi         # bytes per second, host RAM to GPU
        labels: {gpu: h100}
        taints: []

Models are ModelDeployments, read from the same YAML a user applies (validated by the API
models) or listed from a live cluster (`vram_operator.capacity.live`). The simulator needs
`spec.vram`: the estimate the agent would make needs the backend itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vram_operator.api import Backend, ModelDeployment, Priority, parse_bytes
from vram_operator.api.modeldeployment import Toleration
from vram_operator.operator.placement import Taint

GIB = 2**30

OLLAMA_DEFAULT_KEEP_ALIVE = 300.0
"""Ollama's OLLAMA_KEEP_ALIVE default (5m), for a model whose spec sets no keepAlive."""


DEFAULT_START_SECONDS: Mapping[Backend, float] = {Backend.OLLAMA: 2.0, Backend.VLLM: 20.0}
"""Fixed part of a cold load: an Ollama runner starts in about two seconds; `vllm serve`
takes tens of seconds (engine start, CUDA graph capture) before the weights stream."""


class DescriptionError(ValueError):
    """A cluster or model description the simulator cannot use; the message says which field."""


@dataclass(frozen=True)
class NodeSpec:
    """One GPU node of the described cluster."""

    name: str
    gpu_bytes: tuple[int, ...]
    host_bytes: int = 512 * GIB
    disk_bytes_per_second: float = 2.0 * GIB
    host_bytes_per_second: float = 16.0 * GIB
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()


@dataclass(frozen=True)
class ClusterSpec:
    """The described cluster and the settings of the operator and agents that run it."""

    nodes: tuple[NodeSpec, ...]
    start_seconds: Mapping[Backend, float] = field(
        default_factory=lambda: dict(DEFAULT_START_SECONDS)
    )
    """Fixed part of a cold load: server start, CUDA context, graph capture."""
    wake_seconds: float = 0.5
    """Fixed part of waking a parked vLLM model (sleep level 1)."""
    min_free_bytes: int = 256 * 2**20
    min_residency_seconds: float = 120.0
    gateway_demand: bool = True
    """The agents read the gateways' demand, as the chart has them do: a model's minimum
    residency ends once it has served its requests and none runs or waits, and `cost` weighs
    request rates (else 1 / idle time)."""
    request_seconds: float = 5.0
    """How long a request keeps its model in use when the trace gives no tokens: a chat answer
    of a few hundred tokens."""
    tokens_per_second: float = 50.0
    """How fast a request's tokens come, for a trace that gives them."""
    strategy: str = "binpack"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tokens_per_second) and self.tokens_per_second > 0):
            raise DescriptionError(
                f"tokensPerSecond: must be a finite number > 0, got {self.tokens_per_second}"
            )

    def request_duration(self, tokens: int | None) -> float:
        """Seconds a request of `tokens` (None: not given) keeps its model in use."""
        return self.request_seconds if tokens is None else tokens / self.tokens_per_second

    @property
    def gpu_count(self) -> int:
        return sum(len(node.gpu_bytes) for node in self.nodes)

    def with_gpus(self, count: int) -> ClusterSpec:
        """The same cluster resized to `count` GPUs: copies of the first node, the last one
        holding what is left over (for the capacity sweep)."""
        if count < 1:
            raise DescriptionError(f"GPU count must be at least 1, got {count}")
        template = self.nodes[0]
        per_node = len(template.gpu_bytes)
        nodes = []
        for index in range(math.ceil(count / per_node)):
            gpus = template.gpu_bytes[: min(per_node, count - index * per_node)]
            nodes.append(replace(template, name=f"{template.name}-{index}", gpu_bytes=gpus))
        return replace(self, nodes=tuple(nodes))

    def load_seconds(self, node: NodeSpec, model: SimModel) -> float:
        """Seconds to load `model` from disk onto a GPU of `node`."""
        start = self.start_seconds.get(model.backend, 0.0)
        return start + model.vram_bytes / node.disk_bytes_per_second

    def wake_seconds_for(self, node: NodeSpec, model: SimModel) -> float:
        """Seconds to wake `model` from host RAM on `node`."""
        return self.wake_seconds + model.vram_bytes / node.host_bytes_per_second


@dataclass(frozen=True)
class SimModel:
    """A ModelDeployment as the simulator sees it: one copy, loaded on demand."""

    key: str
    """namespace.name, the assignment key."""
    ref: str
    """spec.model, the backend's reference."""
    backend: Backend
    priority: Priority
    vram_bytes: int
    keep_alive_seconds: float = OLLAMA_DEFAULT_KEEP_ALIVE
    can_park: bool = False
    """vLLM with sleep mode: a victim can go to host RAM and wake in about a second."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[-1]


def _bytes(raw: Any, where: str) -> int:
    try:
        return parse_bytes(str(raw))
    except ValueError as exc:
        raise DescriptionError(f"{where}: {exc}") from None


def _seconds(raw: Any, where: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DescriptionError(f"{where}: must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise DescriptionError(f"{where}: must be a finite number >= 0, got {raw!r}")
    return value


def _speed(raw: Any, where: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DescriptionError(f"{where}: must be a number per second, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise DescriptionError(f"{where}: must be a finite number > 0, got {raw!r}")
    return value


def _flag(raw: Any, where: str) -> bool:
    if not isinstance(raw, bool):
        raise DescriptionError(f"{where}: must be true or false, got {raw!r}")
    return raw


def _node(raw: Mapping[str, Any], index: int) -> list[NodeSpec]:
    where = f"nodes[{index}]"
    gpus = raw.get("gpus")
    if not isinstance(gpus, list) or not gpus:
        raise DescriptionError(f"{where}.gpus: a list of GPU memory sizes is required (80Gi)")
    name = str(raw.get("name", f"node-{index}"))
    count = int(raw.get("count", 1))
    if count < 1:
        raise DescriptionError(f"{where}.count: must be at least 1, got {count}")
    speeds = {}
    for key, default in (("diskBandwidth", 2 * GIB), ("hostBandwidth", 16 * GIB)):
        speeds[key] = float(_bytes(raw.get(key, default), f"{where}.{key}"))
        if speeds[key] <= 0:
            raise DescriptionError(f"{where}.{key}: must be positive bytes per second")
    base = NodeSpec(
        name=name,
        gpu_bytes=tuple(_bytes(g, f"{where}.gpus") for g in gpus),
        host_bytes=_bytes(raw.get("hostMemory", 512 * GIB), f"{where}.hostMemory"),
        disk_bytes_per_second=speeds["diskBandwidth"],
        host_bytes_per_second=speeds["hostBandwidth"],
        labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
        taints=tuple(Taint.from_k8s(t) for t in raw.get("taints") or ()),
    )
    if count == 1:
        return [base]
    return [replace(base, name=f"{name}-{i}") for i in range(count)]


def parse_cluster(raw: Mapping[str, Any]) -> ClusterSpec:
    """A ClusterSpec from a cluster file's contents; DescriptionError names a bad field."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("nodes"), list):
        raise DescriptionError("cluster: a mapping with a `nodes` list is required")
    nodes = [n for i, r in enumerate(raw["nodes"]) for n in _node(r, i)]
    if not nodes:
        raise DescriptionError("cluster.nodes: at least one node is required")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise DescriptionError(f"cluster.nodes: node names repeat: {sorted(names)}")
    start = dict(DEFAULT_START_SECONDS)
    for backend, value in (raw.get("startSeconds") or {}).items():
        try:
            start[Backend(backend)] = _seconds(value, f"startSeconds.{backend}")
        except ValueError as exc:
            raise DescriptionError(f"startSeconds: {exc}") from None
    strategy = str(raw.get("strategy", "binpack"))
    if strategy not in ("binpack", "spread"):
        raise DescriptionError(f"strategy: binpack or spread, got {strategy!r}")
    return ClusterSpec(
        nodes=tuple(nodes),
        start_seconds=start,
        wake_seconds=_seconds(raw.get("wakeSeconds", 0.5), "wakeSeconds"),
        min_free_bytes=_bytes(raw.get("minFree", "256Mi"), "minFree"),
        min_residency_seconds=_seconds(
            raw.get("minResidencySeconds", 120.0), "minResidencySeconds"
        ),
        gateway_demand=_flag(raw.get("gatewayDemand", True), "gatewayDemand"),
        request_seconds=_seconds(raw.get("requestSeconds", 5.0), "requestSeconds"),
        tokens_per_second=_speed(raw.get("tokensPerSecond", 50.0), "tokensPerSecond"),
        strategy=strategy,
    )


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a cluster file."""
    with open(path) as handle:
        return parse_cluster(yaml.safe_load(handle))


def model_from_object(raw: Mapping[str, Any]) -> SimModel:
    """A SimModel from a ModelDeployment object, validated by the API models."""
    try:
        obj = ModelDeployment.model_validate(raw)
    except ValueError as exc:
        name = (raw.get("metadata") or {}).get("name", "?")
        raise DescriptionError(f"ModelDeployment {name}: {exc}") from None
    name = obj.metadata.get("name")
    if not name:
        raise DescriptionError("ModelDeployment: metadata.name is required")
    namespace = obj.metadata.get("namespace") or "default"
    spec = obj.spec
    if spec.vram_bytes is None:
        raise DescriptionError(
            f"ModelDeployment {namespace}/{name}: spec.vram is required to simulate "
            "(the estimate the agent makes needs the backend)"
        )
    keep_alive = spec.keep_alive_seconds
    return SimModel(
        key=f"{namespace}.{name}",
        ref=spec.model,
        backend=spec.backend,
        priority=spec.priority,
        vram_bytes=spec.vram_bytes,
        keep_alive_seconds=OLLAMA_DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive,
        can_park=spec.backend is Backend.VLLM and (spec.vllm is None or spec.vllm.sleep_mode),
        node_selector=dict(spec.node_selector),
        tolerations=tuple(spec.tolerations),
    )


def models_from_documents(documents: Iterable[Any]) -> list[SimModel]:
    """The ModelDeployments among YAML documents (a `List` kind is opened); others are skipped."""
    models: list[SimModel] = []
    for doc in documents:
        if not isinstance(doc, Mapping):
            continue
        if doc.get("kind") == "List" or (doc.get("items") and "kind" not in doc):
            models.extend(models_from_documents(doc.get("items") or ()))
        elif doc.get("kind") == "ModelDeployment":
            models.append(model_from_object(doc))
    keys = [m.key for m in models]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise DescriptionError(f"ModelDeployments repeat: {', '.join(repeated)}")
    return models


def load_models(paths: Sequence[str | Path]) -> list[SimModel]:
    """Every ModelDeployment in these YAML files (or folders of them), in file order."""
    documents: list[Any] = []
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
        for file in files:
            with open(file) as handle:
                documents.extend(yaml.safe_load_all(handle))
    models = models_from_documents(documents)
    if not models:
        raise DescriptionError(f"no ModelDeployment in {', '.join(map(str, paths))}")
    return models


# Size classes of a realistic catalog: (parameters, Ollama q4 GiB, vLLM bf16 GiB, weight).
# Ollama's figures are its /api/ps size at num_ctx 4096; vLLM's the weights plus a KV cache.
_FAMILIES = (
    ("0.5b", 0.6, 1.6, 6),
    ("1b", 1.3, 3.0, 10),
    ("3b", 3.2, 8.0, 12),
    ("7b", 5.5, 17.0, 20),
    ("8b", 6.2, 19.0, 18),
    ("14b", 10.5, 32.0, 12),
    ("32b", 21.0, 40.0, 8),
    ("70b", 40.0, 40.0, 4),
)


def catalog(count: int, seed: int) -> list[dict[str, Any]]:
    """`count` seeded ModelDeployment objects of realistic sizes (0.5 to 40 GiB).

    About 70% Ollama (4-bit), 30% vLLM (bf16, sleep mode on, sizes capped at 40 GiB as for a
    quantized large model); the first two are small critical models, then about 10% high,
    20% low and the rest normal; keepAlive as people set it (mostly left at Ollama's 5m).
    """
    rng = random.Random(seed)
    weights = [family[3] for family in _FAMILIES]
    objects = []
    for index in range(count):
        family = rng.choices(_FAMILIES, weights=weights)[0]
        vllm = rng.random() < 0.3
        gib = (family[2] if vllm else family[1]) * rng.uniform(0.85, 1.15)
        gib = min(40.0, max(0.5, gib))
        if index < 2:
            priority, gib = Priority.CRITICAL, min(gib, 4.0)
        else:
            roll = rng.random()
            priority = (
                Priority.HIGH if roll < 0.1 else Priority.LOW if roll < 0.3 else Priority.NORMAL
            )
        name = f"m{index:03d}-{family[0]}"
        spec: dict[str, Any] = {
            "backend": "vllm" if vllm else "ollama",
            "model": f"org/model-{index:03d}-{family[0]}"
            if vllm
            else f"model{index:03d}:{family[0]}",
            "priority": str(priority),
            "vram": f"{math.ceil(gib * 1024)}Mi",
        }
        keep = rng.random()
        if keep > 0.6:
            spec["keepAlive"] = "30m" if keep < 0.8 else "1h" if keep < 0.9 else "10m"
        objects.append(
            {
                "apiVersion": "vram.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": "default"},
                "spec": spec,
            }
        )
    return objects
