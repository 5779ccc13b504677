"""Engine replicas announce their state in the shared Redis; API replicas read it.

Each engine replica writes its `EngineStats` (queue, batch, KV blocks, the store's load counters and
its residency: running and waiting prefix ids, the most prefixes it holds) under
`prefixserve:replica:<id>` every PUBLISH_S, with a TTL of a few periods, so a dead replica's record
expires by itself. The API side reads them all (one SCAN and one MGET) in the background and keeps the
last snapshot: /metrics and /ready read that, never Redis on the event loop. The values are JSON
(msgspec), never pickle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import msgspec
import redis

from prefix_store.redis_health import RedisConfig

from ..engine.wire import EngineStats

log = logging.getLogger(__name__)
KEY_PREFIX = "prefixserve:replica:"
PUBLISH_S = 1.0
TTL_S = 5  # a record not refreshed for this long is gone (its replica with it)

_decode = msgspec.json.Decoder(EngineStats)


class ReplicaPublisher:
    """Writes one replica's stats every PUBLISH_S on a daemon thread (a slow Redis delays no step)."""

    def __init__(self, config: RedisConfig, replica_id: str, stats: Callable[[], EngineStats]) -> None:
        self.key, self.stats = KEY_PREFIX + replica_id, stats
        self._redis = config.client()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self._redis.delete(self.key)

    def publish(self) -> None:
        self._redis.set(self.key, msgspec.json.encode(self.stats()), ex=TTL_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish()
            except redis.RedisError as exc:  # Redis down: the record expires; it comes back with Redis
                log.debug("could not publish the replica's stats: %s", exc)
            except Exception:  # anything else must not end the announcements (the replica would look dead)
                log.exception("publishing the replica's stats failed")
            self._stop.wait(PUBLISH_S)


async def read_replicas(client) -> dict[str, EngineStats]:
    """Every live replica's last record (`client`: an asyncio Redis client)."""
    keys = [key async for key in client.scan_iter(match=KEY_PREFIX + "*", count=500)]
    if not keys:
        return {}
    values = await client.mget(keys)
    out: dict[str, EngineStats] = {}
    for key, value in zip(keys, values, strict=True):
        if value is None:  # expired between the scan and the read
            continue
        name = key.decode() if isinstance(key, bytes) else key
        try:
            out[name.removeprefix(KEY_PREFIX)] = _decode.decode(value)
        except msgspec.DecodeError:
            log.warning("ignoring a malformed replica record under %s", name)
    return out


class ReplicaWatcher:
    """The API side's view of the engine replicas, refreshed every PUBLISH_S in the background."""

    def __init__(self, config: RedisConfig) -> None:
        self._redis = config.async_client()
        self.replicas: dict[str, EngineStats] = {}
        self.heard = False  # at least one read succeeded
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def refresh(self) -> None:
        self.replicas = await read_replicas(self._redis)
        self.heard = True

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except (redis.RedisError, OSError) as exc:  # keep the last snapshot; Redis's own health is
                log.debug("could not read the replicas' stats: %s", exc)  # reported by /ready
            await asyncio.sleep(PUBLISH_S)
