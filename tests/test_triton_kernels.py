"""Every Triton kernel against its eager reference, and the engine's Triton paths against its eager ones.

Runs where Triton runs: on a CUDA device, or on the CPU under Triton's interpreter, which scripts/test.sh
starts as its own stage (`TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py`: the variable must be
set before triton is first imported, so not inside the main run). The interpreter checks no bounds, so
every pool here is filled with NaN wherever no row's key lives: a read past a row's length, or of a
position its table does not name, turns that row's output NaN and fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from prefix_store.triton_env import runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not runs_on(DEVICE), reason="Triton kernels run on CUDA or under TRITON_INTERPRET=1 (scripts/test.sh)"
)

DTYPES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # dtype -> tolerance


def reference_decode(q, k_pool, v_pool, table, lens, scale, prefix=None):
    """Gather each row's keys (its in-pool prefix's slots, then its blocks) and take softmax attention
    in float64: q `[R, H, D]` -> out `[R, H, D]`, lse `[R, H]`. KV head `h // (H / H_kv)` serves head h."""
    group = q.shape[1] // k_pool.shape[2]
    outs, lses = [], []
    for r in range(q.shape[0]):
        n = int(lens[r])
        slots = torch.arange(0) if prefix is None else torch.arange(int(prefix[1][r])) + int(prefix[0][r])
        own = (table[r, :, None] * k_pool.shape[1] + torch.arange(k_pool.shape[1])).flatten()[:n]
        every = torch.cat([slots, own.cpu()])
        k = k_pool.flatten(0, 1)[every].double().repeat_interleave(group, 1)  # [n, H, D]
        v = v_pool.flatten(0, 1)[every].double().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[r].double(), k) * scale  # [H, n]
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
    return torch.stack(outs), torch.stack(lses)


def paged_case(dtype, heads=4, kv_heads=2, dim=16, bs=16, lens=(1, 15, 16, 17, 33, 70, 300), prefixes=None):
    """Pools whose every slot no row reads holds NaN; rows of `lens` own tokens in scattered blocks,
    after `prefixes[r]` in-pool prefix positions (consecutive slots) -> the kernel's arguments."""
    g = torch.Generator().manual_seed(len(lens) * 7 + bs)
    rows = len(lens)
    nb = max(-(-n // bs) for n in lens)
    base = rows * nb + 2  # own blocks are scattered below it; prefixes run on from it, a NaN block apart
    num_blocks = base + sum(-(-p // bs) + 1 for p in prefixes or [])
    k_pool = torch.full((num_blocks, bs, kv_heads, dim), float("nan"))
    v_pool = torch.full_like(k_pool, float("nan"))
    order = torch.randperm(base - 1, generator=g) + 1  # block 0 is the null block: left NaN
    table = torch.zeros(rows, nb, dtype=torch.int64)
    used = 0
    for r, n in enumerate(lens):
        own = -(-n // bs)
        table[r, :own] = order[used : used + own]
        used += own
        for t in range(n):  # only the row's own positions get numbers
            b, i = table[r, t // bs], t % bs
            k_pool[b, i], v_pool[b, i] = torch.randn(2, kv_heads, dim, generator=g)
    prefix = None
    if prefixes is not None:
        slot = torch.zeros(rows, dtype=torch.int64)
        first = base * bs
        for r, p in enumerate(prefixes):
            slot[r] = first
            k_pool.flatten(0, 1)[first : first + p] = torch.randn(p, kv_heads, dim, generator=g)
            v_pool.flatten(0, 1)[first : first + p] = torch.randn(p, kv_heads, dim, generator=g)
            first += (-(-p // bs) + 1) * bs
        prefix = (slot, torch.tensor(prefixes, dtype=torch.int32))
    qkv = torch.randn(rows, 3, heads, dim, generator=g) * 2  # q is a strided view, as in the runner
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return qkv, k_pool.to(dtype), v_pool.to(dtype), table, lens_t, prefix


def run_kernel(qkv, k_pool, v_pool, table, lens, prefix, max_prefix=64):
    from prefixserve.engine.triton_decode import TritonPagedDecode

    dev = lambda t: t.to(DEVICE)  # noqa: E731
    q = dev(qkv.to(k_pool.dtype))[:, 0]
    out = torch.empty(q.shape, dtype=q.dtype, device=DEVICE)
    lse = torch.empty(q.shape[:2], device=DEVICE)
    pre = None if prefix is None else (dev(prefix[0]), dev(prefix[1]))
    TritonPagedDecode(max_prefix)(q, dev(k_pool), dev(v_pool), dev(table), dev(lens), out, lse, 0.3, pre)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("bs", [4, 16])
def test_paged_decode_equals_softmax_over_gathered_keys(dtype, bs):
    case = paged_case(dtype, bs=bs)
    out, lse = run_kernel(*case)
    qkv, k_pool, v_pool, table, lens, _ = case
    want, want_lse = reference_decode(qkv.to(dtype)[:, 0], k_pool, v_pool, table, lens, 0.3)
    tol = DTYPES[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).split(".")[1])
def test_in_pool_prefixes_of_0_to_64_positions_lead_each_rows_keys(dtype):
    lens, prefixes = (1, 5, 16, 40, 3, 260), [0, 1, 16, 33, 64, 64]
    case = paged_case(dtype, lens=lens, prefixes=prefixes)
    out, lse = run_kernel(*case)
    qkv, k_pool, v_pool, table, lens_t, prefix = case
    want, want_lse = reference_decode(qkv.to(dtype)[:, 0], k_pool, v_pool, table, lens_t, 0.3, prefix)
    tol = DTYPES[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)


def test_long_rows_split_and_merge_to_the_same_result():
    from prefixserve.engine.triton_decode import splits_for

    case = paged_case(torch.float32, heads=2, kv_heads=2, lens=(700, 3, 1025), prefixes=[10, 0, 64])
    assert splits_for(case[3].shape[1] * 16 + 64) > 1
    split = run_kernel(*case)
    qkv, k_pool, v_pool, table, lens, prefix = case
    want, want_lse = reference_decode(qkv[:, 0], k_pool, v_pool, table, lens, 0.3, prefix)
    torch.testing.assert_close(split[0].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[1].double(), want_lse, atol=1e-5, rtol=1e-5)


def test_a_nan_stays_in_its_row_and_a_block_outside_the_pool_poisons_only_its_row():
    qkv, k_pool, v_pool, table, lens, _ = paged_case(torch.float32, lens=(5, 20, 9, 30))
    v_pool[table[1, 0], 3, 0, 0] = float("nan")  # row 1's own 4th value
    table[3, 1] = k_pool.shape[0] + 5  # row 3 names a block past the pool's end
    out, _ = run_kernel(qkv, k_pool, v_pool, table, lens, None)
    bad = ~out.flatten(1).isfinite().all(-1)
    assert bad.tolist() == [False, True, False, True]


def test_bad_layouts_are_refused_by_name():
    from prefixserve.engine.triton_decode import TritonPagedDecode

    qkv, k_pool, v_pool, table, lens, _ = (
        t.to(DEVICE) if t is not None else t for t in paged_case(torch.float32)
    )
    q, out = qkv[:, 0], torch.empty(qkv[:, 0].shape, device=DEVICE)
    with pytest.raises(ValueError, match="int32 lens per row"):
        TritonPagedDecode()(q, k_pool, v_pool, table, lens.long(), out, None, 0.3)
    with pytest.raises(ValueError, match="one dtype"):
        TritonPagedDecode()(q.half(), k_pool, v_pool, table, lens, out, None, 0.3)


# ---- the NTK decode kernel ---------------------------------------------------------------------


def ntk_reference(q, k, v, lens, z, kvec, scale):
    """The NTK decode formula in float64: softmax-weighted values plus the NTK terms, per row and head."""
    out = torch.empty(q.shape, dtype=torch.float64)
    d = q.shape[-1]
    for r in range(q.shape[0]):
        n = int(lens[r])
        qr = q[r].double()  # [H, D]
        s = torch.einsum("hd,hnd->hn", qr, k[r, :, :n].double()) * scale  # [H, n]
        top = torch.clamp(s.max(-1).values, min=0)[:, None]  # [H, 1]
        e = torch.exp(s - top)
        f = torch.where(qr / d**0.25 > 0, qr / d**0.25 + 1, torch.exp(qr / d**0.25))  # phi(q) [H, D]
        num = torch.einsum("hn,hnd->hd", e, v[r, :, :n].double()) + torch.einsum(
            "hd,hde->he", f, z[r].double()
        ) * torch.exp(-top)
        den = e.sum(-1, keepdim=True) + (f * kvec[r].double()).sum(-1, keepdim=True) * torch.exp(-top)
        out[r] = num / den
    return out


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).split(".")[1])
def test_ntk_decode_kernel_equals_its_formula_on_strided_views(dtype):
    from prefix_store.kinds.ntk_triton import ntk_decode

    g = torch.Generator().manual_seed(3)
    rows, heads, span, dim = 4, 2, 80, 16
    lens = torch.tensor([1, 31, 64, 80], dtype=torch.int32)
    kv = torch.randn(rows, 2, span, heads, dim, generator=g)  # K, V as the runner's gathered views
    for r, n in enumerate(lens.tolist()):
        kv[r, :, n:] = float("nan")  # every position past each row's length
    k, v = kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)  # [R, H, span, D], strided
    qkv = torch.randn(rows, 3, heads, dim, generator=g)
    z = torch.randn(rows, heads, dim, dim, generator=g).abs() * 0.1
    kvec = torch.rand(rows, heads, dim, generator=g) + 0.1
    dev = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    got = ntk_decode(dev(qkv)[:, 0], dev(k), dev(v), lens.to(DEVICE), dev(z), dev(kvec), 0.25)
    want = ntk_reference(
        dev(qkv)[:, 0].cpu(), dev(k).cpu(), dev(v).cpu(), lens, dev(z).cpu(), dev(kvec).cpu(), 0.25
    )
    tol = DTYPES[dtype]
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


# ---- the engine's Triton paths against its eager ones ------------------------------------------


def test_engine_decodes_through_the_triton_kernel_as_through_gathered_blocks(tiny_model_dir):
    from prefixserve.engine import SamplingParams
    from prefixserve.model import load_model

    from .helpers import PROMPTS, collect, make_ntk, make_prefixes
    from .test_paged_engine import engine_with

    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    seeded = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)
    model = load_model(tiny_model_dir, device=DEVICE)
    prefixes = {**make_prefixes(model, [3, 9, 70]), "n1": make_ntk(model, 1)}
    mix = [("p3", greedy), (None, greedy), ("n1", seeded), ("p70", greedy), ("p9", seeded), ("p9", greedy)]
    runs = {}
    for in_place in (True, False):
        engine = engine_with(model, prefixes, max_running=8, record_logits=True, paged_kernel=in_place)
        kernel = type(engine.runner._paged_decode).__name__
        assert kernel == ("TritonPagedDecode" if in_place else "NoneType")
        for i, (pid, params) in enumerate(mix):
            engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid, request_id=f"r{i}")
        runs[in_place] = {rid: collect(outs) for rid, outs in engine.run_to_completion().items()}
    for rid, (tokens, logits, _) in runs[True].items():
        assert tokens == runs[False][rid][0]
        torch.testing.assert_close(
            torch.stack(logits), torch.stack(runs[False][rid][1]), atol=1e-4, rtol=1e-4
        )


def test_fused_ntk_decode_kernel_in_the_engine_matches_the_eager_path(tiny_model_dir, hf_model):
    from prefix_store.kinds import NtkPrefixKind, ntk_triton
    from prefixserve.model import load_model

    from .helpers import make_ntk
    from .reference import ntk_generate
    from .test_ntk import NTK_ONLY, new_engine, run

    model = load_model(tiny_model_dir, device=DEVICE)
    assert ntk_triton.available(model.device)
    ntk = {"n1": make_ntk(model, 1), "n2": make_ntk(model, 2)}
    results = {}
    for fused in (True, False):
        engine = new_engine(model, 512, ntk)
        assert engine.runner.fused_kinds == {NtkPrefixKind}
        engine.runner.fused_kinds = {NtkPrefixKind} if fused else set()
        results[fused] = run(engine, NTK_ONLY)
    for i, (pid, _, max_new, _) in enumerate(NTK_ONLY):
        (tokens, logits, prompt), (eager_tokens, eager_logits, _) = (
            results[True][f"r{i}"],
            results[False][f"r{i}"],
        )
        assert tokens == eager_tokens == ntk_generate(hf_model, prompt, ntk[pid].z, ntk[pid].k, max_new)[0]
        for a, b in zip(logits, eager_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
