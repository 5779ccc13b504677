"""A step's inputs staged in one persistent buffer (one upload), its results read back in one transfer,
and a step split in two (launch, then finish) with requests taken in between."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefix_store.staging import Readback, StepInputs
from prefixserve.engine import SamplingParams

from .helpers import PROMPTS, collect, make_ntk, make_prefixes
from .test_paged_engine import GREEDY, SEEDED, engine_with, run_mix


def test_staged_inputs_keep_their_values_dtypes_and_alignment():
    inputs = StepInputs(torch.device("cpu"), capacity=256)
    inputs.begin()
    a = inputs.put([1, 2, 3], torch.int32)
    b = inputs.put([True, False, True], torch.bool)
    c = inputs.put(np.arange(4))  # int64
    d = inputs.put2d([[5, 6], [7, 8]])
    assert a.tolist() == [1, 2, 3] and a.dtype == torch.int32
    assert b.tolist() == [True, False, True] and b.dtype == torch.bool
    assert c.tolist() == [0, 1, 2, 3] and c.dtype == torch.int64
    assert d.tolist() == [[5, 6], [7, 8]]
    assert all(t.data_ptr() % 8 == 0 for t in (a, b, c, d))  # each starts on an 8-byte boundary
    assert inputs.uploads == 0  # on the CPU the host buffer is what the step reads: nothing is copied


def test_inputs_that_do_not_fit_get_their_own_tensor_and_the_buffer_grows():
    inputs = StepInputs(torch.device("cpu"), capacity=32)
    inputs.begin()
    small = inputs.put([1, 2])  # 16 bytes: fits
    big = inputs.put(list(range(10)))  # 80 bytes: does not
    assert small.tolist() == [1, 2] and big.tolist() == list(range(10))
    assert inputs.capacity == 32
    inputs.begin()
    assert inputs.capacity >= 2 * (16 + 80)
    assert inputs.put(list(range(10))).tolist() == list(range(10))


def test_a_tiny_staging_buffer_changes_no_token(tiny_model):
    """Every step overflowing the staging buffer (inputs in separate tensors) gives the same tokens."""
    prefixes = {**make_prefixes(tiny_model, [3, 9]), "n1": make_ntk(tiny_model, 1)}
    mix = [("p3", GREEDY), (None, GREEDY), ("n1", SEEDED), ("p9", GREEDY), ("n1", GREEDY), ("p3", SEEDED)]
    expected = run_mix(engine_with(tiny_model, prefixes, max_running=8), mix)
    for kernel in (True, False):
        engine = engine_with(tiny_model, prefixes, max_running=8, paged_kernel=kernel)
        for i, (pid, params) in enumerate(mix):
            engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid, request_id=f"r{i}")
        got: dict[str, list] = {}
        while engine.has_work:
            engine.runner.inputs = StepInputs(torch.device("cpu"), capacity=8)  # never grown
            for out in engine.step():
                got.setdefault(out.request_id, []).append(out)
        assert {rid: collect(outs)[0] for rid, outs in got.items()} == expected


def test_readback_concatenates_flags_and_picks():
    back = Readback(torch.device("cpu"))
    back.start(torch.tensor([True, False]), torch.tensor([7, 9, 11]))
    assert back.wait() == [1, 0, 7, 9, 11]
    assert back.wait() == []  # read once


def test_requests_taken_in_between_launch_and_finish(tiny_model):
    """An abort and an add between a step's launch and its finish: the aborted row emits nothing more,
    the other rows' tokens are those of an undisturbed run, and every KV block comes back."""
    prefixes = make_prefixes(tiny_model, [3, 9])
    mix = [("p3", GREEDY), (None, SEEDED), ("p9", GREEDY), (None, GREEDY)]
    expected = run_mix(engine_with(tiny_model, prefixes, max_running=8), mix)

    engine = engine_with(tiny_model, prefixes, max_running=8)
    for i, (pid, params) in enumerate(mix):
        engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid, request_id=f"r{i}")
    got: dict[str, list] = {}
    for out in engine.step() + engine.step():
        got.setdefault(out.request_id, []).append(out)
    launched = engine.launch()
    assert engine.abort("r1")  # running, its step in flight
    late = SamplingParams(max_new_tokens=5, ignore_eos=True)
    engine.add_request(PROMPTS[0], late, prefix_id="p9", request_id="late")
    finished = engine.finish(launched)
    assert "r1" not in {o.request_id for o in finished}  # its row ran, but it is gone
    for out in finished:
        got.setdefault(out.request_id, []).append(out)
    for rid, outs in engine.run_to_completion().items():
        got.setdefault(rid, []).extend(outs)
    tokens = {rid: collect(outs)[0] for rid, outs in got.items()}
    for rid in ("r0", "r2", "r3"):
        assert tokens[rid] == expected[rid]
    assert len(tokens["r1"]) < len(expected["r1"]) and not got["r1"][-1].finished
    assert len(tokens["late"]) == 5
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.capacity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_step_is_one_upload():
    inputs = StepInputs(torch.device("cuda"), capacity=1 << 10)
    inputs.begin()
    a, b = inputs.put([1, 2, 3]), inputs.put2d([[True], [False]], torch.bool)
    inputs.upload()
    assert inputs.uploads == 1 and a.is_cuda and a.tolist() == [1, 2, 3] and b.tolist() == [[True], [False]]
    back = Readback(torch.device("cuda"))
    back.start(a, b.flatten())
    assert back.wait() == [1, 2, 3, 1, 0]
