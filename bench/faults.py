"""Fault benchmark: /health latency and generate throughput with Redis healthy, then while it sleeps.

    python bench/faults.py [--model tiny|small|DIR] [--sleep-s 5] [--clients 8] [--max-new-tokens 32]

A real redis-server and a `prefixserve serve` process (Redis for cache, rate limits and the job
queue; a per-tenant rate limit set so that every generate counts in Redis). The load, in two phases
of `--sleep-s` seconds each: `--clients` closed-loop generates (non-streaming) with one resident
prefix, one client reading a job record (`GET /jobs/{id}`: Redis) and one probing `/health` every
20 ms. Phase `redis_ok`: Redis answers. Phase `redis_sleep`: exactly while `DEBUG SLEEP` holds Redis
(docs/architecture.md invariant 11: the event loop never waits on Redis, so /health stays fast and
generates keep their speed; job reads answer 503 + Retry-After).

`--model tiny` (default) is the offline tiny GPT-2 (fast on 2 cores); `small` has GPT-2-small
dimensions (random weights). Prints a table; writes bench/results/faults-MODEL.json; the last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import GPT2_SMALL, RESULTS
from prefix_store.redis_server import RedisServer, free_port
from prefixserve.tiny import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Samples:
    """What the clients saw; every entry is stamped with the monotonic time it was sent."""

    health: list[tuple[float, float]] = field(default_factory=list)  # (sent, seconds)
    generates: list[tuple[float, float, int, int]] = field(
        default_factory=list
    )  # (sent, ended, status, tokens)
    jobs: list[tuple[float, int]] = field(default_factory=list)  # (sent, status)


def model_dir(choice: str, work: Path) -> str:
    if choice == "tiny":
        return str(write_tiny_model(work / "tiny-gpt2"))
    if choice == "small":
        return str(write_tiny_model(work / "gpt2-small-dims", GPT2_SMALL))
    return choice


def start_server(model: str, redis_url: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PREFIXSERVE_MODEL": model,
        "PREFIXSERVE_DATA_DIR": str(work),
        "PREFIXSERVE_REDIS_URL": redis_url,
        "PREFIXSERVE_PORT": str(port),
        "PREFIXSERVE_API_KEYS": f"bench:{KEY}",
        "PREFIXSERVE_REQUESTS_PER_MINUTE": "1000000",  # every generate counts in Redis
        "PREFIXSERVE_MAX_RUNNING": "16",
        "HF_HUB_OFFLINE": "1",
    }
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefixserve.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server was not ready in 300 s")


def load(
    url: str, prefix: str, job: str, clients: int, max_new: int, stop: threading.Event
) -> tuple[Samples, list[threading.Thread]]:
    """Start the clients; they run until `stop` is set."""
    out = Samples()

    def health() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                c.get("/health")
                out.health.append((t0, time.monotonic() - t0))
                time.sleep(0.02)

    def generate(i: int) -> None:
        body = {"prefix_id": prefix, "input": f"name : Aromi {i} | food :", "max_new_tokens": max_new}
        with httpx.Client(base_url=url, timeout=60, headers=HEADERS) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.post("/generate", json={**body, "ignore_eos": True})
                tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                out.generates.append((t0, time.monotonic(), r.status_code, tokens))

    def jobs() -> None:
        with httpx.Client(base_url=url, timeout=30, headers=HEADERS) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                out.jobs.append((t0, c.get(f"/jobs/{job}").status_code))
                time.sleep(0.05)

    threads = [threading.Thread(target=health), threading.Thread(target=jobs)]
    threads += [threading.Thread(target=generate, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    return out, threads


def phase(s: Samples, start: float, end: float) -> dict:
    health = [dt for t0, dt in s.health if start <= t0 <= end]
    done = [g for g in s.generates if start <= g[1] <= end]  # generates that ended in the window
    return {
        "health_n": len(health),
        "health_p50_ms": float(np.percentile(health, 50)) * 1e3,
        "health_p99_ms": float(np.percentile(health, 99)) * 1e3,
        "health_max_ms": max(health) * 1e3,
        "tok_s": sum(g[3] for g in done) / (end - start),
        "generate_statuses": dict(Counter(str(g[2]) for g in done)),
        "job_statuses": dict(Counter(str(code) for t0, code in s.jobs if start <= t0 <= end)),
    }


def run(url: str, redis_url: str, args: argparse.Namespace) -> tuple[dict[str, dict], float]:
    """Both phases under one continuous load; returns their figures and the measured sleep."""
    r = httpx.post(url + "/prefixes", json={"text": "name : Aromi | food : Italian\n"}, headers=HEADERS)
    prefix = r.json()["id"]
    train = {"examples": [{"input": "name : Aromi", "output": "Aromi is a restaurant."}], "epochs": 1}
    job = httpx.post(url + "/prefixes", json={"train": train}, headers=HEADERS).json()["id"]  # no worker
    stop = threading.Event()
    samples, threads = load(url, prefix, job, args.clients, args.max_new_tokens, stop)
    try:
        time.sleep(1.0)  # warm-up, not measured
        ok_start = time.monotonic()
        time.sleep(args.sleep_s)
        sleep_start = time.monotonic()
        sleeper = redis.Redis.from_url(redis_url, socket_timeout=args.sleep_s + 30)
        sleeper.execute_command("DEBUG", "SLEEP", str(args.sleep_s))
        sleep_end = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    phases = {
        "redis_ok": phase(samples, ok_start, sleep_start),
        "redis_sleep": phase(samples, sleep_start, sleep_end),
    }
    return phases, sleep_end - sleep_start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, small (GPT-2-small dims) or a directory")
    parser.add_argument("--sleep-s", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    server = RedisServer().start()
    proc, url = start_server(model_dir(args.model, work), server.url, work)
    try:
        phases, slept = run(url, server.url, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        server.kill()
    print(
        f"\nmodel {args.model}, {args.clients} generate clients x {args.max_new_tokens} tokens,"
        f" DEBUG SLEEP {args.sleep_s:g} s ({slept:.2f} s measured)\n"
    )
    header = f"{'phase':<12} {'/health p50 ms':>15} {'p99 ms':>8} {'max ms':>8} {'gen tok/s':>10}"
    print(header + "  generates / job GETs by status")
    for name, p in phases.items():
        print(
            f"{name:<12} {p['health_p50_ms']:>15.1f} {p['health_p99_ms']:>8.1f} {p['health_max_ms']:>8.1f}"
            f" {p['tok_s']:>10.1f}  {p['generate_statuses']} / {p['job_statuses']}"
        )
    ok, slow = phases["redis_ok"], phases["redis_sleep"]
    result = {
        "model": args.model,
        "sleep_s": args.sleep_s,
        "health_p50_ms_redis_ok": round(ok["health_p50_ms"], 2),
        "health_p99_ms_redis_ok": round(ok["health_p99_ms"], 2),
        "health_p50_ms_redis_sleep": round(slow["health_p50_ms"], 2),
        "health_p99_ms_redis_sleep": round(slow["health_p99_ms"], 2),
        "health_max_ms_redis_sleep": round(slow["health_max_ms"], 2),
        "tok_s_redis_ok": round(ok["tok_s"], 1),
        "tok_s_redis_sleep": round(slow["tok_s"], 1),
        "tok_s_ratio": round(slow["tok_s"] / ok["tok_s"], 3) if ok["tok_s"] else None,
        "generate_statuses_redis_sleep": slow["generate_statuses"],
        "job_statuses_redis_sleep": slow["job_statuses"],
    }
    out = Path(args.out or RESULTS / f"faults-{Path(args.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "phases": phases}, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
