"""Per-tenant requests/minute and tokens/minute.

Fixed one-minute windows. With Redis the counters are shared by every replica (INCRBY on a key
that expires with its window); without Redis, or while Redis fails, each replica counts locally.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter

import redis

from .errors import PrefixServeError

log = logging.getLogger(__name__)

WINDOW_S = 60


class RateLimited(PrefixServeError):
    kind = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    def __init__(
        self, requests_per_minute: int, tokens_per_minute: int, redis_url: str | None = None
    ) -> None:
        self.limits = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=0.2) if redis_url else None
        self._local: Counter[str] = Counter()
        self._lock = threading.Lock()

    def check(self, tenant: str, tokens: int) -> None:
        """Count one request of `tokens` tokens for the tenant; RateLimited if a limit is exceeded."""
        now = time.time()
        window = int(now // WINDOW_S)
        retry_after = math.ceil((window + 1) * WINDOW_S - now)
        for what, amount in (("requests", 1), ("tokens", tokens)):
            limit = self.limits[what]
            if limit <= 0:
                continue
            used = self._add(f"prefixserve:rl:{tenant}:{what}:{window}", amount)
            if used > limit:
                raise RateLimited(
                    f"tenant {tenant!r} exceeded {limit} {what} per minute ({used} this minute)", retry_after
                )

    def _add(self, key: str, amount: int) -> int:
        if self._redis is not None:
            try:
                pipe = self._redis.pipeline()
                pipe.incrby(key, amount)
                pipe.expire(key, WINDOW_S + 5)
                return int(pipe.execute()[0])
            except redis.RedisError as exc:
                log.warning("rate limiter: redis failed (%s); counting locally", exc)
        with self._lock:
            self._local[key] += amount
            if len(self._local) > 10_000:  # drop old windows
                current = key.rsplit(":", 1)[1]
                for k in [k for k in self._local if not k.endswith(":" + current)]:
                    del self._local[k]
            return self._local[key]
