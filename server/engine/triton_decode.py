"""Paged decode attention for CUDA (Triton): each decode row's one query over its own K/V, read in place
from the paged pool through the row's block table (no gather copy), with the log-sum-exp of its scores
so the result merges with the row's prefix part (prefix_store/attention.py). The contract of the CPU
kernel (cpu_kernels.PagedDecode), argument for argument, so the runner calls either the same way:

- a row may name a KV prefix placed in the same pool (`prefix = (slot [R], length [R])`): its
  positions are read first, as the row's first keys, under one softmax with its own tokens;
- query head h reads KV head `h // (H / H_kv)` (grouped-query attention; GPT-2 has H_kv = H);
- long rows are split over `splits` programs (split-K, as vLLM's and SGLang's Triton decode kernels):
  each keeps its part's running max, sum and weighted values, and a second kernel merges the parts
  (FlashInfer's `merge_state`); one split writes the result directly.

K/V are read in their dtype (fp32, fp16, bf16) and every sum is float32; `lse` is float32. Positions past
a row's length are masked (never read), and a block id or prefix slot outside the pool turns the row's
output into NaN instead of reading outside it: the runner then drops that row (`_finite_rows`), as it
does for any row whose numbers go bad. A NaN in a row's own keys or values stays in that row.

Runs where `prefix_store.triton_env.runs_on(device)`: CUDA, or the CPU under Triton's interpreter (tests).
"""

from __future__ import annotations

import torch

from prefix_store.triton_env import tl, triton

from .cpu_kernels import layout_problems

SPLIT_TOKENS = 256  # a row's keys per program, at most (long rows are split this finely)
MAX_SPLITS = 16
BLOCK_N = 16  # keys per loop iteration: a [16, D] tile of K and of V (32 took ~168 registers at D=64)
# registers per thread the kernels must stay within, at num_warps=4 for sm_80 and sm_90 in every dtype
# (checked ahead of time by tests/test_triton_aot.py): 128 keeps at least 4 programs (16 warps) per SM
# to hide the memory latency of a bandwidth-bound kernel (~80 measured at D=64)
REGISTER_BUDGET = 128


if triton is not None:

    @triton.jit
    def _decode_part(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, pre_slot_ptr, pre_len_ptr,
        out_ptr, lse_ptr, acc_ptr, ml_ptr,
        q_stride, nb, num_slots, block_size, group, scale,
        H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_LSE: tl.constexpr,
    ):  # fmt: skip
        """Program (r, h, s): query head h of row r over split s of the row's keys."""
        r, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + r * q_stride + h * D + d, mask=dmask, other=0.0).to(tl.float32)  # [BLOCK_D]
        kvh = h // group
        p = tl.load(pre_len_ptr + r) if HAS_PREFIX else 0
        first = tl.load(pre_slot_ptr + r).to(tl.int64) if HAS_PREFIX else 0
        n = p + tl.load(lens_ptr + r)  # the row's keys: prefix positions, then its own tokens
        chunk = tl.cdiv(n, SPLITS)
        start = s * chunk
        end = tl.minimum(start + chunk, n)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
            valid = t < end
            pre = t < p
            own = tl.maximum(t - p, 0)
            blk = tl.load(table_ptr + r * nb + own // block_size, mask=valid & ~pre, other=0).to(tl.int64)
            slot = tl.where(pre, first + t, blk * block_size + own % block_size)  # [BLOCK_N] pool slots
            inside = (slot >= 0) & (slot < num_slots)
            offs = (slot[:, None] * H_KV + kvh) * D + d[None, :]  # [BLOCK_N, BLOCK_D]
            mask = (valid & inside)[:, None] & dmask[None, :]
            k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK_N]
            scores = tl.where(valid, tl.where(inside, scores, float("nan")), float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            w = tl.exp(scores - m_new)  # [BLOCK_N]; 0 past the row's end, NaN where a slot was outside
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(w[:, None] * v, axis=0)
            total = total * alpha + tl.sum(w, axis=0)
            m = m_new
        if SPLITS == 1:
            tl.store(out_ptr + (r * H + h) * D + d, (acc / total).to(out_ptr.dtype.element_ty), mask=dmask)
            if HAS_LSE:
                tl.store(lse_ptr + r * H + h, m + tl.log(total))
        else:  # this part's state, for _merge_parts: acc [R, H, S, BLOCK_D], (max, sum) [R, H, S, 2]
            part = (r * H + h) * SPLITS + s
            tl.store(acc_ptr + part * BLOCK_D + d, acc)
            tl.store(ml_ptr + part * 2, m)
            tl.store(ml_ptr + part * 2 + 1, total)

    @triton.jit
    def _merge_parts(
        out_ptr, lse_ptr, acc_ptr, ml_ptr,
        H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
        HAS_LSE: tl.constexpr,
    ):  # fmt: skip
        """Program (r, h): the SPLITS parts of row r's head h merged by their log-sum-exps."""
        r, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, BLOCK_D)
        base = (r * H + h) * SPLITS
        m = tl.load(ml_ptr + (base + s) * 2)  # [SPLITS]; -inf for a part with no keys
        total = tl.load(ml_ptr + (base + s) * 2 + 1)  # [SPLITS]
        top = tl.max(m, axis=0)  # finite: a row has at least one key
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # [SPLITS]
        acc = tl.load(acc_ptr + (base + s)[:, None] * BLOCK_D + d[None, :])  # [SPLITS, BLOCK_D]
        den = tl.sum(w * total, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / den
        tl.store(out_ptr + (r * H + h) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
        if HAS_LSE:
            tl.store(lse_ptr + r * H + h, top + tl.log(den))


def splits_for(span: int) -> int:
    """Programs per (row, head) for rows of up to `span` keys: a power of two, SPLIT_TOKENS keys each at
    most, MAX_SPLITS at most."""
    splits = 1
    while splits < MAX_SPLITS and splits * SPLIT_TOKENS < span:
        splits *= 2
    return splits


class TritonPagedDecode:
    """`paged_decode(q, k_pool, v_pool, table, lens, out, lse, scale[, prefix])`, as the CPU kernel.
    `max_prefix`: the longest in-pool prefix the caller passes (only sizes the split; any length is read
    whole)."""

    def __init__(self, max_prefix: int = 0) -> None:
        self.max_prefix = max_prefix

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        table: torch.Tensor,
        lens: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor | None,
        scale: float,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Row r's query `q[r]` `[H, D]` over its own `lens[r]` tokens, found in the pool `k`/`v`
        `[num_blocks, block_size, H_kv, D]` through `table [R, nb]` (int64): writes `out [R, H, D]` and,
        when given, `lse [R, H]` (float32). q may be a strided view of rows (each `[H, D]` contiguous).
        `prefix = (slot [R] int64, length [R] int32)`: row r's keys begin with `length[r]` positions at
        the pool's flat slots `slot[r] ..`. No host synchronisation."""
        rows, heads, dim = q.shape
        bad = layout_problems(q, k, v, table, lens, out, lse, prefix)
        grouped = k.dim() == 4 and k.shape[2] > 0 and heads % k.shape[2] == 0
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not grouped:
            bad.append("float32/float16/bfloat16 tensors with heads a multiple of the pool's KV heads")
        if bad:
            raise ValueError(f"paged_decode: expected {', '.join(bad)}")
        if rows == 0:
            return
        splits = splits_for(table.shape[1] * k.shape[1] + (self.max_prefix if prefix is not None else 0))
        block_d = triton.next_power_of_2(dim)
        acc = ml = out  # (unused with one split)
        if splits > 1:
            acc = torch.empty(rows, heads, splits, block_d, device=q.device, dtype=torch.float32)
            ml = torch.empty(rows, heads, splits, 2, device=q.device, dtype=torch.float32)
        slot, length = prefix if prefix is not None else (lens, lens)  # (unused without a prefix)
        _decode_part[(rows, heads, splits)](
            q, k, v, table, lens, slot, length, out, out if lse is None else lse, acc, ml,
            q.stride(0), table.shape[1], k.shape[0] * k.shape[1], k.shape[1], heads // k.shape[2], scale,
            H=heads, H_KV=k.shape[2], D=dim, BLOCK_D=block_d, BLOCK_N=BLOCK_N, SPLITS=splits,
            HAS_PREFIX=prefix is not None, HAS_LSE=lse is not None,
        )  # fmt: skip
        if splits > 1:
            _merge_parts[(rows, heads)](
                out, out if lse is None else lse, acc, ml,
                H=heads, D=dim, BLOCK_D=block_d, SPLITS=splits, HAS_LSE=lse is not None,
            )  # fmt: skip
