"""What a prefix must match to run on the loaded model: the model's shapes and fingerprint (`Expect`) and
the largest magnitudes its keys and values may hold (`MagnitudeBounds`). A leaf module: the file format
(format.py) and every prefix kind (kinds/) check against these, and it imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .spec import ModelSpec

F16_MAX = 65504.0  # float16's largest finite value: the narrowest range we serve in (bf16, fp32: ~3.4e38)
LOGIT_HEADROOM = 4.0  # attention logits stay below F16_MAX / 4
OUTPUT_HEADROOM = 8.0  # projected attention outputs stay below F16_MAX / 8; so does any value
OWN_MARGIN = 4.0  # a layer's K/V bound is at least this multiple of what the model itself produces
# A varied probe (prose, a table row, digits, code, punctuation) for the model's own K/V magnitudes.
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. name : Aromi | food : Italian | area : riverside\n"
    "In 1887, 42 of the 365 ships (11.5%) sailed from Boston to Lisbon; def f(x): return x ** 2 + 1 #\n"
    "Q: What is prefix tuning? A: A small set of key/value vectors that steers a frozen model."
)


@dataclass(frozen=True)
class MagnitudeBounds:
    """The largest |value| a prefix may hold at each layer, so that attention cannot overflow in float16
    (nor in bfloat16 or float32, whose range is wider) whatever the input. Derived from the weights:

    - Queries: layer norm's (or RMSNorm's) normalised vector n has ||n|| <= sqrt(C) before its affine
      (g, b; RMSNorm: b = 0), so head h's query q = (g*n) W_h + (b W_h + c_h) has, for every input
      (Cauchy-Schwarz), ||q|| <= Q = sigma_max(diag(g) W_h) sqrt(C) + ||b W_h + c_h||, maximised over
      heads. A rotary embedding (the Llama family) rotates q, which keeps its norm.
    - Keys: |k_i| <= B_k gives a logit |q.k| * scale <= Q sqrt(D) B_k scale; kept below F16_MAX / 4:
      B_k = F16_MAX / (4 Q sqrt(D) scale).
    - Values: attention's output is a convex combination of values, so |o_i| <= B_v, and the output
      projection gives |(o W_o)_j| <= B_v max_j ||W_o[:, j]||_1; kept below F16_MAX / 8:
      B_v = F16_MAX / (8 max_j ||W_o[:, j]||_1).
    - These worst cases assume a query aligned with W_q's top singular direction, which real inputs
      never give; on a trained checkpoint they can fall below the keys and values the model itself
      produces (a text prefix is exactly such K/V). So each key/value bound is at least OWN_MARGIN
      times the largest |key| / |value| the model gives that layer on a probe text. Where that floor
      governs, an overflow needs a query far beyond the model's own, and the engine's per-row guard
      ends such a row alone.
    - NTK: `ntk_combine` computes phi(q) Z and phi(q).k in float32 whatever the serving dtype, so they
      cannot overflow for values that fit float16; Z and k are bounded by the float16 cap below, and
      k >= 0 keeps phi(q).k >= 0, so the denominator S + phi(q).k stays >= S > 0.
    - Every bound is capped at F16_MAX / 8, so the values themselves fit float16 with room to spare.

    The weights are read rounded to bfloat16 and each bound is rounded down to two significant digits,
    so one checkpoint served in float32, bfloat16 or float16 has one bound (as it has one fingerprint).
    """

    key: tuple[float, ...]  # [n_layer]
    value: tuple[float, ...]  # [n_layer]
    ntk: tuple[float, ...]  # [n_layer], for ntk_z and ntk_k

    @classmethod
    def derive(cls, spec: ModelSpec, layers: Sequence[Any], own_peaks: torch.Tensor) -> MagnitudeBounds:
        """The bounds from the frozen weights and the model's own K/V peaks. `layers`: per layer the
        attention weights `ln1_w`, `ln1_b` `[C]` (None: no bias), `attn_w` `[C, W]` (queries in the first
        H*D columns), `attn_b` `[W]` (or None), `proj_w` `[H*D, C]` (attributes, as the server's
        families' `LayerWeights`); `own_peaks [L, 2]`: the largest |key| and |value|
        the model gives each layer on PROBE_TEXT (measured by the server, which runs the model:
        `prefixserve.compile.magnitude_bounds`)."""
        h, d = spec.n_head, spec.head_dim
        cap = F16_MAX / OUTPUT_HEADROOM
        own = own_peaks.float().cpu() * OWN_MARGIN  # [L, 2]
        key, value = [], []
        for layer, lw in enumerate(layers):
            g, w = _bf16(lw.ln1_w), _bf16(lw.attn_w)
            b, bias = (_bf16(t) if t is not None else None for t in (lw.ln1_b, lw.attn_b))
            q = _query_norm_bound(g, b, w, bias, h, spec.q_width)
            proj = float(_bf16(lw.proj_w).abs().sum(0).max())  # max_j ||W_o[:, j]||_1 ([in, out] layout)
            worst_k = F16_MAX / (LOGIT_HEADROOM * q * d**0.5 * spec.attn_scale(layer))
            worst_v = F16_MAX / (OUTPUT_HEADROOM * proj)
            key.append(_round_down(min(cap, max(worst_k, float(own[layer, 0])))))
            value.append(_round_down(min(cap, max(worst_v, float(own[layer, 1])))))
        return cls(tuple(key), tuple(value), (_round_down(cap),) * spec.n_layer)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16).float()


def _round_down(x: float) -> float:
    """x rounded down to two significant digits (1176.7 -> 1100, 186.8 -> 180)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.floor(x / step) * step


def _query_norm_bound(
    g: torch.Tensor,
    b: torch.Tensor | None,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    n_head: int,
    q_width: int,
) -> float:
    """Q: the largest query norm any input can give one head of a layer. g, b `[C]` (the norm's affine;
    b None: none), w `[C, W]`, bias `[W]` or None (the QKV projection, queries in the first q_width
    columns)."""
    c = g.shape[0]
    wq = (g[:, None] * w[:, :q_width]).view(c, n_head, -1).transpose(0, 1)  # [H, C, D]
    gram = wq.transpose(1, 2) @ wq  # [H, D, D]: sigma_max(wq)^2 is its largest eigenvalue
    spread = torch.linalg.eigvalsh(gram)[:, -1].clamp(min=0).sqrt() * c**0.5  # [H]
    offset = w.new_zeros(q_width)  # [H*D]
    if b is not None:
        offset += b @ w[:, :q_width]
    if bias is not None:
        offset += bias[:q_width]
    return float((spread + offset.view(n_head, -1).norm(dim=-1)).max())


@dataclass(frozen=True)
class Expect:
    """What a prefix must match to run on the loaded model."""

    spec: ModelSpec
    fingerprint: str
    max_prefix_len: int
    max_bytes: int
    bounds: MagnitudeBounds | None = None  # None: magnitudes are not checked (finiteness still is)
