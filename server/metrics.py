"""Prometheus metrics of one app (its own registry: nothing global)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefix_store.service import PrefixService

from .auth import Unauthorized
from .engine import EngineClient
from .engine.wire import EngineStats
from .errors import PrefixServeError
from .settings import ServerSettings


@dataclass(frozen=True)
class MetricsConfig:
    """Who may read /metrics and what it shows."""

    key: str = ""  # set: only `Authorization: Bearer <key>` reads /metrics, from anywhere
    loopback_only: bool = False  # no key: only loopback clients read it (on whenever auth is on)
    tenant_labels: bool = False  # False: tenant names appear only as pseudonyms (`tenant_label`)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> MetricsConfig:
        return cls(
            key=settings.metrics_key,
            loopback_only=settings.auth_enabled,
            tenant_labels=settings.metrics_tenant_labels,
        )


NO_TENANT = "-"  # the label of requests that never authenticated (401s, /health, ...)


class MetricsForbidden(PrefixServeError):
    kind = "forbidden"
    status = 403


def tenant_label(tenant: str) -> str:
    """A stable pseudonym for a tenant name (sha256, 12 hex digits). It keeps names out of the
    output and dashboards; whoever knows a name can compute its pseudonym to find its series."""
    return "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:12]


def is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:  # no address (e.g. a unix socket) or a name
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


class MetricsAccess:
    """The /metrics gate (MetricsConfig): a metrics key, or else loopback clients only when auth is on."""

    def __init__(self, config: MetricsConfig) -> None:
        self.config = config
        self._digest = hashlib.sha256(config.key.encode()).digest() if config.key else b""

    def check(self, authorization: str | None, client_host: str | None) -> None:
        """Return if this caller may read /metrics; Unauthorized (401) or MetricsForbidden (403)."""
        if self._digest:
            scheme, _, key = (authorization or "").partition(" ")
            offered = hashlib.sha256(key.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered, self._digest):
                raise Unauthorized(
                    "/metrics needs 'Authorization: Bearer <metrics key>' (PREFIXSERVE_METRICS_KEY)"
                )
        elif self.config.loopback_only and not is_loopback(client_host):
            raise MetricsForbidden(
                f"/metrics: expected a loopback client, got {client_host or 'none'};"
                " set PREFIXSERVE_METRICS_KEY to read it from elsewhere"
            )


class TokenRate:
    """Tokens per second over the last `window_s` whole seconds (the current second left out)."""

    def __init__(self, window_s: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._seconds: deque[list[int]] = deque()  # [second, tokens], oldest first

    def add(self, n: int) -> None:
        second = int(self.clock())
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += n
        else:
            self._seconds.append([second, n])
        while self._seconds[0][0] < second - self.window_s:
            self._seconds.popleft()

    def per_second(self) -> float:
        now = int(self.clock())
        return sum(n for second, n in self._seconds if now - self.window_s <= second < now) / self.window_s


class Metrics:
    def __init__(
        self, engine: EngineClient, service: PrefixService, config: MetricsConfig | None = None
    ) -> None:
        self.config = config or MetricsConfig()
        self.access = MetricsAccess(self.config)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefixserve_requests", "HTTP requests", ["endpoint", "status", "tenant"], registry=r
        )
        self.tokens = Counter("prefixserve_generated_tokens", "Generated tokens", ["tenant"], registry=r)
        self.usage = Counter(
            "prefixserve_usage",
            "Usage counted for tenants (usage.py: requests, prompt_tokens, prefix_tokens, generated_tokens,"
            " training_example_epochs, evaluation_examples, stored_bytes)",
            ["tenant", "what"],
            registry=r,
        )
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
        self.stats = stats = engine.stats  # the engine's own counts (here, or the last heard from its own)
        self.service = service
        self.token_rate = TokenRate()
        self.tokens_total = 0
        gauges = {
            "prefixserve_queue_depth": ("Requests waiting", "waiting"),
            "prefixserve_running_sequences": ("Sequences in the batch", "running"),
            "prefixserve_kv_blocks_total": ("Blocks of the paged KV pool", "kv_blocks_total"),
            "prefixserve_kv_blocks_free": ("Free blocks of the paged KV pool", "kv_blocks_free"),
            "prefixserve_engine_cpu_threads": (
                "The forward pass's CPU threads now (0: not on the CPU)",
                "cpu_threads",
            ),
            "prefixserve_kv_blocks_prefixes": (
                "Blocks of the paged KV pool held by resident KV prefixes",
                "kv_blocks_prefixes",
            ),
        }
        for name, (text, field) in gauges.items():
            Gauge(name, text, registry=r).set_function(lambda field=field: getattr(stats(), field))
        Gauge(
            "prefixserve_engine_cuda_graphs",
            "1 while the dense pieces replay captured CUDA graphs; 0 when they run eagerly (off, no graphs "
            "on this device, or a capture failed: /server/stats says which)",
            registry=r,
        ).set_function(lambda: stats().cuda_graphs == "graphs")
        r.register(_TierCollector(self.prefix_loads))
        r.register(_PreemptionCollector(stats))
        r.register(_ResidencyCollector(engine.replica_stats))

    def tenant(self, tenant: str) -> str:
        """The value of a `tenant` label: the name only when configured (tenant_labels)."""
        return tenant if self.config.tenant_labels or tenant == NO_TENANT else tenant_label(tenant)

    def count_usage(self, tenant: str, counts: dict[str, int]) -> None:
        """The usage meter's hook: every count also goes to the `prefixserve_usage` counters."""
        label = self.tenant(tenant)
        for what, n in counts.items():
            self.usage.labels(label, what).inc(n)

    def count_tokens(self, tenant: str, n: int) -> None:
        self.tokens.labels(self.tenant(tenant)).inc(n)
        self.tokens_total += n
        self.token_rate.add(n)

    def prefix_loads(self) -> dict[str, int]:
        """Prefix lookups by "tier_result": this process's store counters plus those of an engine in a
        process of its own (its device pool and caches are there)."""
        counts = self.service.stats.snapshot()
        for key, value in self.stats().prefix_loads.items():
            counts[key] = counts.get(key, 0) + value
        return counts


class _PreemptionCollector:
    """Rows preempted for KV memory (and recomputed later), from the scheduler's count."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self):
        family = CounterMetricFamily(
            "prefixserve_preemptions", "Rows preempted for KV memory since start (recomputed later)"
        )
        family.add_metric([], self.stats().preemptions)
        yield family


class _ResidencyCollector:
    """`prefixserve_prefix_requests_info`, in the shape of vLLM's `vllm:lora_requests_info` so that
    Gateway-API inference routers can score prefix affinity: one sample per engine replica, labelled
    with the prefix ids of its running rows and of its waiting requests (comma-separated) and the most
    prefixes it holds (`max_prefixes`, 0: bounded by the device pool's bytes only); the value is the
    time the state was read (seconds since the epoch)."""

    LABELS = ("replica", "running_prefix_ids", "waiting_prefix_ids", "max_prefixes")

    def __init__(self, replicas: Callable[[], dict[str, EngineStats]]) -> None:
        self.replicas = replicas

    def collect(self):
        family = GaugeMetricFamily(
            "prefixserve_prefix_requests_info",
            "Prefixes running and waiting per engine replica",
            labels=self.LABELS,
        )
        now = time.time()
        for replica, stats in sorted(self.replicas().items()):
            running, waiting = ",".join(stats.running_prefixes), ",".join(stats.waiting_prefixes)
            family.add_metric([replica, running, waiting, str(stats.max_prefixes)], now)
        yield family


class _TierCollector:
    """Prefix hits / misses / errors per tier (`Metrics.prefix_loads`)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self):
        family = CounterMetricFamily(
            "prefixserve_prefix_loads", "Prefix lookups per tier", labels=["tier", "result"]
        )
        for key, value in sorted(self.counts().items()):
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
                tenant = scope.get("state", {}).get("tenant", NO_TENANT)
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                metrics = state.metrics
                metrics.requests.labels(endpoint, str(status), metrics.tenant(tenant)).inc()
