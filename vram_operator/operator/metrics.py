"""The operator's Prometheus metrics, on a private registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    """Reconciles and their latency, placements by outcome, pending models by reason; cold
    starts, wake-ups, swap-outs and demand's wake-ups of idle or scaled-to-zero models."""

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
        self.cold_starts = Counter(
            "vram_operator_cold_starts_total",
            "Replicas that became Loaded from disk (not woken from host RAM), per model.",
            ["namespace", "name"],
            registry=self.registry,
        )
        self.cold_start_seconds = Histogram(
            "vram_operator_cold_start_duration_seconds",
            "Load time of a cold start as the agent measured it, by backend.",
            ["backend"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.wake_ups = Counter(
            "vram_operator_wake_ups_total",
            "Replicas woken from host RAM (Sleeping to Loaded), per model.",
            ["namespace", "name"],
            registry=self.registry,
        )
        self.swap_outs = Counter(
            "vram_operator_swap_outs_total",
            "Replicas withdrawn to make room for another model, by cause: demand (requests "
            "waited for it) or priority (preemption).",
            ["cause"],
            registry=self.registry,
        )
        self.wake_requests = Counter(
            "vram_operator_demand_wakes_total",
            "Models a request brought back, by cause: idle (past keepAlive) or zero (autoscaled "
            "to zero).",
            ["cause"],
            registry=self.registry,
        )
