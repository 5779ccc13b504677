"""Scale-out benchmark: prefix-affinity routing vs prefix-blind routing on Ray Serve, in one run.

    python bench/scale.py [--quick] [--replicas 2] [--prefixes 200] [--per-replica 50] [--requests 1000]

A local Ray cluster, two engine replicas (tiny model, CPU), a real redis-server and a shared store. 200
prefixes are uploaded once; then the same closed-loop load (Zipf popularity over the prefixes, alpha 1,
`--concurrency` clients, `--new-tokens` each) runs twice on fresh replicas whose device pools hold
`--per-replica` prefixes (Ray's models per replica, and the pool's bytes):

  affinity   each request carries its prefix as Ray Serve's multiplexed model id: routed to a replica
             that holds it
  random     each replica its own deployment; the ingress picks one uniformly at random per request,
             blind to prefixes (Ray's own prefix-blind router turned out sticky under a light load
             of short requests, sending everything to one replica: no baseline)

Cold loads = prefixes loaded into a device pool (the device tier's misses), summed over the replicas;
Redis is flushed between the runs, so both start from the store. Next to the measured counts, the
same request order is run through exact LRU pools (random routing vs perfect affinity): what routing
can achieve at best. With R replicas, prefix-blind routing loads a prefix on up to R replicas and
affinity on one, so the ratio of cold loads is bounded by about R (2 by default) before the pools'
capacity adds misses to both; more replicas raise the bound (`--replicas 4`). Throughput cannot
scale on a 2-core machine (the replicas share the cores); it is reported, not judged. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import ray
import redis
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_store.redis_server import RedisServer, free_port
from prefixserve.scale.ray_serve import APP_NAME, build_application
from prefixserve.scale.replicas import KEY_PREFIX
from prefixserve.settings import ServerSettings
from prefixserve.tiny import TinyModelConfig

PREFIX_TOKENS = 8
RESULTS = Path(__file__).resolve().parent / "results"


def settings_for(args, workdir: Path, redis_url: str, port: int, affinity: bool) -> ServerSettings:
    cfg = TinyModelConfig()
    head = cfg.n_embd // cfg.n_head
    prefix_bytes = cfg.n_layer * 2 * cfg.n_head * PREFIX_TOKENS * head * 4  # float32
    return ServerSettings(
        model="tiny",
        data_dir=str(workdir / "data"),
        store_url=str(workdir / "store"),
        redis_url=redis_url,
        auth="false",
        host="127.0.0.1",
        port=port,
        max_running=16,
        max_waiting=64,
        ray_replicas=args.replicas,
        replica_prefixes=args.per_replica,
        device_pool_bytes=args.per_replica * prefix_bytes,  # the pool holds exactly that many
        ray_max_ongoing_requests=80,
        ray_routing="affinity" if affinity else "random",
    )


def replica_records(redis_url: str) -> list[dict]:
    client = redis.Redis.from_url(redis_url)
    return [json.loads(client.get(k) or "{}") for k in client.scan_iter(match=KEY_PREFIX + "*")]


def wait_ready(url: str, redis_url: str, replicas: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (
                len(replica_records(redis_url)) == replicas
                and httpx.get(url + "/ready", timeout=5).status_code == 200
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the application did not become ready")


def upload_prefixes(url: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = httpx.post(url + "/prefixes", json={"text": f"prefix {i} says {i * 7 % 13}"}, timeout=60)
        r.raise_for_status()
        ids.append(r.json()["id"])
    return ids


def zipf_sequence(n_prefixes: int, n_requests: int, alpha: float, seed: int = 0) -> list[int]:
    p = 1.0 / np.arange(1, n_prefixes + 1) ** alpha
    return np.random.default_rng(seed).choice(n_prefixes, size=n_requests, p=p / p.sum()).tolist()


def lru_misses(order: list[int], capacity: int) -> int:
    cache: dict[int, None] = {}  # insertion-ordered: the first key is the least recently used
    misses = 0
    for key in order:
        if key in cache:
            del cache[key]
        else:
            misses += 1
            if len(cache) >= capacity:
                del cache[next(iter(cache))]
        cache[key] = None
    return misses


def ideal_cold_loads(order: list[int], replicas: int, capacity: int, seed: int = 1) -> dict[str, int]:
    """The same request order through exact LRU pools of `capacity`: uniformly random routing, and perfect
    affinity (each prefix owned by one replica, owners dealt round-robin in order of first use). What the
    routing can do at best, with nothing else in the way (no concurrency, no Ray)."""
    rng = np.random.default_rng(seed)
    rand: list[list[int]] = [[] for _ in range(replicas)]
    for key in order:
        rand[int(rng.integers(replicas))].append(key)
    owner: dict[int, int] = {}
    aff: list[list[int]] = [[] for _ in range(replicas)]
    for key in order:
        aff[owner.setdefault(key, len(owner) % replicas)].append(key)
    return {
        "random": sum(lru_misses(s, capacity) for s in rand),
        "affinity": sum(lru_misses(s, capacity) for s in aff),
    }


def run_load(url: str, ids: list[str], order: list[int], concurrency: int, new_tokens: int) -> dict:
    def one(i: int) -> int:
        body = {"prefix_id": ids[order[i]], "input": "the menu", "max_new_tokens": new_tokens}
        r = httpx.post(url + "/generate", json=body, timeout=300)
        return r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -r.status_code

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(order))))
    wall = time.perf_counter() - t0
    tokens = sum(r for r in results if r > 0)
    return {"tok_s": tokens / wall, "wall_s": wall, "errors": sum(1 for r in results if r < 0)}


def one_mode(args, workdir, redis_server, ids_holder: list, affinity: bool) -> dict:
    port = free_port()
    settings = settings_for(args, workdir, redis_server.url, port, affinity)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(settings, args.per_replica), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, redis_server.url, args.replicas)
    if not ids_holder:
        ids_holder.extend(upload_prefixes(url, args.prefixes))
        redis.Redis.from_url(redis_server.url).flushdb()  # the uploads cached them: start cold
        time.sleep(2)
    order = zipf_sequence(args.prefixes, args.requests, args.alpha)
    before = sum(r["prefix_loads"].get("device_misses", 0) for r in replica_records(redis_server.url))
    result = run_load(url, ids_holder, order, args.concurrency, args.new_tokens)
    time.sleep(2.5)  # the replicas' last counters reach Redis
    records = replica_records(redis_server.url)
    result["cold_loads"] = sum(r["prefix_loads"].get("device_misses", 0) for r in records) - before
    result["per_replica_loads"] = sorted(r["prefix_loads"].get("device_misses", 0) for r in records)
    result["per_replica_hits"] = sorted(r["prefix_loads"].get("device_hits", 0) for r in records)
    serve.shutdown()
    redis.Redis.from_url(redis_server.url).flushdb()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 requests (about 5 minutes on 2 cores)")
    ap.add_argument("--replicas", type=int, default=2, help="engine replicas (the issue's: 2)")
    ap.add_argument("--prefixes", type=int, default=200)
    ap.add_argument("--per-replica", type=int, default=50)
    ap.add_argument("--requests", type=int, default=None, help="default 1000 (400 quick)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/scale-cpu-tiny[-quick].json)"
    )
    args = ap.parse_args()
    args.requests = args.requests or (400 if args.quick else 1000)
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    redis_server = RedisServer().start()
    ray.init(num_cpus=max(4, args.replicas), include_dashboard=False)  # one per replica at least
    ids: list[str] = []
    try:
        results = {
            "random": one_mode(args, workdir, redis_server, ids, affinity=False),
            "affinity": one_mode(args, workdir, redis_server, ids, affinity=True),
        }
    finally:
        ray.shutdown()
        redis_server.kill()
    print(f"{args.requests} requests, Zipf alpha {args.alpha} over {args.prefixes} prefixes,")
    print(f"{args.replicas} engine replicas, {args.per_replica} prefixes each, {args.concurrency} clients")
    print(
        f"{'routing':10s} {'cold loads':>10s} {'per replica':>14s} {'hits':>10s} {'tok/s':>8s} {'errors':>7s}"
    )
    for name, r in results.items():
        per, hits = "/".join(map(str, r["per_replica_loads"])), "/".join(map(str, r["per_replica_hits"]))
        print(f"{name:10s} {r['cold_loads']:10d} {per:>14s} {hits:>10s} {r['tok_s']:8.1f} {r['errors']:7d}")
    ratio = results["random"]["cold_loads"] / max(1, results["affinity"]["cold_loads"])
    order = zipf_sequence(args.prefixes, args.requests, args.alpha)
    ideal = ideal_cold_loads(order, args.replicas, args.per_replica)
    ideal_ratio = ideal["random"] / max(1, ideal["affinity"])
    print(f"exact LRU simulation of the same order: random {ideal['random']}, affinity {ideal['affinity']}")
    print(f"cold_loads_random / cold_loads_affinity = {ratio:.2f} (target >= 3; simulated {ideal_ratio:.2f})")
    summary = {
        "cold_loads_affinity": results["affinity"]["cold_loads"],
        "cold_loads_random": results["random"]["cold_loads"],
        "tok_s_affinity": round(results["affinity"]["tok_s"], 1),
        "tok_s_random": round(results["random"]["tok_s"], 1),
        "cold_loads_ratio": round(ratio, 2),
        "cold_loads_random_lru_sim": ideal["random"],
        "cold_loads_affinity_lru_sim": ideal["affinity"],
        "config": {
            k: getattr(args, k)
            for k in ("replicas", "prefixes", "per_replica", "requests", "concurrency", "alpha")
        },
    }
    out = Path(args.out or RESULTS / f"scale-cpu-tiny{'-quick' if args.quick else ''}.json")
    out.write_text(json.dumps({**summary, "runs": results}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
