"""Tenant fairness in the scheduler (Virtual Token Counters) and in the engine's bounded queue.

The scheduler tests drive it with fake outputs (no model, no tensors), as tests/test_scheduler.py does;
the queue tests run the real engine core on the tiny model.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from prefixserve.engine import (
    EngineConfig,
    EngineCore,
    FinishReason,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
)
from prefixserve.engine.request import Request, Tenancy
from prefixserve.engine.sequence import Sequence
from prefixserve.errors import EngineOverloaded, QuotaExceeded

EOS = 0


def seq(rid: str, tenant: str, prompt: int = 4, max_new: int = 8, weight: float = 1.0) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new)
    return Sequence(Request(rid, [5] * prompt, params, tenancy=Tenancy(tenant, weight)), None)


def make(max_running: int = 4, budget: int = 64, blocks: int | None = None, block_size: int = 4) -> Scheduler:
    num_blocks = 1 << 40 if blocks is None else blocks + 1
    return Scheduler(SchedulerConfig(max_running, budget, num_blocks, block_size), lambda pid: True)


def step(s: Scheduler):
    plan = s.schedule()
    return plan, s.update({c.request_id: 7 for c in plan.chunks if c.sample})


def test_a_light_tenant_is_admitted_at_the_next_step_with_300_of_another_waiting():
    s = make(max_running=4)
    for i in range(304):
        s.add(seq(f"h{i}", "heavy", max_new=50))
    for _ in range(3):
        step(s)
    assert s.num_running == 4 and s.num_waiting == 300  # the flood fills the batch and the queue
    s.add(seq("light", "light", max_new=16))
    plan, _ = step(s)
    admitted = [c.request_id for c in plan.chunks if c.first]
    assert admitted == ["light"]  # at once, ahead of 300 earlier requests
    assert plan.preempted == ["h3"]  # the newest row of the tenant above its share stepped back for it
    h3 = s.get("h3")
    assert h3.num_preemptions == 1 and s.num_running == 4
    assert h3.num_computed == 6 and len(h3.blocks) == 2  # paused: it keeps its KV (and the block it grew)
    while s.get("light") is not None:
        step(s)
    plan, _ = step(s)  # light is done: h3 goes on where it stopped (one token, not a recompute)
    chunk = next(c for c in plan.chunks if c.request_id == "h3")
    assert (chunk.first, chunk.start, chunk.num_tokens) == (False, 6, 1)


def test_light_requests_keep_going_first_while_their_tenant_is_below_its_share():
    s = make(max_running=16)  # the light tenant's share is 8 places; it asks for 4 at a time
    for i in range(300):
        s.add(seq(f"h{i}", "heavy", max_new=64))
    for _ in range(5):
        step(s)
    waits = []
    for round_ in range(20):  # the light tenant sends 4 at a time, the next 4 when those are done
        ids = [f"l{round_}-{j}" for j in range(4)]
        for rid in ids:
            s.add(seq(rid, "light", max_new=16))
        started: dict[str, int] = {}
        n = 0
        while any(s.get(r) is not None for r in ids):
            plan, _ = step(s)
            n += 1
            for c in plan.chunks:
                if c.first and c.request_id in ids:
                    started.setdefault(c.request_id, n)
        waits += started.values()
    assert max(waits) == 1  # every light request starts in the first step after it arrives


def test_a_floods_prompt_chunks_do_not_hold_back_another_tenants_prompt():
    s = make(max_running=8, budget=32)
    for i in range(4):
        s.add(seq(f"h{i}", "heavy", prompt=400, max_new=4))  # long prompts, prefilled in chunks
    step(s)
    assert all(s.get(f"h{i}").num_computed < 400 for i in range(4))  # still prefilling
    s.add(seq("light", "light", prompt=12, max_new=4))
    plan, _ = step(s)
    light = next(c for c in plan.chunks if c.request_id == "light")
    assert (light.first, light.num_tokens, light.sample) == (True, 12, True)  # whole prompt, first token
    assert plan.num_tokens == 32  # the rest of the budget still goes to heavy's prompts


def test_a_step_with_a_light_prompt_carries_no_prompt_of_a_tenant_above_its_share():
    s = make(max_running=12, budget=64)  # room for all: no row gives its place
    for i in range(7):
        s.add(seq(f"d{i}", "heavy", prompt=4, max_new=50))  # decoding rows
    step(s)
    s.add(seq("p", "heavy", prompt=300, max_new=4))  # a long prompt, prefilled in chunks
    step(s)
    assert s.num_running == 8 and 0 < s.get("p").num_computed < 300
    s.add(seq("light", "light", prompt=12, max_new=4))  # heavy holds 8 places, its share is 6
    plan, _ = step(s)
    chunks = {c.request_id: c for c in plan.chunks}
    assert chunks["light"].first and chunks["light"].num_tokens == 12
    heavy = [c for rid, c in chunks.items() if rid != "light"]
    assert heavy and all(c.num_tokens == 1 for c in heavy)  # heavy's decoding rows only: no prompt chunk
    plan, _ = step(s)  # the next step gives heavy's prompt the budget again
    assert next(c for c in plan.chunks if c.request_id == "p").num_tokens > 1
    assert plan.num_tokens == 64


def test_a_tenant_above_its_share_gets_a_bounded_prompt_per_step_only_while_another_has_work():
    config = SchedulerConfig(max_running=12, max_tokens_per_step=64, crowded_prompt_tokens=16)
    s = Scheduler(config, lambda pid: True)
    for i in range(7):
        s.add(seq(f"d{i}", "heavy", prompt=4, max_new=50))
    step(s)
    s.add(seq("p", "heavy", prompt=300, max_new=4))
    plan, _ = step(s)  # heavy alone: the whole budget
    assert next(c for c in plan.chunks if c.request_id == "p").num_tokens == 64 - 7
    s.add(seq("light", "light", prompt=4, max_new=50))  # heavy: 8 rows, its share 6
    step(s)  # light's prompt: heavy's prompt waits
    for _ in range(3):  # light decodes: heavy's prompt goes on, 16 tokens a step
        plan, _ = step(s)
        assert next(c for c in plan.chunks if c.request_id == "p").num_tokens == 16
    assert plan.num_tokens == 7 + 1 + 16


def test_a_tenant_that_just_left_still_bounds_the_floods_prompt_for_a_few_steps():
    """A client's next request follows the end of its previous one: the step in progress when it comes
    is kept as short as while it was there."""
    config = SchedulerConfig(
        max_running=12, max_tokens_per_step=64, crowded_prompt_tokens=16, sharing_steps=2
    )
    s = Scheduler(config, lambda pid: True)
    for i in range(7):
        s.add(seq(f"d{i}", "heavy", prompt=4, max_new=50))
    step(s)
    s.add(seq("light", "light", prompt=4, max_new=1))
    step(s)  # light's only token: it has left
    assert s.get("light") is None
    s.add(seq("p", "heavy", prompt=300, max_new=4))
    sizes = [next(c for c in step(s)[0].chunks if c.request_id == "p").num_tokens for _ in range(3)]
    assert sizes == [16, 16, 64 - 7]  # two steps as if light were there, then heavy alone: the budget


def test_a_paused_row_gives_its_blocks_back_when_memory_runs_short():
    s = make(max_running=2, blocks=6, block_size=4)
    s.add(seq("h0", "heavy", prompt=4, max_new=20))
    s.add(seq("h1", "heavy", prompt=4, max_new=20))
    step(s)
    s.add(seq("light", "light", prompt=4, max_new=20))
    plan, _ = step(s)
    h1 = s.get("h1")
    assert plan.preempted == ["h1"] and len(h1.blocks) == 2  # paused, holding its blocks
    for _ in range(6):  # h0 and light grow until blocks run short: h1's are taken back first
        step(s)
    assert (h1.status.value, h1.blocks, h1.num_computed) == ("waiting", [], 0)
    assert s.get("h0").status.value == "running" and s.get("light").status.value == "running"
    while s.has_work:
        step(s)
    assert s.blocks.num_free == 6  # every block back


def test_paused_and_resumed_rows_give_the_tokens_they_give_alone(tiny_model):
    """Invariant 3 with fair places: a flood's row that gives its place and goes on later, and the light
    request that took it, produce exactly their greedy tokens run alone."""
    core = EngineCore(tiny_model, EngineConfig(max_running=2, max_waiting=8))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    inputs = {"h0": "name : Aromi", "h1": "name : Cotto | food", "light": "name : Wildwood"}
    for rid in ("h0", "h1"):
        core.add(core.prepare(inputs[rid], params, request_id=rid, tenancy=Tenancy("heavy")))
    got: dict[str, list[int]] = {rid: [] for rid in inputs}
    for _ in range(2):
        for out in core.step():
            got[out.request_id] += out.token_ids
    core.add(core.prepare(inputs["light"], params, request_id="light", tenancy=Tenancy("light")))
    for rid, outs in core.run_to_completion().items():
        got[rid] += [t for o in outs for t in o.token_ids]
    assert core.scheduler.num_preemptions == 1  # h1 paused for light
    for rid, text in inputs.items():
        alone = EngineCore(tiny_model)
        alone.add(alone.prepare(text, params, request_id=rid))
        want = [t for o in alone.run_to_completion()[rid] for t in o.token_ids]
        assert len(want) == 12 and got[rid] == want, rid


def service_shares(weights: dict[str, float], steps: int, seed: int = 0) -> tuple[dict[str, float], int]:
    """Every tenant keeps 40 requests of random lengths queued; the share of the service (prompt tokens
    computed once + 2 x tokens generated) each receives over `steps` steps after a warm-up, counted here
    from the plans, and the number of preemptions."""
    rng = random.Random(seed)
    s = make(max_running=16, budget=128)
    counted: dict[str, int] = {}  # prompt tokens of each request already counted (a recompute is not)
    service: Counter[str] = Counter()
    n = 0
    for i in range(steps + 500):
        for tenant, weight in weights.items():
            while s.in_flight(tenant) < 40:
                s.add(seq(f"{tenant}-{n}", tenant, rng.randint(2, 40), rng.randint(1, 60), weight))
                n += 1
        plan = s.schedule()
        for c in plan.chunks:
            tenant, prompt = c.request_id.split("-")[0], s.get(c.request_id).num_prompt_tokens
            new = max(0, min(c.start + c.num_tokens, prompt) - counted.get(c.request_id, 0))
            counted[c.request_id] = counted.get(c.request_id, 0) + new
            if i >= 500:
                service[tenant] += new + 2 * c.sample
        s.update({c.request_id: 7 for c in plan.chunks if c.sample})
    total = sum(service.values())
    return {t: service[t] / total for t in weights}, s.num_preemptions


def test_service_shares_match_weights_1_1_2_within_5_percent_over_10000_steps():
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    shares, preemptions = service_shares(weights, steps=10_000)
    want = {t: w / sum(weights.values()) for t, w in weights.items()}
    errors = {t: abs(shares[t] - want[t]) for t in weights}
    assert max(errors.values()) <= 0.05, (shares, want)
    assert preemptions < 10_000 * 0.05  # places change hands rarely once the shares are met


def test_one_tenant_alone_fills_the_batch_and_a_short_one_leaves_the_rest_to_the_other():
    s = make(max_running=8)
    for i in range(20):
        s.add(seq(f"a{i}", "a"))
    step(s)
    assert s.num_running == 8  # work-conserving: alone, it gets every place
    s2 = make(max_running=8)
    for i in range(3):
        s2.add(seq(f"b{i}", "b", max_new=100))
    for i in range(20):
        s2.add(seq(f"a{i}", "a", max_new=100))
    step(s2)
    running = Counter(r.tenant for r in s2.running())
    assert running == {"b": 3, "a": 5}  # b wants only 3 places; a takes every other one


def test_a_returning_tenant_is_lifted_to_the_active_minimum_and_banks_nothing():
    s = make(max_running=4)
    for i in range(100):
        s.add(seq(f"a{i}", "a", max_new=20))
    for _ in range(200):  # "a" alone for a long while
        step(s)
    a_counter = s.tenants.counter("a")
    assert a_counter > 1000
    s.add(seq("b0", "b", max_new=20))
    assert s.tenants.counter("b") == pytest.approx(a_counter)  # lifted, not starting from zero
    for i in range(1, 100):
        s.add(seq(f"b{i}", "b", max_new=20))
    for _ in range(20):
        step(s)
    # from here on the two share the batch: "b" does not take it over to spend a credit it never had
    counts: Counter[str] = Counter()
    for _ in range(200):
        plan, _ = step(s)
        counts.update(c.request_id[0] for c in plan.chunks if c.sample)
    assert abs(counts["a"] - counts["b"]) / sum(counts.values()) < 0.1, counts


def test_counters_are_dropped_when_every_tenant_is_idle():
    s = make()
    s.add(seq("a", "a", max_new=2))
    while s.has_work:
        step(s)
    assert s.tenants.counter("a") == 0.0 and not s.tenants.live


def test_out_of_memory_preempts_the_tenant_furthest_above_its_share_not_the_newest_row():
    s = make(max_running=8, blocks=6, block_size=4)
    for i in range(2):
        s.add(seq(f"h{i}", "heavy", prompt=4, max_new=20))
    step(s)  # heavy's two rows: one block each, and heavy has been served
    s.add(seq("light", "light", prompt=4, max_new=20))
    for _ in range(4):  # every row grows to two blocks: 6 of 6 held
        step(s)
    assert s.blocks.num_free == 0
    plan, _ = step(s)  # heavy's rows need a third block: memory runs out
    assert plan.preempted and all(r.startswith("h") for r in plan.preempted)  # never the light row
    assert s.get("light").status.value == "running"


def test_the_full_queue_is_shared_fairly():
    s = make(max_running=1)
    for i in range(6):
        s.add(seq(f"h{i}", "heavy"))
    step(s)  # h0 runs; h1..h5 wait
    held, fraction = s.queue_share("light", 1.0)
    assert (held, fraction) == (0, 0.5)  # two tenants of equal weight: half the queue each
    victim = s.queue_victim("light")
    assert victim.request_id == "h5"  # the youngest waiting request of the tenant holding the most
    assert s.queue_share("heavy", 1.0) == (5, 1.0)
    assert s.queue_victim("heavy") is None  # nobody else waits: heavy's own requests are refused


# ---- the engine's bounded queue and the concurrency quota (real engine core, tiny model) -----------


def test_a_full_queue_refuses_the_tenant_over_its_share_and_makes_room_for_the_other(tiny_model):
    core = EngineCore(tiny_model, EngineConfig(max_running=1, max_waiting=4))
    long = SamplingParams(max_new_tokens=50, ignore_eos=True)
    heavy, light = Tenancy("heavy"), Tenancy("light")
    core.add(core.prepare("name : Aromi", long, request_id="h0", tenancy=heavy))
    core.step()  # h0 runs
    for i in range(1, 5):  # four wait: the queue is full
        assert core.add(core.prepare("name : Aromi", long, request_id=f"h{i}", tenancy=heavy)) == []
    with pytest.raises(
        EngineOverloaded, match="you \\(tenant 'heavy'\\) hold 4 places, your fair share is 4"
    ):
        core.add(core.prepare("name : Aromi", long, request_id="h5", tenancy=heavy))
    ended = core.add(core.prepare("name : Cotto", long, request_id="l0", tenancy=light))
    assert [(o.request_id, o.finish_reason) for o in ended] == [("h4", FinishReason.ERROR)]
    assert isinstance(ended[0].error, EngineOverloaded) and "gave its place" in str(ended[0].error)
    assert ended[0].error.status == 429
    core.add(core.prepare("name : Cotto", long, request_id="l1", tenancy=light))  # h3 makes room
    with pytest.raises(EngineOverloaded, match="hold 2 places, your fair share is 2"):
        core.add(core.prepare("name : Cotto", long, request_id="l2", tenancy=light))
    assert sorted(s.request_id for s in core.scheduler.waiting()) == ["h1", "h2", "l0", "l1"]
    for rid in ["h0", "h1", "h2", "l0", "l1"]:
        core.abort(rid)
    assert core.num_live == 0


def test_max_concurrent_caps_a_tenants_requests_in_the_engine(tiny_model):
    core = EngineCore(tiny_model, EngineConfig(max_running=2, max_waiting=8))
    capped = Tenancy("acme", max_concurrent=2)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    for i in range(2):
        core.add(core.prepare("name : Aromi", params, request_id=f"a{i}", tenancy=capped))
    with pytest.raises(
        QuotaExceeded,
        match=r"'acme' has reached its max_concurrent quota \(2 requests in the engine; the limit is 2\)",
    ):
        core.add(core.prepare("name : Aromi", params, request_id="a2", tenancy=capped))
    core.add(core.prepare("name : Aromi", params, request_id="other", tenancy=Tenancy("other")))
    outputs = core.run_to_completion()
    assert set(outputs) == {"a0", "a1", "other"}
    core.add(core.prepare("name : Aromi", params, request_id="a3", tenancy=capped))  # room again
    assert core.run_to_completion()["a3"][-1].finish_reason == FinishReason.LENGTH


def test_tenancy_is_validated(tiny_model):
    core = EngineCore(tiny_model)
    with pytest.raises(Exception, match=r"tenant\.weight: expected a finite number > 0"):
        core.prepare("x", None, tenancy=Tenancy("t", weight=0.0))


# ---- the noisy neighbour over HTTP ------------------------------------------------------------------
def test_a_flooding_tenant_does_not_delay_another_over_http(tmp_path):
    """One tenant keeps 40 long streams in flight (10x the batch); the other's requests all succeed and
    each starts within a few engine steps of its arrival (in arrival order it would wait ~500 steps)."""
    import threading

    import httpx

    from prefixserve.model import load_model
    from prefixserve.settings import ServerSettings
    from prefixserve.tiny import TinyModelConfig, write_tiny_model

    from .live import LiveServer

    heavy_key, light_key = "heavy-key-0123456789ab", "light-key-0123456789ab"
    slow = load_model(write_tiny_model(tmp_path / "m", TinyModelConfig(n_layer=8, n_head=8, n_embd=384)))
    settings = ServerSettings(
        data_dir=str(tmp_path), api_keys=f"heavy:{heavy_key},light:{light_key}", max_running=4, max_waiting=64
    )
    server = LiveServer(settings, slow).start()
    core = server.state.engine.core
    stop = threading.Event()
    flood_errors: list[int] = []

    def flood() -> None:
        body = {"input": "name : Aromi", "max_new_tokens": 50, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {heavy_key}"}
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                with client.stream("POST", server.url + "/generate", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        flood_errors.append(r.status_code)
                    for _ in r.iter_lines():
                        pass

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(40)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while core.scheduler.num_waiting < 30:  # the flood fills the batch and the queue
            assert time.monotonic() < deadline, "the flood did not build up"
            time.sleep(0.01)
        waits = []
        body = {"input": "name : Cotto", "max_new_tokens": 4, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as client:
            for _ in range(5):
                sent = core.num_steps
                headers = {"Authorization": f"Bearer {light_key}"}
                with client.stream("POST", server.url + "/generate", json=body, headers=headers) as r:
                    assert r.status_code == 200
                    lines = r.iter_lines()
                    first = next(line for line in lines if line.startswith("data:"))
                    waits.append(core.num_steps - sent)
                    assert "token_ids" in first
                    rest = [line for line in lines if line.startswith("event:")]
                    assert rest[-1] == "event: done"  # it succeeded
        assert core.scheduler.num_waiting >= 20  # the flood was still queued the whole time
        assert max(waits) <= 3, waits  # the step running when it arrived, its own, and slack for the stream
    finally:
        stop.set()
        server.stop()
    assert not flood_errors, flood_errors
