"""Engine throughput: many prefixes in one batch vs one shared prefix vs HF generate vs the roofline.

    python bench/engine.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--model DIR|ID]
                           [--family gpt2|llama]

Workload (the issue's): 64 concurrent requests, 32 input tokens, 64 new tokens each (greedy, EOS
ignored), prefix length 10, GPT-2-small dimensions (random weights unless --model names a checkpoint;
`--family llama`: SmolLM2-135M's dimensions, a Llama-family model with grouped-query attention, and
every JSON key prefixed with `llama_`).
Columns, measured side by side in one run, rounds interleaved so machine noise hits all alike (every
other round in reverse order):

  mixed          the engine, 64 distinct prefixes
  single         the engine, one shared prefix
  hf_batched     HF generate, batch 64, one shared prefix as past_key_values
  hf_sequential  HF generate one request at a time with its own prefix (how PEFT serves)
  roofline       the same workload's matrix multiplications alone (prefill of 64x32 tokens with the
                 LM head on the 64 last tokens, which yields the first new token, then 63 decode steps
                 at batch 64): the limit on this machine

Prefix length (engine v2's workload): 64 requests x 32 input tokens -> 32 new tokens, and

  shared_p10     every row uses one shared prefix of 10 positions
  shared_p1000   every row uses one shared prefix of 1000 positions (read once per step, not per row)
  distinct_p1000 every row has its own 1000-position prefix: bandwidth-bound by design (64 x 1000
                 positions of K/V read per step; an NTK prefix is the answer for long distinct ones)

The random GPT-2-small model gets n_positions 1088 so that 1000 + 32 + 32 positions fit; with --model,
the long prefix is min(1000, n_positions - 64). Memory: `kv_rows_at_budget` is how many rows of 128
own tokens the scheduler admits into a 2 GiB paged KV pool (the engine's block size and watermark);
`fixed_rows_at_budget` is the same budget over full-length per-row slots (n_positions each).

tok/s counts generated tokens over wall time, prefill included, for every column. A second table
splits the engine's time into its prefill step and its decode steps, next to the roofline's.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_store.kinds import kind_of
from prefix_store.pool import DevicePool
from prefix_store.state import PrefixState
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams, Scheduler
from prefixserve.engine.blocks import blocks_for
from prefixserve.engine.request import Request
from prefixserve.engine.sequence import Sequence
from prefixserve.model import LoadedModel, hf_cache_kwargs, load_hf_model, load_model, parse_dtype
from prefixserve.tiny import TinyModelConfig, write_tiny_model

RESULTS = Path(__file__).resolve().parent / "results"
GPT2_SMALL = TinyModelConfig(  # n_positions 1088: a 1000-position prefix + 32 in + 32 new fits
    vocab_size=50257, n_layer=12, n_head=12, n_embd=768, n_positions=1088, initializer_range=0.02
)
SMOLLM2_135M = TinyModelConfig(  # SmolLM2-135M's shape: 30 layers, 9 heads, 3 KV heads, SwiGLU 1536
    family="llama",
    vocab_size=49152,
    n_layer=30,
    n_head=9,
    n_kv_head=3,
    n_embd=576,
    intermediate_size=1536,
    n_positions=1088,
    initializer_range=0.02,
)
KV_BUDGET = 2 << 30  # bytes, for kv_rows_at_budget / fixed_rows_at_budget
BUDGET_ROW_TOKENS = 128


@dataclass(frozen=True)
class Workload:
    batch: int = 64
    input_len: int = 32
    new_tokens: int = 64
    prefix_len: int = 10

    @property
    def generated(self) -> int:
        return self.batch * self.new_tokens


def engine_config(batch: int, max_seq_len: int, prefix_tokens: int = 0, **more) -> EngineConfig:
    """`batch` rows of `max_seq_len`, default token budget (prefill runs in chunks). The paged KV pool
    gets the memory full-length slots would take plus the prefixes' (`prefix_tokens`, which live in it),
    so the columns measure speed, not memory pressure: no row is ever preempted (`kv_rows_at_budget`
    measures memory)."""
    if "kv_cache_tokens" in EngineConfig.__dataclass_fields__:  # (the engine before paging had slots)
        more["kv_cache_tokens"] = batch * max_seq_len + prefix_tokens
    return EngineConfig(max_running=batch, max_waiting=batch, max_seq_len=max_seq_len, **more)


def engine_with_prefixes(
    model: LoadedModel, config: EngineConfig, states: dict[str, PrefixState]
) -> EngineCore:
    """An engine whose prefixes (and adapters: any kind) are resident in the store's device pool, as the
    server runs them: KV prefixes in runs of the engine's own KV blocks (unified paging), read there in
    place."""
    length = lambda pid: kind_of(states[pid]).length(states[pid])  # noqa: E731
    pool = DevicePool(states.__getitem__, length, 1 << 62, model.device, model.dtype)
    engine = EngineCore(model, config, prefixes=pool)
    for pid, state in states.items():
        pool.put(pid, state)
    kv = [s for s in states.values() if isinstance(s, torch.Tensor)]
    blocks = sum(blocks_for(s.shape[3], engine.config.block_size) for s in kv)
    assert engine.arena.prefix_blocks == blocks, "every prefix is placed in the KV pool"
    states.clear()  # the copies in the pool are what runs (the budget never evicts one to reload it)
    return engine


def git_commit() -> str | None:
    """The checkout's short commit, "-dirty" when it has changes (None outside a git checkout)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=RESULTS.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=RESULTS.parent, capture_output=True, text=True
        )
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def padded_tokens(count: int, plen: int) -> int:
    """KV pool tokens that `count` prefixes of `plen` positions take (whole blocks each)."""
    block_size = EngineConfig.block_size
    return count * blocks_for(plen, block_size) * block_size


def alternating(names: list[str], rounds: int) -> list[list[str]]:
    """The order of the columns (systems) in each round: as given, then reversed, and so on (A B C,
    C B A), so that a drift of the machine's speed over the run weighs on every one alike."""
    return [names if r % 2 == 0 else names[::-1] for r in range(rounds)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, model: LoadedModel, hf: GPT2LMHeadModel, wl: Workload, seq_requests: int) -> None:
        self.model, self.hf, self.wl, self.seq_requests = model, hf, wl, seq_requests
        spec, dev = model.spec, model.device
        g = torch.Generator().manual_seed(0)
        self.prompts = torch.randint(0, spec.vocab_size, (wl.batch, wl.input_len), generator=g).tolist()
        shape = (wl.batch, *spec.prefix_shape(wl.prefix_len))
        # activations-sized values, as a trained prefix would have
        self.prefixes = (torch.randn(shape, generator=g) * 0.5).to(dev, model.dtype)  # [B, L, 2, H, P, D]
        self.params = SamplingParams(max_new_tokens=wl.new_tokens, ignore_eos=True)
        self.engine = engine_with_prefixes(
            model,
            engine_config(
                wl.batch,
                wl.prefix_len + wl.input_len + wl.new_tokens,
                padded_tokens(wl.batch, wl.prefix_len),
            ),
            {f"p{i}": self.prefixes[i] for i in range(wl.batch)},
        )
        self.hf.generation_config.eos_token_id = None  # generate exactly new_tokens, as the engine does
        self.hf.generation_config.pad_token_id = 0
        self.split: dict[str, tuple[float, float]] = {}
        self._long: dict[tuple[int, bool], EngineCore] = {}

    # ---- engine ------------------------------------------------------------------------------
    def run_engine(self, distinct: bool, name: str) -> float:
        eng = self.engine
        for i, prompt in enumerate(self.prompts):
            eng.add_request(prompt, self.params, prefix_id=f"p{i}" if distinct else "p0")
        sync(self.model.device)
        t0 = time.perf_counter()
        n = 0
        while n < self.wl.batch:  # prefill: until every request has its first token
            n += len(eng.step())
        sync(self.model.device)
        t1 = time.perf_counter()
        while eng.has_work:
            n += len(eng.step())
        sync(self.model.device)
        t2 = time.perf_counter()
        assert n == self.wl.generated, f"{name}: generated {n}, expected {self.wl.generated}"
        self.split[name] = (t1 - t0, t2 - t1)
        return n / (t2 - t0)

    # ---- prefix length: shared vs distinct ------------------------------------------------------
    def long_engine(self, plen: int, distinct: bool) -> EngineCore:
        """An engine for `batch` x 32 in -> 32 new with prefixes of `plen` positions (shared or one each)."""
        key = (plen, distinct)
        if key not in self._long:
            self._long.clear()  # one set of long prefixes in memory at a time
            spec, wl = self.model.spec, self.wl
            count = wl.batch if distinct else 1
            g = torch.Generator().manual_seed(plen)
            states = {  # [L, 2, H, P, D] each
                f"s{i}": (torch.randn(spec.prefix_shape(plen), generator=g) * 0.5).to(
                    self.model.device, self.model.dtype
                )
                for i in range(count)
            }
            self._long[key] = engine_with_prefixes(
                self.model,
                engine_config(wl.batch, plen + 64, padded_tokens(count, plen), max_prefix_len=plen),
                states,
            )
        return self._long[key]

    def run_prefix_len(self, plen: int, distinct: bool) -> float:
        eng, wl = self.long_engine(plen, distinct), self.wl
        params = SamplingParams(max_new_tokens=32, ignore_eos=True)
        for i, prompt in enumerate(self.prompts):
            eng.add_request(prompt, params, prefix_id=f"s{i}" if distinct else "s0")
        sync(self.model.device)
        t0 = time.perf_counter()
        n = 0
        while eng.has_work:
            n += len(eng.step())
        sync(self.model.device)
        assert n == wl.batch * 32, f"generated {n}, expected {wl.batch * 32}"
        return n / (time.perf_counter() - t0)

    # ---- HF baselines ------------------------------------------------------------------------
    def _cache(self, prefixes: torch.Tensor) -> dict:
        """[B, L, 2, H, P, D] -> the keyword handing HF an HF cache that holds each row's prefix."""
        return hf_cache_kwargs(
            self.hf, [(prefixes[:, i, 0], prefixes[:, i, 1]) for i in range(prefixes.shape[1])]
        )

    @torch.inference_mode()
    def _hf_generate(self, prompts: list[list[int]], prefixes: torch.Tensor) -> int:
        ids = torch.tensor(prompts, device=self.model.device)
        mask = torch.ones(
            len(prompts), self.wl.prefix_len + self.wl.input_len, dtype=torch.long, device=self.model.device
        )
        out = self.hf.generate(
            ids,
            attention_mask=mask,
            **self._cache(prefixes),
            max_new_tokens=self.wl.new_tokens,
            do_sample=False,
        )
        return (out.shape[1] - self.wl.input_len) * len(prompts)

    def run_hf_batched(self) -> float:
        shared = self.prefixes[:1].expand(self.wl.batch, *self.prefixes.shape[1:]).contiguous()
        sync(self.model.device)
        t0 = time.perf_counter()
        n = self._hf_generate(self.prompts, shared)
        sync(self.model.device)
        assert n == self.wl.generated
        return n / (time.perf_counter() - t0)

    def run_hf_sequential(self) -> float:
        sync(self.model.device)
        t0 = time.perf_counter()
        n = sum(
            self._hf_generate([self.prompts[i]], self.prefixes[i : i + 1]) for i in range(self.seq_requests)
        )
        sync(self.model.device)
        return n / (time.perf_counter() - t0)

    # ---- roofline ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run_roofline(self) -> float:
        """The workload's matmuls alone, on the layouts the engine runs them on (dense.py: packed for
        decode-sized steps where the device has it): prefill of B*T tokens (-> first token), then
        new_tokens - 1 steps."""
        wl, dev, dt = self.wl, self.model.device, self.model.dtype
        spec = self.model.spec
        c, mlp = spec.n_embd, spec.intermediate_size
        layers, lm_head = self.model.dense()

        def matmuls(x: torch.Tensor, logits_rows: int) -> None:  # x [N, C] (H*D == C here)
            for d in layers:
                d.attn(x)  # [N, W] queries, keys, values
                d.proj(x)  # [N, C]
                d.out(d.fc(x)[:, :mlp])  # [N, 4C] (GPT-2) or [N, 2I] (SwiGLU's gate and up) -> [N, C]
            lm_head(x[:logits_rows])  # [B, V]

        prefill_x = torch.randn(wl.batch * wl.input_len, c, device=dev, dtype=dt)  # [B*T, C]
        decode_x = torch.randn(wl.batch, c, device=dev, dtype=dt)  # [B, C]
        sync(dev)
        t0 = time.perf_counter()
        matmuls(prefill_x, wl.batch)
        sync(dev)
        t1 = time.perf_counter()
        for _ in range(wl.new_tokens - 1):
            matmuls(decode_x, wl.batch)
        sync(dev)
        t2 = time.perf_counter()
        self.split["roofline"] = (t1 - t0, t2 - t1)
        return wl.generated / (t2 - t0)


def rows_at_budget(model: LoadedModel) -> tuple[int | None, int]:
    """(rows of BUDGET_ROW_TOKENS own tokens the engine's scheduler admits into a KV_BUDGET paged pool,
    rows of full-length slots the same budget holds). The first is None for an engine without paging."""
    spec = model.spec
    token_bytes = spec.kv_bytes(1, model.dtype.itemsize)  # K and V of one token
    fixed = KV_BUDGET // (spec.n_positions * token_bytes)
    if not hasattr(EngineConfig, "resolved"):  # the engine before paged KV (for before/after tables)
        return None, fixed
    tries = fixed * 64  # more rows than can fit
    cfg = EngineConfig(
        max_running=tries,
        max_tokens_per_step=tries * BUDGET_ROW_TOKENS,  # one step may admit them all
        kv_cache_tokens=KV_BUDGET // token_bytes,
    )
    sched = Scheduler(cfg.resolved(model.device, spec.n_positions).scheduler_config(), lambda pid: True)
    for i in range(tries):
        request = Request(f"r{i}", [5] * BUDGET_ROW_TOKENS, SamplingParams(max_new_tokens=1))
        sched.add(Sequence(request, None))
    sched.schedule()
    return sched.num_running, fixed


def prepare_model(args: argparse.Namespace) -> tuple[LoadedModel, GPT2LMHeadModel, str]:
    dtype = parse_dtype(args.dtype)
    if args.model:
        path, label = args.model, args.model
    elif args.family == "llama":
        path = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-smollm2-")), SMOLLM2_135M)
        label = "random SmolLM2-135M dims (Llama family, 3 KV heads)"
    else:
        path = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-gpt2-small-")), GPT2_SMALL)
        label = "random GPT-2-small dims (124M)"
    model = load_model(path, dtype=args.dtype, device=args.device)
    hf = load_hf_model(path, dtype, model.device)
    return model, hf, label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="one measured round (ends within ~3 minutes on 2 cores)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=None, help="a served checkpoint (hub id or directory)")
    ap.add_argument(
        "--family", default="gpt2", choices=["gpt2", "llama"], help="random weights of GPT-2-small or SmolLM2"
    )
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds (default 1 quick, 3 full)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/engine-DEVICE-DTYPE.json)")
    ap.add_argument(
        "--seq-requests", type=int, default=None, help="requests for hf_sequential (4 quick, 8 full)"
    )
    ap.add_argument(
        "--columns", default=None, help="comma-separated subset of the columns to run (default: all)"
    )
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seq_requests = args.seq_requests or (4 if args.quick else 8)

    model, hf, label = prepare_model(args)
    long_len = min(1000, model.spec.n_positions - 64)
    wl = Workload()
    bench = Bench(model, hf, wl, seq_requests)
    columns: dict[str, Callable[[], float]] = {
        "mixed": lambda: bench.run_engine(True, "mixed"),
        "single": lambda: bench.run_engine(False, "single"),
        "hf_batched": bench.run_hf_batched,
        "hf_sequential": bench.run_hf_sequential,
        "roofline": bench.run_roofline,
        "shared_p10": lambda: bench.run_prefix_len(10, False),
        "shared_p1000": lambda: bench.run_prefix_len(long_len, False),
        "distinct_p1000": lambda: bench.run_prefix_len(long_len, True),
    }
    if args.columns:
        columns = {k: v for k, v in columns.items() if k in args.columns.split(",") or k == "roofline"}
    # warm-up: one short pass of each system (allocator, thread pools, lazy inits)
    bench.run_engine(True, "warmup")
    bench.run_roofline()
    results: dict[str, list[float]] = {k: [] for k in columns}
    splits: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("mixed", "single", "roofline") if k in columns
    }
    # alternate rounds run the columns in reverse order, so no column always follows the same one
    # (a 1000-position engine's memory going back, a warm-up) and neighbours' drift cancels out
    for order in alternating(list(columns), rounds):
        for name in order:
            results[name].append(columns[name]())
            if name in splits:
                splits[name].append(bench.split[name])
        bench._long.clear()  # the long prefixes' memory goes back between rounds
    tok_s = {k: statistics.median(v) for k, v in results.items()}

    print(
        f"\nengine benchmark: {label}, {args.device}, {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"workload: {wl.batch} requests x {wl.input_len} input tokens -> {wl.new_tokens} new tokens, "
        f"prefix length {wl.prefix_len}; median of {rounds} round(s); "
        f"hf_sequential over {seq_requests} requests\n"
    )
    print(f"{'column':<15}{'tok/s':>10}{'of roofline':>13}")
    for name, v in tok_s.items():
        print(f"{name:<15}{v:>10.1f}{v / tok_s['roofline']:>13.2f}")
    print(f"\n{'time split':<15}{'prefill s':>10}{'decode s':>10}{'decode tok/s':>14}")
    for name, rows in splits.items():
        pre, dec = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"{name:<15}{pre:>10.3f}{dec:>10.3f}{(wl.generated - wl.batch) / dec:>14.1f}")
    kv_rows, fixed_rows = rows_at_budget(model)
    targets = {
        "mixed/single": 0.95,
        "mixed/hf_batched": 1.5,
        "mixed/hf_sequential": 12,
        "mixed/roofline": 0.75,
        "shared_p1000/shared_p10": 0.8,
        "kv_rows/fixed_rows": 4,
    }
    ratios = {
        k: tok_s[a] / tok_s[b]
        for k in targets
        if (a := k.split("/")[0]) in tok_s and (b := k.split("/")[1]) in tok_s
    }
    if kv_rows is not None:
        ratios["kv_rows/fixed_rows"] = kv_rows / fixed_rows
    print(
        f"\nrows of {BUDGET_ROW_TOKENS} own tokens in {KV_BUDGET >> 30} GiB of KV: paged {kv_rows},"
        f" fixed slots {fixed_rows}; long prefix {long_len} positions"
    )
    print(f"\n{'ratio':<26}{'measured':>10}{'target':>10}")
    for k, v in ratios.items():
        print(f"{k:<26}{v:>10.2f}{'>= ' + str(targets[k]):>10}  {'ok' if v >= targets[k] else 'MISSED'}")
    key = "llama_" if args.family == "llama" else ""
    summary = {f"{key}{k}_tok_s": round(v, 1) for k, v in tok_s.items()}
    summary.update(
        device=args.device,
        dtype=args.dtype,
        model=label,
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        rounds=rounds,
        long_prefix_len=long_len,
        kv_rows_at_budget=kv_rows,
        fixed_rows_at_budget=fixed_rows,
    )
    summary.update({key + k.replace("/", "_over_"): round(v, 3) for k, v in ratios.items()})
    family = "-llama" if args.family == "llama" else ""
    out = Path(
        args.out
        or RESULTS / f"engine{family}-{args.device}-{args.dtype}{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
