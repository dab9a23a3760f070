"""The agent's Prometheus metrics, on a private registry so tests can read them in isolation."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vram_operator.api import GPU, MemoryPressure, ModelState

from .registry import Entry


class AgentMetrics:
    """Gauges are set from each report; counters grow as the agent acts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        gpu_labels = ["gpu_uuid", "gpu_name"]
        self.gpu_total = Gauge(
            "vram_gpu_memory_total_bytes", "Total GPU memory.", gpu_labels, registry=self.registry
        )
        self.gpu_used = Gauge(
            "vram_gpu_memory_used_bytes", "GPU memory in use.", gpu_labels, registry=self.registry
        )
        self.gpu_free = Gauge(
            "vram_gpu_memory_free_bytes", "Free GPU memory.", gpu_labels, registry=self.registry
        )
        self.gpu_temperature = Gauge(
            "vram_gpu_temperature_celsius",
            "GPU core temperature.",
            gpu_labels,
            registry=self.registry,
        )
        self.psi_avg10 = Gauge(
            "vram_host_memory_pressure_avg10_ratio",
            "Host memory PSI avg10 as a fraction of time stalled.",
            ["kind"],
            registry=self.registry,
        )
        self.model_bytes = Gauge(
            "vram_model_resident_bytes",
            "GPU memory held by a model.",
            ["model_key", "model", "backend", "gpu_uuid"],
            registry=self.registry,
        )
        self.model_state = Gauge(
            "vram_model_state",
            "1 for the state a model is in.",
            ["model_key", "state"],
            registry=self.registry,
        )
        self.loads = Counter(
            "vram_model_loads_total",
            "Model loads by outcome.",
            ["backend", "outcome"],
            registry=self.registry,
        )
        self.evictions = Counter(
            "vram_model_evictions_total",
            "Models evicted or parked, by reason.",
            ["reason", "action"],
            registry=self.registry,
        )
        self.failures = Counter(
            "vram_model_failures_total",
            "Failed loads by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.load_duration = Histogram(
            "vram_model_load_duration_seconds",
            "Time from pull start to loaded.",
            ["backend"],
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )

    def observe(
        self, gpus: Iterable[GPU], pressure: MemoryPressure | None, entries: Iterable[Entry]
    ) -> None:
        """Set every gauge from one report, dropping series of models that are gone."""
        for gauge in (self.gpu_total, self.gpu_used, self.gpu_free, self.gpu_temperature):
            gauge.clear()
        for gpu in gpus:
            labels = (gpu.uuid, gpu.name)
            self.gpu_total.labels(*labels).set(gpu.total_bytes)
            self.gpu_used.labels(*labels).set(gpu.used_bytes)
            self.gpu_free.labels(*labels).set(gpu.free_bytes)
            if gpu.temperature_celsius is not None:
                self.gpu_temperature.labels(*labels).set(gpu.temperature_celsius)
        self.psi_avg10.clear()
        if pressure is not None and pressure.available:
            for kind, figures in (("some", pressure.some), ("full", pressure.full)):
                if figures is not None:
                    self.psi_avg10.labels(kind).set(figures.avg10 / 100)
        self.model_bytes.clear()
        self.model_state.clear()
        for entry in entries:
            self.model_bytes.labels(
                entry.key, entry.model, entry.backend.value, entry.gpu_uuid or ""
            ).set(entry.vram_bytes or 0 if entry.state is ModelState.LOADED else 0)
            for state in ModelState:
                self.model_state.labels(entry.key, state.value).set(
                    1 if entry.state is state else 0
                )
