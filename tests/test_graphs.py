"""Piecewise graphs (graphs.py): each layer's dense part on bucketed static buffers, attention eager.

On the CPU the pieces run without capture on the same buffers, so the bucketing and padding are checked
here; on CUDA they are captured graphs, compared with the eager engine and with the CPU."""

from __future__ import annotations

import pytest
import torch

from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.engine.graphs import BUCKETS
from prefixserve.model import load_model

from .test_engine_reference import PROMPTS, collect, make_prefixes
from .test_ntk import make_ntk

MIX = [("p3", 12), (None, 9), ("n1", 15), ("p9", 10), ("p3", 6)]


def run(engine: EngineCore, prefixes: dict, mix=MIX) -> dict[str, tuple[list[int], list[torch.Tensor]]]:
    for pid, state in prefixes.items():
        engine.prefixes.register(pid, state)
    for i, (pid, new) in enumerate(mix):
        engine.add_request(
            PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=new), prefix_id=pid, request_id=f"r{i}"
        )
    return {rid: collect(outs)[:2] for rid, outs in engine.run_to_completion().items()}


def prefixes_for(model) -> dict:
    return {**make_prefixes(model, [3, 9]), "n1": make_ntk(model, 1)}


def assert_same(got: dict, expected: dict, tol: float) -> None:
    assert got.keys() == expected.keys()
    for rid, (tokens, logits) in expected.items():
        assert got[rid][0] == tokens, rid
        for a, b in zip(got[rid][1], logits, strict=True):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=tol, atol=tol)


def test_steps_use_the_smallest_bucket_and_larger_ones_run_eagerly(tiny_model):
    prefixes = prefixes_for(tiny_model)
    eager = run(EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True)), prefixes)
    # a 24-token budget: prompts longer than that are prefilled in chunks, every step fits a bucket
    engine = EngineCore(
        tiny_model, EngineConfig(max_running=8, max_tokens_per_step=24, record_logits=True, cuda_graphs=True)
    )
    assert engine.runner.graphs.sizes == [b for b in BUCKETS if b <= 24]
    assert_same(run(engine, prefixes), eager, 1e-5)
    made = engine.runner.graphs.captured
    assert 8 in made and 24 in made  # decode steps of 5 rows; full prefill chunks
    assert engine.runner.graphs.bucket(25) is None  # past the largest: that step runs eagerly


def test_padding_rows_are_never_read(tiny_model):
    """NaN in every bucket buffer before each step (the rows past a step's tokens keep it): the outputs
    are those of the eager engine, and no row is ended as non-finite."""
    prefixes = prefixes_for(tiny_model)
    eager = run(EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True)), prefixes)
    engine = EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True, cuda_graphs=True))
    for pid, state in prefixes.items():
        engine.prefixes.register(pid, state)
    for i, (pid, new) in enumerate(MIX):
        engine.add_request(
            PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=new), prefix_id=pid, request_id=f"r{i}"
        )
    outs: dict[str, list] = {}
    for size in engine.runner.graphs.sizes:  # make every bucket now, then poison them
        engine.runner.graphs.bucket(size)
    while engine.has_work:
        for b in engine.runner.graphs._buckets.values():
            for buf in (b.x, b.qkv, b.attn):
                buf.fill_(float("nan"))
        for out in engine.step():
            assert out.error is None
            outs.setdefault(out.request_id, []).append(out)
    assert_same({rid: collect(o)[:2] for rid, o in outs.items()}, eager, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_match_eager_and_the_cpu(tiny_model_dir, tiny_model):
    cuda = load_model(tiny_model_dir, dtype="float32", device="cuda")
    prefixes = prefixes_for(tiny_model)
    on_cpu = run(EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True)), prefixes)
    eager = run(
        EngineCore(cuda, EngineConfig(max_running=8, record_logits=True, cuda_graphs=False)), prefixes
    )
    engine = EngineCore(cuda, EngineConfig(max_running=8, record_logits=True))  # graphs: on by default
    assert engine.runner.graphs is not None
    graphed = run(engine, prefixes)
    assert engine.runner.graphs.captured  # replayed, not eager
    assert_same(graphed, eager, 1e-4)
    assert_same(graphed, on_cpu, 1e-3)
