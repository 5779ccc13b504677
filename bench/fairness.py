"""Fairness benchmark: a noisy neighbour against one prefixserve server, over HTTP (issue 31).

    python bench/fairness.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--model DIR|tiny]
                             [--duration S]

One `prefixserve serve` process (the embedded default: no Redis, the engine in its own process, the
training worker on a thread of the server), authentication on: an admin key creates the tenants and
issues their API keys through the admin API (`POST /admin/tenants`, `POST /admin/tenants/{name}/keys`),
and every request carries its tenant's key. The model has GPT-2-small dimensions and random weights
unless `--model` names a checkpoint (`--model tiny`: the offline tiny model, to develop quickly). Each
tenant generates with a public prefix of its own (`--prefix-len` positions, written to the store before
the server starts). Every request streams (SSE) with EOS ignored, so it generates exactly its length and
its time to first token (TTFT) is measured at the client; inputs are a drawn number of random words
(bench/serve.py's words and counts).

Load, per tenant:

  heavy   a closed loop of 300 streams of 64 new tokens: a new request as soon as one ends or is refused
          (the refusals, 429, are counted)
  light   4 requests of 16 new tokens at a time, the next 4 when those have all ended
  w1a, w1b, w2
          tenants of weights 1, 1 and 2, each a closed loop of 100 streams of 64 new tokens

Phases, in one run, each `--duration` seconds but the last (the server is let go idle between them):

  1 light-solo      light alone: its TTFT without a neighbour
  2 heavy-solo      heavy alone: its throughput without a neighbour
  3 flood           heavy and light together: light's TTFT and refusals next to heavy's flood, and
                    what sharing the engine costs heavy
  4 heavy-solo-2    heavy alone again: a drift of the machine's speed over the run shows as a difference
                    between the two solo figures; heavy's solo throughput is their mean
  5 weighted        w1a, w1b and w2 together, all saturating: each tenant's share of the tokens generated
                    against its weight's share (1/4, 1/4, 1/2); share_error_max is the largest gap
  6 training        heavy submits 3 small training jobs, then light submits 1; the order in which the
                    (one) training worker starts them (`started_at`) gives light's job its position
                    (1-based; round-robin across tenants puts it 2nd, arrival order 4th)

Before phase 1 a tenant of its own sends an untimed warm-up (a full batch of short requests, then two
rounds of light's), so that phase 1 does not pay for a fresh engine's first steps. Throughput counts the
tokens streamed inside a phase's measurement window (the phase less its first 25%, the ramp-up:
bench/serve.py's in_window); latencies are those of the requests sent inside the window (a request still
without its first token when the phase ends has no TTFT: `ttft_in_window` counts those that have one).
Requests still running when a phase ends are cut off (aborted) and reported as cut, never as errors.

Durations (`--duration`): 300 s per phase on the CPU, 60 s on CUDA, 20 s with `--quick`. On 2 CPU
cores the ramp-up alone (prefilling heavy's first 64 rows of ~70 tokens in 512-token chunks) takes
~20-30 s, and a GPT-2-small step of 64 decoding rows ~0.3 s over HTTP; a round of light's 4 requests (a
step that prefills them beside heavy's rows, then 15 decode steps) takes ~6 s, so the 225 s window
gives light ~140 requests in the flood: enough for a p99 (about its 2nd largest TTFT). CUDA steps are
~20x faster. `--quick` (20 s phases) checks the plumbing only: on the CPU its windows are mostly heavy's
ramp-up.

Writes bench/results/fairness-DEVICE-DTYPE[-quick][-tiny].json (every phase, every tenant's figures, the
jobs) and prints a table per phase. The last line printed is one JSON object (the headline figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import GPT2_SMALL, RESULTS, git_commit
from bench.serve import (
    WORDS,
    Arrival,
    Load,
    Outcome,
    ServerProcess,
    Setup,
    in_window,
    make_prefixes,
    new_client,
    one_request,
    pct,
    request_body,
)
from prefix_store.redis_server import free_port
from prefixserve.tiny import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-fairness-admin-key-0123456789"
SMALL_LABEL = "random GPT-2-small dims (124M)"
ENDED = ("succeeded", "failed", "cancelled")


# ---- workload ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TenantLoad:
    """One tenant's load in a phase: `inflight` requests of `new_tokens` each, either a closed loop (a
    new request as soon as one ends) or rounds (`inflight` at once, the next round when all have ended)."""

    tenant: str
    inflight: int
    new_tokens: int
    rounds: bool = False

    @property
    def label(self) -> str:
        return f"{self.inflight}{' at a time' if self.rounds else ' in flight'} x {self.new_tokens}"


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    loads: tuple[TenantLoad, ...]
    saturating: bool = False  # shares against weights are the point (phase 5)


# every tenant's weight ("warmup" only sends the untimed warm-up before phase 1)
WEIGHTS = {"heavy": 1.0, "light": 1.0, "w1a": 1.0, "w1b": 1.0, "w2": 2.0, "warmup": 1.0}


def phases(heavy_inflight: int, light_batch: int, weighted_inflight: int) -> list[Phase]:
    heavy = TenantLoad("heavy", heavy_inflight, 64)
    light = TenantLoad("light", light_batch, 16, rounds=True)
    weighted = tuple(TenantLoad(t, weighted_inflight, 64) for t in ("w1a", "w1b", "w2"))
    return [
        Phase("light-solo", "light alone", (light,)),
        Phase("heavy-solo", "heavy alone", (heavy,)),
        Phase("flood", "heavy and light together (the flood)", (heavy, light)),
        Phase("heavy-solo-2", "heavy alone again, after the flood", (heavy,)),
        Phase("weighted", "three tenants of weights 1:1:2, all saturating", weighted, saturating=True),
    ]


def draw_inputs(n: int, words: tuple[int, int], seed: int) -> list[str]:
    """Inputs as bench/serve.py draws them: a uniform number of words in `words`, each from WORDS."""
    rng = np.random.default_rng(seed)
    vocab = WORDS.split()
    return [" ".join(rng.choice(vocab, size=int(rng.integers(*words, endpoint=True)))) for _ in range(n)]


# ---- client ------------------------------------------------------------------------------------
def tenant_client(key: str) -> httpx.AsyncClient:
    client = new_client()  # (no keep-alive, unbounded connections: 300+ streams at once)
    client.headers["Authorization"] = f"Bearer {key}"
    return client


async def closed_loop(
    client: httpx.AsyncClient, url: str, bodies: list[dict], deadline: float, outcomes: list[Outcome], i: int
) -> None:
    """One stream slot: send, and as soon as the request ends (or is refused) send the next (bodies
    from the i-th on)."""
    while time.perf_counter() < deadline:
        outcome = Outcome(sent=time.perf_counter())
        outcomes.append(outcome)
        await one_request(client, url, bodies[i % len(bodies)], outcome)
        i += 1
        if outcome.status is None:  # transport error (server gone?): no hot loop
            await asyncio.sleep(0.1)


async def rounds_loop(
    client: httpx.AsyncClient, url: str, bodies: list[dict], n: int, deadline: float, outcomes: list[Outcome]
) -> None:
    """`n` requests at once; the next `n` when those have all ended."""
    i = 0
    while time.perf_counter() < deadline:
        batch = [Outcome(sent=time.perf_counter()) for _ in range(n)]
        outcomes.extend(batch)
        await asyncio.gather(
            *(one_request(client, url, bodies[(i + j) % len(bodies)], o) for j, o in enumerate(batch))
        )
        i += n
        if any(o.status is None for o in batch):
            await asyncio.sleep(0.1)


async def run_phase(
    url: str, phase: Phase, keys: dict[str, str], bodies: dict[str, list[dict]], duration: float
) -> tuple[dict[str, list[Outcome]], float]:
    """Every tenant's load for `duration` seconds, then whatever still runs is cut off (aborted)."""
    outcomes: dict[str, list[Outcome]] = {load.tenant: [] for load in phase.loads}
    async with AsyncExitStack() as stack:
        clients = {
            load.tenant: await stack.enter_async_context(tenant_client(keys[load.tenant]))
            for load in phase.loads
        }
        start = time.perf_counter()
        deadline = start + duration
        tasks: list[asyncio.Task] = []
        try:
            for load in phase.loads:
                client, out = clients[load.tenant], outcomes[load.tenant]
                own = [{**b, "max_new_tokens": load.new_tokens} for b in bodies[load.tenant]]
                if load.rounds:
                    loop = rounds_loop(client, url, own, load.inflight, deadline, out)
                    tasks.append(asyncio.create_task(loop))
                else:
                    tasks += [
                        asyncio.create_task(closed_loop(client, url, own, deadline, out, k))
                        for k in range(load.inflight)
                    ]
            done, _ = await asyncio.wait(
                tasks,
                timeout=max(0.0, deadline - time.perf_counter()),
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
        finally:  # cut off (closing a stream aborts its request on the server), before the clients close
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes, start


async def warm_up(url: str, key: str, bodies: list[dict], rows: int, light_batch: int) -> dict:
    """Untimed, by a tenant of its own: a full batch of short requests, then two rounds of light's (the
    first steps of a fresh engine compile kernels and size its buffers; phase 1 would pay for them)."""
    t0 = time.perf_counter()
    async with tenant_client(key) as client:
        waves = [[{**b, "max_new_tokens": 4} for b in bodies[:rows]]] + [bodies[:light_batch]] * 2
        outcomes = []
        for wave in waves:
            batch = [Outcome(sent=time.perf_counter()) for _ in wave]
            await asyncio.gather(*(one_request(client, url, b, o) for b, o in zip(wave, batch, strict=True)))
            outcomes += batch
    bad = [o.error or o.status for o in outcomes if not o.ok]
    if bad:
        raise RuntimeError(f"warm-up requests failed: {bad[:3]}")
    return {"requests": len(outcomes), "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}


# ---- server ------------------------------------------------------------------------------------
def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class Server(ServerProcess):
    """`prefixserve serve` whose stop also ends the engine process it started (its own session: a
    SIGKILLed server would leave it behind)."""

    def stop(self) -> None:
        engines = child_pids(self.proc.pid) if self.proc.poll() is None else []
        super().stop()
        for pid in engines:
            for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                    time.sleep(0.1)


def server_log(work: Path) -> Path:
    return work / "prefixserve.log"  # (ServerProcess writes <name>.log into the directory it is given)


def start_server(setup: Setup, work: Path, max_running: int, max_waiting: int) -> Server:
    port = free_port()
    env = {
        "PREFIXSERVE_MODEL": setup.model_dir,
        "PREFIXSERVE_STORE_URL": setup.store,
        "PREFIXSERVE_DATA_DIR": str(work),
        "PREFIXSERVE_DEVICE": setup.device,
        "PREFIXSERVE_DTYPE": setup.dtype,
        "PREFIXSERVE_PORT": str(port),
        "PREFIXSERVE_AUTH": "true",
        "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY,
        "PREFIXSERVE_REDIS_URL": "",  # the embedded default: in-process cache, one training worker
        "PREFIXSERVE_ENGINE_PROCESS": "true",
    }
    if max_running:
        env["PREFIXSERVE_MAX_RUNNING"] = str(max_running)
    if max_waiting:
        env["PREFIXSERVE_MAX_WAITING"] = str(max_waiting)
    server = Server("prefixserve", [sys.executable, "-m", "prefixserve.cli", "serve"], env, port, work)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def create_tenants(url: str, names: list[str]) -> dict[str, str]:
    """Each tenant (its weight from WEIGHTS) and one API key for it, through the admin API."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = {}
    with httpx.Client(base_url=url, headers=admin, timeout=30) as client:
        for name in names:
            r = client.post("/admin/tenants", json={"name": name, "weight": WEIGHTS[name]})
            r.raise_for_status()
            r = client.post(f"/admin/tenants/{name}/keys", json={"name": "bench"})
            r.raise_for_status()
            keys[name] = r.json()["key"]
    return keys


def engine_gauges(url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics (readable from loopback with auth on and no metrics key)."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("prefixserve_") and "{" not in line:
            name, _, value = line.partition(" ")
            with suppress(ValueError):
                out[name] = float(value)
    return out


async def wait_idle(url: str, timeout_s: float = 120.0) -> float:
    """Until the engine has nothing running or waiting (the cut-off requests aborted); seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        g = await asyncio.to_thread(engine_gauges, url)
        if not g.get("prefixserve_running_sequences") and not g.get("prefixserve_queue_depth"):
            break
        await asyncio.sleep(0.25)
    else:
        print(f"warning: the engine was not idle after {timeout_s:.0f}s", file=sys.stderr)
    await asyncio.sleep(0.5)  # (the engine's stats reach the API process a little late)
    return time.perf_counter() - t0


# ---- metrics -----------------------------------------------------------------------------------
def error_kind(o: Outcome) -> str | None:
    if o.cut or (o.status == 200 and not o.error):
        return None
    return str(o.status) if o.status not in (None, 200) else "transport" if o.status is None else "stream"


def tenant_summary(outcomes: list[Outcome], start: float, duration: float, warmup: float) -> dict:
    """One tenant's figures in one phase: tokens and finished requests inside the window, latencies of
    the requests sent inside it, refusals and errors over the whole phase."""
    load = Load(n_prefixes=1, rate=1.0, duration_s=duration)
    tokens, done_in_window = in_window((outcomes, start), load, warmup)
    w0, w1 = start + warmup * duration, start + duration
    window_s = (1 - warmup) * duration
    sent = [o for o in outcomes if w0 <= o.sent < w1]
    ttft = [o.ttft for o in sent if o.ttft is not None]
    itl = [b - a for o in sent for a, b in zip(o.token_times, o.token_times[1:], strict=False)]
    e2e = [o.ended - o.sent for o in sent if o.ok]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for o in outcomes:
        kind = error_kind(o)
        if kind:
            errors[kind] = errors.get(kind, 0) + 1
            samples.setdefault(kind, o.error[:200])
    return {
        "sent": len(outcomes),
        "completed": sum(o.ok for o in outcomes),
        "refused": sum(o.status == 429 for o in outcomes),
        "cut": sum(o.cut for o in outcomes),
        "errors": errors,
        "error_samples": samples,
        "sent_in_window": len(sent),
        "ttft_in_window": len(ttft),
        "window_tokens": tokens,
        "tok_s": round(tokens / window_s, 1),
        "req_s": round(done_in_window / window_s, 3),
        "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99), "max": pct(ttft, 100)},
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
        "e2e_ms": {"p50": pct(e2e, 50), "p99": pct(e2e, 99)},
    }


def phase_summary(phase: Phase, run: tuple[dict[str, list[Outcome]], float], args, extra: dict) -> dict:
    outcomes, start = run
    tenants = {t: tenant_summary(o, start, args.duration, args.warmup) for t, o in outcomes.items()}
    total = sum(r["window_tokens"] for r in tenants.values())
    weight_sum = sum(WEIGHTS[t] for t in tenants)
    for t, r in tenants.items():
        load = next(x for x in phase.loads if x.tenant == t)
        r["weight"] = WEIGHTS[t]
        r["load"] = load.label
        r["share"] = round(r["window_tokens"] / total, 4) if total else None
        r["target_share"] = round(WEIGHTS[t] / weight_sum, 4)
    out = {
        "title": phase.title,
        "duration_s": args.duration,
        "window_s": round((1 - args.warmup) * args.duration, 1),
        "tok_s": round(total / ((1 - args.warmup) * args.duration), 1),
        "tenants": tenants,
        **extra,
    }
    if phase.saturating:
        out["share_error_max"] = round(
            max(abs(r["share"] - r["target_share"]) for r in tenants.values() if r["share"] is not None), 4
        )
    return out


def print_phase(n: int, name: str, r: dict, saturating: bool) -> None:
    print(f"\nPhase {n} {name}: {r['title']}, {r['duration_s']:.0f} s (window {r['window_s']:.0f} s)")
    head = f"{'tenant':<7}{'w':>4} {'load':<18}{'sent':>6}{'done':>6}{'429':>5}{'cut':>5}"
    head += f"{'tok/s':>8}{'req/s':>7}"
    head += f"{'ttft p50':>9}{'p90':>7}{'p99':>7}{'itl p50':>8}{'p99':>7}{'e2e p50':>8}{'p99':>7}"
    head += f"{'share':>7}{'target':>7}  errors" if saturating else f"{'share':>7}  errors"
    print(head)

    def ms(x: float | None, w: int) -> str:
        return f"{'-' if x is None else f'{x:.0f}':>{w}}"

    for tenant, t in r["tenants"].items():
        lat = t["ttft_ms"], t["itl_ms"], t["e2e_ms"]
        cells = ms(lat[0]["p50"], 9) + ms(lat[0]["p90"], 7) + ms(lat[0]["p99"], 7)
        cells += ms(lat[1]["p50"], 8) + ms(lat[1]["p99"], 7) + ms(lat[2]["p50"], 8) + ms(lat[2]["p99"], 7)
        share = "-" if t["share"] is None else f"{t['share']:.3f}"
        cells += f"{share:>7}" + (f"{t['target_share']:>7.3f}" if saturating else "")
        errs = ", ".join(f"{k}: {v}" for k, v in t["errors"].items() if k != "429") or "none"
        print(
            f"{tenant:<7}{t['weight']:>4g} {t['load']:<18}{t['sent']:>6}{t['completed']:>6}{t['refused']:>5}"
            f"{t['cut']:>5}{t['tok_s']:>8.1f}{t['req_s']:>7.2f}{cells}  {errs}"
        )
    line = f"all tenants {r['tok_s']:.1f} tok/s; preemptions {r['preemptions']}"
    if saturating:
        line += f"; share_error_max {r['share_error_max']:.4f}"
    print(line)


# ---- phase 6: the training queue ------------------------------------------------------------------
def training_phase(url: str, keys: dict[str, str], timeout_s: float, seed: int) -> dict:
    """heavy submits 3 small training jobs, then light 1; the order the worker starts them in."""
    rng = np.random.default_rng(seed)
    vocab = WORDS.split()

    def examples() -> list[dict]:
        return [
            {"input": " ".join(rng.choice(vocab, 6)), "output": " ".join(rng.choice(vocab, 6))}
            for _ in range(8)
        ]

    jobs = []  # (tenant, id) in submission order
    with httpx.Client(base_url=url, timeout=60) as client:
        for tenant in ("heavy", "heavy", "heavy", "light"):
            body = {"train": {"examples": examples(), "epochs": 1, "prefix_len": 2}, "name": f"fair-{tenant}"}
            r = client.post("/prefixes", json=body, headers={"Authorization": f"Bearer {keys[tenant]}"})
            if r.status_code != 202:
                raise RuntimeError(f"training job of {tenant}: {r.status_code} {r.text[:300]}")
            jobs.append((tenant, r.json()["id"]))
        t0 = time.perf_counter()
        infos: dict[str, dict] = {}
        seen_ended: dict[str, float] = {}  # (updated_at has whole seconds only: timed here instead)
        while True:
            for tenant, job_id in jobs:
                r = client.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {keys[tenant]}"})
                r.raise_for_status()
                infos[job_id] = r.json()
                if infos[job_id]["status"] in ENDED:
                    seen_ended.setdefault(job_id, time.perf_counter() - t0)
            if len(seen_ended) == len(jobs):
                break
            if time.perf_counter() - t0 > timeout_s:
                print(f"warning: training jobs not all ended after {timeout_s:.0f}s", file=sys.stderr)
                break
            time.sleep(0.25)
    rows = []
    for k, (tenant, job_id) in enumerate(jobs):
        i = infos[job_id]
        ended_s = seen_ended.get(job_id)
        rows.append(
            {
                "tenant": tenant,
                "job_id": job_id,
                "submitted": k + 1,
                "status": i["status"],
                "started_at": i.get("started_at"),
                "ended_after_s": None if ended_s is None else round(ended_s, 2),
                "error": i.get("error"),
            }
        )
    started = sorted(
        (r for r in rows if r["started_at"]),
        key=lambda r: (datetime.fromisoformat(r["started_at"]), r["submitted"]),
    )
    for pos, r in enumerate(started, 1):
        r["start_position"] = pos
    ties = len({r["started_at"] for r in started}) < len(started)
    light = next(r for r in rows if r["tenant"] == "light")
    return {
        "jobs": rows,
        "start_order": [r["tenant"] for r in started],
        "light_job_start_position": light.get("start_position"),
        "started_at_ties": ties,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def print_training(n: int, r: dict) -> None:
    print(f"\nPhase {n} training: heavy submits 3 jobs, then light 1 (one training worker)")
    print(
        f"{'submitted':>9}  {'tenant':<7}{'status':<11}{'started_at':<31}{'position':>8}{'ended after s':>14}"
    )
    for j in r["jobs"]:
        pos = j.get("start_position", "-")
        ended = "-" if j["ended_after_s"] is None else f"{j['ended_after_s']:.1f}"
        started = j["started_at"] or "-"
        print(f"{j['submitted']:>9}  {j['tenant']:<7}{j['status']:<11}{started:<31}{pos:>8}{ended:>14}")
    print(
        f"start order: {' '.join(r['start_order'])}; light's job started "
        f"{r['light_job_start_position']} (round-robin: 2, arrival order: 4)"
        + ("; started_at ties!" if r["started_at_ties"] else "")
    )


# ---- main --------------------------------------------------------------------------------------
async def measure(url: str, args, keys: dict[str, str], bodies: dict[str, list[dict]]) -> dict:
    plan = phases(args.heavy_inflight, args.light_batch, args.weighted_inflight)
    rows = min(args.heavy_inflight, args.max_running or (256 if args.device.startswith("cuda") else 64))
    print(f"warm-up: {rows} rows, then {args.light_batch} ...", file=sys.stderr, flush=True)
    results: dict = {"warmup": await warm_up(url, keys["warmup"], bodies["warmup"], rows, args.light_batch)}
    await wait_idle(url)
    for n, phase in enumerate(plan, 1):
        before = await asyncio.to_thread(engine_gauges, url)
        print(f"phase {n} {phase.name}: {args.duration:.0f} s ...", file=sys.stderr, flush=True)
        run = await run_phase(url, phase, keys, bodies, args.duration)
        idle_s = await wait_idle(url)
        after = await asyncio.to_thread(engine_gauges, url)
        preempt = "prefixserve_preemptions_total"
        extra = {
            "preemptions": int(after.get(preempt, 0) - before.get(preempt, 0)),
            "drain_s": round(idle_s, 1),
        }
        results[phase.name] = phase_summary(phase, run, args, extra)
        print_phase(n, phase.name, results[phase.name], phase.saturating)
    print(f"phase {len(plan) + 1} training ...", file=sys.stderr, flush=True)
    results["training"] = await asyncio.to_thread(training_phase, url, keys, args.jobs_timeout, args.seed)
    print_training(len(plan) + 1, results["training"])
    return results


def headline(phases_: dict, config: dict) -> dict:
    solo, flood = phases_["light-solo"]["tenants"]["light"], phases_["flood"]["tenants"]
    h1, h2 = phases_["heavy-solo"]["tenants"]["heavy"], phases_["heavy-solo-2"]["tenants"]["heavy"]
    weighted = phases_["weighted"]
    heavy_solo = round((h1["tok_s"] + h2["tok_s"]) / 2, 1)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    h = {
        "light_ttft_p99_solo_ms": solo["ttft_ms"]["p99"],
        "light_ttft_p99_flood_ms": flood["light"]["ttft_ms"]["p99"],
        "light_ttft_p99_flood_over_solo": ratio(flood["light"]["ttft_ms"]["p99"], solo["ttft_ms"]["p99"]),
        "light_ttft_p50_solo_ms": solo["ttft_ms"]["p50"],
        "light_ttft_p50_flood_ms": flood["light"]["ttft_ms"]["p50"],
        "light_requests_solo": solo["ttft_in_window"],
        "light_requests_flood": flood["light"]["ttft_in_window"],
        "light_refused_flood": flood["light"]["refused"],
        "light_errors_flood": sum(v for k, v in flood["light"]["errors"].items() if k != "429"),
        "light_tok_s_flood": flood["light"]["tok_s"],
        "heavy_tok_s_solo": heavy_solo,
        "heavy_tok_s_solo_1": h1["tok_s"],
        "heavy_tok_s_solo_2": h2["tok_s"],
        "heavy_tok_s_flood": flood["heavy"]["tok_s"],
        "heavy_tok_s_flood_over_solo": ratio(flood["heavy"]["tok_s"], heavy_solo),
        "heavy_ttft_p50_solo_ms": h1["ttft_ms"]["p50"],
        "heavy_ttft_p50_flood_ms": flood["heavy"]["ttft_ms"]["p50"],
        "heavy_requests_solo": h1["completed"] + h2["completed"],
        "heavy_requests_flood": flood["heavy"]["completed"],
        "heavy_refused_solo": h1["refused"] + h2["refused"],
        "heavy_refused_flood": flood["heavy"]["refused"],
        "flood_tok_s": phases_["flood"]["tok_s"],
        "shares": {t: r["share"] for t, r in weighted["tenants"].items()},
        "target_shares": {t: r["target_share"] for t, r in weighted["tenants"].items()},
        "share_error_max": weighted["share_error_max"],
        "weighted_refused": sum(r["refused"] for r in weighted["tenants"].values()),
        "light_job_start_position": phases_["training"]["light_job_start_position"],
        "job_start_order": phases_["training"]["start_order"],
        "preemptions": sum(p.get("preemptions", 0) for p in phases_.values()),
        "duration_s": config["duration"],
        "quick": config["quick"],
        "device": config["device"],
        "dtype": config["dtype"],
        "model": config["model"],
        "commit": config["commit"],
    }
    return h


def interrupted(signum: int, _frame: object) -> None:
    """SIGTERM as Ctrl-C: unwind, so that the `finally`s stop the server."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s phases (development; p99s over few requests)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--model",
        default=None,
        help="a GPT-2-family checkpoint directory, or 'tiny' (default: random GPT-2-small dims)",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per phase 1-5 (default 300 cpu, 60 cuda, 20 quick)",
    )
    ap.add_argument("--warmup", type=float, default=0.25, help="share of each phase left out of the figures")
    ap.add_argument("--heavy-inflight", type=int, default=300)
    ap.add_argument("--light-batch", type=int, default=4)
    ap.add_argument("--weighted-inflight", type=int, default=100, help="phase 5: streams per tenant")
    ap.add_argument(
        "--max-running", type=int, default=0, help="the server's (0: its default, 64 cpu / 256 cuda)"
    )
    ap.add_argument("--max-waiting", type=int, default=0, help="the server's queue (0: its default, 256)")
    ap.add_argument("--input-words", default="16,64", help="words per input (bench/serve.py's)")
    ap.add_argument("--prefix-len", type=int, default=10)
    ap.add_argument("--jobs-timeout", type=float, default=900.0, help="phase 6: seconds for the jobs to end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 20.0 if args.quick else 60.0 if args.device.startswith("cuda") else 300.0
    tiny = args.model == "tiny"
    model_label = "tiny offline model" if tiny else args.model or SMALL_LABEL

    signal.signal(signal.SIGTERM, interrupted)  # (Ctrl-C raises KeyboardInterrupt already)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    if tiny:
        model_dir = str(write_tiny_model(work / "tiny"))
    else:
        model_dir = args.model or str(write_tiny_model(work / "gpt2-small", GPT2_SMALL))
    print(f"work directory {work}", file=sys.stderr)
    setup = Setup(
        model_dir, str(work / "prefixes"), args.device, args.dtype, args.max_running, args.max_waiting
    )
    tenants = list(WEIGHTS)
    prefix_ids = dict(zip(tenants, make_prefixes(setup, len(tenants), args.prefix_len), strict=True))
    inputs = draw_inputs(512, tuple(int(x) for x in args.input_words.split(",")), args.seed)
    bodies = {  # (each phase sets max_new_tokens to its tenant's load; 16 here for the warm-up)
        t: [request_body(Arrival(0.0, 0, x, 16), prefix_ids[t]) for x in inputs[k * 37 :] + inputs[: k * 37]]
        for k, t in enumerate(tenants)
    }
    try:
        server = start_server(setup, work, args.max_running, args.max_waiting)
        try:
            print(f"server ready after {time.perf_counter() - t_start:.0f}s", file=sys.stderr)
            keys = create_tenants(server.url, tenants)
            results = asyncio.run(measure(server.url, args, keys, bodies))
        finally:
            server.stop()
    finally:  # the checkpoint we wrote (~0.5 GB for GPT-2-small) goes; the server's log stays
        if model_dir.startswith(str(work)):
            shutil.rmtree(model_dir, ignore_errors=True)
        print(f"server log: {server_log(work)}", file=sys.stderr)

    suffix = ("-quick" if args.quick else "") + ("-tiny" if tiny else "")
    out = Path(args.out) if args.out else RESULTS / f"fairness-{args.device}-{args.dtype}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "model": model_label,
        "commit": git_commit(),
        "weights": WEIGHTS,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    h = headline(results, config)
    if (h["light_requests_flood"] or 0) < 100:
        print(
            f"\nnote: light has {h['light_requests_flood']} requests with a TTFT in the flood's window"
            " (< 100: its p99 is not meaningful; a longer --duration gives more)"
        )
    out.write_text(json.dumps({"headline": h, "phases": results, "config": config}, indent=1) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(json.dumps(h))


if __name__ == "__main__":
    main()
