"""What the web console reads from the API: GET /jobs (each tenant its own, newest first, on the
in-process queue and on Redis), GET /server/stats (aggregates only), and the docs' local assets."""

from __future__ import annotations

import re

import httpx
import torch

from prefixserve.training.jobs import BY_TENANT, MAX_LISTED, Job, LocalJobQueue, RedisJobQueue

from .helpers import A, B, text_prefix, train_body, wait_job


def check_listing(queue) -> None:
    made = [
        Job(id=f"job-{i}", tenant="bob" if i == 2 else "alice", config={}, n_examples=1) for i in range(4)
    ]
    for job in made:
        queue.submit(job)
    assert [j.id for j in queue.list("alice", 10)] == ["job-3", "job-1", "job-0"]
    assert [j.id for j in queue.list("alice", 2)] == ["job-3", "job-1"]
    assert [j.id for j in queue.list("bob", 10)] == ["job-2"]
    assert queue.list("carol", 10) == []


def test_local_job_lists_are_per_tenant_and_newest_first():
    check_listing(LocalJobQueue())


def test_redis_job_lists_are_per_tenant_and_newest_first_and_keep_the_newest(own_redis):
    queue = RedisJobQueue(own_redis.url)
    check_listing(queue)
    for i in range(MAX_LISTED + 5):
        queue.r.zadd(BY_TENANT + "busy", {f"old-{i}": i})  # the index alone (ids without records)
    queue.submit(Job(id="job-new", tenant="busy", config={}, n_examples=1))
    assert queue.r.zcard(BY_TENANT + "busy") == MAX_LISTED
    assert [j.id for j in queue.list("busy", 5)] == ["job-new"]  # ids without records are skipped


def test_get_jobs_over_http(api):
    job_id = httpx.post(api.url + "/prefixes", json=train_body(), headers=A).json()["id"]
    wait_job(api, job_id)
    mine = httpx.get(api.url + "/jobs", headers=A).json()["jobs"]
    assert mine[0]["id"] == job_id and mine[0]["status"] == "succeeded" and mine[0]["losses"]
    assert job_id not in {j["id"] for j in httpx.get(api.url + "/jobs", headers=B).json()["jobs"]}
    assert httpx.get(api.url + "/jobs").status_code == 401
    for bad in ("0", "201", "x"):
        r = httpx.get(api.url + "/jobs", params={"limit": bad}, headers=A)
        assert r.status_code == 422 and "limit" in r.text


def test_server_stats_are_aggregates_for_any_tenant(api):
    assert httpx.get(api.url + "/server/stats").status_code == 401
    before = httpx.get(api.url + "/server/stats", headers=B).json()
    prefix = text_prefix(api, A)
    r = httpx.post(
        api.url + "/generate", json={"prefix_id": prefix["id"], "input": "hi", "max_new_tokens": 4}, headers=A
    )
    assert r.status_code == 200, r.text
    after = httpx.get(api.url + "/server/stats", headers=B).json()
    assert after["tokens_total"] == before["tokens_total"] + 4
    assert after["max_running"] == 4 and after["running"] == 0 and after["waiting"] == 0
    # no row holds a block; the prefix sits in the KV pool (unified paging) until it is evicted
    assert after["kv_blocks_prefixes"] >= 1
    assert after["kv_blocks_free"] + after["kv_blocks_prefixes"] == after["kv_blocks_total"] > 0
    assert after["resident_prefixes"] >= 1 and 0 < after["resident_bytes"] <= after["pool_budget_bytes"]
    device = after["prefix_loads"]["device"]
    assert device["hits"] + device["misses"] >= 1 and 0 <= (device["hit_rate"] or 0) <= 1
    shown = httpx.get(api.url + "/server/stats", headers=B).text
    assert prefix["id"] not in shown and "alice" not in shown  # no prefix ids, no tenants
    # how the engine computes here: no graphs on the CPU (not configured), blocks read in place by C
    assert (after["cuda_graphs"], after["decode_kernel"]) == ("off", "c")
    metrics = httpx.get(api.url + "/metrics").text
    assert "prefixserve_engine_cuda_graphs 0.0" in metrics


def test_docs_and_console_come_from_this_server(api):
    for path in ("/docs", "/redoc"):
        page = httpx.get(api.url + path).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
        for asset in assets:
            assert httpx.get(api.url + asset).status_code == 200, asset
    console = httpx.get(api.url + "/ui/")
    assert console.status_code == 200 and "default-src 'none'" in console.headers["content-security-policy"]
    assert httpx.get(api.url + "/", follow_redirects=False).headers["location"] == "/ui/"
    assert httpx.get(api.url + "/ui/../app.py").status_code == 404  # no way out of the console's folder


def test_prefixes_carry_their_stored_size(api):
    made = text_prefix(api, A)
    listed = {p["id"]: p for p in httpx.get(api.url + "/prefixes", headers=A).json()["prefixes"]}
    one = httpx.get(api.url + f"/prefixes/{made['id']}", headers=A).json()
    stored = api.state.service.store.get(made["id"])
    assert made["size_bytes"] == listed[made["id"]]["size_bytes"] == one["size_bytes"] == len(stored)


def test_file_size_is_read_from_the_header_alone(tiny_model):
    from prefix_store.format import PrefixMeta, encode_prefix, read_listing

    meta = PrefixMeta(id="pfx-size", model_fingerprint="f", prefix_len=3, dtype="float32", owner="x")
    data = encode_prefix(torch.zeros(tiny_model.spec.prefix_shape(3)), meta)
    header_end = 8 + int.from_bytes(data[:8], "little")
    _, size = read_listing(data[:header_end])  # the header is all it needs
    assert len(data) > header_end and size == len(data)
