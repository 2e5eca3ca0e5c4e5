"""Prometheus metrics of one app, in their own registry (several apps in one process, as in the
tests, do not collide): requests and latency per endpoint, batching, queue, model, index."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index.follower import FollowerState

if TYPE_CHECKING:
    from app.service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format 0.0.4
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNMATCHED = "unmatched"  # the endpoint label of a path no route serves (keeps labels few)


class Metrics:
    """Every imgsim_* metric of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "endpoint", "status")
        self.requests = Counter(
            "imgsim_requests", "HTTP requests answered", labels, registry=self.registry
        )
        self.latency = Histogram(
            "imgsim_request_duration_seconds",
            "time from the request's arrival to its answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imgsim_inference_batch_size",
            "images per forward of the model",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.forward = Histogram(
            "imgsim_model_forward_seconds",
            "time of one batched forward in the inference worker (images preprocessed by then)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = self._counter(
            "imgsim_rejected_requests", "requests answered 503 because the inference queue was full"
        )
        self.unhandled_errors = self._counter(
            "imgsim_unhandled_errors",
            "requests that failed with an unexpected exception (answered 500)",
        )
        self.queue_depth = self._gauge(
            "imgsim_inference_queue_depth", "images waiting for the model"
        )
        self.index_size = self._gauge("imgsim_index_size", "items in the gallery index")
        self.change_applied = self._gauge(
            "imgsim_change_applied", "the last change the index holds"
        )
        self.change_lag = self._gauge(
            "imgsim_change_lag", "changes other replicas committed that this one has not applied"
        )
        self.change_lag_seconds = self._gauge(
            "imgsim_change_lag_seconds",
            "how long this replica has known of a change it has not applied",
        )
        self._served: _Served | None = None

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, registry=self.registry)

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, registry=self.registry)

    def observe_forward(self, images: int, seconds: float) -> None:
        """One forward of `images` images that took `seconds`."""
        self.batch_size.observe(images)
        self.forward.observe(seconds)

    def watch(self, service: Service, queue_depth: Callable[[], int]) -> None:
        """Read the queue depth, index size and what is served at each scrape."""
        self.queue_depth.set_function(queue_depth)
        self.index_size.set_function(
            lambda: len(service.gallery) if service.gallery is not None else 0
        )
        self.change_applied.set_function(lambda: _lag(service).applied)
        self.change_lag.set_function(lambda: _lag(service).lag_changes)
        self.change_lag_seconds.set_function(lambda: _lag(service).lag_seconds)
        if self._served is not None:  # the app was started again
            self.registry.unregister(self._served)
        self._served = _Served(service)
        self.registry.register(self._served)

    def render(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)


def _lag(service: Service) -> FollowerState:
    """How far behind the other replicas the service is: none where nobody shares its store."""
    if service.follower is not None:
        return service.follower.state()
    applied = service.gallery.last_change if service.gallery is not None else 0
    return FollowerState(applied, applied, 0.0, None)


class _Served(Collector):
    """imgsim_model_info: the model and index being served, as labels."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self) -> Iterator[Metric]:
        bundle, gallery = self.service.bundle, self.service.gallery
        labels = {
            "fingerprint": bundle.fingerprint,
            "classifier": self.service.classifier.version,  # changes as classes are added
            "added_classes": str(len(self.service.classifier.added)),
            "backbone": bundle.config.backbone,
            "runtime": bundle.runtime.name,  # the one in use: auto resolved
            "device": bundle.device,
            "index_model": gallery.fingerprint if gallery is not None else "",
            "index_type": gallery.vectors.factory if gallery is not None else "",
            "index_version": str(gallery.last_change) if gallery is not None else "",
        }
        yield InfoMetricFamily("imgsim_model", "the model and index being served", value=labels)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", UNMATCHED)
            labels = (scope["method"], endpoint, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
