"""Serving benchmark: an open-loop HTTP load against prefixserve and two baselines, over many prefixes.

    python bench/serve.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--model DIR]

Three servers run as their own processes, on one model checkpoint and one prefix store:

  prefixserve  this project (`prefixserve serve`): continuous batching, mixed prefixes per step
  sequential   HF generate one request at a time, prefix as past_key_values (how PEFT users serve)
  grouped      a static batcher of HF generate that only batches requests sharing a prefix
  engine       prefixserve's engine without HTTP: the same EngineCore in this process, fed the same
               arrivals between its steps (`engine_tok_s`); prefixserve over HTTP (`http_tok_s`)
               against it is what the API processes, the IPC and SSE cost
  threaded     prefixserve with its engine on a thread of the API process (PREFIXSERVE_ENGINE_PROCESS
               =false: the design before the engine got its own process), for before/after

(bench/baselines.py; the same /generate body and SSE events, the same bounded queue and 429s.)

Load, as the multi-adapter serving papers measure it (S-LoRA, Punica): requests arrive open-loop
(Gamma inter-arrival times, cv 1 = Poisson) for a fixed duration; each picks one of N prefixes with
power-law popularity (p_i ~ 1/i^alpha), an input of a drawn number of words and a drawn output
length (EOS ignored, so each request generates exactly its length). Every request streams (SSE), so
time to first token and inter-token gaps are measured at the client.

Rates: a calibration batch (max_running concurrent requests against prefixserve) gives its capacity
C in requests/s. The throughput sweep offers 3 C (saturation: every batch slot stays busy and the queue
full, so the tok/s columns are capacity and the surplus is answered 429), over
N = 1, 10, 100, 1000 prefixes; the latency runs offer 0.5 C at N = 100 (below prefixserve's
saturation: TTFT, inter-token and end-to-end latency, SLO attainment). Both rates are the same for
every system. With `--rounds R` every point is measured R times, the systems in reverse order every
other round (A B C, C B A: a drift of the machine's speed weighs on all alike), and the figures pool the
rounds (each round's tok/s is kept too). Throughput counts tokens streamed inside the measurement
window (the run less its first 25%, the ramp-up); a saturation run ends at its last arrival, and a
latency run waits `--drain` seconds for its requests to finish; requests still running then are cut
off (aborted) and reported as unfinished, never as errors.

`--rotation`: prefix loads under CPU contention, at the serving level. Two prefixserve servers (API
and engine processes, on the same cores as everything else) serve the same saturating load over
`--rotation-prefixes` prefixes (Zipf): "resident", whose device pool holds them all (each loaded once
before the clock starts), and "rotation", whose pool holds `--pool-prefixes` of them, so most requests
load their prefix (cache -> validation -> device) while the batch runs. A competing process keeps
`--contend` threads of its own busy with matrix products meanwhile (as a training worker, Redis or a
neighbour's service would). Headline `rotation_over_resident` (target >= 0.9). Writes
bench/results/serve-rotation-DEVICE-DTYPE[-quick].json.

Writes bench/results/serve-DEVICE-DTYPE[-quick].json and two PNGs (throughput vs number of prefixes,
latency CDFs per system). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import torch
from transformers import GPT2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import GPT2_SMALL, RESULTS, alternating
from prefix_store.redis_server import free_port
from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.errors import PrefixServeError
from prefixserve.model import load_model, parse_dtype, spec_from_config
from prefixserve.tiny import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("prefixserve", "sequential", "grouped", "engine", "threaded")
WORDS = (  # inputs are drawn from these
    "name food area price rating family friendly near city centre riverside coffee shop pub restaurant "
    "italian french english chinese cheap moderate high average customer the a is of and with in to"
)


# ---- workload ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    n_prefixes: int
    rate: float  # requests/s offered
    duration_s: float
    alpha: float = 1.0  # popularity p_i ~ 1 / i^alpha
    cv: float = 1.0  # coefficient of variation of inter-arrival times (1: Poisson)
    input_words: tuple[int, int] = (16, 64)
    output_tokens: tuple[int, int] = (32, 96)
    seed: int = 0


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    prefix: int  # index into the prefix list
    input: str
    max_new_tokens: int


def arrivals(load: Load) -> list[Arrival]:
    rng = np.random.default_rng(load.seed)
    shape = 1.0 / load.cv**2  # Gamma(k, 1/(rate k)): mean 1/rate, cv 1/sqrt(k)
    out, t = [], 0.0
    weights = 1.0 / np.arange(1, load.n_prefixes + 1) ** load.alpha
    weights /= weights.sum()
    while True:
        t += rng.gamma(shape, 1.0 / (load.rate * shape))
        if t >= load.duration_s:
            return out
        words = rng.choice(WORDS.split(), size=int(rng.integers(*load.input_words, endpoint=True)))
        out.append(
            Arrival(
                at=t,
                prefix=int(rng.choice(load.n_prefixes, p=weights)),
                input=" ".join(words),
                max_new_tokens=int(rng.integers(*load.output_tokens, endpoint=True)),
            )
        )


# ---- client ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    sent: float
    status: int | None = None  # None: no HTTP answer (transport error)
    error: str = ""
    token_times: list[float] = field(default_factory=list)  # one entry per token
    ended: float | None = None  # the `done` event
    prompt_tokens: int = 0
    cut: bool = False  # still running when the run ended, and aborted

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.ended is not None and not self.error

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None


def new_client() -> httpx.AsyncClient:
    # no keep-alive: a pooled connection reused just as the server times it out fails with a ReadError
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits)


def request_body(a: Arrival, prefix_id: str) -> dict:
    """The /generate body of one arrival: streamed, exactly `max_new_tokens` long."""
    return {
        "prefix_id": prefix_id,
        "input": a.input,
        "max_new_tokens": a.max_new_tokens,
        "ignore_eos": True,
        "stream": True,
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict, outcome: Outcome) -> None:
    try:
        async with client.stream("POST", url + "/generate", json=body) as r:
            outcome.status = r.status_code
            if r.status_code != 200:
                outcome.error = (await r.aread()).decode(errors="replace")[:200]
                return
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    now = time.perf_counter()
                    data = json.loads(line[6:])
                    if event == "token":
                        outcome.token_times.extend([now] * len(data["token_ids"]))
                    elif event == "done":
                        outcome.ended = now
                        outcome.prompt_tokens = data["usage"]["prompt_tokens"]
                    elif event == "error":
                        outcome.error = data["error"]["message"]
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        outcome.cut = True
        raise


async def run_load(
    url: str, load: Load, prefix_ids: list[str], drain_s: float
) -> tuple[list[Outcome], float]:
    """Send every arrival on time (open loop); returns the outcomes and the start time."""
    plan = arrivals(load)
    async with new_client() as client:
        start = time.perf_counter()
        tasks, outcomes = [], []
        for a in plan:
            delay = start + a.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = Outcome(sent=time.perf_counter())
            outcomes.append(outcome)
            body = request_body(a, prefix_ids[a.prefix])
            tasks.append(asyncio.create_task(one_request(client, url, body, outcome)))
        if tasks:
            _, pending = await asyncio.wait(
                tasks, timeout=max(0.0, start + load.duration_s + drain_s - time.perf_counter())
            )
            for t in pending:  # cut off: closing the stream aborts the request on the server
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return outcomes, start


class EngineDirect:
    """The engine alone: an EngineCore in this process, the same configuration and prefix store as the
    prefixserve server, fed the same arrivals between its steps (no client, no HTTP, no IPC)."""

    def __init__(self, setup: Setup) -> None:
        model = load_model(setup.model_dir, setup.dtype, setup.device)
        self.service = PrefixService(bind_model(model), StoreConfig(url=setup.store))
        config = EngineConfig(max_running=setup.max_running, max_waiting=setup.max_waiting)
        self.core = EngineCore(model, config, prefixes=self.service.pool)

    def stop(self) -> None:
        self.service.close()

    def drive(self, load: Load, prefix_ids: list[str], drain_s: float) -> tuple[list[Outcome], float]:
        """`run_load` for the engine: each arrival is added when its time has come (open loop), then
        the engine steps; token times are taken as each step returns."""
        core, plan = self.core, arrivals(load)
        start = time.perf_counter()
        end = start + load.duration_s + drain_s
        live: dict[str, Outcome] = {}
        outcomes: list[Outcome] = []
        i = 0
        while time.perf_counter() < end and (i < len(plan) or core.has_work):
            while i < len(plan) and start + plan[i].at <= time.perf_counter():
                a = plan[i]
                outcome = Outcome(sent=start + a.at)
                outcomes.append(outcome)
                params = SamplingParams(max_new_tokens=a.max_new_tokens, ignore_eos=True)
                try:
                    live[core.add_request(a.input, params, prefix_ids[a.prefix])] = outcome
                    outcome.status = 200
                except PrefixServeError as exc:
                    outcome.status, outcome.error = exc.status, str(exc)[:200]
                i += 1
            if not core.has_work:
                time.sleep(
                    max(0.0, min(start + plan[i].at, end) - time.perf_counter()) if i < len(plan) else 0
                )
                continue
            for out in core.step():
                outcome, now = live[out.request_id], time.perf_counter()
                outcome.token_times.extend([now] * len(out.token_ids))
                if out.finished:
                    outcome.ended, outcome.prompt_tokens = now, out.prompt_tokens
        for rid, outcome in live.items():  # still running at the end: cut off
            if outcome.ended is None and core.abort(rid):
                outcome.cut = True
        core.run_to_completion()  # (the aborted ones leave at the next step)
        return outcomes, start


# ---- metrics -----------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1e3, 1) if xs else None


Run = tuple[list[Outcome], float]  # one run's outcomes and its start time


def in_window(run: Run, load: Load, warmup: float) -> tuple[int, int]:
    """Tokens streamed and requests finished inside a run's measurement window (after the ramp-up)."""
    outcomes, start = run
    w0, w1 = start + warmup * load.duration_s, start + load.duration_s
    tokens = sum(1 for o in outcomes for t in o.token_times if w0 <= t < w1)
    return tokens, sum(1 for o in outcomes if o.ok and w0 <= o.ended < w1)


def summarize(runs: list[Run], load: Load, slo_ttft_s: float, warmup: float) -> dict:
    """One system's figures at one load over its runs (rounds): rates over all their windows,
    percentiles over all their requests, and each run's tok/s (`tok_s_rounds`)."""
    window_s = (1 - warmup) * load.duration_s
    counts = [in_window(run, load, warmup) for run in runs]
    tokens, done_in_window = sum(c[0] for c in counts), sum(c[1] for c in counts)
    outcomes = [o for run, _ in runs for o in run]
    ttft = [o.ttft for o in outcomes if o.ttft is not None]
    itl = [b - a for o in outcomes for a, b in zip(o.token_times, o.token_times[1:], strict=False)]
    e2e = [o.ended - o.sent for o in outcomes if o.ok]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}  # one message per error kind
    for o in outcomes:
        if not o.cut and (o.status != 200 or o.error):
            key = (
                str(o.status)
                if o.status not in (None, 200)
                else "transport"
                if o.status is None
                else "stream"
            )
            errors[key] = errors.get(key, 0) + 1
            samples.setdefault(key, o.error[:200])
    unfinished = sum(o.cut for o in outcomes)
    return {
        "n_prefixes": load.n_prefixes,
        "rate": round(load.rate, 3),
        "sent": len(outcomes),
        "completed": sum(o.ok for o in outcomes),
        "unfinished": unfinished,
        "errors": errors,
        "error_samples": samples,
        "req_s": round(done_in_window / (window_s * len(runs)), 3),
        "tok_s": round(tokens / (window_s * len(runs)), 1),
        "tok_s_rounds": [round(c[0] / window_s, 1) for c in counts],
        "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p90": pct(itl, 90), "p99": pct(itl, 99)},
        "e2e_ms": {"p50": pct(e2e, 50), "p90": pct(e2e, 90), "p99": pct(e2e, 99)},
        "slo_attainment": round(sum(1 for x in ttft if x <= slo_ttft_s) / max(1, len(outcomes)), 3),
        "cdf": {"ttft_s": sorted(round(x, 4) for x in ttft), "e2e_s": sorted(round(x, 4) for x in e2e)},
    }


def summarize_systems(runs: dict[str, list[Run]], load: Load, args) -> dict[str, dict]:
    """`summarize` for each system's runs at one load, in the order the systems first ran."""
    return {name: summarize(point, load, args.slo_ttft_ms / 1e3, args.warmup) for name, point in runs.items()}


# ---- servers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    model_dir: str
    store: str
    device: str
    dtype: str
    max_running: int
    max_waiting: int


class ServerProcess:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log_dir: Path) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = Path(self.log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready within {timeout_s}s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def prefixserve_env(setup: Setup, port: int, log_dir: Path, **more: str) -> dict[str, str]:
    """The environment of a `prefixserve serve` process on this setup (`more`: further settings)."""
    return {
        "PREFIXSERVE_MODEL": setup.model_dir,
        "PREFIXSERVE_STORE_URL": setup.store,
        "PREFIXSERVE_DATA_DIR": str(log_dir),
        "PREFIXSERVE_DEVICE": setup.device,
        "PREFIXSERVE_DTYPE": setup.dtype,
        "PREFIXSERVE_PORT": str(port),
        "PREFIXSERVE_AUTH": "false",
        "PREFIXSERVE_MAX_RUNNING": str(setup.max_running),
        "PREFIXSERVE_MAX_WAITING": str(setup.max_waiting),
        **more,
    }


def start_servers(setup: Setup, names: list[str], log_dir: Path) -> dict[str, ServerProcess | EngineDirect]:
    servers: dict[str, ServerProcess | EngineDirect] = {}
    for name in names:
        if name == "engine":
            servers[name] = EngineDirect(setup)
            continue
        port = free_port()
        if name in ("prefixserve", "threaded"):
            cmd = [sys.executable, "-m", "prefixserve.cli", "serve"]
            env = prefixserve_env(
                setup, port, log_dir, PREFIXSERVE_ENGINE_PROCESS="false" if name == "threaded" else "true"
            )
        else:
            cmd = [sys.executable, "-m", "bench.baselines", "--mode", name, "--model", setup.model_dir]
            cmd += ["--store", setup.store, "--device", setup.device, "--dtype", setup.dtype]
            cmd += ["--port", str(port), "--max-waiting", str(setup.max_waiting)]
            cmd += ["--max-batch", str(setup.max_running)]
            env = {}
        servers[name] = ServerProcess(name, cmd, env, port, log_dir)
    for server in servers.values():
        if isinstance(server, ServerProcess):
            server.wait_ready()
    return servers


async def load_on(
    server: ServerProcess | EngineDirect, load: Load, prefix_ids: list[str], drain_s: float
) -> tuple[list[Outcome], float]:
    if isinstance(server, EngineDirect):
        return server.drive(load, prefix_ids, drain_s)  # (on this thread: nothing else runs meanwhile)
    return await run_load(server.url, load, prefix_ids, drain_s)


def make_prefixes(setup: Setup, n: int, prefix_len: int) -> list[str]:
    """n public prefixes of activation-sized random values, written to the shared store."""
    model = load_model(setup.model_dir, setup.dtype, "cpu")
    service = PrefixService(bind_model(model), StoreConfig(url=setup.store))
    g = torch.Generator().manual_seed(0)
    ids = []
    for i in range(n):
        kv = torch.randn(model.spec.prefix_shape(prefix_len), generator=g) * 0.5  # [L, 2, H, P, D]
        ids.append(service.add_tensor(kv, "bench", f"bench-{i}", "public", prefix_id=f"bench-{i:04d}").id)
    service.close()
    return ids


def prefix_bytes(setup: Setup, prefix_len: int) -> int:
    """The bytes one KV prefix of `prefix_len` positions takes on the device."""
    spec = spec_from_config(GPT2Config.from_pretrained(setup.model_dir))
    return math.prod(spec.prefix_shape(prefix_len)) * parse_dtype(setup.dtype).itemsize


async def calibrate(url: str, prefix_ids: list[str], concurrency: int, load: Load) -> float:
    """prefixserve's capacity in requests/s: `concurrency` requests at once, closed batch."""
    plan = arrivals(replace(load, rate=4.0 * concurrency, duration_s=1.0))
    plan = (plan * (concurrency // max(1, len(plan)) + 1))[:concurrency]
    outcomes = [Outcome(sent=time.perf_counter()) for _ in plan]
    async with new_client() as client:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                one_request(client, url, request_body(a, prefix_ids[0]), o)
                for a, o in zip(plan, outcomes, strict=True)
            )
        )
    bad = [o.error or o.status for o in outcomes if not o.ok]
    if bad:
        raise RuntimeError(f"calibration requests failed: {bad[:3]}")
    return len(plan) / (time.perf_counter() - t0)


# ---- report ------------------------------------------------------------------------------------
def print_table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}")
    head = f"{'system':<12}{'N':>6}{'rate':>7}{'sent':>6}{'done':>6}{'req/s':>7}{'tok/s':>8}"
    head += f"{'ttft p50':>9}{'p90':>8}{'p99':>8}{'itl p50':>8}{'p99':>7}{'e2e p50':>8}{'p99':>8}"
    head += f"{'slo':>6}  errors"
    print(head)
    for name, r in rows:
        t, i, e = r["ttft_ms"], r["itl_ms"], r["e2e_ms"]
        cells = [t["p50"], t["p90"], t["p99"], i["p50"], i["p99"], e["p50"], e["p99"]]
        ms = "".join(
            f"{('-' if c is None else f'{c:.0f}'):>{w}}"
            for c, w in zip(cells, (9, 8, 8, 8, 7, 8, 8), strict=True)
        )
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
        if r["unfinished"]:
            errs += f" (unfinished {r['unfinished']})"
        print(
            f"{name:<12}{r['n_prefixes']:>6}{r['rate']:>7.2f}{r['sent']:>6}{r['completed']:>6}"
            f"{r['req_s']:>7.2f}{r['tok_s']:>8.1f}{ms}{r['slo_attainment']:>6.2f}  {errs}"
        )


def plot(results: dict, out_stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in results["throughput"].items():
        xs = sorted(points, key=int)
        ax.plot([int(x) for x in xs], [points[x]["tok_s"] for x in xs], marker="o", label=name)
    ax.set(
        xscale="log",
        xlabel="number of prefixes (Zipf popularity)",
        ylabel="tokens/s",
        title="Throughput at saturation",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(str(out_stem) + "-throughput.png")
    fig.savefig(paths[-1], dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results["latency"].items():
        for ax, key in zip(axes, ("ttft_s", "e2e_s"), strict=True):
            xs = r["cdf"][key]
            if xs:  # share of all sent requests, so 429s and cut-off requests keep the curve below 1
                ax.step(xs, np.arange(1, len(xs) + 1) / r["sent"], where="post", label=name)
    for ax, label in zip(axes, ("time to first token (s)", "end-to-end latency (s)"), strict=True):
        ax.set(xscale="log", xlabel=label, ylabel="share of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Latency CDF at {results['latency_rate']:.2f} req/s, N = {results['latency_n']} prefixes")
    fig.tight_layout()
    paths.append(str(out_stem) + "-latency-cdf.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


# ---- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="short runs; baselines at N=100 only (< 5 min on 2 cores)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--model", default=None, help="a GPT-2-family checkpoint directory (default: random GPT-2-small dims)"
    )
    ap.add_argument("--sweep", default="1,10,100,1000", help="numbers of prefixes")
    ap.add_argument("--alpha", type=float, default=1.0, help="popularity power law exponent")
    ap.add_argument(
        "--cv", type=float, default=1.0, help="inter-arrival coefficient of variation (1: Poisson)"
    )
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds per saturation point (20 quick, 60 full)"
    )
    ap.add_argument(
        "--latency-duration", type=float, default=None, help="seconds of arrivals per latency run (12/30)"
    )
    ap.add_argument(
        "--drain", type=float, default=None, help="latency runs: seconds to let requests finish (5/20)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every point this many times, the systems in reverse order every other round (2: ABBA)",
    )
    ap.add_argument("--warmup", type=float, default=0.25, help="share of each run left out of tok/s")
    ap.add_argument(
        "--overload",
        type=float,
        default=3.0,
        help="throughput sweep rate, in units of prefixserve's capacity",
    )
    ap.add_argument(
        "--underload", type=float, default=0.5, help="latency run rate, in units of prefixserve's capacity"
    )
    ap.add_argument(
        "--rate", type=float, default=None, help="fix the saturation rate in req/s instead of calibrating"
    )
    ap.add_argument("--input-words", default="16,64")
    ap.add_argument("--output-tokens", default="32,96")
    ap.add_argument("--prefix-len", type=int, default=10)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--max-waiting", type=int, default=64)
    ap.add_argument("--latency-n", type=int, default=100)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--rotation", action="store_true", help="prefix loads under CPU contention (see above) instead"
    )
    ap.add_argument("--rotation-prefixes", type=int, default=1000)
    ap.add_argument(
        "--pool-prefixes", type=int, default=100, help="prefixes the rotation server's pool holds"
    )
    ap.add_argument("--contend", type=int, default=1, help="threads of the competing CPU load (0: none)")
    args = ap.parse_args()
    sweep = [int(x) for x in args.sweep.split(",")]
    systems = args.systems.split(",")
    args.duration = args.duration or (20.0 if args.quick else 60.0)
    args.latency_duration = args.latency_duration or (12.0 if args.quick else 30.0)
    args.drain = args.drain if args.drain is not None else (5.0 if args.quick else 20.0)
    base = Load(
        n_prefixes=1,
        rate=1.0,
        duration_s=args.duration,
        alpha=args.alpha,
        cv=args.cv,
        input_words=tuple(int(x) for x in args.input_words.split(",")),
        output_tokens=tuple(int(x) for x in args.output_tokens.split(",")),
    )
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = args.model or str(write_tiny_model(work / "gpt2-small", GPT2_SMALL))
    setup = Setup(
        model_dir, str(work / "prefixes"), args.device, args.dtype, args.max_running, args.max_waiting
    )
    if args.rotation:
        prefix_ids = make_prefixes(setup, args.rotation_prefixes, args.prefix_len)
        per_prefix = prefix_bytes(setup, args.prefix_len)
        main_rotation(args, replace(base, duration_s=args.duration), work, setup, per_prefix, prefix_ids)
        return
    prefix_ids = make_prefixes(setup, max(*sweep, args.latency_n), args.prefix_len)
    servers = start_servers(setup, systems, work)
    print(f"servers ready after {time.perf_counter() - t_start:.0f}s (logs in {work})", file=sys.stderr)
    try:
        results = asyncio.run(measure(args, servers, prefix_ids, base, sweep))
    finally:
        for s in servers.values():
            s.stop()

    label = f"serve-{args.device}-{args.dtype}{'-quick' if args.quick else ''}"
    out = Path(args.out) if args.out else RESULTS / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results["plots"] = [Path(p).name for p in plot(results, out.with_suffix(""))]
    results["config"] = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "model": args.model or "random GPT-2-small dims (124M)",
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load": asdict(base),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(headline(results)))


async def measure(
    args,
    servers: dict[str, ServerProcess | EngineDirect],
    prefix_ids: list[str],
    base: Load,
    sweep: list[int],
) -> dict:
    if args.rate:
        capacity = args.rate
    else:
        capacity = await calibrate(servers["prefixserve"].url, prefix_ids, args.max_running, base)
    hi, lo = args.overload * capacity, args.underload * capacity
    print(
        f"prefixserve capacity {capacity:.2f} req/s: saturation sweep at {hi:.2f}, latency runs at {lo:.2f}",
        file=sys.stderr,
    )
    results: dict = {
        "capacity_req_s": round(capacity, 3),
        "throughput": {},
        "latency": {},
        "latency_rate": lo,
        "latency_n": args.latency_n,
    }
    names = list(servers)
    runs: dict[tuple[str, int], list[Run]] = {}
    for order in alternating(names, args.rounds):  # A B C, then C B A, ...: drift cancels
        for name in order:
            full = name in ("prefixserve", "engine", "threaded") or not args.quick
            for n in sweep if full else [n for n in sweep if n == 100]:
                load = replace(base, n_prefixes=n, rate=hi, seed=n)
                runs.setdefault((name, n), []).append(await load_on(servers[name], load, prefix_ids, 0.0))
                await asyncio.sleep(1.0)  # cut-off requests are aborted before the next point
    rows = []
    for (name, n), point in runs.items():
        r = summarize(point, replace(base, n_prefixes=n, rate=hi), args.slo_ttft_ms / 1e3, args.warmup)
        results["throughput"].setdefault(name, {})[str(n)] = r
        rows.append((name, r))
    print_table(f"Throughput sweep: offered {hi:.2f} req/s ({args.overload}x prefixserve's capacity)", rows)
    latency = replace(base, n_prefixes=args.latency_n, rate=lo, duration_s=args.latency_duration, seed=7)
    lat_runs: dict[str, list[Run]] = {}
    for order in alternating(names, args.rounds):
        for name in order:
            run = await load_on(servers[name], latency, prefix_ids, args.drain)
            lat_runs.setdefault(name, []).append(run)
            await asyncio.sleep(1.0)
    results["latency"] = summarize_systems(lat_runs, latency, args)
    print_table(
        f"Latency runs: offered {lo:.2f} req/s, N = {args.latency_n}, "
        f"SLO: first token within {args.slo_ttft_ms:.0f} ms",
        list(results["latency"].items()),
    )
    for points in results["throughput"].values():
        for r in points.values():
            r.pop("cdf")
    return results


# ---- rotation under contention (--rotation) ------------------------------------------------------
BURN = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a * 0.01)
"""


def contend(threads: int) -> subprocess.Popen | None:
    """A competing CPU load: a process keeping `threads` threads busy with matrix products."""
    if threads <= 0:
        return None
    return subprocess.Popen([sys.executable, "-c", BURN, str(threads)])


async def warm(url: str, prefix_ids: list[str], concurrency: int = 32) -> None:
    """One 1-token request per prefix, so that each is resident (as far as the pool holds them)."""
    gate = asyncio.Semaphore(concurrency)
    async with new_client() as client:

        async def one(pid: str) -> None:
            async with gate:
                r = await client.post(
                    url + "/generate", json={"prefix_id": pid, "input": "warm up", "max_new_tokens": 1}
                )
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up of {pid} got {r.status_code}: {r.text[:200]}")

        await asyncio.gather(*(one(pid) for pid in prefix_ids))


def device_loads(url: str) -> dict[str, float]:
    """The server's device-pool counters (hits, misses, evictions) from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("prefixserve_prefix_loads_total{") and 'tier="device"' in line:
            result = line.split('result="')[1].split('"')[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


async def measure_rotation(
    args, servers: dict[str, ServerProcess], prefix_ids: list[str], base: Load
) -> dict:
    for name, server in servers.items():
        t = time.perf_counter()
        await warm(server.url, prefix_ids)
        print(f"{name}: {len(prefix_ids)} prefixes warmed in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    burner = contend(args.contend)
    try:
        await asyncio.sleep(2.0)  # the competing load is up
        capacity = args.rate or await calibrate(servers["resident"].url, prefix_ids, args.max_running, base)
        load = replace(base, n_prefixes=len(prefix_ids), rate=args.overload * capacity, seed=11)
        runs: dict[str, list[Run]] = {}
        loads: dict[str, dict[str, float]] = {}
        for order in alternating(list(servers), args.rounds):
            for name in order:
                before = device_loads(servers[name].url)
                runs.setdefault(name, []).append(await run_load(servers[name].url, load, prefix_ids, 0.0))
                after = device_loads(servers[name].url)
                counts = loads.setdefault(name, {})
                for k, v in after.items():
                    counts[k] = counts.get(k, 0) + v - before.get(k, 0)
                await asyncio.sleep(1.0)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    throughput = summarize_systems(runs, load, args)
    for r in throughput.values():
        r.pop("cdf")
    print_table(
        f"Rotation under contention: {len(prefix_ids)} prefixes (Zipf alpha={load.alpha}), offered "
        f"{load.rate:.2f} req/s ({args.overload}x capacity); competing load: {args.contend} thread(s)",
        list(throughput.items()),
    )
    for name, counts in loads.items():
        print(
            f"{name:<10} device pool during the runs: " + ", ".join(f"{k} {v:.0f}" for k, v in counts.items())
        )
    return {
        "capacity_req_s": round(capacity, 3),
        "rate": load.rate,
        "throughput": throughput,
        "device": loads,
    }


def rotation_headline(results: dict) -> dict:
    tp = results["throughput"]
    rot, res = tp["rotation"]["tok_s"], tp["resident"]["tok_s"]
    h = {
        "rotation_tok_s": rot,
        "resident_tok_s": res,
        "rotation_over_resident": round(rot / res, 3) if res else None,
        "rotation_over_resident_rounds": [
            round(a / b, 3)
            for a, b in zip(tp["rotation"]["tok_s_rounds"], tp["resident"]["tok_s_rounds"], strict=True)
            if b
        ],
        "rotation_ttft_p99_ms": tp["rotation"]["ttft_ms"]["p99"],
        "resident_ttft_p99_ms": tp["resident"]["ttft_ms"]["p99"],
        "rotation_device_misses": results["device"].get("rotation", {}).get("misses"),
        "capacity_req_s": results["capacity_req_s"],
    }
    v = h["rotation_over_resident"]
    print(f"\nrotation_over_resident {v} (target >= 0.9): {'ok' if v and v >= 0.9 else 'MISSED'}")
    return h


def main_rotation(args, base: Load, work: Path, setup: Setup, per_prefix: int, prefix_ids: list[str]) -> None:
    servers: dict[str, ServerProcess] = {}
    pools = {"resident": (len(prefix_ids) + 16) * per_prefix, "rotation": args.pool_prefixes * per_prefix}
    for name, pool_bytes in pools.items():
        port = free_port()
        env = prefixserve_env(setup, port, work, PREFIXSERVE_DEVICE_POOL_BYTES=str(pool_bytes))
        servers[name] = ServerProcess(
            name, [sys.executable, "-m", "prefixserve.cli", "serve"], env, port, work
        )
    try:
        for server in servers.values():
            server.wait_ready()
        results = asyncio.run(measure_rotation(args, servers, prefix_ids, base))
    finally:
        for s in servers.values():
            s.stop()
    results["config"] = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "pool_bytes": pools,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load": asdict(base),
    }
    label = f"serve-rotation-{args.device}-{args.dtype}{'-quick' if args.quick else ''}"
    out = Path(args.out) if args.out else RESULTS / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(rotation_headline(results)))


def headline(results: dict) -> dict:
    tp, lat = results["throughput"], results["latency"]

    def tok(system: str, n: int) -> float | None:
        return tp.get(system, {}).get(str(n), {}).get("tok_s")

    h = {
        "tok_s_1": tok("prefixserve", 1),
        "tok_s_10": tok("prefixserve", 10),
        "tok_s_100": tok("prefixserve", 100),
        "tok_s_1000": tok("prefixserve", 1000),
        "baseline_seq_tok_s_100": tok("sequential", 100),
        "baseline_group_tok_s_100": tok("grouped", 100),
        "ttft_p99_ms_100": lat.get("prefixserve", {}).get("ttft_ms", {}).get("p99"),
        "slo_attainment_100": lat.get("prefixserve", {}).get("slo_attainment"),
        "capacity_req_s": results["capacity_req_s"],
        "engine_tok_s": tok("engine", 100),
        "http_tok_s": tok("prefixserve", 100),
        "engine_ttft_p99_ms_100": lat.get("engine", {}).get("ttft_ms", {}).get("p99"),
        "threaded_tok_s": tok("threaded", 100),
        "threaded_ttft_p99_ms_100": lat.get("threaded", {}).get("ttft_ms", {}).get("p99"),
    }

    def ratio(a: str, b: str) -> float | None:
        return round(h[a] / h[b], 3) if h[a] and h[b] else None

    h["tok_s_1000_over_tok_s_1"] = ratio("tok_s_1000", "tok_s_1")
    h["tok_s_100_over_seq"] = ratio("tok_s_100", "baseline_seq_tok_s_100")
    h["tok_s_100_over_group"] = ratio("tok_s_100", "baseline_group_tok_s_100")
    h["http_over_engine"] = ratio("http_tok_s", "engine_tok_s")
    http_r, engine_r = (
        tp.get(s, {}).get("100", {}).get("tok_s_rounds", []) for s in ("prefixserve", "engine")
    )
    h["http_over_engine_rounds"] = [round(a / b, 3) for a, b in zip(http_r, engine_r, strict=False) if b]
    targets = {
        "tok_s_1000_over_tok_s_1": 0.9,
        "tok_s_100_over_seq": 10,
        "tok_s_100_over_group": 2,
        "http_over_engine": 0.9,
    }
    print(f"\n{'ratio':<26}{'measured':>10}{'target':>10}")
    for k, target in targets.items():
        v = h[k]
        verdict = "-" if v is None else "ok" if v >= target else "MISSED"
        print(f"{k:<26}{'-' if v is None else f'{v:.2f}':>10}{'>= ' + str(target):>10}  {verdict}")
    lo_errors = lat.get("prefixserve", {}).get("errors", {})
    hi_errors = {k for r in tp.get("prefixserve", {}).values() for k in r["errors"]}
    print(
        f"prefixserve errors below saturation: {lo_errors or 'none'}; above it: {sorted(hi_errors) or 'none'}"
    )
    return h


if __name__ == "__main__":
    main()
