"""Faults against the real parts (docs/architecture.md invariants 5, 11 and 12): a live uvicorn with a
real redis-server that is put to sleep, killed, restarted or flushed, and a real filesystem that is
filled (a tiny tmpfs). Each test asserts what a user of the HTTP API sees."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from prefix_store.redis_health import RedisConfig, RedisHealth, RedisUnavailable
from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model
from prefixserve.training.jobs import GROUP, STREAM, RedisJobQueue
from prefixserve.training.worker import Worker, WorkerConfig

from .helpers import A, settings_for, text_prefix, train_body, wait_job, wait_until
from .live import LiveServer

HEALTH_LOG = "prefix_store.redis_health"


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """(warnings, infos) the shared Redis health state logged."""
    records = [r for r in caplog.records if r.name == HEALTH_LOG]
    return (
        [r.getMessage() for r in records if r.levelno == logging.WARNING],
        [r.getMessage() for r in records if r.levelno == logging.INFO],
    )


def redis_state(server: LiveServer) -> str:
    r = httpx.get(server.url + "/ready", timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["redis"]


# ---- the shared health state, on a fake clock ---------------------------------------------------------
def test_redis_health_skips_a_down_redis_probes_once_and_logs_each_transition_once(caplog):
    caplog.set_level(logging.INFO, logger=HEALTH_LOG)
    now = [0.0]
    health = RedisHealth(RedisConfig("redis://127.0.0.1:1/0", retry_s=2.0), clock=lambda: now[0])

    def refused() -> None:
        raise redis.ConnectionError("Connection refused")

    for _ in range(100):
        with pytest.raises(RedisUnavailable):
            health.run("rate limiting", refused)
    assert health.state == "down" and len(outage_lines(caplog)[0]) == 1
    calls: list[int] = []
    with pytest.raises(RedisUnavailable) as skipped:
        health.run("reading a job", lambda: calls.append(1))
    assert calls == [] and not skipped.value.attempted and skipped.value.retry_after >= 1
    now[0] = 2.5  # due for a probe: one caller tries, and its success lets everyone back
    assert health.run("reading a job", lambda: "ok") == "ok" and health.state == "up"
    assert len([m for m in outage_lines(caplog)[1] if "back" in m]) == 1

    def oom() -> None:
        raise redis.ResponseError("OOM command not allowed")

    with pytest.raises(RedisUnavailable, match="Redis refused"):  # an answer: Redis is up
        health.run("caching a prefix", oom)
    assert health.state == "up" and len(outage_lines(caplog)[0]) == 2  # the refusal, once


# ---- a slow Redis (DEBUG SLEEP) ---------------------------------------------------------------------
def test_health_and_generation_keep_going_while_redis_sleeps(tiny_model, tmp_path, own_redis, caplog):
    """`DEBUG SLEEP 5` while clients hit routes that touch Redis (rate-limited generates, job reads):
    the event loop never waits on it, so every /health answers within 1 s (blocking calls would hold it
    for the whole 5 s), generates with a resident prefix all succeed, job reads answer 200 or 503 with
    Retry-After, never a 500; the outage is logged once, and everything heals by itself."""
    caplog.set_level(logging.INFO, logger=HEALTH_LOG)
    settings = settings_for(
        tmp_path, redis_url=own_redis.url, requests_per_minute=100_000, max_running=8, max_waiting=64
    )
    server = LiveServer(settings, tiny_model).start()
    stop = threading.Event()
    health: list[tuple[float, float]] = []  # (sent at, seconds to answer)
    gens: list[tuple[float, float, int]] = []
    jobs: list[tuple[float, int, str | None]] = []
    try:
        prefix = text_prefix(server, A, "name : Aromi | food : Italian\n")["id"]
        job = httpx.post(server.url + "/prefixes", json=train_body(), headers=A).json()["id"]  # no worker

        def timed(log: list, call) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    t0 = time.monotonic()
                    log.append((t0, *call(client, t0)))
                    time.sleep(0.01)

        def probe(client: httpx.Client, t0: float) -> tuple[float]:
            client.get("/health")
            return (time.monotonic() - t0,)

        def generate(client: httpx.Client, t0: float) -> tuple[float, int]:
            body = {"prefix_id": prefix, "input": "name : Cotto", "max_new_tokens": 8}
            r = client.post("/generate", json=body, headers=A)
            return time.monotonic() - t0, r.status_code

        def read_job(client: httpx.Client, t0: float) -> tuple[int, str | None]:
            r = client.get(f"/jobs/{job}", headers=A)
            return r.status_code, r.headers.get("retry-after")

        threads = [threading.Thread(target=timed, args=(health, probe))]
        threads += [threading.Thread(target=timed, args=(gens, generate)) for _ in range(3)]
        threads += [threading.Thread(target=timed, args=(jobs, read_job))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        asleep = time.monotonic()
        redis.Redis.from_url(own_redis.url, socket_timeout=30).execute_command("DEBUG", "SLEEP", "5")
        awake = time.monotonic()
        wait_until(lambda: jobs[-1][1] == 200 and jobs[-1][0] > awake, 10)  # heals by itself
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        server.stop()
    during = [dt for t0, dt in health if asleep <= t0 <= awake]
    assert len(during) >= 20 and max(during) < 1.0, f"/health took up to {max(during):.2f}s"
    gens_during = [(dt, code) for t0, dt, code in gens if asleep <= t0 <= awake]
    assert len(gens_during) >= 5 and {code for _, code in gens_during} == {200}
    assert max(dt for dt, _ in gens_during) < 3.0  # not held for the sleep's 5 s
    codes = {code for t0, code, _ in jobs if asleep <= t0 <= awake}
    assert codes <= {200, 503} and 503 in codes
    assert all(int(retry) >= 1 for _, code, retry in jobs if code == 503)
    warnings, infos = outage_lines(caplog)
    assert len(warnings) == 1 and "unavailable" in warnings[0], warnings
    assert len([m for m in infos if "back" in m]) == 1, infos


# ---- Redis killed, restarted empty -----------------------------------------------------------------
def test_redis_down_fails_open_once_logged_and_job_calls_answer_503(live_server, tmp_path, own_redis, caplog):
    caplog.set_level(logging.INFO, logger=HEALTH_LOG)
    settings = settings_for(tmp_path, redis_url=own_redis.url, requests_per_minute=1000, redis_retry_s=0.5)
    server = live_server(settings=settings)
    training = Path(server.state.service.store.root) / "training"
    queued = httpx.post(server.url + "/prefixes", json=train_body(), headers=A)
    assert queued.status_code == 202, queued.text
    job = queued.json()["id"]
    own_redis.kill()
    body = {"input": "name : Aromi", "max_new_tokens": 2}
    codes = [httpx.post(server.url + "/generate", json=body, headers=A).status_code for _ in range(30)]
    assert codes == [200] * 30  # rate limiting fails open (counted on this replica)
    warnings, _ = outage_lines(caplog)
    assert len(warnings) == 1 and "fail open" in warnings[0], warnings  # one line, not one per request
    r = httpx.post(server.url + "/prefixes", json=train_body(), headers=A)
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1 and "Redis" in r.json()["error"]["message"]
    assert sorted(os.listdir(training)) == [f"{job}.jsonl"]  # no orphan dataset
    for method in ("GET", "DELETE"):
        r = httpx.request(method, server.url + f"/jobs/{job}", headers=A)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (method, r.text)
    assert redis_state(server) == "down"
    own_redis.start()  # the same port, empty (no persistence)
    wait_until(lambda: redis_state(server) == "up", 10)
    _, infos = outage_lines(caplog)
    assert len([m for m in infos if "back" in m]) == 1, infos
    again = httpx.post(server.url + "/prefixes", json=train_body(), headers=A)
    assert again.status_code == 202, again.text  # the queue's group was recreated on the empty Redis
    assert httpx.get(server.url + f"/jobs/{again.json()['id']}", headers=A).status_code == 200
    assert httpx.post(server.url + "/generate", json=body, headers=A).status_code == 200
    assert redis.Redis.from_url(own_redis.url).keys("prefixserve:rl:*")  # limits shared again
    assert len(outage_lines(caplog)[0]) == 1


def test_server_starts_with_redis_down_and_reconnects_by_itself(live_server, tmp_path, own_redis):
    own_redis.kill()
    settings = settings_for(tmp_path, redis_url=own_redis.url, requests_per_minute=1000, redis_retry_s=0.5)
    server = live_server(settings=settings)
    assert redis_state(server) == "down"
    prefix = text_prefix(server, A, "name : Zizzi\n")["id"]  # stored durably; the cache is skipped
    server.state.service.pool.evict(prefix)  # cold: loads from the durable store
    body = {"prefix_id": prefix, "input": "x", "max_new_tokens": 3}
    assert httpx.post(server.url + "/generate", json=body, headers=A).status_code == 200
    assert httpx.post(server.url + "/prefixes", json=train_body(), headers=A).status_code == 503
    own_redis.start()
    wait_until(lambda: redis_state(server) == "up", 10)
    client = redis.Redis.from_url(own_redis.url)
    r = httpx.post(server.url + "/prefixes", json=train_body(), headers=A)
    assert r.status_code == 202, r.text
    assert client.xlen(STREAM) == 1 and client.xinfo_groups(STREAM)[0]["name"] == GROUP.encode()
    server.state.service.pool.evict(prefix)
    assert httpx.post(server.url + "/generate", json=body, headers=A).status_code == 200
    assert client.keys("prefixserve:rl:*")  # rate limits use Redis again
    assert client.exists(f"prefixserve:prefix:{prefix}")  # and the cache


def test_job_queue_works_again_after_flushall_without_restarts(tiny_model, tmp_path, own_redis):
    """A worker and a server keep running across FLUSHALL: the worker recreates the consumer group by
    itself (NOGROUP is not fatal) and a job submitted afterwards is trained and served."""
    server = LiveServer(settings_for(tmp_path, redis_url=own_redis.url, job_reclaim_s=2), tiny_model).start()
    service = PrefixService(bind_model(tiny_model), StoreConfig(url=server.state.service.config.url))
    worker = Worker(RedisJobQueue(own_redis.url, reclaim_s=2), service, WorkerConfig(poll_s=0.2))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="worker")
    thread.start()
    client = redis.Redis.from_url(own_redis.url)

    try:
        first = httpx.post(server.url + "/prefixes", json=train_body(), headers=A).json()["id"]
        assert wait_job(server, first)["status"] == "succeeded"
        client.flushall()
        wait_until(lambda: client.exists(STREAM) and client.xinfo_groups(STREAM), 10)  # the worker did it
        r = httpx.post(server.url + "/prefixes", json=train_body(), headers=A)
        assert r.status_code == 202, r.text
        second = wait_job(server, r.json()["id"])
        assert second["status"] == "succeeded", second
        body = {"prefix_id": second["prefix_id"], "input": "name : Aromi", "max_new_tokens": 3}
        assert httpx.post(server.url + "/generate", json=body, headers=A).status_code == 200
    finally:
        stop.set()
        thread.join(30)
        service.close()
        server.stop()


# ---- a full disk --------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs: a real filesystem that really fills up (ENOSPC). Mounting needs root (or
    CAP_SYS_ADMIN); CI runs as root."""
    path = tmp_path / "small"
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem is full, then free `leave` bytes (whole pages)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    written = 0
    try:
        for chunk in (1 << 16, 1 << 12):
            while True:
                try:
                    written += os.write(fd, bytes(chunk))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        os.ftruncate(fd, max(0, written - leave))
    finally:
        os.close(fd)
    return filler


def temp_files(store: Path) -> list[str]:
    return [name for name in os.listdir(store) if name.startswith(".tmp-")]


def test_full_disk_answers_507_and_publishes_nothing(live_server, small_disk):
    store = small_disk / "prefixes"
    server = live_server(store_url=str(store))
    kept = text_prefix(server, A, "name : Aromi\n")
    native = (store / f"{kept['id']}.safetensors").read_bytes()
    filler = fill(small_disk)
    attempts = [
        httpx.post(server.url + "/prefixes", json={"text": "name : Cotto\n"}, headers=A),
        httpx.post(server.url + "/prefixes", files={"file": ("p.safetensors", native)}, headers=A),
        httpx.post(server.url + "/prefixes", json=train_body(), headers=A),
    ]
    for r in attempts:
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["type"] == "insufficient_storage" and "ENOSPC" in error["message"], error
        assert "nothing was published" in error["message"]
    listed = httpx.get(server.url + "/prefixes", headers=A).json()["prefixes"]
    assert [p["id"] for p in listed] == [kept["id"]]
    assert temp_files(store) == [] and os.listdir(store / "training") == []
    body = {"prefix_id": kept["id"], "input": "x", "max_new_tokens": 2}
    assert httpx.post(server.url + "/generate", json=body, headers=A).status_code == 200  # reads work
    filler.unlink()  # space again: the same request succeeds
    r = httpx.post(server.url + "/prefixes", json={"text": "name : Cotto\n"}, headers=A)
    assert r.status_code == 201, r.text


def test_training_publish_on_a_full_disk_fails_the_job_with_the_reason(live_server, small_disk):
    """The dataset fits, the trained prefix does not: the job fails naming the full disk, and nothing
    (prefix, checkpoint or temp file) is left published."""
    store = small_disk / "prefixes"
    server = live_server(store_url=str(store))
    (store / "training").mkdir()
    fill(small_disk, leave=4096)  # one page: room for the dataset only
    r = httpx.post(server.url + "/prefixes", json=train_body(epochs=2), headers=A)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = wait_job(server, job_id)
    assert job["status"] == "failed" and job["prefix_id"] is None, job
    assert "InsufficientStorage" in job["error"] and "ENOSPC" in job["error"], job["error"]
    assert httpx.get(server.url + "/prefixes", headers=A).json()["prefixes"] == []
    assert not any(name.endswith(".safetensors") for name in os.listdir(store))
    checkpoints = store / "checkpoints"
    assert temp_files(store) == [] and (not checkpoints.exists() or not os.listdir(checkpoints))


def test_leftover_temp_files_are_swept_at_start_up(live_server, tmp_path):
    """A process killed mid-write leaves a temp file (never published: the id appears only by link).
    The next server start removes it; a young one, maybe another replica's write in progress, stays."""
    store = tmp_path / "prefixes"
    store.mkdir()
    old, young = store / ".tmp-0123abcd", store / ".tmp-4567ef01"
    old.write_bytes(b"half a prefix")
    young.write_bytes(b"being written")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    server = live_server(data_dir=tmp_path)
    assert temp_files(store) == [young.name]
    assert httpx.get(server.url + "/prefixes", headers=A).json()["prefixes"] == []
