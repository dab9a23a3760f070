"""A seeded burst of ModelDeployments for a simulated cluster: the scenario the integration
tests and `bench/burst.py` apply, and what counts as settled.

The burst mixes Ollama and vLLM models, all four priorities and some 2-replica models, and
asks for `oversubscription` times the VRAM the cluster's GPUs can hold (each replica counted
by the accounting rule the operator reserves by), so some must end Pending with a true reason.
Every model has its own name, so its memory on a simulated GPU is attributed to it alone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vram_operator.api import Backend, parse_bytes
from vram_operator.api.budget import footprint_bytes

MIB = 2**20
PENDING_REASONS = frozenset({"InsufficientVRAM", "Preempted", "NoMatchingNodes"})
"""Scheduled=False reasons that are a final answer while the cluster stays as it is."""

_PRIORITIES = (("critical", 0.05), ("high", 0.2), ("normal", 0.45), ("low", 0.3))
_SIZES_MIB = (256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class BurstModel:
    """One ModelDeployment of the burst."""

    name: str
    spec: Mapping[str, Any]

    @property
    def ollama_model(self) -> str | None:
        return self.spec["model"] if self.spec["backend"] == "ollama" else None


def burst(
    count: int,
    gpu_bytes: int,
    gpus: int,
    seed: int,
    oversubscription: float = 1.5,
    vllm_share: float = 0.3,
) -> list[BurstModel]:
    """`count` models whose replicas ask for `oversubscription` x the cluster's memory.

    Sizes are drawn, then scaled so the total footprint hits the target; names are
    `burst-<i>`, Ollama models `burst-<i>:1b`, vLLM models `burst/model-<i>`.
    """
    rng = random.Random(seed)
    drafts = []
    for index in range(count):
        backend = Backend.VLLM if rng.random() < vllm_share else Backend.OLLAMA
        priority = rng.choices([p for p, _ in _PRIORITIES], [w for _, w in _PRIORITIES])[0]
        replicas = 2 if rng.random() < 0.1 and gpus > 1 else 1
        drafts.append((index, backend, priority, replicas, rng.choice(_SIZES_MIB) * MIB))
    wanted = oversubscription * gpus * gpu_bytes

    def total(scale: float) -> float:
        return sum(
            r * footprint_bytes(b, max(MIB, int(size * scale)), gpu_bytes)
            for _, b, _, r, size in drafts
        )

    low, high = 0.01, 100.0
    for _ in range(60):  # the footprint grows with the scale: bisect for the target
        middle = (low + high) / 2
        low, high = (middle, high) if total(middle) < wanted else (low, middle)
    models = []
    for index, backend, priority, replicas, size in drafts:
        vram = max(MIB, int(size * low)) // MIB * MIB or MIB
        name = f"burst-{index}"
        model = f"{name}:1b" if backend is Backend.OLLAMA else f"burst/model-{index}"
        spec = {
            "model": model,
            "backend": backend.value,
            "priority": priority,
            "replicas": replicas,
            "vram": f"{vram // MIB}Mi",
        }
        models.append(BurstModel(name, spec))
    return models


def ollama_catalog(models: Sequence[BurstModel], path: Path) -> Path:
    """A catalog for the fake Ollama in which each burst model is exactly its spec.vram."""
    entries = {}
    for model in models:
        if model.ollama_model is not None:
            size = parse_bytes(str(model.spec["vram"]))
            entries[model.ollama_model] = {"size": max(size // 2, 1), "size_vram": size}
    path.write_text(json.dumps(entries))
    return path


def settled(body: Mapping[str, Any] | None) -> bool:
    """Whether a ModelDeployment has reached a final answer: Ready, or short of replicas for
    a reason capacity gives, with every placed replica Loaded (nothing Loading, Evicted,
    Failed or Unloading)."""
    status = (body or {}).get("status") or {}
    states = {p.get("state") for p in status.get("placements") or []}
    if states - {"Loaded"}:
        return False
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready") or {}
    if ready.get("status") == "True":
        return True
    scheduled = conditions.get("Scheduled") or {}
    return scheduled.get("status") == "False" and scheduled.get("reason") in PENDING_REASONS
