"""Byte caches in front of the durable store: Redis (shared) or in-process (the embedded default).

Redis is only a cache (architecture.md invariant 5): every key carries a TTL so Redis can run
`volatile-lru` beside the job queue; any Redis error or timeout is counted and treated as a miss, and
after an error Redis is skipped for a short back-off (`redis_health.RedisHealth`, which logs the outage
once) so a dead or slow Redis does not add its timeout to every request.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from typing import Protocol

from .redis_health import RedisConfig, RedisHealth, RedisUnavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "prefixserve:prefix:"


class ByteCache(Protocol):
    tier: str

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class Stats:
    """Thread-safe counters: hits, misses and errors per tier."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def inc(self, tier: str, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[(tier, what)] += n

    def get(self, tier: str, what: str) -> int:
        with self._lock:
            return self._counts[(tier, what)]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f"{tier}_{what}": n for (tier, what), n in sorted(self._counts.items())}


class LocalByteCache:
    """In-process LRU of bytes within a byte budget."""

    tier = "local"

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.budget:
            return
        with self._lock:
            self._drop(key)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.budget:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)

    def delete(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old)


class RedisByteCache:
    """Prefix bytes in Redis under `prefixserve:prefix:<id>` with a TTL; failures are misses.

    Calls go through the process's shared `RedisHealth`: while Redis is known to be down (or slow),
    the cache is skipped without waiting, and the outage is logged once, not per call."""

    tier = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: int,
        timeout_s: float = 0.5,
        backoff_s: float = 2.0,
        stats: Stats | None = None,
        health: RedisHealth | None = None,
    ):
        self.ttl_s = ttl_s
        self.stats = stats or Stats()
        self.health = health or RedisHealth(RedisConfig(url, timeout_s, backoff_s))
        self._client = self.health.config.client()

    def _call(self, what: str, fn):
        try:
            return self.health.run(f"prefix cache {what}", fn)
        except RedisUnavailable as exc:
            self.stats.inc(self.tier, "errors" if exc.attempted else "skipped")
            return None

    def get(self, key: str) -> bytes | None:
        return self._call("get", lambda: self._client.get(KEY_PREFIX + key))

    def put(self, key: str, value: bytes) -> None:
        self._call("set", lambda: self._client.set(KEY_PREFIX + key, value, ex=self.ttl_s))

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self._client.delete(KEY_PREFIX + key))
