"""The training queue is fair: jobs are dispatched round-robin across tenants, a tenant that becomes
active is served right after the jobs running now (so 100 queued jobs of one tenant delay another
tenant's first job by at most the job running now), and on Redis delivery stays at-least-once (a
reclaimed ticket resumes the SAME job), FLUSHALL heals, and `active(tenant)` counts queued + running.
No model, no training: job records are built directly."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis

from prefixserve.training.jobs import (
    ACTIVE,
    BOUND,
    GROUP,
    QUEUED,
    RECORD,
    RING,
    STREAM,
    TERMINAL,
    Job,
    JobStatus,
    LocalJobQueue,
    RedisJobQueue,
    cancel,
)

CONFIG = {"epochs": 1, "prefix_len": 2, "hidden": 8, "batch_size": 4}
BLOCK_S = 0.02  # a claim's wait when nothing is queued
_ids = itertools.count()


def submit(queue, tenant: str, n: int = 1) -> list[str]:
    ids = []
    for _ in range(n):
        job = Job(id=f"job-{tenant}-{next(_ids)}", tenant=tenant, config=CONFIG, n_examples=1)
        queue.submit(job)
        ids.append(job.id)
    return ids


def run(queue, consumer: str = "w1") -> Job | None:
    """What a worker does with a job, minus the training: claim, save running, save succeeded, ack."""
    claimed = queue.claim(consumer, BLOCK_S)
    if claimed is None:
        return None
    delivery, job = claimed
    if job.status in TERMINAL:  # e.g. cancelled while queued: the worker only acks it
        queue.ack(delivery)
        return job
    job.status = JobStatus.RUNNING
    queue.save(job)
    job.status = JobStatus.SUCCEEDED
    queue.save(job)
    queue.ack(delivery)
    return job


def drain(queue, consumer: str = "w1") -> list[Job]:
    done = []
    while (job := run(queue, consumer)) is not None:
        done.append(job)
    return done


@pytest.fixture
def fresh_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()


@pytest.fixture(params=["local", "redis"])
def queue(request):
    if request.param == "local":
        return LocalJobQueue()
    return RedisJobQueue(request.getfixturevalue("fresh_redis"))


# ---- fairness ------------------------------------------------------------------------------------
def test_a_new_tenants_first_job_waits_only_for_the_job_running_now(queue):
    heavy = submit(queue, "heavy", 3)
    delivery, running = queue.claim("w1", BLOCK_S)  # the job running now
    assert running.id == heavy[0]
    heavy += submit(queue, "heavy", 97)
    (light,) = submit(queue, "light")
    queue.ack(delivery)
    order = [running.id] + [j.id for j in drain(queue)]
    assert order.index(light) + 1 <= 2  # the 2nd job claimed overall
    assert [i for i in order if i != light] == heavy  # heavy's all ran, in submission order
    assert len(order) == 101


def test_active_tenants_take_turns_round_robin(queue):
    jobs = {t: submit(queue, t, n) for t, n in (("a", 12), ("b", 7), ("c", 10))}
    order = [(j.tenant, j.id) for j in drain(queue)]
    assert sorted(i for _, i in order) == sorted(i for ids in jobs.values() for i in ids)
    for t, ids in jobs.items():
        assert [i for u, i in order if u == t] == ids  # each tenant's own jobs in submission order
    turns = [t for t, _ in order]
    # while several tenants have jobs queued, none gets two turns before each other one got one
    for start in range(0, 3 * 7, 3):
        assert sorted(turns[start : start + 3]) == ["a", "b", "c"], turns
    assert turns[21:27] in (["a", "c"] * 3, ["c", "a"] * 3), turns  # b ran out; a and c alternate
    assert turns[27:] == ["a"] * 2


def test_a_tenant_resubmitting_while_its_job_runs_is_not_new_again(queue):
    """fq_codel's rule: a tenant whose FIFO emptied stays in the ring until its turn comes, so
    submitting the next job while the previous one runs does not jump ahead of the others."""
    heavy = submit(queue, "heavy", 4)
    (s1,) = submit(queue, "sneaky")
    delivery, job = queue.claim("w1", BLOCK_S)
    assert job.id == s1  # new: first
    (s2,) = submit(queue, "sneaky")  # while s1 runs
    queue.ack(delivery)
    assert [j.id for j in drain(queue)] == [heavy[0], s2, *heavy[1:]]


def test_a_claim_waits_for_a_submission(queue):
    got: list = []
    thread = threading.Thread(target=lambda: got.append(queue.claim("w1", 5.0)))
    t0 = time.monotonic()
    thread.start()
    time.sleep(0.05)
    (job_id,) = submit(queue, "alice")
    thread.join(5)
    assert got and got[0][1].id == job_id and time.monotonic() - t0 < 2


# ---- active(tenant) ------------------------------------------------------------------------------
def test_active_counts_queued_and_running_jobs(queue):
    (b1,) = submit(queue, "bob")
    a1, a2, a3 = submit(queue, "alice", 3)
    assert (queue.active("alice"), queue.active("bob"), queue.active("carol")) == (3, 1, 0)
    delivery, job = queue.claim("w1", BLOCK_S)
    assert job.id == a1  # alice became active last: first
    job.status = JobStatus.RUNNING
    queue.save(job)
    assert queue.active("alice") == 3  # one running, two queued
    job.status = JobStatus.SUCCEEDED
    queue.save(job)
    queue.ack(delivery)
    assert queue.active("alice") == 2
    assert cancel(queue, a3).status == JobStatus.CANCELLED  # queued: ends now
    assert queue.active("alice") == 1 and queue.active("bob") == 1
    done = drain(queue)  # the cancelled job's turn comes too: a worker only acks it
    assert [(j.id, j.status) for j in done] == [
        (b1, JobStatus.SUCCEEDED),
        (a2, JobStatus.SUCCEEDED),
        (a3, JobStatus.CANCELLED),
    ]
    assert queue.active("alice") == 0 and queue.active("bob") == 0


def test_redis_active_heals_from_the_records(fresh_redis):
    queue = RedisJobQueue(fresh_redis)
    a1, a2 = submit(queue, "alice", 2)
    queue.r.delete(RECORD + a1)  # a record lost behind the queue's back
    job = queue.get(a2)
    job.status = JobStatus.FAILED
    queue.r.set(RECORD + a2, job.to_json())  # ended without the set being told
    queue.r.sadd(ACTIVE + "alice", "job-never-existed")
    assert queue.active("alice") == 0
    assert queue.r.scard(ACTIVE + "alice") == 0  # the stale members are gone
    (a3,) = submit(queue, "alice")
    job = queue.get(a3)
    job.progress.losses = [float("nan"), float("inf"), 1.5]  # a diverged loss curve is still JSON to us
    job.status = JobStatus.RUNNING
    queue.save(job)
    assert queue.active("alice") == 1


# ---- at-least-once on Redis ----------------------------------------------------------------------
def test_a_reclaimed_ticket_resumes_the_same_job_and_ack_unbinds_it(fresh_redis):
    queue = RedisJobQueue(fresh_redis, reclaim_s=0.2)
    other = RedisJobQueue(fresh_redis, reclaim_s=0.2)
    submitted = submit(queue, "heavy", 3) + submit(queue, "light", 2)
    delivery, job = queue.claim("dies", BLOCK_S)  # and never acks
    assert queue.r.hget(BOUND, delivery) == job.id.encode()
    time.sleep(0.25)
    delivery2, again = other.claim("takes-over", BLOCK_S)
    assert (delivery2, again.id) == (delivery, job.id)  # the same ticket, the same job
    other.ack(delivery2)
    assert queue.r.hlen(BOUND) == 0
    # a ticket read but never bound (its worker died in between) is reclaimed and bound then
    queue.r.xreadgroup(GROUP, "dies-too", {STREAM: ">"}, count=1)
    time.sleep(0.25)
    rest = [j.id for j in drain(other, "takes-over")]
    assert sorted([job.id, *rest]) == sorted(submitted)  # every job exactly once more
    assert queue.r.hlen(BOUND) == 0 and queue.r.xpending(STREAM, GROUP)["pending"] == 0
    assert queue.r.llen(RING) == 1 and not queue.r.keys(QUEUED + "*")  # heavy's slot, found empty later
    assert other.claim("takes-over", BLOCK_S) is None


def test_a_ticket_without_queued_jobs_runs_its_own_job(fresh_redis):
    """Entries an older version wrote (no FIFO, no ring): each is bound to its own job_id."""
    queue = RedisJobQueue(fresh_redis)
    queue._create_group()
    job = Job(id="job-old", tenant="alice", config=CONFIG, n_examples=1)
    queue.r.set(RECORD + job.id, job.to_json())
    queue.r.xadd(STREAM, {"job_id": job.id})
    assert [j.id for j in drain(queue)] == ["job-old"]
    queue.r.xadd(STREAM, {"job_id": "job-gone"})  # a record that vanished: acked, not run
    assert queue.claim("w1", BLOCK_S) is None
    assert queue.r.xpending(STREAM, GROUP)["pending"] == 0 and queue.r.hlen(BOUND) == 0


def test_flushall_in_the_middle_heals_without_a_restart(own_redis):
    server = RedisJobQueue(own_redis.url)
    worker = RedisJobQueue(own_redis.url)
    before = submit(server, "heavy", 3)
    delivery, running = worker.claim("w1", BLOCK_S)
    assert running.id == before[0]
    server.r.flushall()
    assert worker.claim("w1", BLOCK_S) is None  # NOGROUP: the worker recreated the group
    assert server.r.xinfo_groups(STREAM)[0]["name"] == GROUP.encode()
    running.status = JobStatus.RUNNING  # the running job's worker goes on: saves, ends, acks
    worker.save(running)
    assert server.active("heavy") == 1
    running.status = JobStatus.SUCCEEDED
    worker.save(running)
    worker.ack(delivery)
    assert server.active("heavy") == 0
    after = submit(server, "heavy", 2) + submit(server, "light")
    assert [j.id for j in drain(worker)] == [after[2], after[0], after[1]]  # light first: new
    assert server.active("heavy") == server.active("light") == 0
    assert server.r.hlen(BOUND) == 0 and server.r.xpending(STREAM, GROUP)["pending"] == 0


# ---- LocalJobQueue retries -----------------------------------------------------------------------
def test_local_release_puts_the_job_back_first_in_its_tenants_turn():
    queue = LocalJobQueue()
    a1, a2 = submit(queue, "alice", 2)
    (b1,) = submit(queue, "bob")
    assert queue.claim("w1", BLOCK_S)[1].id == b1  # new: first
    delivery, job = queue.claim("w1", BLOCK_S)
    assert job.id == a1
    queue.release(delivery, job)  # a failed attempt: alice's next job is a1 again, on her turn
    assert [j.id for j in drain(queue)] == [a1, a2]
    assert queue.active("alice") == 0 and queue.active("bob") == 1  # b1 was never ended


def test_local_release_brings_a_tenant_that_left_the_ring_back_at_its_front():
    queue = LocalJobQueue()
    (c1,) = submit(queue, "carol")
    a1, a2 = submit(queue, "alice", 2)
    assert queue.claim("w1", BLOCK_S)[1].id == a1
    carols = queue.claim("w2", BLOCK_S)
    assert carols[1].id == c1
    assert queue.claim("w3", BLOCK_S)[1].id == a2
    a3, a4 = submit(queue, "alice", 2)
    assert queue.claim("w3", BLOCK_S)[1].id == a3  # carol's turn came with nothing queued: she left
    queue.release(*carols)  # w2's attempt failed
    assert [j.id for j in drain(queue)] == [c1, a4]
