"""Durable store, Redis cache tier and device pool, against a real redis-server and the tiny model."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import torch

from prefix_store.cache import KEY_PREFIX, LocalByteCache
from prefix_store.format import InvalidPrefixFile, PrefixMeta, encode_prefix
from prefix_store.store import DurableStore, PrefixExists
from prefixserve.engine import EngineConfig, EngineCore, FinishReason, SamplingParams
from prefixserve.errors import PrefixNotFound

from .helpers import PROMPTS, collect, kv_for
from .reference import hf_greedy


def file_for(model, p: int = 4) -> bytes:
    meta = PrefixMeta(
        id="pfx-file", model_fingerprint=model.fingerprint, prefix_len=p, dtype="float32", owner="x"
    )
    return encode_prefix(kv_for(model, p), meta)


# ---- durable store -----------------------------------------------------------------------------
def test_store_put_get_list_delete_and_no_overwrite(tmp_path, tiny_model):
    store = DurableStore(tmp_path / "prefixes")
    data = file_for(tiny_model)
    store.put("pfx-aaa", data)
    assert store.get("pfx-aaa") == data and store.exists("pfx-aaa")
    assert store.head("pfx-aaa", 8) == data[:8]
    with pytest.raises(PrefixExists):
        store.put("pfx-aaa", b"other bytes")
    assert store.get("pfx-aaa") == data  # the first version is intact
    (tmp_path / "prefixes" / ".tmp-deadbeef").write_bytes(b"half-written")  # a crashed writer's leftover
    (tmp_path / "prefixes" / "notes.txt").write_text("not a prefix")
    store.put("pfx-bbb", data)
    assert store.ids() == ["pfx-aaa", "pfx-bbb"]
    assert store.delete("pfx-aaa") and not store.delete("pfx-aaa")
    with pytest.raises(PrefixNotFound):
        store.get("pfx-aaa")
    assert not list((tmp_path / "prefixes").glob(".tmp-*")) or store.ids() == ["pfx-bbb"]


def test_store_ids_never_become_paths_unchecked(tmp_path):
    store = DurableStore(tmp_path / "s")
    for bad in ("../escape", "a/b", "/etc/passwd", "..", "UPPER"):
        with pytest.raises(InvalidPrefixFile, match="prefix id must match"):
            store.put(bad, b"x")
        with pytest.raises(InvalidPrefixFile):
            store.get(bad)
    assert not (tmp_path / "escape.safetensors").exists()


def test_store_works_on_any_fsspec_url(tiny_model):
    store = DurableStore("memory://prefixserve-test/prefixes")
    data = file_for(tiny_model)
    store.put("pfx-mem", data)
    assert store.get("pfx-mem") == data and store.ids() == ["pfx-mem"]
    with pytest.raises(PrefixExists):
        store.put("pfx-mem", data)
    assert store.delete("pfx-mem")


# ---- service: tiers --------------------------------------------------------------------------
def test_service_add_list_visibility_delete(service_factory, tiny_model):
    svc = service_factory()
    a = svc.add_tensor(kv_for(tiny_model, 5), owner="alice", name="mine")
    b = svc.add_tensor(kv_for(tiny_model, 3), owner="bob", visibility="public", source="text")
    c = svc.add_tensor(kv_for(tiny_model, 2), owner="bob")
    assert {m.id for m in svc.list("alice")} == {a.id, b.id}
    assert {m.id for m in svc.list("bob")} == {b.id, c.id}
    assert svc.visible(b.id, "alice").owner == "bob"
    with pytest.raises(PrefixNotFound) as foreign:
        svc.visible(c.id, "alice")  # bob's private prefix
    with pytest.raises(PrefixNotFound) as unknown:
        svc.visible("pfx-does-not-exist", "alice")
    assert str(foreign.value).replace(c.id, "X") == str(unknown.value).replace("pfx-does-not-exist", "X")
    big = svc.add_tensor(kv_for(tiny_model, 64), owner="carol")  # a file far larger than the header read
    fresh = service_factory()  # a new server on the same store: self-describing files, no index
    assert {m.id for m in fresh.list("alice")} == {a.id, b.id}
    assert fresh.meta(big.id).prefix_len == 64 and {m.id for m in fresh.list("carol")} == {big.id, b.id}
    assert fresh.meta(a.id).name == "mine" and fresh.meta(a.id).prefix_len == 5
    assert svc.delete(a.id) and not svc.delete(a.id)
    with pytest.raises(PrefixNotFound):
        fresh.store.get(a.id)


def test_redis_tier_read_through_with_ttl(service_factory, tiny_model, redis_url):
    svc = service_factory(redis_url=redis_url, cache_ttl_s=600)
    meta = svc.add_tensor(kv_for(tiny_model, 4), owner="alice")
    client = redis.Redis.from_url(redis_url)
    assert 0 < client.ttl(KEY_PREFIX + meta.id) <= 600  # written on upload, with a TTL
    assert svc.load_bytes(meta.id) == svc.store.get(meta.id)
    assert svc.stats.get("redis", "hits") == 1
    client.delete(KEY_PREFIX + meta.id)  # evicted or flushed
    assert svc.load_bytes(meta.id) == svc.store.get(meta.id)
    assert svc.stats.get("redis", "misses") == 1 and svc.stats.get("store", "reads") == 1
    assert client.exists(KEY_PREFIX + meta.id) and client.ttl(KEY_PREFIX + meta.id) > 0  # refilled
    svc.delete(meta.id)
    assert not client.exists(KEY_PREFIX + meta.id)


def run_one(engine: EngineCore, prefix_id: str, prompt: str, n: int = 8) -> list:
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=n), prefix_id=prefix_id)
    return engine.run_to_completion()[rid]


def test_generation_survives_redis_flush_kill_and_restart(service_factory, tiny_model, hf_model, own_redis):
    svc = service_factory(redis_url=own_redis.url, redis_backoff_s=0.2)
    kvs = [kv_for(tiny_model, 3 + i, seed=i) for i in range(3)]
    metas = [svc.add_tensor(kv, owner="alice") for kv in kvs]
    expected = [hf_greedy(hf_model, tiny_model.tokenizer.encode(PROMPTS[0]), kv, 8)[0] for kv in kvs]

    def generate_all(fresh_pool: bool) -> None:
        if fresh_pool:  # nothing resident: every prefix is loaded through the tiers again
            for m in metas:
                svc.pool.evict(m.id)
        engine = EngineCore(tiny_model, EngineConfig(max_running=4), prefixes=svc.pool)
        for m, want in zip(metas, expected, strict=True):
            assert collect(run_one(engine, m.id, PROMPTS[0]))[0] == want

    generate_all(fresh_pool=True)
    redis.Redis.from_url(own_redis.url).flushall()
    generate_all(fresh_pool=True)
    own_redis.kill()  # Redis dies mid-run: every request is still served from the store
    generate_all(fresh_pool=True)
    assert svc.stats.get("redis", "errors") >= 1
    late = svc.add_tensor(kv_for(tiny_model, 6, seed=9), owner="alice")  # uploads work without Redis too
    assert svc.store.exists(late.id)
    own_redis.start()
    time.sleep(0.25)  # the back-off after the last error runs out
    generate_all(fresh_pool=True)
    assert redis.Redis.from_url(own_redis.url).exists(KEY_PREFIX + metas[0].id)  # refilled after restart


def test_redis_killed_while_loads_are_in_flight(service_factory, tiny_model, hf_model, own_redis):
    svc = service_factory(redis_url=own_redis.url)
    kvs = [kv_for(tiny_model, 2 + i, seed=20 + i) for i in range(6)]
    metas = [svc.add_tensor(kv, owner="a") for kv in kvs]
    for m in metas:
        svc.pool.evict(m.id)  # all cold
    gate = threading.Event()
    real_load = svc.pool._load
    svc.pool._load = lambda pid: gate.wait(10) and real_load(pid)  # loads start, then wait for the kill
    engine = EngineCore(tiny_model, EngineConfig(max_running=8), prefixes=svc.pool)
    rids = [engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6), prefix_id=m.id) for m in metas]
    own_redis.kill()  # with the loads in flight on the worker threads
    gate.set()
    outs = engine.run_to_completion()
    assert svc.stats.get("redis", "errors") >= 1 and svc.stats.get("store", "reads") == len(metas)
    for rid, kv in zip(rids, kvs, strict=True):
        ref, _ = hf_greedy(hf_model, tiny_model.tokenizer.encode(PROMPTS[2]), kv, 6)
        assert collect(outs[rid])[0] == ref


def test_slow_redis_times_out_to_the_store(service_factory, tiny_model, own_redis):
    svc = service_factory(redis_url=own_redis.url, redis_timeout_s=0.2)
    meta = svc.add_tensor(kv_for(tiny_model, 4), owner="a")
    blocker = threading.Thread(
        target=lambda: redis.Redis.from_url(own_redis.url).execute_command("DEBUG", "SLEEP", "1.5")
    )
    blocker.start()  # the server stops answering for 1.5 s
    time.sleep(0.1)
    assert svc.load_bytes(meta.id) == svc.store.get(meta.id)
    assert blocker.is_alive()  # served from the store while Redis still slept: it did not wait for it
    assert svc.stats.get("redis", "errors") == 1
    blocker.join()


def test_slow_or_absent_redis_never_fails_a_load(service_factory, tiny_model):
    svc = service_factory(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    meta = svc.add_tensor(kv_for(tiny_model, 4), owner="alice")
    for _ in range(5):
        assert svc.load_bytes(meta.id) == svc.store.get(meta.id)
    # one failed attempt (the upload's cache write), then the back-off skips Redis without trying it:
    # each load's lookup and its cache fill
    assert (svc.stats.get("redis", "errors"), svc.stats.get("redis", "skipped")) == (1, 5 * 2)


def test_embedded_default_uses_the_in_process_cache(service_factory, tiny_model):
    svc = service_factory()
    assert isinstance(svc.cache, LocalByteCache)
    meta = svc.add_tensor(kv_for(tiny_model, 4), owner="alice")
    svc.load_bytes(meta.id)
    assert svc.stats.get("local", "hits") == 1


def test_local_cache_is_lru_within_budget():
    cache = LocalByteCache(budget_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    cache.get("a")  # a is now the most recent
    cache.put("c", b"90ab")
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"90ab"
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None


# ---- device pool ---------------------------------------------------------------------------------
def test_pool_lru_eviction_respects_budget_and_pins(service_factory, tiny_model):
    per = kv_for(tiny_model, 4).numel() * 4
    svc = service_factory(device_pool_bytes=3 * per)
    ids = [svc.add_tensor(kv_for(tiny_model, 4, seed=i), owner="a").id for i in range(5)]
    pool = svc.pool

    def load(pid: str) -> None:
        pool.acquire(pid)
        deadline = time.monotonic() + 5
        while not pool.is_ready(pid):
            assert time.monotonic() < deadline
            time.sleep(0.002)

    load(ids[0])  # pinned: never evicted while pinned
    for pid in ids[1:3]:
        load(pid)
        pool.release(pid)
    assert set(pool.resident()) == set(ids[:3]) and pool.resident_bytes == 3 * per
    load(ids[3])
    pool.release(ids[3])
    assert set(pool.resident()) == {ids[0], ids[2], ids[3]}  # ids[1] was least recently used
    assert pool.resident_bytes <= 3 * per
    assert svc.stats.get("device", "evictions") == 1
    pool.acquire(ids[2])  # a hit
    assert svc.stats.get("device", "hits") == 1 and svc.stats.get("device", "misses") == 4


def test_cold_prefix_loads_off_the_decode_loop(service_factory, tiny_model, hf_model):
    """While a cold prefix is loading (held at a gate), the running batch keeps decoding."""
    svc = service_factory()
    cold_kv, warm_kv = kv_for(tiny_model, 5, seed=1), kv_for(tiny_model, 3, seed=2)
    cold, warm = svc.add_tensor(cold_kv, owner="a"), svc.add_tensor(warm_kv, owner="a")
    gate = threading.Event()
    real_load = svc.pool._load

    def gated_load(pid: str) -> torch.Tensor:
        if pid == cold.id:
            assert gate.wait(10)
        return real_load(pid)

    svc.pool._load = gated_load
    engine = EngineCore(tiny_model, EngineConfig(max_running=4), prefixes=svc.pool)
    r_warm = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=10), prefix_id=warm.id)
    r_cold = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6), prefix_id=cold.id)
    outs: dict[str, list] = {}
    deadline = time.monotonic() + 10
    while r_warm not in outs or not outs[r_warm][-1].finished:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        assert time.monotonic() < deadline
    assert r_cold not in outs  # still waiting on its load; nothing else was blocked
    gate.set()
    while engine.has_work:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    ref, _ = hf_greedy(hf_model, tiny_model.tokenizer.encode(PROMPTS[0]), cold_kv, 6)
    assert collect(outs[r_cold])[0] == ref
    assert svc.pool.pins(cold.id) == 0 and svc.pool.pins(warm.id) == 0


def test_prefix_that_fails_to_load_ends_its_requests_with_the_error(service_factory, tiny_model, tmp_path):
    svc = service_factory()
    meta = svc.add_tensor(kv_for(tiny_model, 4), owner="a")
    path = tmp_path / "store" / f"{meta.id}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # corrupted on disk after it was written
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    svc.cache.delete(meta.id)
    engine = EngineCore(tiny_model, prefixes=svc.pool)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4), prefix_id=meta.id)
    other = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=4))
    outs = engine.run_to_completion()
    assert outs[rid][-1].finish_reason == FinishReason.ERROR
    assert "sha256" in str(outs[rid][-1].error)
    assert outs[other][-1].finish_reason == FinishReason.LENGTH
    assert svc.pool.pins(meta.id) == 0


def test_deleting_a_prefix_in_use_finishes_its_admitted_requests(service_factory, tiny_model, hf_model):
    svc = service_factory()
    kv = kv_for(tiny_model, 4, seed=5)
    meta = svc.add_tensor(kv, owner="a")
    svc.pool.evict(meta.id)  # cold, so the request below waits on a load
    engine = EngineCore(tiny_model, prefixes=svc.pool)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5), prefix_id=meta.id)
    other = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=5))
    assert svc.delete(meta.id)  # deleted while a queued request holds a pin
    outs = engine.run_to_completion()
    ref, _ = hf_greedy(hf_model, tiny_model.tokenizer.encode(PROMPTS[0]), kv, 5)
    assert collect(outs[rid])[0] == ref and outs[other][-1].finish_reason == FinishReason.LENGTH
    assert meta.id not in svc.pool.resident() and svc.pool.resident_bytes == 0  # dropped with the last pin
    with pytest.raises(PrefixNotFound):
        engine.add_request(PROMPTS[0], prefix_id=meta.id)  # new requests: gone
