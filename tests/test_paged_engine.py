"""Engine v2 on the tiny model: paged own-token KV, admission by memory, preemption, prefixes read in
place (never copied per row) and evicted only when no row references them, shared-prefix attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.engine.cpu_kernels import load_paged_decode

from .helpers import PROMPTS, collect, kv_for, make_ntk, make_prefixes
from .reference import hf_greedy

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)


def engine_with(model, prefixes: dict, **config) -> EngineCore:
    engine = EngineCore(model, EngineConfig(**config))
    for pid, state in prefixes.items():
        engine.prefixes.register(pid, state)
    return engine


def run_mix(engine: EngineCore, mix: list[tuple[str | None, SamplingParams]]) -> dict[str, list[int]]:
    for i, (pid, params) in enumerate(mix):
        engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid, request_id=f"r{i}")
    return {rid: collect(outs)[0] for rid, outs in engine.run_to_completion().items()}


def test_preempted_requests_end_exactly_as_their_uninterrupted_run(tiny_model):
    prefixes = {**make_prefixes(tiny_model, [3, 9]), "n1": make_ntk(tiny_model, 1)}
    mix = [
        ("p3", GREEDY),
        (None, GREEDY),
        ("n1", GREEDY),
        ("p9", SEEDED),
        ("p3", dataclasses.replace(SEEDED, seed=8)),
        (None, dataclasses.replace(SEEDED, seed=9)),
        ("n1", SEEDED),
        ("p9", GREEDY),
    ]
    roomy = engine_with(tiny_model, prefixes, max_running=8)
    expected = run_mix(roomy, mix)
    assert roomy.scheduler.num_preemptions == 0
    # the smallest pool the engine allows (one longest row): rows grow until the newest is preempted
    tight = engine_with(tiny_model, prefixes, max_running=8, max_seq_len=64, kv_cache_tokens=64, block_size=4)
    got = run_mix(tight, mix)
    assert tight.scheduler.num_preemptions >= 3
    assert got == expected
    assert tight.scheduler.blocks.num_free == tight.scheduler.blocks.capacity  # every block came back


def test_memory_not_rows_limits_the_batch(tiny_model):
    """64 rows of 8 own tokens (one block each) fit a pool that full-length slots would fill with 4."""
    tokens = 4 * 128 + 4 * 8  # 68 blocks of 8
    engine = engine_with(
        tiny_model, {}, max_running=64, max_seq_len=128, kv_cache_tokens=tokens, block_size=8
    )
    for i in range(64):
        engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=5, ignore_eos=True), request_id=f"r{i}")
    first = engine.step()
    assert engine.num_running == 64 and len(first) == 64  # all admitted at once, one token each
    outs = engine.run_to_completion()
    assert len(outs) == 64 and all(len(collect(o)[0]) == 4 for o in outs.values())


def test_rows_sharing_a_prefix_read_it_in_place_and_match_hf(tiny_model, hf_model):
    """Many rows on one long prefix (one stacked attention call per layer), beside rows with short
    distinct prefixes (one padded call) and none: each equals HF with its prefix as past_key_values."""
    long = make_prefixes(tiny_model, [100], seed=3)["p100"]
    short = make_prefixes(tiny_model, [1, 2, 5, 7], seed=4)
    prefixes = {"long": long, **short}
    engine = engine_with(tiny_model, prefixes, max_running=16, record_logits=True)
    before = {pid: engine.prefixes.get(pid).kv.clone() for pid in prefixes}
    mix = ["long"] * 6 + list(short) + [None, None]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    rids = {}
    for i, pid in enumerate(mix):
        rids[engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid)] = (pid, i)
    outs = engine.run_to_completion()
    for rid, (pid, i) in rids.items():
        tokens, logits, _ = collect(outs[rid])
        prompt = tiny_model.tokenizer.encode(PROMPTS[i % len(PROMPTS)])
        ref_tokens, ref_logits = hf_greedy(hf_model, prompt, prefixes.get(pid), 6)
        assert tokens == ref_tokens, f"{rid} ({pid})"
        for a, b in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for pid, kv in before.items():  # read in place, never written
        assert torch.equal(engine.prefixes.get(pid).kv, kv)


def test_a_prefix_is_evicted_only_when_no_row_references_it(service_factory, tiny_model, hf_model):
    kvs = [kv_for(tiny_model, 6, seed=i) for i in range(3)]
    one = kvs[0].numel() * 4
    svc = service_factory(device_pool_bytes=one + one // 2)  # room for one prefix at a time
    ids = [svc.add_tensor(kv, owner="a").id for kv in kvs]
    for pid in ids:
        svc.pool.evict(pid)
    engine = EngineCore(tiny_model, EngineConfig(max_running=4), prefixes=svc.pool)
    prompt = tiny_model.tokenizer.encode(PROMPTS[0])
    long_params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    first = engine.add_request(prompt, long_params, prefix_id=ids[0])
    outs: dict[str, list] = {}

    def step() -> None:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)

    while engine.num_running == 0:
        step()
    second = engine.add_request(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True), prefix_id=ids[1])
    while second not in outs or not outs[second][-1].finished:  # its load needs room: ids[0] is in use
        step()
        assert ids[0] in svc.pool.resident(), "a prefix in use was evicted"
    assert svc.pool.resident_bytes > svc.pool.budget  # over budget rather than evicting a referenced one
    while engine.has_work:
        step()
    assert svc.pool.pins(ids[0]) == 0
    engine.add_request(prompt, SamplingParams(max_new_tokens=2), prefix_id=ids[2])
    engine.run_to_completion()
    assert ids[0] not in svc.pool.resident()  # unreferenced now: evicted for the next load
    assert collect(outs[first])[0] == hf_greedy(hf_model, prompt, kvs[0], 30)[0]


# ---- the CPU decode kernel (blocks read in place) -----------------------------------------------


def _reference_decode(q, k_pool, v_pool, table, lens, scale, prefix=None):
    """Gather each row's blocks (after its in-pool prefix's slots) and take softmax attention:
    q `[R, H, D]` over pools `[num_blocks, block_size, H_kv, D]` -> out `[R, H, D]`, lse `[R, H]`.
    KV head `h // (H / H_kv)` serves query head h (HF's repeat_interleave of the KV heads)."""
    group = q.shape[1] // k_pool.shape[2]
    outs, lses = [], []
    for r in range(q.shape[0]):
        n = int(lens[r])
        slots = torch.arange(0) if prefix is None else torch.arange(prefix[1][r]) + prefix[0][r]
        k = torch.cat([k_pool.flatten(0, 1)[slots], k_pool[table[r]].flatten(0, 1)[:n]])  # [p + n, H_kv, D]
        v = torch.cat([v_pool.flatten(0, 1)[slots], v_pool[table[r]].flatten(0, 1)[:n]])
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [p + n, H, D]
        s = torch.einsum("hd,nhd->hn", q[r], k) * scale  # [H, n]
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
    return torch.stack(outs), torch.stack(lses)


def _check_kernel(kernel) -> None:
    """The kernel's outputs equal softmax attention over gathered blocks; a NaN stays in its row."""
    assert kernel is not None, "the CPU decode kernel did not build (is there a C compiler?)"
    g = torch.Generator().manual_seed(0)
    heads, dim, bs, num_blocks = 3, 8, 4, 40
    k_pool = torch.randn(num_blocks, bs, heads, dim, generator=g)
    v_pool = torch.randn(num_blocks, bs, heads, dim, generator=g)
    lens = torch.tensor([1, 4, 5, 13, 16, 2], dtype=torch.int32)
    table = torch.randperm(num_blocks - 1, generator=g)[: 6 * 4].add(1).view(6, 4)  # scattered blocks
    qkv = torch.randn(6, 3, heads, dim, generator=g) * 3  # q is a strided view, as in the runner
    q = qkv[:, 0]
    out, lse = torch.empty(6, heads, dim), torch.empty(6, heads)
    kernel(q, k_pool, v_pool, table, lens, out, lse, 0.35)
    want_out, want_lse = _reference_decode(q, k_pool, v_pool, table, lens, 0.35)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    # rows whose keys begin with a prefix placed in the pool (block 0's slots, or none for row 2)
    prefix = torch.tensor([0, 1, 0, 2, 0, 3]), torch.tensor([3, 4, 0, 2, 1, 1], dtype=torch.int32)
    kernel(q, k_pool, v_pool, table, lens, out, lse, 0.35, prefix)
    want_out, want_lse = _reference_decode(q, k_pool, v_pool, table, lens, 0.35, prefix)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix slots within the pool"):
        kernel(q, k_pool, v_pool, table, lens, out, lse, 0.35, (prefix[0] + num_blocks * bs - 3, prefix[1]))
    # a NaN in row 3's values, past row 1's length in a block row 1 also lists: only row 3 goes bad
    table[1, 1] = table[3, 1]
    v_pool[table[3, 1], 2, 0, 0] = float("nan")
    kernel(q, k_pool, v_pool, table, lens, out, None, 0.35)
    bad = ~out.flatten(1).isfinite().all(-1)
    assert bad.tolist() == [False, False, False, True, False, False]


def test_decode_kernel_matches_softmax_over_gathered_blocks_and_keeps_nan_in_its_row():
    assert torch.get_num_threads() > 1, "the rows are meant to be split over torch's OpenMP threads"
    _check_kernel(load_paged_decode())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_decode_kernel_reads_half_precision_pools_and_sums_in_float32(dtype):
    kernel = load_paged_decode()
    assert kernel is not None and dtype in kernel.dtypes  # (float16: any compiler with _Float16, gcc >= 12)
    g = torch.Generator().manual_seed(1)
    heads, dim, bs = 3, 8, 4
    k_pool, v_pool = (torch.randn(20, bs, heads, dim, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([1, 7, 16, 3], dtype=torch.int32)
    table = torch.randperm(19, generator=g)[:16].add(1).view(4, 4)
    q = (torch.randn(4, 3, heads, dim, generator=g) * 3).to(dtype)[:, 0]  # a strided view
    prefix = torch.tensor([0, 1, 0, 2]), torch.tensor([3, 0, 2, 1], dtype=torch.int32)
    out, lse = torch.empty(q.shape, dtype=dtype), torch.empty(4, heads)
    kernel(q, k_pool, v_pool, table, lens, out, lse, 0.35, prefix)
    want_out, want_lse = _reference_decode(
        q.double(), k_pool.double(), v_pool.double(), table, lens, 0.35, prefix
    )
    # the output is rounded once to the dtype; the log-sum-exp stays float32
    torch.testing.assert_close(out.double(), want_out.to(dtype).double(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    v_pool[table[2, 0], 1, 0, 0] = float("nan")  # row 2's second value
    kernel(q, k_pool, v_pool, table, lens, out, None, 0.35)
    assert (~out.flatten(1).isfinite().all(-1)).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="one dtype"):
        kernel(q.float(), k_pool, v_pool, table, lens, out, None, 0.35)


def _grouped_case(dtype, kv_heads, prefixes=None, heads=6, dim=16, bs=16, lens=(1, 15, 16, 17, 40, 70)):
    """Pools `[num_blocks, bs, kv_heads, dim]` holding NaN wherever no row's key lives (so a read past
    a row's length, of a block its table does not name or of the wrong slot shows); rows of `lens` own
    tokens in shuffled blocks, after `prefixes[r]` in-pool prefix positions (consecutive slots, a NaN
    block apart) -> q (a strided view) `[R, heads, dim]`, k_pool, v_pool, table, lens, prefix."""
    g = torch.Generator().manual_seed(kv_heads)
    rows, nb = len(lens), max(-(-n // bs) for n in lens)
    base = rows * nb + 2  # own blocks are shuffled below it (block 0 left NaN); prefixes run on from it
    num_blocks = base + sum(-(-p // bs) + 1 for p in prefixes or [])
    k_pool = torch.full((num_blocks, bs, kv_heads, dim), float("nan"))
    v_pool = torch.full_like(k_pool, float("nan"))
    order = torch.randperm(base - 1, generator=g) + 1
    table = torch.zeros(rows, nb, dtype=torch.int64)
    for r, n in enumerate(lens):
        table[r, : -(-n // bs)] = order[r * nb : r * nb + -(-n // bs)]
        for t in range(n):  # only the row's own positions get numbers
            b, i = table[r, t // bs], t % bs
            k_pool[b, i], v_pool[b, i] = torch.randn(2, kv_heads, dim, generator=g)
    prefix = None
    if prefixes is not None:
        slot, first = torch.zeros(rows, dtype=torch.int64), base * bs
        for r, p in enumerate(prefixes):
            slot[r] = first
            k_pool.flatten(0, 1)[first : first + p] = torch.randn(p, kv_heads, dim, generator=g)
            v_pool.flatten(0, 1)[first : first + p] = torch.randn(p, kv_heads, dim, generator=g)
            first += (-(-p // bs) + 1) * bs
        prefix = (slot, torch.tensor(prefixes, dtype=torch.int32))
    qkv = torch.randn(rows, 3, heads, dim, generator=g) * 2  # q is a strided view, as in the runner
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return qkv.to(dtype)[:, 0], k_pool.to(dtype), v_pool.to(dtype), table, lens_t, prefix


@pytest.mark.parametrize("with_prefix", [False, True], ids=["own-tokens", "in-pool-prefix"])
@pytest.mark.parametrize("kv_heads", [6, 3, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_kernel_serves_grouped_query_heads_from_pools_of_fewer_kv_heads(dtype, kv_heads, with_prefix):
    """6 query heads over 6, 3, 2 or 1 KV heads: head h reads KV head h // (6 / H_kv), as attention over
    repeat_interleave-d K/V heads (in float64) gives, for rows' own tokens and in-pool prefixes alike."""
    kernel = load_paged_decode()
    assert kernel is not None, "the CPU decode kernel did not build (is there a C compiler?)"
    if dtype not in kernel.dtypes:
        pytest.skip(f"this build does not serve {dtype}")
    prefixes = [0, 1, 16, 33, 5, 64] if with_prefix else None
    q, k_pool, v_pool, table, lens, prefix = _grouped_case(dtype, kv_heads, prefixes)
    out, lse = torch.empty(q.shape, dtype=dtype), torch.empty(q.shape[:2])
    kernel(q, k_pool, v_pool, table, lens, out, lse, 0.3, prefix)
    want_out, want_lse = _reference_decode(
        q.double(), k_pool.double(), v_pool.double(), table, lens, 0.3, prefix
    )
    # float32 sums throughout; a half-precision output is rounded once, the log-sum-exp stays float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want_out.to(dtype).double(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_decode_kernel_refuses_pools_whose_kv_heads_do_not_divide_the_query_heads():
    kernel = load_paged_decode()
    assert kernel is not None
    q, k_pool, v_pool, table, lens, _ = _grouped_case(torch.float32, kv_heads=4)  # 6 query heads
    out = torch.empty(q.shape)
    with pytest.raises(ValueError, match="pools whose KV heads divide the query's heads"):
        kernel(q, k_pool, v_pool, table, lens, out, None, 0.3)


def test_half_precision_engines_read_blocks_in_place_as_they_gather_them(tiny_model_dir):
    from prefixserve.model import load_model

    params = dataclasses.replace(GREEDY, max_new_tokens=12)
    for dtype in ("bfloat16", "float16"):
        model = load_model(tiny_model_dir, dtype=dtype)
        prefixes = make_prefixes(model, [3, 9])
        runs = {}
        for in_place in (True, False):
            engine = engine_with(model, prefixes, max_running=8, record_logits=True, paged_kernel=in_place)
            assert engine.runner.decode_kernel == ("c" if in_place else "gather")
            for i, pid in enumerate(["p3", None, "p9", "p9"]):
                engine.add_request(PROMPTS[i], params, prefix_id=pid, request_id=f"r{i}")
            runs[in_place] = {rid: collect(outs) for rid, outs in engine.run_to_completion().items()}
        for rid, (tokens, logits, _) in runs[True].items():
            other, other_logits = runs[False][rid][:2]
            differ = [i for i, (a, b) in enumerate(zip(tokens, other, strict=True)) if a != b]
            same = differ[0] if differ else len(tokens)
            # the same steps while the tokens agree (a near tie may round either way in half precision)
            a, b = torch.stack(logits[: same + 1]).float(), torch.stack(other_logits[: same + 1]).float()
            torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
            assert same >= len(tokens) // 2, (dtype, rid, tokens, other)


def test_a_compiler_without_openmp_builds_the_kernel_serial(tmp_path, monkeypatch):
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("PREFIXSERVE_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(compiler))
    _check_kernel(load_paged_decode.__wrapped__())


def test_decode_kernel_and_gathered_blocks_give_the_same_outputs(tiny_model):
    prefixes = {**make_prefixes(tiny_model, [3, 9]), "n1": make_ntk(tiny_model, 1)}
    mix = [("p3", GREEDY), (None, GREEDY), ("n1", SEEDED), ("p9", SEEDED), ("p9", GREEDY), (None, SEEDED)]
    runs = {}
    for in_place in (True, False):
        engine = engine_with(tiny_model, prefixes, max_running=8, record_logits=True, paged_kernel=in_place)
        assert (engine.runner._paged_decode is not None) == in_place
        for i, (pid, params) in enumerate(mix):
            engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid, request_id=f"r{i}")
        runs[in_place] = {rid: collect(outs) for rid, outs in engine.run_to_completion().items()}
    for rid, (tokens, logits, _) in runs[True].items():
        assert tokens == runs[False][rid][0]
        gathered = torch.stack(runs[False][rid][1])
        torch.testing.assert_close(torch.stack(logits), gathered, atol=1e-4, rtol=1e-4)


def test_without_a_compiler_the_runner_gathers(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert load_paged_decode.__wrapped__() is None
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind


def test_stats_name_the_prefixes_running_and_waiting(tiny_model):
    """The residency the gauge shows (prefixserve_prefix_requests_info): distinct prefix ids of the
    rows in the batch and of the waiting requests."""
    prefixes = make_prefixes(tiny_model, [3, 9])
    engine = engine_with(tiny_model, prefixes, max_running=2)
    for i, pid in enumerate(["p3", "p3", "p9", None]):
        engine.add_request(PROMPTS[i], GREEDY, prefix_id=pid, request_id=f"r{i}")
    engine.step()
    stats = engine.stats()
    assert stats.running_prefixes == ["p3"] and stats.waiting_prefixes == ["p9"]
    engine.run_to_completion()
    assert engine.stats().running_prefixes == [] == engine.stats().waiting_prefixes
