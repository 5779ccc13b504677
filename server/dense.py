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

The packed copies cost one more copy of the layers' and the LM head's weights in memory (~490 MB for
GPT-2 small in float32: the model keeps its plain layout); `pack=False` (PREFIXSERVE_CPU_PACKED=0)
serves on the plain layout alone. Both layouts give the same numbers up to float32 rounding (both are
GEMMs; the reference tests hold either way).

`Int8Dense` (PREFIXSERVE_QUANTIZE=int8, float32 models on the CPU) runs every dense layer and the LM
head as an int8 GEMM through fbgemm (torch's quantized linear ops): weights quantized once per output
channel, activations per row at each call. Per row, not per tensor as dynamic quantization does, so a
row's numbers never depend on the other rows of its step: a mixed batch equals each row alone, relative
to the quantized model (architecture.md invariant 3). See `Int8Dense` for the ranges.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

QUANTIZE = ("int8",)  # the serving options for the dense layers' arithmetic (besides none)

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
            return acc.add_(self(x))
        if self.b is not None:
            acc.add_(self.b)
        return acc.addmm_(x, self.w)  # the residual is the matmul's accumulator


class Int8Dense:
    """`y = x @ w + b` as an int8 GEMM: x `[n, C_in]` float32 -> `[n, C_out]` float32.

    Each row of x is scaled to integers in [-127, 127] by its own max (`s_r = max|x_r| / 127`, rounded
    here, so the kernel's own rounding never applies), the weights per output channel to [-63, 63]
    (`w_c = max|w_c| / 63`); fbgemm's int32 products are exact, then scaled back: `y = (q_x @ q_w) * s_r
    * w_c + b`. Seven-bit weights because fbgemm's AVX2 kernel sums pairs of u8 x s8 products in int16
    (`vpmaddubsw`): with the activations offset to u8 [1, 255], 2 * 255 * 63 = 32130 fits, 8-bit weights
    would saturate. A non-finite row stays non-finite (its scale is, and multiplies its outputs), so bad
    rows are still found by their outputs.
    """

    ROW_LEVELS, WEIGHT_LEVELS = 127, 63

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        wt = w.t().float().contiguous()  # [C_out, C_in]
        scale = (wt.abs().amax(1) / self.WEIGHT_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.zeros(wt.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the quantized tensor API is deprecated; its ops are what runs
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(wt, scale.double(), zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.b = b  # [C_out] added after the row scales (the kernel would add it before)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x `[n, C_in]` -> `[n, C_out]` (written into `out` when given)."""
        s = (
            x.abs().amax(1, keepdim=True).div_(self.ROW_LEVELS).clamp_min_(torch.finfo(x.dtype).tiny)
        )  # [n, 1]
        q = torch.div(x, s).round_()  # [n, C_in] integers in [-127, 127], as floats
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q, 1.0, 128, self.packed)
        y = y.mul_(s) if self.b is None else torch.addcmul(self.b, y, s, out=y)
        return y if out is None else out.copy_(y)

    def add_to(self, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """acc `[n, C_out]` += x @ w + b, in place."""
        return acc.add_(self(x))


def quantization_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `Int8Dense` runs here: float32 on a CPU with fbgemm (x86)."""
    engines = torch.backends.quantized.supported_engines
    return device.type == "cpu" and dtype == torch.float32 and "fbgemm" in engines


@dataclass(frozen=True)
class LayerDense:
    """One transformer layer's four dense layers."""

    attn: Dense | Int8Dense  # [C] -> [3C] (Q, K, V)
    proj: Dense | Int8Dense  # [C] -> [C]
    fc: Dense | Int8Dense  # [C] -> [4C]
    out: Dense | Int8Dense  # [4C] -> [C]
