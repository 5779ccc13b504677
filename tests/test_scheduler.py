"""Scheduler unit tests: no model, no tensors; outputs are faked (as vLLM's tests/v1/core does)."""

from __future__ import annotations

import pytest

from prefixserve.engine import FinishReason, Scheduler, SchedulerConfig
from prefixserve.engine.scheduler import Sequence

EOS = 0


def seq(
    rid: str, prompt: int = 4, max_new: int = 3, prefix: str | None = None, eos: int | None = EOS
) -> Sequence:
    return Sequence(rid, prefix, prompt, max_new, eos)


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
