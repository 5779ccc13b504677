"""Prometheus metrics of one app (its own registry: nothing global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from prefix_store.service import PrefixService

from .engine import AsyncEngine


class Metrics:
    def __init__(self, engine: AsyncEngine, service: PrefixService) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefixserve_requests", "HTTP requests", ["endpoint", "status", "tenant"], registry=r
        )
        self.tokens = Counter("prefixserve_generated_tokens", "Generated tokens", ["tenant"], registry=r)
        self.ttft = Histogram(
            "prefixserve_time_to_first_token_seconds",
            "Time to first token",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.itl = Histogram(
            "prefixserve_inter_token_latency_seconds",
            "Time between tokens",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.batch = Histogram(
            "prefixserve_batch_size",
            "Rows sampled per engine step",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        core = engine.core
        Gauge("prefixserve_queue_depth", "Requests waiting", registry=r).set_function(
            lambda: core.scheduler.num_waiting
        )
        Gauge("prefixserve_running_sequences", "Sequences in the batch", registry=r).set_function(
            lambda: core.scheduler.num_running
        )
        r.register(_TierCollector(service))


class _TierCollector:
    """Prefix hits / misses / errors per tier, from the store's counters."""

    def __init__(self, service: PrefixService) -> None:
        self.service = service

    def collect(self):
        family = CounterMetricFamily(
            "prefixserve_prefix_loads", "Prefix lookups per tier", labels=["tier", "result"]
        )
        for key, value in self.service.stats.snapshot().items():
            tier, _, result = key.partition("_")
            family.add_metric([tier, result], value)
        yield family


class CountRequests:
    """Counts requests by endpoint, status and tenant. Plain ASGI (Starlette's BaseHTTPMiddleware
    would hide client disconnects from the endpoints, and a gone client must abort its sequence)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/metrics", "/health"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = getattr(scope["app"].state, "s", None)
            if state is not None:
                tenant = scope.get("state", {}).get("tenant", "-")
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                state.metrics.requests.labels(endpoint, str(status), tenant).inc()
