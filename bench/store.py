"""Prefix store: load latency per tier, and engine throughput with prefixes rotating through the pool.

    python bench/store.py [--quick] [--redis-url URL]

(a) Latency of loading one GPT-2-small prefix (P=10 and P=200) from each tier, the full path the
    device pool runs: device hit (pin + lookup), Redis (GET + validation + tensor), disk (read +
    validation + tensor). Validation includes the sha256 of the tensor bytes and the finiteness scan.
(b) Engine throughput (closed loop, 64 running + 16 queued) when requests pick among 1000 distinct
    prefixes with Zipf(alpha=1) popularity and rotate through a device pool that holds 100, against
    the same request sequence with every prefix resident.

A redis-server is started on a free port unless --redis-url is given. Prints tables; the last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import GPT2_SMALL, RESULTS
from prefix_store.format import decode_prefix
from prefix_store.redis_server import RedisServer
from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.model import LoadedModel, load_model
from prefixserve.tiny import write_tiny_model


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3


def tier_latency(svc: PrefixService, prefix_id: str, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"device": [], "redis": [], "disk": []}
    data = svc.store.get(prefix_id)
    svc.cache.put(prefix_id, data)
    dev, dt = svc.model.device, svc.model.dtype
    svc.pool.put(prefix_id, decode_prefix(data, svc.expect)[0])
    for _ in range(reps):
        t = time.perf_counter()
        svc.pool.acquire(prefix_id)
        assert svc.pool.is_ready(prefix_id)
        svc.pool.get(prefix_id)
        svc.pool.release(prefix_id)
        times["device"].append(time.perf_counter() - t)

        t = time.perf_counter()
        raw = svc.cache.get(prefix_id)
        decode_prefix(raw, svc.expect)[0].to(dev, dt)
        times["redis"].append(time.perf_counter() - t)

        t = time.perf_counter()
        decode_prefix(svc.store.get(prefix_id), svc.expect)[0].to(dev, dt)
        times["disk"].append(time.perf_counter() - t)
    return times


def zipf_choices(n_prefixes: int, n: int, alpha: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_prefixes + 1) ** alpha
    return rng.choice(n_prefixes, size=n, p=w / w.sum()).tolist()


def closed_loop(
    model: LoadedModel, svc: PrefixService, ids: list[str], picks: list[int], new_tokens: int
) -> float:
    """Keep 64 running + 16 queued; returns generated tokens per second."""
    engine = EngineCore(
        model, EngineConfig(max_running=64, max_waiting=128, max_seq_len=256), prefixes=svc.pool
    )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.spec.vocab_size, (len(picks), 32), generator=g).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    nxt, live, tokens, steps, rows = 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    while nxt < len(picks) or live:
        while nxt < len(picks) and live < 80:
            engine.add_request(prompts[nxt], params, prefix_id=ids[picks[nxt]])
            nxt, live = nxt + 1, live + 1
        outs = engine.step()
        steps += 1
        rows += engine.scheduler.num_running
        for out in outs:
            tokens += len(out.token_ids)
            live -= out.finished
        if not engine.scheduler.num_running:
            time.sleep(0.0005)  # every admitted-to-be request is waiting on a load
    elapsed = time.perf_counter() - t0
    print(f"  {steps} steps, mean running rows {rows / max(steps, 1):.1f}, {elapsed:.2f}s")
    return tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--prefixes", type=int, default=1000)
    ap.add_argument(
        "--pool", type=int, default=100, help="prefixes the device pool holds in the rotation run"
    )
    ap.add_argument("--alpha", type=float, default=1.0)
    args = ap.parse_args()
    reps = 30 if args.quick else 200
    n_requests, new_tokens = (192, 24) if args.quick else (640, 32)

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    model = load_model(write_tiny_model(work / "model", GPT2_SMALL))
    server = None
    if args.redis_url is None:
        server = RedisServer().start()
    redis_url = args.redis_url or server.url
    per_prefix = 2 * model.spec.n_layer * model.spec.n_embd * 10 * 4
    try:
        cfg = StoreConfig(
            url=str(work / "store"),
            redis_url=redis_url,
            max_prefix_len=256,
            device_pool_bytes=args.pool * per_prefix,
            load_workers=2,
        )
        bound = bind_model(model)  # the store's view of the model (bounds measured once)
        svc = PrefixService(bound, cfg)
        g = torch.Generator().manual_seed(1)
        lat: dict[int, dict[str, list[float]]] = {}
        for p in (10, 200):
            meta = svc.add_tensor(torch.randn(model.spec.prefix_shape(p), generator=g) * 0.5, owner="bench")
            lat[p] = tier_latency(svc, meta.id, reps)

        t = time.perf_counter()
        ids = [
            svc.add_tensor(torch.randn(model.spec.prefix_shape(10), generator=g) * 0.5, owner="bench").id
            for _ in range(args.prefixes)
        ]
        write_s = time.perf_counter() - t
        picks = zipf_choices(args.prefixes, n_requests, args.alpha, seed=0)
        distinct = len(set(picks))

        svc.pool.close()  # rotation: a pool of `--pool` prefixes, everything else loaded on demand
        svc = PrefixService(bound, cfg)
        rotation = closed_loop(model, svc, ids, picks, new_tokens)
        rot_stats = svc.stats.snapshot()
        svc.pool.close()

        resident_cfg = StoreConfig(**{**cfg.__dict__, "device_pool_bytes": (args.prefixes + 10) * per_prefix})
        svc = PrefixService(bound, resident_cfg)
        for pid in ids:  # every prefix resident before the clock starts
            svc.pool.put(pid, decode_prefix(svc.load_bytes(pid), svc.expect)[0])
        resident = closed_loop(model, svc, ids, picks, new_tokens)
        svc.pool.close()
    finally:
        if server is not None:
            server.kill()

    print(f"\nstore benchmark: GPT-2-small dims, cpu, float32; {reps} loads per tier; redis {redis_url}")
    print(f"\n{'tier':<8}{'P':>5}{'p50 ms':>10}{'p99 ms':>10}")
    for p, tiers in lat.items():
        for tier, xs in tiers.items():
            print(f"{tier:<8}{p:>5}{pct(xs, 50):>10.3f}{pct(xs, 99):>10.3f}")
    print(
        f"\nrotation: {n_requests} requests x {new_tokens} new tokens over {args.prefixes} prefixes "
        f"(Zipf alpha={args.alpha}, {distinct} distinct used), pool holds {args.pool}; "
        f"{args.prefixes} prefixes written in {write_s:.1f}s"
    )
    print(f"{'run':<12}{'tok/s':>10}")
    print(f"{'rotation':<12}{rotation:>10.1f}")
    print(f"{'resident':<12}{resident:>10.1f}")
    print(f"ratio rotation/resident {rotation / resident:.3f} (target >= 0.9)")
    print(f"rotation tier counters: {rot_stats}")
    summary = {
        "redis_p50_ms_p10": round(pct(lat[10]["redis"], 50), 3),
        "redis_p99_ms_p10": round(pct(lat[10]["redis"], 99), 3),
        "disk_p50_ms_p10": round(pct(lat[10]["disk"], 50), 3),
        "disk_p99_ms_p10": round(pct(lat[10]["disk"], 99), 3),
        "device_p50_ms_p10": round(pct(lat[10]["device"], 50), 4),
        "redis_p50_ms_p200": round(pct(lat[200]["redis"], 50), 3),
        "disk_p50_ms_p200": round(pct(lat[200]["disk"], 50), 3),
        "rotation_tok_s": round(rotation, 1),
        "resident_tok_s": round(resident, 1),
        "rotation_over_resident": round(rotation / resident, 3),
        "quick": args.quick,
    }
    out = RESULTS / f"store{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
