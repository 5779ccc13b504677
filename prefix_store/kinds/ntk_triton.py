"""A fused CUDA kernel (Triton) for a decode step whose rows all have NTK prefixes.

On a GPU, the eager NTK path (ntk.py) launches ~25 small kernels per layer; this one kernel per layer
does the softmax attention over each row's own keys (online, one pass over K/V) and the NTK epilogue
`(sum_j e^{s_j} v_j + phi(q) Z) / (sum_j e^{s_j} + phi(q).k)`. Used where Triton runs (CUDA, or the
CPU under Triton's interpreter: triton_env.py); everywhere else the engine runs the eager path. The tests
check both against the formula.
"""

from __future__ import annotations

import torch

from ..triton_env import runs_on, tl, triton

BLOCK_N = 16  # keys per loop iteration (64 took ~230-254 registers at D=64, 32 ~150)
# registers per thread at num_warps=4 (sm_80, sm_90, every dtype; tests/test_triton_aot.py): 128 keeps at
# least 4 programs per SM (~96 measured at D=64, the [D, D] state Z read in one piece)
REGISTER_BUDGET = 128


def available(device: torch.device) -> bool:
    return runs_on(device)


if triton is not None:

    @triton.jit
    def _ntk_decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        lens_ptr,
        z_ptr,
        kv_ptr,
        out_ptr,
        sq_s,
        sq_h,
        sk_s,
        sk_h,
        sk_n,
        sz_s,
        sz_h,
        skv_s,
        skv_h,
        so_s,
        so_h,
        scale,
        d_root4,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        s, h = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + s * sq_s + h * sq_h + d).to(tl.float32)  # [D]
        length = tl.load(lens_ptr + s)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        base = s * sk_s + h * sk_h
        for start in range(0, length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < length
            offs = base + n[:, None] * sk_n + d[None, :]
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, D]
            scores = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))  # [BLOCK_N]
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)  # [BLOCK_N]
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, D]
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            total = total * alpha + tl.sum(p, axis=0)
            m = m_new
        x = q / d_root4
        f = tl.where(x > 0, x + 1.0, tl.exp(x))  # phi(q) = elu(q / D^0.25) + 1
        z = tl.load(z_ptr + s * sz_s + h * sz_h + d[:, None] * D + d[None, :]).to(tl.float32)  # [D, D]
        u = tl.sum(f[:, None] * z, axis=0)  # phi(q) Z: [D]
        w = tl.sum(f * tl.load(kv_ptr + s * skv_s + h * skv_h + d).to(tl.float32), axis=0)  # phi(q).k
        top = tl.maximum(m, 0.0)  # everything scaled by e^-max(m, 0): nothing overflows
        a, c = tl.exp(m - top), tl.exp(-top)
        out = (acc * a + u * c) / (total * a + w * c)
        tl.store(out_ptr + s * so_s + h * so_h + d, out.to(out_ptr.dtype.element_ty))


def ntk_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    z: torch.Tensor,
    kvec: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q `[S, H, D]`, k/v `[S, H, span, D]` (strided views), lens `[S]` positions per row,
    z `[S, H, D, D]`, kvec `[S, H, D]` (contiguous) -> `[S, H, D]`."""
    rows, heads, dim = q.shape
    out = torch.empty(rows, heads, dim, dtype=q.dtype, device=q.device)
    assert k.stride(3) == 1 and q.stride(2) == 1 and z.is_contiguous() and kvec.stride(2) == 1
    _ntk_decode_kernel[(rows, heads)](
        q,
        k,
        v,
        lens,
        z,
        kvec,
        out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        z.stride(0),
        z.stride(1),
        kvec.stride(0),
        kvec.stride(1),
        out.stride(0),
        out.stride(1),
        scale,
        dim**0.25,
        D=dim,
        BLOCK_N=BLOCK_N,
    )
    return out
