"""The diffusion server's Prometheus metrics: images, seconds per step, queue, residency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DiffusionMetrics:
    """One registry per server, so tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.images = Counter(
            "vram_diffusion_images",
            "Images made, by model",
            ["model"],
            registry=self.registry,
        )
        self.requests = Counter(
            "vram_diffusion_requests",
            "Image requests answered, by model, endpoint and HTTP status",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "vram_diffusion_step_seconds",
            "Seconds per denoising step, by model",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge(
            "vram_diffusion_queue_depth",
            "Image requests waiting for their pipeline, by model",
            ["model"],
            registry=self.registry,
        )
        self.pipeline_vram = Gauge(
            "vram_diffusion_pipeline_vram_bytes",
            "GPU memory a pipeline takes (held plus its activation peak), by key and state",
            ["key", "state"],
            registry=self.registry,
        )
        self._states: dict[str, str] = {}

    def set_pipeline(self, key: str, state: str, vram_bytes: int) -> None:
        self.forget(key)
        self.pipeline_vram.labels(key, state).set(vram_bytes)
        self._states[key] = state

    def forget(self, key: str) -> None:
        state = self._states.pop(key, None)
        if state is not None:
            self.pipeline_vram.remove(key, state)
