"""Prometheus metrics of one app instance (its own registry, so several apps in one process don't clash)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "graceful_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "graceful_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.embedded = Counter(
            "graceful_embedded_images_total",
            "images embedded",
            ["version", "purpose"],
            registry=self.registry,
        )
        self.activations = Counter(
            "graceful_activations_total", "model activations", ["version", "outcome"], registry=self.registry
        )
        self.batch_size = Histogram(
            "graceful_batch_size",
            "requests per micro-batch (service.serving.batching)",
            ["queue"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.items = Gauge("graceful_gallery_items", "items in the gallery", registry=self.registry)
        self.active = Gauge(
            "graceful_active_model_info",
            "the active model version (value 1)",
            ["version", "space"],
            registry=self.registry,
        )

    def set_active(self, version: str, space: str) -> None:
        self.active.clear()
        self.active.labels(version=version, space=space).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every request by its route template (not the raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=name, method=scope["method"], status=str(status)).inc()
            self.metrics.latency.labels(route=name).observe(time.perf_counter() - t0)
