"""Piecewise graphs (graphs.py): each layer's dense part on bucketed static buffers, attention eager.

On the CPU the pieces run without capture on the same buffers, so the bucketing and padding are checked
here; on CUDA they are captured graphs, compared with the eager engine and with the CPU. Through the
capture seam, a stand-in for CUDA graphs (`RecordingCapture`: records a piece's operations once,
replays them, and refuses a host synchronisation inside a piece, as a CUDA capture does) runs the
engine's real pieces on the CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.engine.graphs import BUCKETS, PiecewiseGraphs
from prefixserve.model import load_model

from .helpers import PROMPTS, collect, make_ntk, make_prefixes

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


# ---- a stand-in for CUDA graph capture ----------------------------------------------------------
aten = torch.ops.aten
# operators that make the host wait for the device's numbers: inside a CUDA capture each one fails (or
# would bake one step's values into every replay)
HOST_SYNCS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}


class HostSyncInCapture(RuntimeError):
    pass


class _Recorder(TorchDispatchMode):
    """Runs a piece's operators, recording each call; refuses host synchronisations."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, tuple, dict, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNCS:
            raise HostSyncInCapture(f"host synchronisation inside a captured piece: {func}")
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class RecordingCapture:
    """The `Capture` seam's stand-in for CUDA graphs on the CPU: `piece(fn)` runs fn once under a
    recorder and returns a replay that runs the recorded operators again, on the same static buffers and
    weights, with each intermediate tensor replaced by its fresh value: what fn's Python does around its
    operators (branches, host reads) is not replayed, as in a CUDA graph."""

    captures = True

    def __init__(self) -> None:
        self.pieces = 0
        self.replays = 0

    def piece(self, fn: Callable[[], None]) -> Callable[[], None]:
        recorder = _Recorder()
        with recorder:
            fn()
        calls = recorder.calls
        self.pieces += 1

        def replay() -> None:
            fresh: dict[int, torch.Tensor] = {}  # id(recorded intermediate) -> its value in this replay
            swap = lambda t: fresh.get(id(t), t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            for func, args, kwargs, out in calls:
                new = func(*tree_map(swap, args), **tree_map(swap, kwargs))
                for old, value in zip(tree_flatten(out)[0], tree_flatten(new)[0], strict=True):
                    if isinstance(old, torch.Tensor):
                        fresh[id(old)] = value
            self.replays += 1

        return replay


def with_capture(engine: EngineCore, capture, post=None) -> EngineCore:
    """The engine's graphs made anew through `capture` (and with `post` in place of the runner's own
    dense piece after attention, when given)."""
    r = engine.runner
    spec, max_tokens = r.spec, engine.scheduler.config.max_tokens_per_step
    widths = (spec.n_embd, spec.qkv_width, spec.q_width)
    r.graphs = PiecewiseGraphs(spec.n_layer, widths, r.f.pre, post or r.f.post, r.kv, capture, max_tokens)
    return engine


def test_recorded_pieces_replay_the_engines_steps_exactly(tiny_model):
    prefixes = prefixes_for(tiny_model)
    eager = run(EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True)), prefixes)
    capture = RecordingCapture()
    engine = with_capture(
        EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True, cuda_graphs=True)), capture
    )
    assert_same(run(engine, prefixes), eager, 1e-5)
    assert engine.runner.graphs.mode == "graphs" and engine.stats().cuda_graphs == "graphs"
    assert engine.stats().decode_kernel == "c"  # the CPU's in-place kernel between the pieces
    layers = tiny_model.spec.n_layer
    assert capture.pieces == 2 * layers * len(engine.runner.graphs.captured)
    assert capture.replays > 2 * layers * 10  # every step replayed its pieces


def test_a_host_sync_inside_a_piece_fails_the_capture_and_is_reported(tiny_model, caplog):
    prefixes = prefixes_for(tiny_model)
    eager = run(EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True)), prefixes)
    engine = EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True, cuda_graphs=True))
    post = engine.runner.f.post

    def post_with_a_sync(layer, x, attn):
        if bool(attn.sum() > 0):  # a host read of a device value, as a careless edit would add
            pass
        post(layer, x, attn)

    with_capture(engine, RecordingCapture(), post=post_with_a_sync)
    with caplog.at_level(logging.ERROR, logger="prefixserve.engine.graphs"):
        got = run(engine, prefixes)
    assert_same(got, eager, 1e-5)  # served eagerly, not wrongly
    graphs = engine.runner.graphs
    assert graphs.mode == "failed" and "host synchronisation inside a captured piece" in graphs.failure
    assert engine.stats().cuda_graphs == "failed"
    assert "capturing the" in caplog.text


def test_steps_use_the_smallest_bucket_and_larger_ones_run_eagerly(tiny_model):
    prefixes = prefixes_for(tiny_model)
    eager = run(EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True)), prefixes)
    # a 24-token budget: prompts longer than that are prefilled in chunks, every step fits a bucket
    engine = EngineCore(
        tiny_model, EngineConfig(max_running=8, max_tokens_per_step=24, record_logits=True, cuda_graphs=True)
    )
    assert engine.runner.graphs.sizes == [b for b in BUCKETS if b <= 24]
    assert engine.stats().cuda_graphs == "eager"  # the pieces, uncaptured: the CPU has no graphs
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
