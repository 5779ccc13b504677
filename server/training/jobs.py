"""Training jobs: the record, and the queue that delivers them to workers.

`RedisJobQueue`: a Redis Stream with one consumer group (DESIGN.md: Redis is the job queue). Delivery
is at-least-once: a worker acks a job only when it is finished; a job whose worker died stays pending
and another worker takes it over with XAUTOCLAIM once it has been idle for `reclaim_s` (a running
worker heartbeats to keep it). Job records are JSON strings without a TTL (AOF keeps them across a
Redis restart); the training data itself lives in the durable store.

`LocalJobQueue`: the same calls in-process, for the embedded default without Redis.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

import redis

from ..errors import PrefixServeError
from .trainer import Progress

STREAM = "prefixserve:jobs"
GROUP = "workers"
RECORD = "prefixserve:job:"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobNotFound(PrefixServeError):
    kind = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")


def _now() -> str:
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
    attempts: int = 0
    progress: Progress = field(default_factory=Progress)  # epoch, step, loss, eta, loss curve
    error: str | None = None
    prefix_id: str | None = None
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)

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
    def __init__(self, url: str, reclaim_s: float = 60.0) -> None:
        self.r = redis.Redis.from_url(url)
        self.reclaim_ms = int(reclaim_s * 1000)
        try:
            self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def submit(self, job: Job) -> None:
        self.save(job)
        self.r.xadd(STREAM, {"job_id": job.id})

    def get(self, job_id: str) -> Job:
        raw = self.r.get(RECORD + job_id)
        if raw is None:
            raise JobNotFound(job_id)
        return Job.from_json(raw)

    def save(self, job: Job) -> None:
        job.updated_at = _now()
        self.r.set(RECORD + job.id, job.to_json())

    def claim(self, consumer: str, block_s: float) -> tuple[str, Job] | None:
        """A job whose worker died (idle past reclaim_s) first, else a new one."""
        _, claimed, *_ = self.r.xautoclaim(STREAM, GROUP, consumer, self.reclaim_ms, "0-0", count=1)
        if not claimed:
            got = self.r.xreadgroup(
                GROUP, consumer, {STREAM: ">"}, count=1, block=max(1, int(block_s * 1000))
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
        self.r.xclaim(STREAM, GROUP, consumer, 0, [delivery], justid=True)  # resets the idle time

    def ack(self, delivery: str) -> None:
        self.r.xack(STREAM, GROUP, delivery)

    def release(self, delivery: str, job: Job) -> None:
        return None  # left pending: XAUTOCLAIM hands it out again after reclaim_s

    def request_cancel(self, job_id: str) -> None:
        self.r.set(RECORD + job_id + ":cancel", "1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(RECORD + job_id + ":cancel"))


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

    def save(self, job: Job) -> None:
        job.updated_at = _now()
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
