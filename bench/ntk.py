"""NTK-Attention prefixes vs prefix-KV: decode speed against prefix length, and what each learns.

    python bench/ntk.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]

(a) Decode tokens/s of the engine, batch 64, 32 input tokens -> 64 new tokens (greedy, EOS ignored),
    GPT-2-small dimensions (random weights; n_positions raised to 2048 so a 1000-token prefix plus the
    request fits), every row with: a prefix-KV of length 10, 100 or 1000; one NTK prefix shared by the
    64 rows; 64 distinct NTK prefixes. Columns are measured side by side, rounds interleaved. Only decode
    steps are timed (after every row has its first token).
(b) On the synthetic table-to-text task (tests/test_training.py's, offline tiny GPT-2), held-out loss
    of prefix tuning (P=10: 3,840 stored values) vs an NTK prefix of rank 10 (4,032), the same number
    of optimizer steps, each at its own learning rate (prefix tuning 5e-3, NTK 0.5), next to the bare
    model's loss.

Prints tables; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import GPT2_SMALL, RESULTS, sync
from prefix_store.state import NtkPrefix
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.model import LoadedModel, load_model
from prefixserve.tiny import write_tiny_model
from prefixserve.training.synthetic import table_to_text
from prefixserve.training.trainer import PrefixTrainer, TrainConfig, bare_model_loss

BATCH, INPUT, NEW = 64, 32, 64
COLUMNS = ("kv10", "kv100", "kv1000", "ntk", "ntk_distinct")


# ---- (a) decode speed ------------------------------------------------------------------------------
def make_prefix(model: LoadedModel, column: str, row: int) -> torch.Tensor | NtkPrefix:
    s, g = model.spec, torch.Generator().manual_seed(row)
    if column.startswith("kv"):
        return torch.randn(s.prefix_shape(int(column[2:])), generator=g) * 0.5  # [L, 2, H, P, D]
    z = torch.randn(s.n_layer, s.n_head, s.head_dim, s.head_dim, generator=g) * 0.05  # [L, H, D, D]
    return NtkPrefix(z, torch.rand(s.n_layer, s.n_head, s.head_dim, generator=g) * 0.05)


def decode_tok_s(engine: EngineCore, column: str, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    for i, prompt in enumerate(prompts):  # every row its own prefix, except in the shared "ntk" column
        engine.add_request(prompt, params, prefix_id=f"{column}-{i if column != 'ntk' else 0}")
    started: set[str] = set()
    while len(started) < BATCH:  # prefill: until every row has its first token
        started.update(out.request_id for out in engine.step())
    sync(engine.model.device)
    t0, n = time.perf_counter(), 0
    while engine.has_work:
        n += len(engine.step())
    sync(engine.model.device)
    return n / (time.perf_counter() - t0)


def bench_decode(args: argparse.Namespace) -> dict[str, float]:
    cfg = GPT2_SMALL.__class__(**{**GPT2_SMALL.__dict__, "n_positions": 2048})
    path = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-ntk-")), cfg)
    model = load_model(path, dtype=args.dtype, device=args.device)
    engine = EngineCore(
        model,
        EngineConfig(
            max_running=BATCH, max_waiting=BATCH, max_seq_len=1000 + INPUT + NEW, max_prefix_len=1000
        ),
    )
    for column in COLUMNS:
        for i in range(BATCH if column != "ntk" else 1):
            engine.prefixes.register(f"{column}-{i}", make_prefix(model, column, i))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.spec.vocab_size, (BATCH, INPUT), generator=g).tolist()
    decode_tok_s(engine, "ntk", prompts)  # warm-up
    rounds = 1 if args.quick else 3
    runs: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for _ in range(rounds):
        for c in COLUMNS:
            runs[c].append(decode_tok_s(engine, c, prompts))
    return {c: statistics.median(v) for c, v in runs.items()}


# ---- (b) what each learns --------------------------------------------------------------------------
def bench_training(args: argparse.Namespace) -> dict[str, float]:
    path = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-ntk-tiny-")))
    tok = load_model(path).tokenizer
    data = table_to_text(120, seed=0)
    train, held = data[:80], data[80:]
    epochs = 6 if args.quick else 12
    common = {"epochs": epochs, "batch_size": 8, "seed": 0}
    configs = {
        "prefix": TrainConfig(prefix_len=10, hidden=64, learning_rate=5e-3, **common),
        "ntk": TrainConfig(kind="ntk", ntk_rank=10, learning_rate=0.5, **common),
    }
    out = {"bare_eval_loss": bare_model_loss(GPT2LMHeadModel.from_pretrained(path), tok, held, "\n")}
    for name, cfg in configs.items():
        trainer = PrefixTrainer(GPT2LMHeadModel.from_pretrained(path), tok, cfg)
        t0 = time.perf_counter()
        tensors, prog = trainer.train(train)
        out[f"{name}_train_s"] = time.perf_counter() - t0
        out[f"{name}_eval_loss"] = trainer.evaluate(held)
        out[f"{name}_params"] = sum(t.numel() for t in tensors.values())
        out[f"{name}_steps"] = prog.step
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, 6 epochs (a few minutes on 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tok_s = bench_decode(args)
    print(
        f"\n(a) decode tokens/s, batch {BATCH}, {INPUT} -> {NEW} tokens, GPT-2-small dims, "
        f"{args.device} {args.dtype}"
    )
    print(f"{'rows with':<16}{'tok/s':>10}{'vs kv10':>10}")
    for c, v in tok_s.items():
        print(f"{c:<16}{v:>10.1f}{v / tok_s['kv10']:>10.2f}")
    train = bench_training(args)
    print(f"\n(b) synthetic table-to-text, tiny GPT-2, {train['prefix_steps']} steps each: held-out loss")
    print(f"{'method':<16}{'stored values':>14}{'eval loss':>11}{'train s':>9}")
    print(f"{'bare model':<16}{'-':>14}{train['bare_eval_loss']:>11.3f}{'-':>9}")
    for name in ("prefix", "ntk"):
        print(
            f"{name:<16}{train[name + '_params']:>14}{train[name + '_eval_loss']:>11.3f}"
            f"{train[name + '_train_s']:>9.1f}"
        )
    ratios = {
        "ntk_over_kv10": tok_s["ntk"] / tok_s["kv10"],
        "ntk_over_kv1000": tok_s["ntk"] / tok_s["kv1000"],
    }
    print(f"\n{'ratio':<18}{'measured':>10}{'target':>10}")
    for (k, v), target in zip(ratios.items(), (0.9, 1.5), strict=True):
        print(f"{k:<18}{v:>10.2f}{'>= ' + str(target):>10}  {'ok' if v >= target else 'MISSED'}")
    summary = {
        "ntk_tok_s": round(tok_s["ntk"], 1),
        "ntk_distinct_tok_s": round(tok_s["ntk_distinct"], 1),
        "kv10_tok_s": round(tok_s["kv10"], 1),
        "kv100_tok_s": round(tok_s["kv100"], 1),
        "kv1000_tok_s": round(tok_s["kv1000"], 1),
        "ntk_eval_loss": round(train["ntk_eval_loss"], 4),
        "prefix_eval_loss": round(train["prefix_eval_loss"], 4),
        "bare_eval_loss": round(train["bare_eval_loss"], 4),
        **{k: round(v, 3) for k, v in ratios.items()},
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out or RESULTS / f"ntk-{args.device}-{args.dtype}{'-quick' if args.quick else ''}.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
