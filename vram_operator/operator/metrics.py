"""The operator's Prometheus metrics, on a private registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    """Reconciles and their latency, placements by outcome, pending models by reason."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "vram_operator_reconciles_total",
            "ModelDeployment reconciles by result.",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "vram_operator_reconcile_duration_seconds",
            "Time one ModelDeployment reconcile took.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.placements = Counter(
            "vram_operator_placements_total",
            "Replica placements by outcome (placed, preempted, withdrawn, pending).",
            ["outcome"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "vram_operator_pending_models",
            "ModelDeployments not fully scheduled, by reason.",
            ["reason"],
            registry=self.registry,
        )
