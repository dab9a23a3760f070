"""The gateway's demand telemetry as Prometheus metrics, on a private registry.

Labels are the deployment's `namespace` and `name` (bounded by the ModelDeployments that
exist; a request for an unknown model is counted under `model="unknown"` rather than its text,
so a client cannot grow the label set).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """Requests by API, code and model; in flight; queued; time to first byte; queue waits."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        model = ["namespace", "name"]
        self.requests = Counter(
            "vram_gateway_requests_total",
            "Requests answered, by model, API endpoint and HTTP status code.",
            [*model, "endpoint", "code"],
            registry=self.registry,
        )
        self.unknown = Counter(
            "vram_gateway_unknown_model_requests_total",
            "Requests naming no ModelDeployment (404), or an ambiguous one.",
            ["reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "vram_gateway_in_flight_requests",
            "Requests sent to a backend and not yet answered in full.",
            model,
            registry=self.registry,
        )
        self.queued = Gauge(
            "vram_gateway_queued_requests",
            "Requests waiting for a ready replica.",
            model,
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "vram_gateway_time_to_first_byte_seconds",
            "From the request's arrival to the backend's response headers (queue wait included).",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "vram_gateway_queue_wait_seconds",
            "Time a request waited for a ready replica (cold waits only).",
            model,
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.cold_waits = Counter(
            "vram_gateway_cold_waits_total",
            "Requests that found no ready replica and waited, by outcome (served, timeout, gone).",
            [*model, "outcome"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "vram_gateway_rejected_requests_total",
            "Requests refused without waiting: queue_full (429), no_replicas (503).",
            [*model, "reason"],
            registry=self.registry,
        )
        self.backend_requests = Counter(
            "vram_gateway_backend_requests_total",
            "Requests sent to a replica, by the node holding it.",
            [*model, "node"],
            registry=self.registry,
        )
        self.retries = Counter(
            "vram_gateway_backend_retries_total",
            "Requests sent to another replica after one failed before its first byte.",
            model,
            registry=self.registry,
        )
        self.last_request = Gauge(
            "vram_gateway_last_request_timestamp_seconds",
            "Unix time of the model's last request at this gateway replica.",
            model,
            registry=self.registry,
        )
        self.ready_replicas = Gauge(
            "vram_gateway_ready_replicas",
            "Replicas the gateway routes to, per model.",
            model,
            registry=self.registry,
        )
