"""Attention as mergeable partial states (FlashInfer's cascade attention; Hydragen).

A query's context is split into parts (its own tokens, its prefix); each part yields a `Partial`
`(num, den, m)` meaning numerator `num * e^m` and denominator `den * e^m`, so that merging two parts
is exact and the result is `num / den`:

- softmax over keys K with values V: `num = softmax(qK) V`, `den = 1`, `m = logsumexp(qK)`;
- an NTK prefix (kinds/ntk.py): `num = phi(q) Z`, `den = phi(q).k`, `m = 0` (no exponent to carry).

Everything is float32 whatever the serving dtype: `e^m` is kept apart, so nothing overflows.

`QueryGroups` is the shape every kind's attention uses: the step's query tokens grouped by the prefix
they attend to (rows sharing a prefix stack their queries: one matmul per group, the prefix read
once), padded into one `[G, T, H, D]` batch where that is cheaper than one call per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .staging import StepInputs


@dataclass
class Partial:
    """One part of some queries' attention. num `[T, H, D]`, den `[T, H]`, m `[T, H]` (float32)."""

    num: torch.Tensor
    den: torch.Tensor
    m: torch.Tensor

    @staticmethod
    def softmax(out: torch.Tensor, lse: torch.Tensor) -> Partial:
        """From softmax attention's output `[T, H, D]` and log-sum-exp of its scores `[T, H]`."""
        return Partial(out.float(), torch.ones_like(lse, dtype=torch.float32), lse.float())

    def merge(self, other: Partial) -> Partial:
        """The attention over both parts' keys together (exact, up to rounding)."""
        m = torch.maximum(self.m, other.m)  # [T, H]
        a, b = torch.exp(self.m - m), torch.exp(other.m - m)  # [T, H]
        num = self.num * a.unsqueeze(-1) + other.num * b.unsqueeze(-1)  # [T, H, D]
        return Partial(num, self.den * a + other.den * b, m)

    def value(self) -> torch.Tensor:
        """The attention output `[T, H, D]` (float32)."""
        return self.num / self.den.unsqueeze(-1)

    def select(self, rows: torch.Tensor) -> Partial:
        return Partial(self.num[rows], self.den[rows], self.m[rows])

    @staticmethod
    def cat(parts: list[Partial]) -> Partial:
        if len(parts) == 1:
            return parts[0]
        return Partial(*(torch.cat([getattr(p, f) for p in parts]) for f in ("num", "den", "m")))


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores, in one pass over K and V.

    q `[B, H, Tq, D]`, k/v `[B, Hkv, S, D]` (strided views are fine; grouped-query attention when
    Hkv < H: query head h reads KV head h // (H / Hkv)), bias additive `[B|1, 1, Tq|1, S]` in q's dtype
    (0 or -inf) or None -> out `[B, H, Tq, D]` (q's dtype), lse `[B, H, Tq]` float32.
    """
    b, h, tq, d = q.shape
    if (hkv := k.shape[1]) != h:  # each KV head's query heads as one longer query: no K/V copies
        g = h // hkv
        q = q.reshape(b, hkv, g * tq, d)  # [B, Hkv, g*Tq, D]
        if bias is not None and bias.shape[2] != 1:
            bias = bias.repeat(1, 1, g, 1)  # [B|1, 1, g*Tq, S]
        out, lse = _attention_lse(q, k, v, bias, scale)
        return out.reshape(b, h, tq, d), lse.reshape(b, h, tq)
    return _attention_lse(q, k, v, bias, scale)


def _attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
        return out, lse
    # elsewhere: the plain formula (scores in float32: q scaled first, so the logit itself is bounded)
    s = torch.matmul(q * scale, k.transpose(-1, -2)).float()  # [B, H, Tq, S]
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, -1)  # [B, H, Tq]
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), v)  # [B, H, Tq, D]
    return out, lse


@dataclass
class QueryGroups:
    """The query tokens of one step grouped by the prefix they attend to.

    `tokens` `[T]`: every grouped token's index in the step, group by group; `padded` `[G, Tmax]`:
    each group's token indices padded (with any valid index) to the longest group; `valid` `[G, Tmax]`
    bool marks the real ones, so `padded[valid] == tokens`.
    """

    keys: list[object]  # G prefix identities, in group order
    tokens: torch.Tensor  # [T]
    padded: torch.Tensor  # [G, Tmax]
    valid: torch.Tensor  # [G, Tmax]
    sizes: list[int]  # tokens per group
    group_of: torch.Tensor  # [T] each grouped token's group

    @property
    def full(self) -> bool:
        """Every group has Tmax tokens: no padding, so `padded.flatten() == tokens`."""
        return len(set(self.sizes)) == 1

    @staticmethod
    def build(members: dict[object, list[int]], inputs: StepInputs) -> QueryGroups:
        """`members`: prefix identity -> the step's token indices that attend to it (staged in `inputs`)."""
        keys = list(members)
        sizes = [len(members[key]) for key in keys]
        width = max(sizes)
        flat = [t for key in keys for t in members[key]]
        pad = flat[0]
        rows = [members[key] + [pad] * (width - len(members[key])) for key in keys]
        valid = [[True] * n + [False] * (width - n) for n in sizes]
        return QueryGroups(
            keys=keys,
            tokens=inputs.put(flat),
            padded=inputs.put2d(rows),
            valid=inputs.put2d(valid, torch.bool),
            sizes=sizes,
            group_of=inputs.put([g for g, n in enumerate(sizes) for _ in range(n)]),
        )

    def gather(self, q: torch.Tensor) -> torch.Tensor:
        """The queries of every group, padded: q `[N, H, D]` -> `[G, H, Tmax, D]`."""
        return q[self.padded].transpose(1, 2)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group results back to one row per grouped token: `[G, H, Tmax, ...]` -> `[T, H, ...]`."""
        return x.transpose(1, 2)[self.valid]
