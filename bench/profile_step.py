"""Where one engine step's time goes: host phases and the operators of one decode step.

    python bench/profile_step.py [--device cpu|cuda] [--dtype float32] [--batch 64] [--steps 20]

A GPT-2-small-dims model with random weights; `batch` rows with distinct 10-token prefixes (resident
in the store's device pool, so in the KV blocks, as the server has them), 32 input tokens each, all
decoding. Each phase of `EngineCore.step` is timed by wall clock (host time: on CUDA
the forward phase is the time to launch its kernels, and `readback` is the wait for the device to
finish the step), averaged over `steps` decode steps, for each graph setting the device has (CUDA:
piecewise graphs off and on; CPU: off). Then `torch.profiler` lists the costliest operators of one
step. The last line printed is one JSON object: step_ms and the phases per setting.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import GPT2_SMALL, engine_with_prefixes, padded_tokens
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.model import load_model
from prefixserve.tiny import write_tiny_model

PHASES = (  # (object attribute path, label)
    ("scheduler.schedule", "schedule"),
    ("_admit", "admit rows"),
    ("runner._prepare", "step inputs (build + upload)"),
    ("runner.execute", "forward (incl. inputs)"),
    ("readback.wait", "readback wait"),
    ("_sample", "sample"),
    ("scheduler.update", "scheduler update"),
    ("_emit", "emit outputs"),
)


def timed(engine: EngineCore, totals: collections.Counter) -> None:
    """Wrap each phase's method on this engine instance to add its wall time to `totals`."""
    for path, label in PHASES:
        *owner_path, name = path.split(".")
        owner = engine
        for part in owner_path:
            owner = getattr(owner, part)
        fn = getattr(owner, name)

        def wrapper(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_label] += time.perf_counter() - t

        setattr(owner, name, wrapper)


def decoding_engine(model, batch: int, graphs: bool) -> EngineCore:
    config = EngineConfig(
        max_running=batch,
        max_waiting=batch,
        max_seq_len=256,
        kv_cache_tokens=batch * 256 + padded_tokens(batch, 10),
        cuda_graphs=graphs,
    )
    g = torch.Generator().manual_seed(0)
    states = {f"p{i}": torch.randn(model.spec.prefix_shape(10), generator=g) * 0.5 for i in range(batch)}
    engine = engine_with_prefixes(model, config, states)  # in the store's device pool, as the server has them
    prompts = torch.randint(0, model.spec.vocab_size, (batch, 32), generator=g).tolist()
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, prefix_id=f"p{i}")
    while engine.scheduler.num_running < batch or any(
        s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running()
    ):
        engine.step()
    for _ in range(3):  # warm: every decode bucket made
        engine.step()
    return engine


def measure(engine: EngineCore, steps: int) -> dict:
    totals: collections.Counter = collections.Counter()
    timed(engine, totals)
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    step_ms = (time.perf_counter() - t0) / steps * 1000
    phases = {label: round(totals[label] / steps * 1000, 3) for _, label in PHASES}
    return {"step_ms": round(step_ms, 3), "phases_ms": phases}


def operator_table(engine: EngineCore, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if engine.model.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        engine.step()
    key = "self_cuda_time_total" if engine.model.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    path = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-gpt2-small-")), GPT2_SMALL)
    model = load_model(path, dtype=args.dtype, device=args.device)
    settings = [False, True] if model.device.type == "cuda" else [False]
    results: dict[str, dict] = {}
    last = None
    for graphs in settings:
        last = decoding_engine(model, args.batch, graphs)
        results["graphs" if graphs else "eager"] = measure(last, args.steps)
    labels = [label for _, label in PHASES]
    print(f"one decode step, bs {args.batch}, {args.device} {args.dtype} (ms, host wall time per step)")
    print(f"{'phase':32s}" + "".join(f"{name:>12s}" for name in results))
    for label in labels:
        print(f"{label:32s}" + "".join(f"{r['phases_ms'][label]:12.2f}" for r in results.values()))
    print(f"{'whole step':32s}" + "".join(f"{r['step_ms']:12.2f}" for r in results.values()))
    print()
    print(operator_table(last))
    print(json.dumps({"device": args.device, "dtype": args.dtype, "batch": args.batch, **results}))


if __name__ == "__main__":
    main()
