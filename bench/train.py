"""Prefix-tuning training: the worker's trainer vs HuggingFace PEFT, examples/s and final loss.

    python bench/train.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--model DIR|ID]
                          [--rounds N] [--out PATH]

Workload: Li & Liang prefix tuning with the MLP reparameterisation on GPT-2-small dimensions (random
weights built offline unless --model names a checkpoint), on the synthetic table-to-text task
(`prefixserve.training.synthetic.table_to_text`, seed 0): prefix length 10, MLP hidden size k = 512,
batch 5 (the paper's table-to-text setting, TrainConfig's defaults), AdamW (weight decay 0), a linear
decay to 0 without warm-up, gradient clipping at 1.0, dropout off. Full: 100 examples x 10 epochs = 200
steps; --quick: 40 examples x 5 epochs = 40 steps. The learning rate is 5e-3, not the paper's 5e-5:
that one is meant for tens of thousands of steps, and over a few dozen the prefix would not move, so
the loss comparison would say nothing.

Both systems get the same model weights (two copies of one checkpoint), the same examples in the same
order (the trainer's shuffles), the same hyperparameters and the same initial parameters (ours, copied
into PEFT's prompt encoder, as tests/test_training.py does), and the same loss: the mean over the
labelled tokens of a batch, which are y and eos of z = [x; sep; y; eos].

  worker  `PrefixTrainer.train`, the code the training worker runs (without the worker's queue writes
          and per-epoch checkpoints, which are not training steps)
  peft    `get_peft_model(GPT2LMHeadModel, PrefixTuningConfig(task_type="CAUSAL_LM",
          num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512))` and a standard
          torch loop: right-padded batches, forward with labels, backward, clip, AdamW, schedule

ex/s: training examples per second over the wall time of the steps after the first WARMUP_STEPS of
each run (every step ends with `loss.item()`, which waits for the device). final loss: the mean of the
per-step training losses of the last epoch. Each round trains both systems from the same start, in
alternating order, so machine noise hits both alike; the table shows medians over the rounds.
`max |dloss|` is the largest per-step difference of the two loss curves (a check that the two
computed the same thing). `cpu share` (the lowest over the rounds) is the CPU time the process got over
wall time x torch threads: well under 1 means other processes took cores during the run. The last line
printed is one JSON object.

Held out: after the last round, both trained prefixes are evaluated on the same 16 unseen examples
(`table_to_text(seed=1)`) by the server's evaluation code (`prefixserve.training.evaluate`: greedy
generation through the engine, up to 32 tokens, corpus BLEU, and the mean per-token loss of output +
eos). PEFT's prefix is its prompt encoder's output, converted to the canonical layout as an uploaded
PEFT adapter is. The two should agree within noise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_store.importers import peft_to_canonical
from prefixserve.model import load_hf_model, load_model, parse_device, parse_dtype
from prefixserve.tiny import TinyModelConfig, write_tiny_model
from prefixserve.training.evaluate import EvalConfig, evaluate
from prefixserve.training.synthetic import table_to_text
from prefixserve.training.trainer import IGNORE, PrefixTrainer, Progress, TrainConfig, encode_example

RESULTS = Path(__file__).resolve().parent / "results"
GPT2_SMALL = TinyModelConfig(  # GPT-2 small's dimensions (124M parameters), random weights
    vocab_size=50257, n_layer=12, n_head=12, n_embd=768, n_positions=1024, initializer_range=0.02
)
WARMUP_STEPS = 2  # per run, not timed (allocator, thread pools, lazy inits)
HELD_OUT = 16  # unseen examples both trained prefixes are evaluated on
EVAL = EvalConfig(metrics=("bleu", "loss"), max_new_tokens=32)
TARGETS = {"ex_s_ratio": (">=", 1.0), "loss_ratio": ("<=", 1.02)}


@dataclass(frozen=True)
class Workload:
    examples: int
    epochs: int
    batch_size: int = 5
    prefix_len: int = 10
    hidden: int = 512
    learning_rate: float = 5e-3
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.examples / self.batch_size)

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def config(self) -> TrainConfig:
        return TrainConfig(
            prefix_len=self.prefix_len,
            hidden=self.hidden,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
        )


@dataclass
class Run:
    losses: list[float]  # one per step
    ends: list[float]  # perf_counter at the end of each step
    cpu: list[float]  # process_time (all threads) at the end of each step
    sizes: list[int]  # examples in each step

    def ex_s(self) -> float:
        return sum(self.sizes[WARMUP_STEPS:]) / (self.ends[-1] - self.ends[WARMUP_STEPS - 1])

    def ms_step(self) -> float:
        return 1e3 * (self.ends[-1] - self.ends[WARMUP_STEPS - 1]) / (len(self.ends) - WARMUP_STEPS)

    def cpu_share(self) -> float:
        """CPU time the process got over wall time x torch threads, for the timed steps: about 1 on
        a quiet machine, lower when other processes took cores (the timing is then not clean)."""
        wall = self.ends[-1] - self.ends[WARMUP_STEPS - 1]
        return (self.cpu[-1] - self.cpu[WARMUP_STEPS - 1]) / (wall * torch.get_num_threads())

    def final_loss(self, steps_per_epoch: int) -> float:
        return statistics.fmean(self.losses[-steps_per_epoch:])


def collate(
    chunk: list[tuple[list[int], list[int]]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (IGNORE on padding) and attention mask `[B, T]`."""
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, (x, y) in enumerate(chunk):
        ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), labels.to(device), mask.to(device)


class Bench:
    def __init__(self, path: str, tok: PreTrainedTokenizerBase, wl: Workload, dtype, device) -> None:
        self.tok, self.wl, self.cfg, self.device = tok, wl, wl.config(), device
        self.pairs = table_to_text(wl.examples, seed=0)
        self.ours_hf = load_hf_model(path, dtype, device)
        self.served = load_model(path, dtype, str(device))  # what the engine serves and evaluates with
        self.trained: dict[str, torch.Tensor] = {}  # the last run's prefix `[L, 2, H, P, D]`, by system
        first = PrefixTrainer(self.ours_hf, tok, self.cfg)
        self.init = {k: v.detach().clone() for k, v in first.encoder.state_dict().items()}
        peft_cfg = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=wl.prefix_len,
            prefix_projection=True,
            encoder_hidden_size=wl.hidden,
        )
        self.peft = get_peft_model(load_hf_model(path, dtype, device), peft_cfg)
        self.peft.eval()  # dropout off, as in the trainer
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        ours_n = sum(v.numel() for v in self.init.values())
        peft_n = sum(p.numel() for p in self.params)
        assert ours_n == peft_n, f"trainable parameters: ours {ours_n}, PEFT {peft_n}"
        self.trainable = ours_n

    def run_worker(self) -> Run:
        trainer = PrefixTrainer(self.ours_hf, self.tok, self.cfg)
        for k, v in trainer.encoder.state_dict().items():  # seeded: every run starts from self.init
            assert torch.equal(v, self.init[k]), k
        ends: list[float] = []
        cpu: list[float] = []

        def on_progress(prog: Progress) -> None:  # called after each step's loss.item()
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

        tensors, prog = trainer.train(self.pairs, on_progress=on_progress)
        self.trained["worker"] = tensors["past_key_values"]
        return Run(list(prog.losses), ends, cpu, self.sizes())

    def sizes(self) -> list[int]:
        b, n = self.wl.batch_size, self.wl.examples
        return [min(b, n - i * b) for i in range(self.wl.steps_per_epoch)] * self.wl.epochs

    def run_peft(self) -> Run:
        cfg, enc = self.cfg, self.peft.prompt_encoder["default"]
        with torch.no_grad():  # the same start as the worker's trainer
            enc.embedding.weight.copy_(self.init["embedding.weight"])
            for i in (0, 2):
                enc.transform[i].weight.copy_(self.init[f"transform.{i}.weight"])
                enc.transform[i].bias.copy_(self.init[f"transform.{i}.bias"])
        opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, self.wl.steps)
        data = [encode_example(self.tok, x, y, cfg.separator) for x, y in self.pairs]
        order = list(range(len(data)))
        random.Random(cfg.seed).shuffle(order)  # the trainer's order: shuffled once, then per epoch
        train = [data[i] for i in order]
        pad = self.tok.eos_token_id
        losses, ends, cpu, sizes = [], [], [], []
        for epoch in range(cfg.epochs):
            epoch_order = train[:]
            random.Random(cfg.seed + epoch).shuffle(epoch_order)
            for i in range(0, len(epoch_order), cfg.batch_size):
                chunk = epoch_order[i : i + cfg.batch_size]
                ids, labels, mask = collate(chunk, pad, self.device)
                loss = self.peft(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
                ends.append(time.perf_counter())
                cpu.append(time.process_time())
                sizes.append(len(chunk))
        with torch.no_grad():  # PEFT's prefix, as an uploaded adapter's would be read
            out = enc(torch.arange(self.wl.prefix_len, device=self.device)).float().cpu()  # [P, L*2*C]
        spec = self.served.spec
        self.trained["peft"] = peft_to_canonical(out, spec.n_layer, spec.n_head)
        return Run(losses, ends, cpu, sizes)

    def held_out(self) -> dict[str, dict[str, float]]:
        """Both trained prefixes' BLEU and loss on the same unseen examples, through the engine."""
        pairs = table_to_text(HELD_OUT, seed=1)
        return {
            name: evaluate(self.served, f"bench-{name}", prefix, pairs, EVAL)[0]
            for name, prefix in self.trained.items()
        }


def prepare(args: argparse.Namespace, wl: Workload, dtype, device) -> tuple[Bench, str]:
    """The bench over --model, or over a random GPT-2-small written to a directory removed once loaded."""
    if args.model:
        return Bench(args.model, AutoTokenizer.from_pretrained(args.model), wl, dtype, device), args.model
    with tempfile.TemporaryDirectory(prefix="bench-gpt2-small-") as tmp:
        path = str(write_tiny_model(tmp, GPT2_SMALL))
        bench = Bench(path, AutoTokenizer.from_pretrained(path), wl, dtype, device)
    return bench, "random GPT-2-small dims (124M)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 examples x 5 epochs (40 steps), 2 rounds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=None, help="a GPT-2-family checkpoint (hub id or directory)")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds (default 2 quick, 3 full)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train-DEVICE-DTYPE.json)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    wl = Workload(examples=40, epochs=5) if args.quick else Workload(examples=100, epochs=10)
    dtype, device = parse_dtype(args.dtype), parse_device(args.device)

    bench, label = prepare(args, wl, dtype, device)
    systems = {"worker": bench.run_worker, "peft": bench.run_peft}
    runs: dict[str, list[Run]] = {k: [] for k in systems}
    for r in range(rounds):
        for name in list(systems)[:: 1 if r % 2 == 0 else -1]:  # alternating order
            try:
                runs[name].append(systems[name]())
            except RuntimeError as exc:
                if name != "worker" or dtype == torch.float32:
                    raise
                sys.exit(  # the worker itself always trains in float32 (Worker._model)
                    f"worker: PrefixTrainer does not train a {args.dtype} model (its prefix encoder is "
                    f"float32, the model's K/V {args.dtype}): {exc}"
                )
            print(f"round {r + 1} {name}: {runs[name][-1].ex_s():.2f} ex/s", file=sys.stderr, flush=True)

    held_out = bench.held_out()
    spe = wl.steps_per_epoch
    ex_s = {k: statistics.median(run.ex_s() for run in v) for k, v in runs.items()}
    ms = {k: statistics.median(run.ms_step() for run in v) for k, v in runs.items()}
    share = {k: min(run.cpu_share() for run in v) for k, v in runs.items()}
    final = {k: statistics.median(run.final_loss(spe) for run in v) for k, v in runs.items()}
    first = {k: v[-1].losses[0] for k, v in runs.items()}
    diff = max(
        abs(a - b)
        for w, p in zip(runs["worker"], runs["peft"], strict=True)
        for a, b in zip(w.losses, p.losses, strict=True)
    )
    ratios = {"ex_s_ratio": ex_s["worker"] / ex_s["peft"], "loss_ratio": final["worker"] / final["peft"]}
    tokens = [len(encode_example(bench.tok, x, y, bench.cfg.separator)[0]) for x, y in bench.pairs]

    print(
        f"\ntraining benchmark: {label}, {args.device}, {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"workload: {wl.examples} examples x {wl.epochs} epochs = {wl.steps} steps of batch {wl.batch_size}, "
        f"prefix length {wl.prefix_len}, k {wl.hidden}, lr {wl.learning_rate}, {bench.trainable:,} trainable "
        f"parameters, {min(tokens)}-{max(tokens)} tokens per example; first {WARMUP_STEPS} steps of each run "
        f"not timed; median of {rounds} round(s)\n"
    )
    print(
        f"{'system':<10}{'ex/s':>10}{'ms/step':>10}{'first loss':>12}{'final loss':>12}{'cpu share':>11}"
        "  ex/s per round"
    )
    for k in systems:
        per_round = " ".join(f"{run.ex_s():.2f}" for run in runs[k])
        print(
            f"{k:<10}{ex_s[k]:>10.2f}{ms[k]:>10.1f}{first[k]:>12.4f}{final[k]:>12.4f}{share[k]:>11.2f}"
            f"  {per_round}"
        )
    print(f"\nmax |dloss| over all steps and rounds: {diff:.2e}")
    print(f"\nheld out ({HELD_OUT} unseen examples, the last round's prefixes, greedy, engine):")
    print(f"{'system':<10}{'BLEU':>10}{'loss':>10}")
    for k, m in held_out.items():
        print(f"{k:<10}{m['bleu']:>10.2f}{m['loss']:>10.4f}")
    print(f"\n{'ratio':<30}{'measured':>10}{'target':>10}")
    for k, (op, target) in TARGETS.items():
        v = ratios[k]
        ok = v >= target if op == ">=" else v <= target
        print(
            f"{k + (' (worker/peft)'):<30}{v:>10.3f}{op + ' ' + str(target):>10}  {'ok' if ok else 'MISSED'}"
        )

    summary = {
        "worker_ex_s": round(ex_s["worker"], 3),
        "peft_ex_s": round(ex_s["peft"], 3),
        "final_loss": round(final["worker"], 5),
        "peft_final_loss": round(final["peft"], 5),
        "ex_s_ratio": round(ratios["ex_s_ratio"], 4),
        "loss_ratio": round(ratios["loss_ratio"], 5),
        "worker_ms_step": round(ms["worker"], 1),
        "peft_ms_step": round(ms["peft"], 1),
        "worker_cpu_share_min": round(share["worker"], 3),
        "peft_cpu_share_min": round(share["peft"], 3),
        "max_step_loss_diff": diff,
        "worker_heldout_bleu": round(held_out["worker"]["bleu"], 2),
        "peft_heldout_bleu": round(held_out["peft"]["bleu"], 2),
        "worker_heldout_loss": round(held_out["worker"]["loss"], 5),
        "peft_heldout_loss": round(held_out["peft"]["loss"], 5),
        "first_loss": round(first["worker"], 5),
        "device": args.device,
        "dtype": args.dtype,
        "model": label,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch_size": wl.batch_size,
        "steps": wl.steps,
        "timed_steps": wl.steps - WARMUP_STEPS,
        "examples": wl.examples,
        "epochs": wl.epochs,
        "prefix_len": wl.prefix_len,
        "hidden": wl.hidden,
        "learning_rate": wl.learning_rate,
        "rounds": rounds,
        "worker_ex_s_rounds": [round(run.ex_s(), 3) for run in runs["worker"]],
        "peft_ex_s_rounds": [round(run.ex_s(), 3) for run in runs["peft"]],
    }
    out = Path(args.out or RESULTS / f"train-{args.device}-{args.dtype}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
