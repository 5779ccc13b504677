"""Per-tenant requests/minute and tokens/minute (each tenant's own limits: tenants.py).

Fixed one-minute windows. With Redis the counters are shared by every replica (INCRBY on a key
that expires with its window), through the asyncio client, so the event loop never waits on Redis;
without Redis each replica counts locally. While Redis is down or slow the limiter **fails open** to
per-replica counting (a tenant may then get up to N times its limit across N replicas): no request
fails or waits for it, and the outage is logged once (`prefix_store.redis_health.RedisHealth`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

from prefix_store.redis_health import RedisHealth, RedisUnavailable

from .errors import QuotaExceeded
from .tenants import Limits

WINDOW_S = 60


class RateLimited(QuotaExceeded):
    """A tenant's requests or tokens per minute are spent (429 with Retry-After: the window's end)."""

    kind = "rate_limited"


class RateLimiter:
    """Create it on the event loop that calls `check` (the asyncio client belongs to that loop)."""

    def __init__(self, health: RedisHealth | None = None) -> None:
        self.health = health
        self._redis = health.config.async_client() if health is not None else None
        self._local: Counter[str] = Counter()
        self._lock = threading.Lock()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def check(self, tenant: str, tokens: int, limits: Limits) -> None:
        """Count one request of `tokens` tokens for the tenant; RateLimited if one of its limits
        (`limits.requests_per_minute`, `limits.tokens_per_minute`) is exceeded."""
        now = time.time()
        window = int(now // WINDOW_S)
        retry_after = math.ceil((window + 1) * WINDOW_S - now)
        for what, amount, limit in (
            ("requests", 1, limits.requests_per_minute),
            ("tokens", tokens, limits.tokens_per_minute),
        ):
            if limit <= 0:
                continue
            used = await self._add(f"prefixserve:rl:{tenant}:{what}:{window}", amount)
            if used > limit:
                raise RateLimited(
                    tenant, f"{what}_per_minute", used, limit, f"{what} this minute", retry_after
                )

    async def _add(self, key: str, amount: int) -> int:
        if self._redis is not None and self.health is not None:
            try:
                return await self.health.arun("rate limiting", lambda: self._shared_add(key, amount))
            except RedisUnavailable:
                pass  # fail open: count on this replica (the health object logged the outage once)
        return self._local_add(key, amount)

    async def _shared_add(self, key: str, amount: int) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incrby(key, amount)
            pipe.expire(key, WINDOW_S + 5)
            return int((await pipe.execute())[0])

    def _local_add(self, key: str, amount: int) -> int:
        with self._lock:
            self._local[key] += amount
            if len(self._local) > 10_000:  # drop old windows
                current = key.rsplit(":", 1)[1]
                for k in [k for k in self._local if not k.endswith(":" + current)]:
                    del self._local[k]
            return self._local[key]
