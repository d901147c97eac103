"""Prometheus metrics for one app, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from typing import Any


class ServeMetrics:
    """Requests, latency, batch sizes, cache hits and patch states in memory."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("forgetpack_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("forgetpack_request_seconds", "Request latency by route", ["route"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("forgetpack_image_batch_size", "Images per micro-batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queued = Gauge("forgetpack_images_queued", "Images waiting for a micro-batch", registry=r)
        self.state_lookups = Counter("forgetpack_patch_state_lookups", "Patch-state cache lookups", ["result"], registry=r)
        self.states = Gauge("forgetpack_patch_states", "Patch states held in memory", registry=r)
        self.overloaded = Counter("forgetpack_overloaded", "Requests refused with 503 because the queue was full", registry=r)
        self._per_request: dict[tuple[str, int], tuple[Any, Any]] = {}  # (route, status) -> its counter and histogram
        self._lookups = (self.state_lookups.labels("miss"), self.state_lookups.labels("hit"))

    def observe_batch(self, images: int, queued: int) -> None:
        self.batch_size.observe(images)
        self.queued.set(queued)

    def observe_lookup(self, hit: bool) -> None:
        self._lookups[hit].inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One request; ``route`` is a route template or "unmatched", so the label values stay few."""
        children = self._per_request.get((route, status))
        if children is None:  # a labelled child is looked up once, not on every request
            children = self._per_request[(route, status)] = (self.requests.labels(route, str(status)), self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def render(self, states: int) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.states.set(states)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_of(scope: dict[str, Any]) -> str:
    """The route template (``/v1/patches/{patch_id}``), so label values stay few whatever the path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
