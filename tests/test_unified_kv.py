"""Unified paging (engine v2, item 2): KV prefixes live in the same block pool as the rows' own tokens.

The device pool places each resident KV prefix in a run of the engine's KV blocks and every row reads
it there in place; a burst of prefixes and a burst of long requests trade the same blocks (unused
prefixes are evicted for rows, loaded prefixes wait for rows' blocks), and every block comes back.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from prefix_store.kinds import KvPrefixKind
from prefix_store.pool import DevicePool
from prefix_store.state import KvPrefix
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.engine.blocks import BlockAllocator, blocks_for

from .helpers import PROMPTS, collect, make_ntk, make_prefixes
from .reference import hf_greedy

# a small pool: blocks of 4 tokens, rows of at most 64 tokens (16 blocks)
SMALL = dict(block_size=4, max_seq_len=64, max_prefix_len=32)


def pool_for(model, states: dict, budget: int = 1 << 30) -> DevicePool:
    """The store's device pool over prefixes held in memory (the loader is the only stand-in: a dict)."""
    lengths = {pid: (s.shape[3] if isinstance(s, torch.Tensor) else 0) for pid, s in states.items()}
    return DevicePool(states.__getitem__, lengths.__getitem__, budget, model.device, model.dtype)


def engine_on(model, pool: DevicePool, **config) -> EngineCore:
    return EngineCore(model, EngineConfig(**config), prefixes=pool)


def prefix_blocks(engine: EngineCore) -> int:
    """Blocks the placed prefixes hold, by the arena's count, checked against the resident prefixes."""
    pool, bs = engine.prefixes, engine.scheduler.config.block_size
    placed = [pool.get(pid) for pid in pool.resident()]
    kv = engine.runner.kv.untyped_storage().data_ptr()
    in_pool = [s.kv for s in placed if isinstance(s, KvPrefix) and s.kv.untyped_storage().data_ptr() == kv]
    held = sum(blocks_for(s.shape[3], bs) for s in in_pool)
    assert engine.arena.prefix_blocks == held
    return held


def row_blocks(engine: EngineCore) -> int:
    return sum(len(s.blocks) for s in engine.scheduler.running())


def run(engine: EngineCore, jobs: list[tuple[str | None, str, SamplingParams]]) -> dict[str, list[int]]:
    rids = [
        engine.add_request(text, params, prefix_id=pid, request_id=f"r{i}")
        for i, (pid, text, params) in enumerate(jobs)
    ]
    outs = engine.run_to_completion()
    return {rid: collect(outs[rid])[0] for rid in rids}


# ---- the allocator ------------------------------------------------------------------------------
def test_rows_take_the_lowest_blocks_and_prefix_runs_come_from_the_top():
    a = BlockAllocator(num_blocks=21, block_size=4)  # blocks 1..20
    assert a.allocate(3) == [1, 2, 3]
    assert a.allocate_run(5) == 16  # 16..20
    assert a.allocate_run(5) == 11
    assert a.allocate(2) == [4, 5] and a.num_free == 5  # 6..10
    assert a.allocate_run(6) is None  # five free, no run of six
    a.free([2, 4])
    a.free_run(11, 5)  # 11..15 rejoin 6..10: one run of ten
    assert a.allocate_run(10) == 6 and a.num_free == 2
    assert a.try_allocate(2, keep=1) is None and a.num_free == 2  # `keep` is honoured atomically
    assert sorted(a.try_allocate(2)) == [2, 4]
    with pytest.raises(RuntimeError, match="already free"):
        a.free([7, 7])
    a.free([1, 2, 3, 4, 5])
    with pytest.raises(RuntimeError, match="already free"):
        a.free([3])


def test_block_accounting_over_random_rows_and_runs():
    a, rng = BlockAllocator(num_blocks=200, block_size=4), random.Random(0)
    held: list[list[int]] = []
    runs: list[tuple[int, int]] = []
    for _ in range(5000):
        op = rng.random()
        if op < 0.35:
            got = a.try_allocate(rng.randint(1, 6))
            if got is not None:
                held.append(got)
        elif op < 0.5:
            n = rng.randint(1, 12)
            first = a.allocate_run(n)
            if first is not None:
                runs.append((first, n))
        elif held and op < 0.85:
            a.free(held.pop(rng.randrange(len(held))))
        elif runs:
            a.free_run(*runs.pop(rng.randrange(len(runs))))
        used = [b for h in held for b in h] + [b for f, n in runs for b in range(f, f + n)]
        assert len(used) == len(set(used)) and len(used) + a.num_free == a.capacity
    for h in held:
        a.free(h)
    for r in runs:
        a.free_run(*r)
    assert a.num_free == a.capacity and a.allocate_run(a.capacity) == 1  # one run again


# ---- prefixes in the KV pool ----------------------------------------------------------------------
def test_kv_prefixes_live_in_the_kv_pool_and_rows_read_them_there(tiny_model, hf_model):
    """A mixed batch on the pool's prefixes (KV placed in the KV blocks, NTK beside) gives the tokens of
    the same batch on prefixes registered apart, and of HF with the prefix as past_key_values."""
    states = {**make_prefixes(tiny_model, [5, 9, 30], seed=2), "n1": make_ntk(tiny_model, 1)}
    pool = pool_for(tiny_model, states)
    engine = engine_on(tiny_model, pool, max_running=8, kv_cache_tokens=256, **SMALL)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    order = ["p5", "p30", None, "n1", "p9", "p30"]
    jobs = [(pid, PROMPTS[i % len(PROMPTS)], params) for i, pid in enumerate(order)]
    got = run(engine, jobs)

    apart = EngineCore(tiny_model, EngineConfig(max_running=8, kv_cache_tokens=256, **SMALL))
    for pid, state in states.items():
        apart.prefixes.register(pid, state)
    assert got == run(apart, jobs)
    prompt = tiny_model.tokenizer.encode(PROMPTS[1])
    assert got["r1"] == hf_greedy(hf_model, prompt, states["p30"], 12)[0]

    kv_storage = engine.runner.kv.untyped_storage().data_ptr()
    for pid in ("p5", "p9", "p30"):
        view = pool.get(pid).kv
        assert view.untyped_storage().data_ptr() == kv_storage  # in the KV pool, no tensor of its own
        torch.testing.assert_close(view, states[pid])
    assert pool.get("n1").z.untyped_storage().data_ptr() != kv_storage  # NTK keeps its own
    assert prefix_blocks(engine) == 2 + 3 + 8  # ceil(5/4) + ceil(9/4) + ceil(30/4)


@pytest.mark.parametrize("budget", [512, 10])  # 10: prompts prefilled in chunks, later ones from start > 0
def test_short_in_pool_prefixes_are_read_in_place_as_the_rows_first_keys(tiny_model, budget):
    """Rows whose KV prefix is short and placed in the pool attend to it as their first keys, one
    softmax over prefix and own keys: decode rows inside the CPU decode kernel, prefill rows with its
    blocks leading their own gathered blocks. Rows with a longer one (past IN_KERNEL_PREFIX) keep the
    kind's attention. Logits equal the kind's attention on prefixes registered apart."""
    states = {**make_prefixes(tiny_model, [3, 9], seed=4), **make_prefixes(tiny_model, [70], seed=5)}
    config = dict(
        max_running=8, kv_cache_tokens=1024, record_logits=True, max_seq_len=128, max_prefix_len=80,
        max_tokens_per_step=budget,
    )  # fmt: skip
    engine = engine_on(tiny_model, pool_for(tiny_model, states), **config)
    kernel, read = engine.runner._paged_decode, []
    assert kernel is not None, "the CPU decode kernel did not build"

    def spy(*args):  # the real kernel runs; the spy notes the prefix positions each call read
        read.append(set() if args[-1] is None else set(args[-1][1].tolist()))
        return kernel(*args)

    engine.runner._paged_decode = spy
    kv_kind = next(k for k in engine.runner.kinds if isinstance(k, KvPrefixKind))
    plan, planned = kv_kind.plan, set()

    def plan_spy(members, states, inputs):  # the rows the kind's own attention serves
        planned.update(KvPrefixKind().length(s) for s in states.values())
        return plan(members, states, inputs)

    kv_kind.plan = plan_spy
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    order = ["p3", "p9", "p9", None, "p70", "p3"]

    def tokens_and_logits(eng: EngineCore) -> dict[str, tuple]:
        for i, pid in enumerate(order):
            eng.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid, request_id=f"r{i}")
        return {rid: collect(outs)[:2] for rid, outs in eng.run_to_completion().items()}

    got = tokens_and_logits(engine)
    assert set().union(*read) == {0, 3, 9}  # p70 (and the bare row) never in the kernel's prefix part
    assert planned == {70}  # short prefixes never take the kind's path, in prefill either
    apart = EngineCore(tiny_model, EngineConfig(**config))
    for pid, state in states.items():
        apart.prefixes.register(pid, state)
    want = tokens_and_logits(apart)
    assert got.keys() == want.keys() and len(got) == len(order)
    for rid, (tokens, logits) in got.items():
        assert tokens == want[rid][0]
        torch.testing.assert_close(torch.stack(logits), torch.stack(want[rid][1]), atol=1e-4, rtol=1e-4)


def test_unused_prefixes_give_their_blocks_to_long_requests(tiny_model):
    """A burst of prefixes fills the pool; a burst of long requests then takes their blocks (the
    unused prefixes are evicted, least recently used first) instead of preempting anyone."""
    states = make_prefixes(tiny_model, [20, 19], seed=5)
    pool = pool_for(tiny_model, states)
    engine = engine_on(tiny_model, pool, max_running=4, kv_cache_tokens=160, **SMALL)  # 40 blocks
    for pid in ["p20", "p19"]:
        run(engine, [(pid, PROMPTS[1], SamplingParams(max_new_tokens=1))])
    assert sorted(pool.resident()) == ["p19", "p20"] and prefix_blocks(engine) == 10
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    jobs = [(None, list(range(10, 34)), long), (None, list(range(40, 64)), long)]  # 2 x 64 tokens: 32 blocks
    roomy = EngineCore(tiny_model, EngineConfig(max_running=4, kv_cache_tokens=1024, **SMALL))
    assert run(engine, jobs) == run(roomy, jobs)
    assert engine.scheduler.num_preemptions == 0  # a prefix's blocks were enough
    assert pool.stats.get("device", "reclaimed") == 1
    assert pool.resident() == ["p19"]  # p20, least recently used, went
    assert engine.scheduler.blocks.num_free + prefix_blocks(engine) == engine.scheduler.blocks.capacity


def hogged(model, pool: DevicePool) -> tuple[EngineCore, list[str]]:
    """An engine of 96 blocks (prefixes may take 64) whose five long rows hold 85 of them after a step
    (90 when they end)."""
    engine = engine_on(
        model,
        pool,
        max_running=7,
        kv_cache_tokens=384,
        max_tokens_per_step=512,
        block_size=4,
        max_seq_len=128,
        max_prefix_len=64,
    )
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    hogs = [engine.add_request(list(range(10 + i, 78 + i)), params) for i in range(5)]  # 68 tokens each
    engine.step()
    assert engine.scheduler.blocks.num_free == 11
    return engine, hogs


def wait_pending(pool: DevicePool, pid: str, blocks: int) -> None:
    """Until the prefix is loaded (on a worker thread) and waits for `blocks` blocks of the KV pool."""
    deadline = time.monotonic() + 10
    while pool.blocks_wanted() == 0:
        assert time.monotonic() < deadline and not pool.is_ready(pid)
        time.sleep(0.002)
    assert pool.blocks_wanted() == blocks


def test_a_loaded_prefix_waits_for_the_rows_blocks_and_new_rows_wait_behind_it(tiny_model, hf_model):
    """Long rows hold most blocks; a 60-token prefix (15 blocks) is loaded but has no room: it waits,
    admission keeps its blocks free for it (a later request without a prefix does not take them), and
    it runs as soon as the rows leave."""
    states = make_prefixes(tiny_model, [60], seed=7)
    pool = pool_for(tiny_model, states)
    engine, hogs = hogged(tiny_model, pool)
    mine = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True), prefix_id="p60")
    wait_pending(pool, "p60", 15)
    later = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=5, ignore_eos=True))
    outs: dict[str, list] = {}

    def step() -> None:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)

    while not pool.is_ready("p60"):
        step()
        assert later not in outs, "a later request took the blocks the loaded prefix waits for"
    while engine.has_work:
        step()
    assert all(outs[h][-1].finished for h in hogs) and engine.scheduler.num_preemptions == 0
    prompt = tiny_model.tokenizer.encode(PROMPTS[0])
    assert collect(outs[mine])[0] == hf_greedy(hf_model, prompt, states["p60"], 5)[0]
    assert len(collect(outs[later])[0]) == 5
    assert pool.blocks_wanted() == 0 and prefix_blocks(engine) == 15


def test_a_waiting_prefix_nobody_wants_any_more_holds_nothing_back(tiny_model):
    states = make_prefixes(tiny_model, [60], seed=7)
    pool = pool_for(tiny_model, states)
    engine, _ = hogged(tiny_model, pool)
    mine = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5), prefix_id="p60")
    wait_pending(pool, "p60", 15)
    engine.abort(mine)
    engine.step()  # the abort takes effect: the pin goes, and the loaded copy with it
    assert pool.blocks_wanted() == 0 and pool.pins("p60") == 0 and not pool.is_ready("p60")
    later = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=2, ignore_eos=True))
    outs = engine.run_to_completion()
    assert len(collect(outs[later])[0]) == 2
    free, prefixes = engine.arena.usage()
    assert prefixes == 0 and free == engine.scheduler.blocks.capacity


def test_prefixes_longer_than_the_pools_prefix_share_keep_a_tensor_of_their_own(tiny_model, hf_model):
    """The smallest pool (one longest row) leaves prefixes no blocks: they are served as before."""
    states = make_prefixes(tiny_model, [6], seed=8)
    pool = pool_for(tiny_model, states)
    engine = engine_on(tiny_model, pool, max_running=4, kv_cache_tokens=64, **SMALL)
    got = run(engine, [("p6", PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True))])
    prompt = tiny_model.tokenizer.encode(PROMPTS[0])
    assert got["r0"] == hf_greedy(hf_model, prompt, states["p6"], 6)[0]
    assert pool.get("p6").kv.untyped_storage().data_ptr() != engine.runner.kv.untyped_storage().data_ptr()
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.capacity


def test_every_block_comes_back_after_many_requests_prefix_loads_evictions_and_cancels(tiny_model):
    rng = random.Random(1)
    lengths = [rng.randint(1, 32) for _ in range(12)]
    states = {f"q{i}": make_prefixes(tiny_model, [n], seed=i)[f"p{n}"] for i, n in enumerate(lengths)}
    per_position = states["q0"][:, :, :, :1].numel() * 4
    pool = pool_for(tiny_model, states, budget=60 * per_position)  # a few of them: evictions all along
    engine = engine_on(tiny_model, pool, max_running=6, kv_cache_tokens=160, max_tokens_per_step=48, **SMALL)
    cap = engine.scheduler.blocks.capacity
    live: list[str] = []
    for i in range(600):
        pid = rng.choice([None, *states])
        params = SamplingParams(max_new_tokens=rng.randint(1, 6), ignore_eos=True)
        live.append(engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid))
        if rng.random() < 0.1:
            engine.abort(rng.choice(live))
        for _ in range(rng.randint(0, 2)):
            engine.step()
        free, prefixes = engine.arena.usage()  # (a load may place a prefix meanwhile)
        assert free + prefixes + row_blocks(engine) == cap
    engine.run_to_completion()
    assert pool.stats.get("device", "evictions") > 0
    free, prefixes = engine.arena.usage()
    assert free + prefixes == cap
    assert all(pool.pins(pid) == 0 for pid in states)
    for pid in states:
        pool.evict(pid)
    assert engine.scheduler.blocks.num_free == cap  # every block came back
