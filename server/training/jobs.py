"""Training jobs: the record, and the queue that delivers them to workers.

`RedisJobQueue`: a Redis Stream with one consumer group (docs/architecture.md: Redis is the job queue).
Delivery is at-least-once: a worker acks a job only when it is finished; a job whose worker died stays pending
and another worker takes it over with XAUTOCLAIM once it has been idle for `reclaim_s` (a running
worker heartbeats to keep it). Job records are JSON strings without a TTL (AOF keeps them across a
Redis restart); the training data itself lives in the durable store.

`LocalJobQueue`: the same calls in-process, for the embedded default without Redis.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol, TypeVar

import redis

from prefix_store.redis_health import RedisConfig, RedisHealth, RedisUnavailable

from ..errors import PrefixServeError
from .trainer import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")

STREAM = "prefixserve:jobs"
GROUP = "workers"
RECORD = "prefixserve:job:"
BY_TENANT = "prefixserve:jobs-of:"  # a sorted set per tenant: job ids scored by submission time
MAX_LISTED = 1000  # the newest jobs a tenant's index keeps (older records stay readable by id)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobNotFound(PrefixServeError):
    kind = "job_not_found"
    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Job:
    id: str
    tenant: str
    config: dict  # TrainConfig fields
    n_examples: int
    name: str = ""
    visibility: str = "private"
    status: JobStatus = JobStatus.QUEUED
    attempts: int = 0  # runs started; a reclaimed job resumes as the next attempt
    interrupted: int = 0  # runs a worker shutdown ended (not counted against max_attempts)
    progress: Progress = field(default_factory=Progress)  # epoch, step, loss, eta, loss curve
    error: str | None = None
    prefix_id: str | None = None  # the prefix trained (or evaluated)
    kind: str = "train"  # or "evaluate": `config` then holds EvalConfig fields and `target` the prefix
    target: str | None = None
    evaluation: dict | None = None  # the result of an evaluation job, or of a training job's held-out split
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)

    @property
    def prefix_id_to_publish(self) -> str:
        """Deterministic: re-running a job publishes the same id, so at most one prefix exists."""
        return f"pfx-{self.id}"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Job:
        data = json.loads(raw)
        data["status"] = JobStatus(data["status"])
        data["progress"] = Progress(**data["progress"])
        return cls(**data)


class JobQueue(Protocol):
    def submit(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job: ...

    def list(self, tenant: str, limit: int) -> list[Job]:
        """The tenant's newest `limit` jobs, newest first."""
        ...

    def save(self, job: Job) -> None: ...

    def claim(self, consumer: str, block_s: float) -> tuple[str, Job] | None: ...

    def heartbeat(self, consumer: str, delivery: str) -> None: ...

    def ack(self, delivery: str) -> None: ...

    def release(self, delivery: str, job: Job) -> None:
        """Give a failed attempt back for a retry."""
        ...

    def request_cancel(self, job_id: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...


def cancel(q: JobQueue, job_id: str) -> Job:
    """Cancel a job: a queued one ends now, a running one at its worker's next progress save."""
    job = q.get(job_id)
    if job.status in TERMINAL:
        return job
    q.request_cancel(job_id)  # a flag apart from the record, so a worker's progress save can't lose it
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELLED
        q.save(job)
    return job


class RedisJobQueue:
    """Every call has the connect/read timeouts of `RedisHealth.config` and goes through that shared
    health state, so a down or slow Redis answers `RedisUnavailable` (HTTP 503 + Retry-After) at once
    instead of hanging; the server runs these calls on threads, never on its event loop. The consumer
    group is created lazily and again whenever Redis lost it (FLUSHALL, a restart without persistence),
    by the server on submit and by workers on NOGROUP, so neither needs a restart. Consumers idle for
    `dead_after_s` with nothing pending (dead workers) are removed from the group by the workers."""

    def __init__(
        self,
        url: str,
        reclaim_s: float = 60.0,
        health: RedisHealth | None = None,
        dead_after_s: float | None = None,
    ) -> None:
        self.health = health or RedisHealth(RedisConfig(url))
        self.r = self.health.config.client()
        self._blocking: dict[float, redis.Redis] = {}  # clients whose read timeout covers a BLOCK
        self.reclaim_ms = int(reclaim_s * 1000)
        self.dead_after_ms = int((dead_after_s if dead_after_s is not None else 5 * reclaim_s) * 1000)
        self._next_sweep = 0.0

    # ---- plumbing ------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` through the health state; a lost consumer group is recreated and `fn` retried once."""

        def grouped() -> T:
            try:
                return fn()
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._create_group()
                return fn()

        return self.health.run(what, grouped)

    def _create_group(self) -> None:
        """From the stream's start ("0"), so entries added while the group was missing are delivered."""
        try:
            self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            log.info("created the job queue's consumer group %r on %r", GROUP, STREAM)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _blocking_client(self, block_s: float) -> redis.Redis:
        if block_s not in self._blocking:
            self._blocking[block_s] = self.health.config.client(extra_read_s=block_s)
        return self._blocking[block_s]

    # ---- the queue -----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        job.updated_at = now()

        def submit() -> None:
            self._create_group()  # cheap, and makes a flushed Redis usable without waiting for a worker
            pipe = self.r.pipeline(transaction=True)
            pipe.set(RECORD + job.id, job.to_json())
            pipe.zadd(BY_TENANT + job.tenant, {job.id: time.time()})
            pipe.zremrangebyrank(BY_TENANT + job.tenant, 0, -MAX_LISTED - 1)
            pipe.xadd(STREAM, {"job_id": job.id})
            pipe.execute()

        self._call("submitting a training job", submit)

    def get(self, job_id: str) -> Job:
        raw = self._call("reading a job", lambda: self.r.get(RECORD + job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return Job.from_json(raw)

    def list(self, tenant: str, limit: int) -> list[Job]:
        def read() -> list[bytes | None]:
            ids = self.r.zrevrange(BY_TENANT + tenant, 0, limit - 1)
            return self.r.mget([RECORD + i.decode() for i in ids]) if ids else []

        return [Job.from_json(raw) for raw in self._call("listing jobs", read) if raw is not None]

    def save(self, job: Job) -> None:
        job.updated_at = now()
        self._call("saving a job", lambda: self.r.set(RECORD + job.id, job.to_json()))

    def claim(self, consumer: str, block_s: float) -> tuple[str, Job] | None:
        """A job whose worker died (idle past reclaim_s) first, else a new one."""
        self._sweep_dead(consumer)
        _, claimed, *_ = self._call(
            "claiming a job",
            lambda: self.r.xautoclaim(STREAM, GROUP, consumer, self.reclaim_ms, "0-0", count=1),
        )
        if not claimed:
            block = self._blocking_client(block_s)
            got = self._call(
                "waiting for a job",
                lambda: block.xreadgroup(
                    GROUP, consumer, {STREAM: ">"}, count=1, block=max(1, int(block_s * 1000))
                ),
            )
            claimed = got[0][1] if got else []
        if not claimed:
            return None
        delivery, fields = claimed[0]
        job_id = fields[b"job_id"].decode()
        try:
            return delivery.decode(), self.get(job_id)
        except JobNotFound:
            self.ack(delivery.decode())  # a record that vanished cannot be run
            return None

    def heartbeat(self, consumer: str, delivery: str) -> None:
        self._call(  # resets the idle time
            "heartbeat", lambda: self.r.xclaim(STREAM, GROUP, consumer, 0, [delivery], justid=True)
        )

    def ack(self, delivery: str) -> None:
        self._call("acknowledging a job", lambda: self.r.xack(STREAM, GROUP, delivery))

    def release(self, delivery: str, job: Job) -> None:
        return None  # left pending: XAUTOCLAIM hands it out again after reclaim_s

    def request_cancel(self, job_id: str) -> None:
        self._call("cancelling a job", lambda: self.r.set(RECORD + job_id + ":cancel", "1"))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._call("reading a cancel flag", lambda: self.r.exists(RECORD + job_id + ":cancel")))

    # ---- dead consumers ------------------------------------------------------------------------
    def consumers(self) -> list[dict]:
        """XINFO CONSUMERS of the group (name, pending, idle ms); [] when there is no group."""
        try:
            return self._call("listing consumers", lambda: self.r.xinfo_consumers(STREAM, GROUP))
        except RedisUnavailable as exc:
            if isinstance(exc.__cause__, redis.ResponseError):  # no stream yet
                return []
            raise

    def _sweep_dead(self, keep: str) -> None:
        """At most every reclaim_s: delete consumers idle past dead_after_s with nothing pending (a
        pending job is first reclaimed by XAUTOCLAIM, so no delivery is ever lost)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.reclaim_ms / 1000
        for info in self.consumers():
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            if name != keep and info["pending"] == 0 and info["idle"] > self.dead_after_ms:
                self._call(
                    "removing a dead consumer", lambda n=name: self.r.xgroup_delconsumer(STREAM, GROUP, n)
                )
                log.info("removed dead consumer %s (idle %.0fs, nothing pending)", name, info["idle"] / 1000)


class LocalJobQueue:
    """In-process queue (no Redis configured); one process, so no reclaiming is needed."""

    def __init__(self) -> None:
        self._jobs: dict[str, str] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        self.save(job)
        self._queue.put(job.id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            raw = self._jobs.get(job_id)
        if raw is None:
            raise JobNotFound(job_id)
        return Job.from_json(raw)

    def list(self, tenant: str, limit: int) -> list[Job]:
        with self._lock:
            raws = list(self._jobs.values())
        jobs = [j for j in map(Job.from_json, reversed(raws)) if j.tenant == tenant]  # newest first
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)[:limit]  # (stable within a second)

    def save(self, job: Job) -> None:
        job.updated_at = now()
        with self._lock:
            self._jobs[job.id] = job.to_json()

    def claim(self, consumer: str, block_s: float) -> tuple[str, Job] | None:
        try:
            job_id = self._queue.get(timeout=block_s)
        except queue.Empty:
            return None
        return job_id, self.get(job_id)

    def heartbeat(self, consumer: str, delivery: str) -> None:
        return None

    def ack(self, delivery: str) -> None:
        return None

    def release(self, delivery: str, job: Job) -> None:
        self._queue.put(job.id)

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel


def wait_for(q: JobQueue, job_id: str, timeout_s: float, poll_s: float = 0.05) -> Job:
    """Poll a job until it is terminal (tests, CLI)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = q.get(job_id)
        if job.status in TERMINAL or time.monotonic() > deadline:
            return job
        time.sleep(poll_s)
