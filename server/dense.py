"""The frozen model's dense layers, laid out once for the fastest GEMM the device has.

Every linear layer keeps its weight as `[C_in, C_out]` for `torch.addmm` (MKL's sgemm on the CPU,
cuBLAS on CUDA). On a CPU whose oneDNN runs the dtype natively (float32 everywhere; bfloat16 only with
AVX512-BF16/AMX or AVX-NE-CONVERT), the weight is also packed once into oneDNN's blocked layout
(`mkldnn._reorder_linear_weight`, as vLLM's CPU backend does), and steps of up to `PACKED_ROWS` tokens
(decoding) run on it: measured on a 2-core AVX2 EPYC at GPT-2-small sizes, the 12 layers' GEMMs at 64
rows take 88 ms packed against 105 ms through addmm, and the LM head 39 ms against 53 ms. Larger steps
(prefill chunks) go back to addmm, which is faster there (530 ms against 600 ms at 512 rows). The LM
head, which runs on a step's sampling rows only, is packed alone when packing is on: oneDNN is faster at
every row count measured (16 .. 512).

The packed copy costs one more copy of the layers' weights in memory (340 MB for GPT-2 small in
float32); `pack=False` (PREFIXSERVE_CPU_PACKED=0) serves on the plain layout alone. Both layouts give
the same numbers up to float32 rounding (both are GEMMs; the reference tests hold either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACKED_ROWS = 192  # packed GEMMs for steps of up to this many tokens (measured crossover ~256)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed GEMM runs this dtype natively on this device."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass(frozen=True)
class Dense:
    """`y = x @ w + b` for x `[n, C_in]` -> `[n, C_out]`."""

    w: torch.Tensor | None  # [C_in, C_out] for addmm (None: the packed copy serves every size)
    b: torch.Tensor | None  # [C_out]
    packed: torch.Tensor | None = None  # oneDNN's blocked copy of w.T (opaque)

    @classmethod
    def of(cls, w: torch.Tensor, b: torch.Tensor | None, pack: bool, keep_plain: bool = True) -> Dense:
        """A layer over w `[C_in, C_out]`, packed as well when `pack` (the plain copy dropped unless
        `keep_plain`)."""
        if not pack:
            return cls(w, b)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), None)
        return cls(w if keep_plain else None, b, packed)

    def _packed_for(self, rows: int) -> bool:
        return self.packed is not None and (self.w is None or rows <= PACKED_ROWS)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x `[n, C_in]` -> `[n, C_out]` (written into `out` when given)."""
        if self._packed_for(x.shape[0]):
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
            return y if out is None else out.copy_(y)
        if self.b is None:
            return torch.mm(x, self.w, out=out)
        return torch.addmm(self.b, x, self.w, out=out)

    def add_to(self, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """acc `[n, C_out]` += x @ w + b, in place."""
        if self._packed_for(x.shape[0]):
            return acc.add_(torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], ""))
        if self.b is not None:
            acc.add_(self.b)
        return acc.addmm_(x, self.w)  # the residual is the matmul's accumulator


@dataclass(frozen=True)
class LayerDense:
    """One transformer layer's four dense layers."""

    attn: Dense  # [C] -> [3C] (Q, K, V)
    proj: Dense  # [C] -> [C]
    fc: Dense  # [C] -> [4C]
    out: Dense  # [4C] -> [C]
