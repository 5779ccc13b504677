"""Training jobs: the record, and the queue that delivers them to workers.

`RedisJobQueue`: a Redis Stream with one consumer group (docs/architecture.md: Redis is the job queue).
Delivery is at-least-once: a worker acks a job only when it is finished; a job whose worker died stays pending
and another worker takes it over with XAUTOCLAIM once it has been idle for `reclaim_s` (a running
worker heartbeats to keep it). Job records are JSON strings without a TTL (AOF keeps them across a
Redis restart); the training data itself lives in the durable store.

`LocalJobQueue`: the same calls in-process, for the embedded default without Redis.

Fairness: jobs are dispatched round-robin across tenants, so a tenant with 100 queued jobs delays another
tenant's first job by at most the jobs running now. Each tenant has a FIFO of its queued job ids
(`prefixserve:jobs-queued:<tenant>`) and the tenants with a turn to come are a ring
(`prefixserve:jobs-ring`, its members also in the set `prefixserve:jobs-ring-tenants`). The policy is
fq_codel's (RFC 8290) with one job as the quantum:

- a tenant not in the ring that submits (it "becomes active") enters it at the FRONT: new tenants are
  served first, right after the jobs running now;
- a dispatch takes the ring's first tenant, pops that tenant's oldest job and moves the tenant to the
  BACK of the ring, even when its FIFO is now empty; a tenant leaves the ring only when its turn comes
  and it has nothing queued. So a tenant cannot game "new first" by submitting its next job while its
  previous one runs: it is still in the ring and waits for its turn like everybody else.

On Redis the stream entries are *tickets*: every submission writes its record, its tenant index, its
FIFO entry, the ring update, its active-set entry and one stream entry (field `job_id` = the submitted
job) in ONE Lua script, so tickets and queued job ids always match one for one. A worker reads a ticket
exactly as before (XAUTOCLAIM first, then XREADGROUP: at-least-once, reclaim after `reclaim_s`, NOGROUP
recreates the group) and then *binds* it with a second Lua script: the ticket's delivery id already
in the hash `prefixserve:jobs-bound` (a reclaimed ticket) gives the same job again, so a dead worker's
job is resumed, not replaced; otherwise the ring picks the job (as above) and the binding is stored.
`ack` removes the ticket and its binding together. A ticket read but never bound (its worker died in
between) is reclaimed and bound then; nothing is lost. With an empty ring (tickets an older version
wrote, or lists lost) a ticket falls back to its own `job_id`; a worker skips a job whose record is
already terminal (a cancelled queued job still takes its place in its tenant's FIFO, and is acked at
once when its turn comes).

`active(tenant)`: the tenant's queued or running jobs (for a per-tenant quota). Redis keeps a set
`prefixserve:jobs-active:<tenant>` (SADD on submit and on every non-terminal save, SREM on a terminal
save); the record stays the truth: counting reads each member's record and drops the members whose
record is gone or terminal, so an over-count heals itself when it is read. After a FLUSHALL the sets,
the records, the ring, the FIFOs, the bindings and the stream are all gone together: the count is 0,
and a worker still running a job across the flush re-adds it with its next progress save (and removes
it with its end), like it re-creates its record. Jobs queued by a version without the set are counted
from their first save by a worker on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
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
QUEUED = "prefixserve:jobs-queued:"  # a list per tenant: its queued job ids, oldest first
RING = "prefixserve:jobs-ring"  # a list: the tenants whose turn is to come, next first
RING_TENANTS = "prefixserve:jobs-ring-tenants"  # a set: the tenants in the ring
BOUND = "prefixserve:jobs-bound"  # a hash: a ticket's delivery id -> the job bound to it
ACTIVE = "prefixserve:jobs-active:"  # a set per tenant: its queued or running job ids


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
LIVE = tuple(s for s in JobStatus if s not in TERMINAL)  # queued or running: counted by `active`


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
    started_at: str | None = None  # when a worker first began it (milliseconds: the dispatch order)

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

    def active(self, tenant: str) -> int:
        """The tenant's jobs that are queued or running."""
        ...


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


# KEYS: record, tenant index, tenant FIFO, ring, ring tenants, active set, stream
# ARGV: record JSON, job id, tenant, submission time, MAX_LISTED
SUBMIT_LUA = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[5]) - 1)
redis.call('RPUSH', KEYS[3], ARGV[2])
if redis.call('SADD', KEYS[5], ARGV[3]) == 1 then
  redis.call('LPUSH', KEYS[4], ARGV[3])
end
redis.call('SADD', KEYS[6], ARGV[2])
return redis.call('XADD', KEYS[7], '*', 'job_id', ARGV[2], 'tenant', ARGV[3])
"""

# KEYS: bindings, ring, ring tenants; ARGV: delivery id, the ticket's own job id, QUEUED
BIND_LUA = """
local job = redis.call('HGET', KEYS[1], ARGV[1])
if job then
  return job
end
while true do
  local tenant = redis.call('LPOP', KEYS[2])
  if not tenant then
    break
  end
  job = redis.call('LPOP', ARGV[3] .. tenant)
  if job then
    redis.call('RPUSH', KEYS[2], tenant)
    break
  end
  redis.call('SREM', KEYS[3], tenant)
end
if not job then
  job = ARGV[2]
end
redis.call('HSET', KEYS[1], ARGV[1], job)
return job
"""

# KEYS: the tenant's active set; ARGV: RECORD, then the live statuses. A member whose record is gone or
# no longer live is removed (the record is the truth). Record keys are read by name (one Redis, no
# cluster). cjson reads the NaN/Infinity Python writes in a loss curve; a record it refuses anyway has its
# top-level status read with a pattern (a string value cannot fake it: its quotes are escaped).
ACTIVE_LUA = """
local live = {}
for i = 2, #ARGV do
  live[ARGV[i]] = true
end
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local raw = redis.call('GET', ARGV[1] .. id)
  local status = nil
  if raw then
    local ok, rec = pcall(cjson.decode, raw)
    if ok and type(rec) == 'table' then
      status = rec.status
    else
      status = string.match(raw, '"status": "(%a+)"')
    end
  end
  if status and live[status] then
    n = n + 1
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return n
"""


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
        # EVALSHA, loaded again by redis-py after a Redis restart (NOSCRIPT); nothing is sent here
        self._submit = self.r.register_script(SUBMIT_LUA)
        self._bind = self.r.register_script(BIND_LUA)
        self._active = self.r.register_script(ACTIVE_LUA)

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
            self._submit(  # the record, its index, its place in the tenant's FIFO and ring, its ticket
                keys=[
                    RECORD + job.id,
                    BY_TENANT + job.tenant,
                    QUEUED + job.tenant,
                    RING,
                    RING_TENANTS,
                    ACTIVE + job.tenant,
                    STREAM,
                ],
                args=[job.to_json(), job.id, job.tenant, time.time(), MAX_LISTED],
            )

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

        def save() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.set(RECORD + job.id, job.to_json())
            if job.status in TERMINAL:
                pipe.srem(ACTIVE + job.tenant, job.id)
            else:
                pipe.sadd(ACTIVE + job.tenant, job.id)
            pipe.execute()

        self._call("saving a job", save)

    def active(self, tenant: str) -> int:
        return int(
            self._call(
                "counting a tenant's jobs",
                lambda: self._active(keys=[ACTIVE + tenant], args=[RECORD, *(s.value for s in LIVE)]),
            )
        )

    def claim(self, consumer: str, block_s: float) -> tuple[str, Job] | None:
        """A ticket whose worker died (idle past reclaim_s) first, else a new one; then the job bound to
        it: the same job again for a reclaimed ticket, else the next job in round-robin order."""
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
        delivery = delivery.decode()
        own = (fields or {}).get(b"job_id", b"").decode()  # the fallback when no tenant has a job queued
        job_id = self._call(
            "dispatching a job",
            lambda: self._bind(keys=[BOUND, RING, RING_TENANTS], args=[delivery, own, QUEUED]),
        ).decode()
        try:
            return delivery, self.get(job_id)
        except JobNotFound:
            self.ack(delivery)  # a record that vanished cannot be run
            return None

    def heartbeat(self, consumer: str, delivery: str) -> None:
        self._call(  # resets the idle time
            "heartbeat", lambda: self.r.xclaim(STREAM, GROUP, consumer, 0, [delivery], justid=True)
        )

    def ack(self, delivery: str) -> None:
        def ack() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.xack(STREAM, GROUP, delivery)
            pipe.hdel(BOUND, delivery)
            pipe.execute()

        self._call("acknowledging a job", ack)

    def release(self, delivery: str, job: Job) -> None:
        return None  # left pending and bound: XAUTOCLAIM hands the same job out again after reclaim_s

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
    """In-process queue (no Redis configured); one process, so no reclaiming is needed. The same
    round-robin policy as Redis (the module docstring): a FIFO of job ids per tenant and a ring of
    tenants, new tenants at the front; `claim` waits on a condition up to `block_s`."""

    def __init__(self) -> None:
        self._jobs: dict[str, str] = {}
        self._live: dict[str, str] = {}  # job id -> tenant, for the jobs queued or running
        self._cancel: set[str] = set()
        self._lock = threading.Condition()
        self._ring: deque[str] = deque()  # tenants whose turn is to come, next first
        self._fifo: dict[str, deque[str]] = {}  # a tenant has one exactly while it is in the ring
        self._n_queued = 0

    def submit(self, job: Job) -> None:
        with self._lock:
            self.save(job)
            self._enqueue(job.tenant, job.id, front=False)

    def _enqueue(self, tenant: str, job_id: str, front: bool) -> None:
        if tenant not in self._fifo:  # becomes active: served first
            self._fifo[tenant] = deque()
            self._ring.appendleft(tenant)
        if front:
            self._fifo[tenant].appendleft(job_id)
        else:
            self._fifo[tenant].append(job_id)
        self._n_queued += 1
        self._lock.notify()

    def _next(self) -> str | None:
        """The ring's next job; its tenant moves to the back, or leaves the ring when found empty."""
        if not self._n_queued:  # (no turn is taken while nothing is queued, as on Redis)
            return None
        while True:
            tenant = self._ring.popleft()
            fifo = self._fifo[tenant]
            if fifo:
                self._ring.append(tenant)
                self._n_queued -= 1
                return fifo.popleft()
            del self._fifo[tenant]

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
            if job.status in TERMINAL:
                self._live.pop(job.id, None)
            else:
                self._live[job.id] = job.tenant

    def active(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for owner in self._live.values() if owner == tenant)

    def claim(self, consumer: str, block_s: float) -> tuple[str, Job] | None:
        deadline = time.monotonic() + block_s
        with self._lock:
            while (job_id := self._next()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)
        return job_id, self.get(job_id)

    def heartbeat(self, consumer: str, delivery: str) -> None:
        return None

    def ack(self, delivery: str) -> None:
        return None

    def release(self, delivery: str, job: Job) -> None:
        """Back at the front of its tenant's FIFO (its tenant enters the ring at the front if absent)."""
        with self._lock:
            self._enqueue(job.tenant, job.id, front=True)

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
