"""Scheduler unit tests: no model, no tensors; outputs are faked (as vLLM's tests/v1/core does)."""

from __future__ import annotations

import pytest

from prefixserve.engine import FinishReason, SamplingParams, Scheduler, SchedulerConfig
from prefixserve.engine.request import Request
from prefixserve.engine.sequence import Sequence

EOS = 0


def seq(
    rid: str, prompt: int = 4, max_new: int = 3, prefix: str | None = None, eos: int | None = EOS
) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new)
    return Sequence(Request(rid, [5] * prompt, params, prefix_id=prefix), eos)


def make(max_running: int = 4, budget: int = 64, ready: set[str] | None = None) -> Scheduler:
    ready = ready if ready is not None else set()
    return Scheduler(SchedulerConfig(max_running, budget), lambda pid: pid in ready)


def run_step(s: Scheduler, token: int = 7, tokens: dict[str, int] | None = None):
    """One cycle with fake outputs: every sampling row produces `token` (or its entry in tokens)."""
    plan = s.schedule()
    sampled = {c.request_id: (tokens or {}).get(c.request_id, token) for c in plan.chunks if c.sample}
    return plan, s.update(sampled)


def test_config_rejects_budget_below_running():
    with pytest.raises(ValueError, match=r"max_tokens_per_step \(3\) must be >= max_running \(4\)"):
        SchedulerConfig(max_running=4, max_tokens_per_step=3)
    with pytest.raises(ValueError, match="max_running must be >= 1"):
        SchedulerConfig(max_running=0, max_tokens_per_step=3)


def test_admission_limited_by_running_slots():
    s = make(max_running=2)
    for r in "abc":
        s.add(seq(r))
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    assert all(c.first and c.sample and c.start == 0 and c.num_tokens == 4 for c in plan.chunks)
    assert (s.num_running, s.num_waiting) == (2, 1)


def test_decode_rows_take_one_token_and_join_mid_flight():
    s = make(max_running=4)
    s.add(seq("a", prompt=5))
    run_step(s)
    s.add(seq("b", prompt=3))
    plan, _ = run_step(s)
    chunks = {c.request_id: c for c in plan.chunks}
    assert (chunks["a"].start, chunks["a"].num_tokens, chunks["a"].first) == (5, 1, False)
    assert (chunks["b"].start, chunks["b"].num_tokens, chunks["b"].first) == (0, 3, True)
    assert plan.num_tokens == 4


def test_token_budget_chunks_prefill_and_decode_comes_first():
    s = make(max_running=4, budget=6)
    s.add(seq("a", prompt=2, max_new=10))
    run_step(s)  # a prefilled, one token sampled
    s.add(seq("b", prompt=12))
    plan, _ = run_step(s)
    assert [(c.request_id, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [
        ("a", 2, 1, True),
        ("b", 0, 5, False),  # the rest of the budget; no token sampled mid-prompt
    ]
    plan, _ = run_step(s)
    assert [(c.request_id, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [
        ("a", 3, 1, True),
        ("b", 5, 5, False),
    ]
    plan, _ = run_step(s)
    assert [(c.request_id, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [
        ("a", 4, 1, True),
        ("b", 10, 2, True),  # prompt done: samples its first token
    ]
    assert all(c.num_tokens <= 6 for c in plan.chunks) and plan.num_tokens <= 6


def test_fifo_head_gets_budget_before_later_requests():
    """A long prompt at the head is not overtaken by short ones behind it (no starvation)."""
    s = make(max_running=4, budget=8)
    s.add(seq("long", prompt=20))
    s.add(seq("short", prompt=2))
    plan, _ = run_step(s)
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("long", 8)]
    plan, _ = run_step(s)
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("long", 8)]
    plan, _ = run_step(s)
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("long", 4), ("short", 2)]


def test_waiting_prefix_does_not_block_others_and_keeps_its_place():
    ready: set[str] = set()
    s = make(max_running=2, ready=ready)
    s.add(seq("slow", prefix="cold"))
    s.add(seq("x"))
    s.add(seq("y", prefix="warm"))
    ready.add("warm")
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["x", "y"]
    assert s.get("slow").status.value == "waiting"
    s.add(seq("z"))
    ready.add("cold")
    run_step(s, tokens={"x": EOS})  # x finishes: one slot opens
    plan, _ = run_step(s)
    admitted = [c.request_id for c in plan.chunks if c.first]
    assert admitted == ["slow"]  # arrived before z, so it gets the slot first


def test_finish_reasons_length_and_eos():
    s = make()
    s.add(seq("len", max_new=2))
    s.add(seq("eos", max_new=5))
    s.add(seq("noeos", max_new=2, eos=None))
    _, fin = run_step(s, tokens={"eos": EOS, "noeos": EOS})
    assert fin == [type(fin[0])("eos", FinishReason.EOS)]
    _, fin = run_step(s, tokens={"noeos": EOS})
    assert {(f.request_id, f.reason) for f in fin} == {
        ("len", FinishReason.LENGTH),
        ("noeos", FinishReason.LENGTH),
    }
    assert not s.num_running and s.get("len") is None


def test_finished_rows_are_freed_by_the_next_plan():
    s = make()
    s.add(seq("a", max_new=1))
    s.add(seq("b", max_new=3))
    _, fin = run_step(s)
    assert [f.request_id for f in fin] == ["a"]
    plan, _ = run_step(s)
    assert plan.freed == ["a"]
    assert [c.request_id for c in plan.chunks] == ["b"]
    plan, _ = run_step(s)
    assert plan.freed == []


def test_cancel_running_frees_slot_next_step_and_cancel_waiting_needs_no_slot():
    s = make(max_running=1)
    s.add(seq("run", max_new=50))
    s.add(seq("wait"))
    run_step(s)
    assert s.finish("wait", FinishReason.CANCELLED)
    assert s.finish("run", FinishReason.CANCELLED)
    assert not s.finish("run", FinishReason.CANCELLED)  # already gone
    plan, fin = run_step(s)
    assert plan.freed == ["run"] and plan.chunks == [] and fin == []
    assert not s.has_work


def test_cancel_between_schedule_and_update_is_ignored_by_update():
    s = make()
    s.add(seq("a"))
    s.add(seq("b"))
    plan = s.schedule()
    s.finish("a", FinishReason.STOP)
    fin = s.update({c.request_id: 7 for c in plan.chunks})
    assert fin == [] and s.get("a") is None and s.get("b").num_computed == 4


def test_update_without_schedule_is_an_error_and_duplicate_ids_are_rejected():
    s = make()
    with pytest.raises(RuntimeError, match="without a schedule"):
        s.update({})
    s.add(seq("a"))
    with pytest.raises(ValueError, match="already scheduled"):
        s.add(seq("a"))


def test_many_requests_all_finish_in_arrival_order_of_admission():
    s = make(max_running=3, budget=8)
    for i in range(10):
        s.add(seq(f"r{i}", prompt=3, max_new=2))
    admitted: list[str] = []
    finished: list[str] = []
    for _ in range(100):
        if not s.has_work:
            break
        plan, fin = run_step(s)
        admitted += [c.request_id for c in plan.chunks if c.first]
        finished += [f.request_id for f in fin]
        assert s.num_running <= 3 and plan.num_tokens <= 8
    assert admitted == [f"r{i}" for i in range(10)]
    assert sorted(finished) == sorted(admitted)


# ---- memory: KV blocks -------------------------------------------------------------------------


def make_paged(blocks: int, block_size: int = 4, max_running: int = 8, budget: int = 64) -> Scheduler:
    """A scheduler over `blocks` usable KV blocks (plus the null block), no watermark."""
    return Scheduler(SchedulerConfig(max_running, budget, blocks + 1, block_size), lambda pid: True)


def test_allocator_reuses_freed_blocks_then_fresh_ones_never_past_the_pool():
    from prefixserve.engine.blocks import BlockAllocator

    a = BlockAllocator(num_blocks=11, block_size=16)  # blocks 1..10
    first = a.allocate(7)
    a.free(first)
    second = a.allocate(8)  # the 7 freed ones and one fresh
    assert sorted(second) == list(range(1, 9)) and a.num_free == 2
    assert sorted(a.allocate(2)) == [9, 10] and a.num_free == 0
    a.free(second)
    with pytest.raises(RuntimeError, match="never handed out"):
        a.free([11])


def drain(s: Scheduler) -> None:
    while s.has_work:
        run_step(s)


def test_admission_is_by_free_blocks_not_by_rows():
    s = make_paged(blocks=5, block_size=4)
    for r, prompt in (("a", 8), ("b", 8), ("c", 8)):  # two blocks each
        s.add(seq(r, prompt=prompt, max_new=2))
    plan, _ = run_step(s)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]  # c would need 2 of the 1 left
    assert [len(c.blocks) for c in plan.chunks] == [2, 2] and s.blocks.num_free == 1
    assert (s.num_running, s.num_waiting) == (2, 1)


def test_rows_grow_block_by_block_and_return_them_when_done():
    s = make_paged(blocks=10, block_size=4)
    s.add(seq("a", prompt=3, max_new=6, eos=None))
    plan, _ = run_step(s)
    assert plan.chunks[0].blocks == s.get("a").blocks and len(s.get("a").blocks) == 1
    run_step(s)  # token 4 (index 3) still fits the first block
    assert len(s.get("a").blocks) == 1
    run_step(s)  # index 4: a second block
    assert len(s.get("a").blocks) == 2
    drain(s)
    assert s.blocks.num_free == 10


def test_out_of_blocks_preempts_the_newest_row_which_recomputes_later():
    s = make_paged(blocks=4, block_size=4, budget=64)
    s.add(seq("old", prompt=4, max_new=8, eos=None))
    s.add(seq("new", prompt=4, max_new=8, eos=None))
    run_step(s)  # both prefilled (4 tokens: one block each), one token sampled each
    for _ in range(4):  # decode tokens 4..7: each row holds 2 blocks, none left
        run_step(s)
    assert s.blocks.num_free == 0 and s.get("old").num_computed == 8
    plan, _ = run_step(s)  # "old" needs a third block for token 8: "new" (the newest) is preempted
    assert plan.preempted == ["new"] and [c.request_id for c in plan.chunks] == ["old"]
    new = s.get("new")
    assert (new.num_computed, new.blocks, s.num_waiting, s.num_preemptions) == (0, [], 1, 1)
    generated = new.num_generated
    while s.get("old") is not None:
        run_step(s)
    plan, _ = run_step(s)  # memory is back: "new" recomputes prompt + output so far, then samples
    (chunk,) = plan.chunks
    assert (chunk.request_id, chunk.first, chunk.start, chunk.num_tokens, chunk.sample) == (
        "new",
        True,
        0,
        4 + generated,
        True,
    )
    assert s.get("new").num_generated == generated + 1  # exactly one new token for that step
    drain(s)
    assert s.blocks.num_free == 4


def test_a_row_preempts_itself_when_it_is_the_newest():
    s = make_paged(blocks=3, block_size=2, budget=64)
    s.add(seq("a", prompt=3, max_new=10, eos=None))
    s.add(seq("b", prompt=2, max_new=10, eos=None))
    run_step(s)  # a: 2 blocks (room for one more token), b: 1 full block; none free
    plan, _ = run_step(s)  # b needs a block and is itself the newest: it steps back, a runs on
    assert plan.preempted == ["b"] and [c.request_id for c in plan.chunks] == ["a"]
    assert s.get("b").num_computed == 0 and s.blocks.num_free == 1


def test_block_accounting_after_thousands_of_requests_with_cancels_and_preemptions():
    import random

    rng = random.Random(0)
    s = make_paged(blocks=40, block_size=4, max_running=12, budget=48)
    added = 0
    step = 0
    while added < 2000 or s.has_work:
        for _ in range(rng.randint(0, 3)):
            if added < 2000:
                s.add(seq(f"r{added}", prompt=rng.randint(1, 30), max_new=rng.randint(1, 20), eos=None))
                added += 1
        plan = s.schedule()
        sampled = {c.request_id: 7 for c in plan.chunks if c.sample}
        s.update(sampled)
        for r in s.running():  # every running row's table covers what it has computed
            assert len(r.blocks) * 4 >= r.num_computed
        tables = [b for r in s.running() for b in r.blocks]
        assert len(set(tables)) == len(tables) and all(0 < b <= 40 for b in tables)  # owned once, real
        held = len(tables)
        assert held + s.blocks.num_free == 40, f"step {step}: {held} held + {s.blocks.num_free} free != 40"
        if step % 7 == 0 and s.num_running:  # cancel one (running or waiting)
            victim = rng.choice(s.running() + s.waiting())
            s.finish(victim.request_id, FinishReason.CANCELLED)
        step += 1
    assert s.blocks.num_free == 40 and s.num_preemptions > 0
