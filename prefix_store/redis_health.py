"""One Redis as its callers see it: short timeouts, up/down tracking, one log line per outage.

Redis is only a cache, the rate-limit counters and the job queue (docs/architecture.md invariants 5
and 11). Every call goes through a `RedisHealth`, shared by every user of one Redis in a process
(prefix cache, rate limiter, job queue): a failed or timed-out call marks Redis down, logs **one**
warning, and for `retry_s` afterwards calls are not even tried (each caller degrades at once: the
cache misses, the limiter counts locally, the queue answers 503 with Retry-After); then one caller at
a time probes it, and the first success logs one info line and lets everyone back. `watch` probes in
the background, so the state heals (and `/ready` reports it) without traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from .errors import PrefixServeError

log = logging.getLogger(__name__)

T = TypeVar("T")
QUIET_REFUSALS = ("ERR no such key",)  # expected answers some callers handle (XINFO on a fresh stream)


@dataclass(frozen=True)
class RedisConfig:
    """Every Redis client of a process is built from this one object."""

    url: str
    timeout_s: float = 0.5  # connect and read timeout of every call: a slower answer is a failure
    retry_s: float = 2.0  # after a failure Redis is skipped this long, then one call probes it

    def client(self, extra_read_s: float = 0.0) -> redis.Redis:
        """A synchronous client (for threads); `extra_read_s` for commands that block on purpose."""
        return redis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout_s + extra_read_s,
            socket_connect_timeout=self.timeout_s,
            retry=SyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            retry_on_error=[redis.ConnectionError],
        )

    def async_client(self) -> aredis.Redis:
        """An asyncio client (for the event loop). Like the synchronous one, a call that finds its pooled
        connection dead (Redis restarted since) is tried once more on a fresh connection at once: a
        restart that is over is not an outage. A timeout is not retried (a hung Redis stays one timeout)."""
        return aredis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=AsyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            retry_on_error=[redis.ConnectionError],
        )


class RedisUnavailable(PrefixServeError):
    """Redis is down or too slow; what needs it answers HTTP 503 with Retry-After."""

    kind = "unavailable"
    status = 503

    def __init__(self, what: str, reason: str, retry_after: float, attempted: bool = True) -> None:
        super().__init__(f"{what} needs Redis, which is unavailable ({reason}); retry in {retry_after:.0f}s")
        self.retry_after = retry_after
        self.attempted = attempted  # False: not tried, Redis was already known to be down


class RedisHealth:
    """Thread-safe up/down state of one Redis, shared by its callers (see the module docstring)."""

    def __init__(self, config: RedisConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._up: bool | None = None  # None: not tried yet
        self._next_try = 0.0
        self._probing = False
        self._down_since = 0.0
        self._reason = ""
        self._quiet_until = 0.0
        self.outages = 0
        self.skipped = 0

    @property
    def state(self) -> str:
        """One of "up", "down", or "unknown" (before the first call)."""
        with self._lock:
            return {None: "unknown", True: "up", False: "down"}[self._up]

    def check(self, what: str) -> None:
        """RedisUnavailable now if Redis is known to be down and not due for a probe (so a caller can
        refuse before doing work it would have to undo); otherwise nothing."""
        with self._lock:
            if self._up is not False or (self._clock() >= self._next_try and not self._probing):
                return
            retry, reason = max(1.0, self._next_try - self._clock()), self._reason
        raise RedisUnavailable(what, reason, retry, attempted=False)

    # ---- calls ---------------------------------------------------------------------------------
    def run(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` (one or more Redis calls); RedisUnavailable at once while Redis is known down."""
        self._admit(what)
        try:
            out = fn()
        except redis.ResponseError as exc:  # Redis answered: it is up, but refused (OOM, no such key)
            raise self._refused(what, exc) from exc
        except redis.RedisError as exc:
            raise self._failed(what, exc) from exc
        except BaseException:
            self._release()
            raise
        self._ok()
        return out

    async def arun(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """`await fn()`, the same way as `run`."""
        self._admit(what)
        try:
            out = await fn()
        except redis.ResponseError as exc:
            raise self._refused(what, exc) from exc
        except (redis.RedisError, TimeoutError) as exc:
            raise self._failed(what, exc) from exc
        except BaseException:
            self._release()
            raise
        self._ok()
        return out

    async def watch(self, stop: asyncio.Event, first_done: asyncio.Event | None = None) -> None:
        """PING every retry_s / 2 until `stop` is set, so the state follows Redis (and `/ready` reports it)
        without traffic; `first_done` is set after the first PING. A task on the event loop, which the
        asyncio client never blocks."""
        client = self.config.async_client()
        try:
            while not stop.is_set():
                with contextlib.suppress(RedisUnavailable):
                    await self.arun("health check", client.ping)
                if first_done is not None:
                    first_done.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.retry_s / 2)
        finally:
            if first_done is not None:
                first_done.set()
            await client.aclose()

    # ---- state ---------------------------------------------------------------------------------
    def _admit(self, what: str) -> None:
        with self._lock:
            if self._up is not False:
                return
            now = self._clock()
            if now >= self._next_try and not self._probing:
                self._probing = True  # this caller probes; the others keep skipping
                return
            self.skipped += 1
            retry, reason = max(1.0, self._next_try - now), self._reason
        raise RedisUnavailable(what, reason, retry, attempted=False)

    def _release(self) -> None:
        with self._lock:
            self._probing = False

    def _ok(self) -> None:
        with self._lock:
            was_down, self._up, self._probing = self._up is False, True, False
            skipped, down_for = self.skipped, self._clock() - self._down_since
        if was_down:
            log.info("redis is back after %.1fs (%d calls skipped meanwhile)", down_for, skipped)

    def _refused(self, what: str, exc: redis.ResponseError) -> RedisUnavailable:
        """An error answer: Redis is reachable (state up), this call failed. Logged at most once per
        retry_s, so a refusal on every request (e.g. OOM) cannot flood the log either."""
        self._ok()
        if not str(exc).startswith(QUIET_REFUSALS):
            with self._lock:
                now = self._clock()
                loud = now >= self._quiet_until
                if loud:
                    self._quiet_until = now + self.config.retry_s
            if loud:
                log.warning("redis refused %s: %s", what, exc)
        return RedisUnavailable(what, f"Redis refused: {exc}", self.config.retry_s)

    def _failed(self, what: str, exc: BaseException) -> RedisUnavailable:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with self._lock:
            now = self._clock()
            went_down = self._up is not False
            self._up, self._probing, self._reason = False, False, reason
            self._next_try = now + self.config.retry_s
            if went_down:
                self._down_since, self.skipped = now, 0
                self.outages += 1
        if went_down:
            log.warning(
                "redis at %s is unavailable (%s during %s): rate limits count per replica (fail open),"
                " the prefix cache is skipped, job calls answer 503; retrying every %.1fs",
                _safe_url(self.config.url),
                reason,
                what,
                self.config.retry_s,
            )
        return RedisUnavailable(what, reason, self.config.retry_s)


def _safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
