"""Weight-side adapters in the batch: many LoRAs per forward pass vs no adapters vs PEFT one at a time.

    python bench/adapters.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--model DIR|ID]

Workload (issue 21's): 64 concurrent requests, 32 input tokens -> 32 new tokens each (greedy, EOS
ignored), GPT-2-small dimensions (random weights unless --model names a checkpoint). Columns, measured
side by side in one run, rounds interleaved so machine noise hits all alike:

  base         the engine, 64 rows, no adapters
  lora_mixed   the engine, 64 rows carrying 32 distinct LoRA adapters of rank 8 on all four modules
               (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; two rows each), in one batch
  mixed_kinds  the engine, 64 rows: 22 with LoRA adapters (distinct), 21 with prefixes of 10 positions
               (distinct), 21 bare
  adapters_mixed  (extra) 64 rows, 32 distinct Houlsby bottleneck adapters (m = 64)
  peft_seq     PEFT serving one adapter at a time: for each adapter, HF generate over its two requests
               with that adapter active (PEFT's LoRA layers), over --peft-adapters adapters

The LoRA weights are made in PEFT (its LoRA layers, random A and B) and imported into the engine
through the server's PEFT importer, so both serve the same adapters. tok/s counts generated tokens over
wall time, prefill included. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS, engine_config, prepare_model, sync
from prefix_store.importers import import_peft_lora
from prefix_store.kinds import LoraKind
from prefix_store.state import BottleneckAdapter
from prefixserve.compile import bind_model
from prefixserve.engine import EngineCore, SamplingParams

BATCH, INPUT, NEW, RANK, ADAPTERS, PREFIX = 64, 32, 32, 8, 32, 10
TARGETS = {"lora_mixed/base": 0.8, "lora_mixed/peft_seq": 8, "mixed_kinds/base": 0.75}


def peft_adapters(hf, n: int) -> tuple[object, list[tuple[bytes, bytes]]]:
    """A PEFT model with n LoRA adapters (rank 8, all four modules; random A, B scaled to a trained
    adapter's size) and each adapter as PEFT's files (adapter_config.json, adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    config = LoraConfig(
        r=RANK, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
        fan_in_fan_out=True, task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(hf), config, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    files = []
    for i in range(n):
        cfg = json.dumps(model.peft_config[f"a{i}"].to_dict(), default=list).encode()
        weights = {
            k: v.contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=f"a{i}").items()
        }
        files.append((cfg, st_save(weights)))
    return model.eval(), files


class Bench:
    def __init__(self, model, hf, peft_count: int) -> None:
        self.model, spec, dev = model, model.spec, model.device
        g = torch.Generator().manual_seed(1)
        self.prompts = torch.randint(0, spec.vocab_size, (BATCH, INPUT), generator=g).tolist()
        self.params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        self.peft, files = peft_adapters(hf, ADAPTERS)
        self.peft.to(dev)
        self.peft_count = peft_count
        binding = bind_model(model)
        self.engine = EngineCore(model, engine_config(BATCH, PREFIX + INPUT + NEW))
        for i, (cfg, weights) in enumerate(files):
            lora = LoraKind.from_tensors(import_peft_lora(cfg, weights, binding, 1 << 31))
            self.engine.prefixes.register(f"lora{i}", lora)
        n, c, m = spec.n_layer, spec.n_embd, 64
        for i in range(ADAPTERS):
            down, up = torch.randn(n, c, m, generator=g) * 0.02, torch.randn(n, m, c, generator=g) * 0.02
            parts = (down, torch.zeros(n, m), up, torch.zeros(n, c))
            self.engine.prefixes.register(
                f"houlsby{i}", BottleneckAdapter({s: parts for s in ("attn", "mlp")})
            )
        for i in range(BATCH):
            kv = torch.randn(spec.prefix_shape(PREFIX), generator=g) * 0.5
            self.engine.prefixes.register(f"p{i}", kv)
        hf.generation_config.eos_token_id = None
        self.peft.generation_config.eos_token_id = None
        self.peft.generation_config.pad_token_id = 0

    def run_engine(self, rows: list[tuple[str | None, str | None]]) -> float:
        """rows: (prefix id, adapter id) per request -> tok/s."""
        eng = self.engine
        for prompt, (pid, aid) in zip(self.prompts, rows, strict=True):
            eng.add_request(prompt, self.params, prefix_id=pid, adapter_id=aid)
        sync(self.model.device)
        t0 = time.perf_counter()
        n = sum(len(out.token_ids) for out in _drain(eng))
        sync(self.model.device)
        assert n == BATCH * NEW, n
        return n / (time.perf_counter() - t0)

    def run_peft_seq(self) -> float:
        """One adapter at a time, each over its two requests (PEFT's LoRA layers, HF generate)."""
        dev = self.model.device
        n = 0
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(self.peft_count):
                self.peft.set_adapter(f"a{i}")
                ids = torch.tensor(self.prompts[2 * i : 2 * i + 2], device=dev)
                mask = torch.ones_like(ids)
                out = self.peft.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=NEW,
                    min_new_tokens=NEW,
                    do_sample=False,
                )
                n += (out.shape[1] - INPUT) * out.shape[0]
        sync(dev)
        return n / (time.perf_counter() - t0)


def _drain(engine: EngineCore):
    while engine.has_work:
        yield from engine.step()


def columns_of(bench: Bench) -> dict[str, Callable[[], float]]:
    lora = [(None, f"lora{i // 2}") for i in range(BATCH)]  # 32 adapters, two rows each
    kinds = [
        (None, f"lora{i // 3}") if i % 3 == 0 else (f"p{i}", None) if i % 3 == 1 else (None, None)
        for i in range(BATCH)
    ]
    houlsby = [(None, f"houlsby{i // 2}") for i in range(BATCH)]
    return {
        "base": lambda: bench.run_engine([(None, None)] * BATCH),
        "lora_mixed": lambda: bench.run_engine(lora),
        "mixed_kinds": lambda: bench.run_engine(kinds),
        "adapters_mixed": lambda: bench.run_engine(houlsby),
        "peft_seq": bench.run_peft_seq,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one measured round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=None, help="a GPT-2-family checkpoint (hub id or directory)")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds (default 1 quick, 3 full)")
    ap.add_argument("--peft-adapters", type=int, default=None, help="adapters PEFT serves (2 quick, 4 full)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/adapters-DEVICE-DTYPE.json)"
    )
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    model, hf, label = prepare_model(args)
    bench = Bench(model, hf, args.peft_adapters or (2 if args.quick else 4))
    columns = columns_of(bench)
    columns["lora_mixed"]()  # warm-up: allocator, thread pools, lazy inits
    results: dict[str, list[float]] = {k: [] for k in columns}
    for _ in range(rounds):
        for name, fn in columns.items():
            results[name].append(fn())
    tok_s = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nadapter benchmark: {label}, {args.device}, {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"workload: {BATCH} requests x {INPUT} input tokens -> {NEW} new tokens; {ADAPTERS} LoRA adapters of"
        f" rank {RANK} on all four modules; median of {rounds} round(s); peft_seq over"
        f" {bench.peft_count} adapters x 2 requests\n"
    )
    print(f"{'column':<16}{'tok/s':>10}{'of base':>10}")
    for name, v in tok_s.items():
        print(f"{name:<16}{v:>10.1f}{v / tok_s['base']:>10.2f}")
    ratios = {
        "lora_mixed/base": tok_s["lora_mixed"] / tok_s["base"],
        "lora_mixed/peft_seq": tok_s["lora_mixed"] / tok_s["peft_seq"],
        "mixed_kinds/base": tok_s["mixed_kinds"] / tok_s["base"],
    }
    print(f"\n{'ratio':<22}{'measured':>10}{'target':>10}")
    for name, v in ratios.items():
        print(f"{name:<22}{v:>10.2f}{'>= ' + str(TARGETS[name]):>10}")
    record = {
        "lora_mixed_tok_s": round(tok_s["lora_mixed"], 1),
        "base_tok_s": round(tok_s["base"], 1),
        "peft_seq_tok_s": round(tok_s["peft_seq"], 1),
        "mixed_kinds_tok_s": round(tok_s["mixed_kinds"], 1),
        "adapters_mixed_tok_s": round(tok_s["adapters_mixed"], 1),
        **{k.replace("/", "_over_"): round(v, 3) for k, v in ratios.items()},
        "rounds": rounds,
        "device": args.device,
        "dtype": args.dtype,
        "model": label,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    out = Path(args.out) if args.out else RESULTS / f"adapters-{args.device}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
