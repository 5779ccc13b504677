"""Kind `ntk`: NTK-Attention prefixes (Liang, Shi, Song, Yang 2024, "Towards Infinite-Long Prefix in
Transformer").

An infinitely long prefix is approximated per layer and head by `Z [D, D]` and `k [D]`: a query q that
attends to its own (causal) keys K and values V gets

    out = (sum_j exp(q.k_j/sqrt(D)) v_j + phi(q) Z) / (sum_j exp(q.k_j/sqrt(D)) + phi(q).k)

with phi(x) = elu(x / D**0.25) + 1. The extra terms cost O(D^2) per token and head, whatever the
prefix "length". As a partial state (attention.py) that is `num = phi(q) Z`, `den = phi(q).k`, `m = 0`,
merged with the softmax part over the row's own keys. A row with an NTK prefix occupies no positions:
its tokens start at 0.

File: `ntk_k [n_layer, n_kv_head, head_dim]` and either `ntk_z [n_layer, n_kv_head, head_dim, head_dim]`
or its low-rank factors `ntk_z_a [.., head_dim, s]` and `ntk_z_b [.., s, head_dim]` (multiplied out on
load). Z and k summarise keys and values, so there is one per KV head: with grouped-query attention
(the Llama family) a KV head's Z and k serve its n_head / n_kv_head query heads, as its keys do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import Partial, QueryGroups
from ..errors import InvalidPrefixFile
from ..limits import KIND_NTK
from ..spec import ModelSpec
from ..staging import StepInputs
from ..state import NtkPrefix
from .base import StackCache, check_peaks
from .ntk_triton import available as fused_kernel_available
from .ntk_triton import ntk_decode as fused_ntk_decode

if TYPE_CHECKING:
    from ..bounds import Expect, MagnitudeBounds


def phi(q: torch.Tensor) -> torch.Tensor:
    """The feature map elu(x / D**0.25) + 1 (positive), over the last dim. `[..., D]` -> `[..., D]`."""
    return F.elu(q / q.shape[-1] ** 0.25) + 1.0


def ntk_partial(q: torch.Tensor, z: torch.Tensor, k: torch.Tensor) -> Partial:
    """An NTK prefix's part of attention, in float32 (phi(q) Z could overflow float16).
    q `[..., H, D]`, z `[..., Hkv, D, D]`, k `[..., Hkv, D]` (broadcast over the leading dims; Hkv
    divides H: grouped-query attention)."""
    z, k = per_query_head(z, q.shape[-2], -3), per_query_head(k, q.shape[-2], -2)
    f = phi(q.float())  # [..., H, D]
    num = torch.matmul(f.unsqueeze(-2), z.float()).squeeze(-2)  # [..., H, D]
    den = (f * k.float()).sum(-1)  # [..., H]
    return Partial(num, den, torch.zeros_like(den))


def per_query_head(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """A per-KV-head tensor (its heads at `dim`) for `heads` query heads: KV head j serves query heads
    j*g .. j*g+g-1 (g = heads / KV heads). The tensor itself when there is one KV head per query head."""
    return t if t.shape[dim] == heads else t.repeat_interleave(heads // t.shape[dim], dim=dim)


def ntk_combine(
    o: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, z: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Softmax attention over a row's own keys (output o `[..., H, D]`, log-sum-exp lse `[..., H]`) merged
    with the NTK terms of queries q `[..., H, D]`: `(o S + phi(q) Z) / (S + phi(q).k)` with S = exp(lse).
    -> `[..., H, D]` in o's dtype. (The trainer's forward; the engine merges the same partials.)"""
    return Partial.softmax(o, lse).merge(ntk_partial(q, z, k)).value().to(o.dtype)


def check_ntk(prefix: NtkPrefix, n_layer: int, n_head: int, head_dim: int) -> str | None:
    """What is wrong with an NTK prefix for this model (shapes, dtype, finite values), or None."""
    want_z, want_k = [n_layer, n_head, head_dim, head_dim], [n_layer, n_head, head_dim]
    if list(prefix.z.shape) != want_z:
        return f"ntk_z must have shape {want_z} for this model, got {list(prefix.z.shape)}"
    if list(prefix.k.shape) != want_k:
        return f"ntk_k must have shape {want_k} for this model, got {list(prefix.k.shape)}"
    if not (prefix.z.is_floating_point() and prefix.k.is_floating_point()):
        return f"NTK tensors must be floating point, got {prefix.z.dtype} and {prefix.k.dtype}"
    if not bool(torch.isfinite(prefix.z).all() and torch.isfinite(prefix.k).all()):
        return "NTK prefix contains NaN or Inf values"
    return None


PAD_TOKENS = 8  # prefixes read by at most this many query tokens are batched (padded to the largest)


@dataclass
class _Plan:
    groups: QueryGroups | None  # prefixes read by few tokens (decode rows), in one padded call
    z: torch.Tensor | None  # [G, L, H, D, D] their stacked Z
    k: torch.Tensor | None  # [G, L, H, D]
    singles: list[tuple[torch.Tensor, NtkPrefix]]  # (token indices [Tg], prefix): a call each


class NtkPrefixKind:
    name: ClassVar[str] = KIND_NTK
    positional: ClassVar[bool] = False  # occupies no positions: the row's tokens start at 0
    weight_side: ClassVar[bool] = False  # attaches at attention
    placed: ClassVar[bool] = False  # a fixed-size state, not per-token K/V
    tensor_sets: ClassVar[tuple[list[str], ...]] = (["ntk_k", "ntk_z"], ["ntk_k", "ntk_z_a", "ntk_z_b"])
    state_type: ClassVar[type] = NtkPrefix  # what a loaded prefix of this kind is (kind_of)

    def __init__(self) -> None:
        self._stacks = StackCache()

    # ---- format and validation -------------------------------------------------------------------
    @staticmethod
    def check_shapes(shapes: dict[str, list[int]], prefix_len: int, expect: Expect) -> None:
        spec = expect.spec
        lh, d = [spec.n_layer, spec.n_kv_head], spec.head_dim
        want = {"ntk_k": [*lh, d], "ntk_z": [*lh, d, d]}
        if "ntk_z_a" in shapes:
            rank = shapes["ntk_z_a"][-1] if len(shapes["ntk_z_a"]) == 4 else -1
            if not 1 <= rank <= d:
                raise InvalidPrefixFile(
                    f"ntk_z_a must be [{lh[0]}, {lh[1]}, {d}, s] with 1 <= s <= {d}, got {shapes['ntk_z_a']}"
                )
            want.update(ntk_z_a=[*lh, d, rank], ntk_z_b=[*lh, rank, d])
        for name, shape in shapes.items():
            if shape != want[name]:
                raise InvalidPrefixFile(f"{name} must have shape {want[name]} for this model, got {shape}")

    @staticmethod
    def check_magnitudes(arrays: dict[str, np.ndarray], bounds: MagnitudeBounds) -> None:
        n_layer = len(bounds.ntk)
        k = arrays["ntk_k"].reshape(n_layer, -1)  # [L, H*D]
        if (low := float(k.min())) < 0:
            layer = int(np.argmin(k.min(-1)))
            raise InvalidPrefixFile(
                f"ntk_k must be >= 0 everywhere (so the NTK denominator S + phi(q).k stays positive; a"
                f" trained k is softplus(.) > 0), got {low:.4g} at layer {layer}"
            )
        check_peaks("ntk_k", k.max(-1), bounds.ntk)
        if "ntk_z" in arrays:
            z, name = arrays["ntk_z"], "ntk_z"
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
                z, name = arrays["ntk_z_a"] @ arrays["ntk_z_b"], "ntk_z (= ntk_z_a @ ntk_z_b)"
        check_peaks(name, np.abs(z).reshape(n_layer, -1).max(-1), bounds.ntk)

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> NtkPrefix:
        if "ntk_z" in tensors:
            return NtkPrefix(tensors["ntk_z"], tensors["ntk_k"])
        return NtkPrefix.from_factors(tensors["ntk_z_a"], tensors["ntk_z_b"], tensors["ntk_k"])

    @staticmethod
    def check(state: NtkPrefix, spec: ModelSpec, max_len: int) -> str | None:
        return check_ntk(state, spec.n_layer, spec.n_kv_head, spec.head_dim)

    @staticmethod
    def length(state: NtkPrefix) -> int:
        return 0

    @staticmethod
    def nbytes(state: NtkPrefix) -> int:
        return state.nbytes

    @staticmethod
    def to(state: NtkPrefix, device: torch.device, dtype: torch.dtype) -> NtkPrefix:
        return state.to(device, dtype)

    # ---- attention -------------------------------------------------------------------------------
    def idle(self) -> None:
        self._stacks.clear()

    def plan(self, members: dict[int, list[int]], states: dict[int, NtkPrefix], inputs: StepInputs) -> _Plan:
        few = {key: toks for key, toks in members.items() if len(toks) <= PAD_TOKENS}
        singles = [(inputs.put(toks), states[key]) for key, toks in members.items() if key not in few]
        if not few:
            self._stacks.clear()
            return _Plan(None, None, None, singles)
        groups = QueryGroups.build(self._stacks.ordered(few, states), inputs)
        z, k = self._stacks.get([states[key] for key in groups.keys], _stack)
        return _Plan(groups, z, k, singles)

    def attend(self, layer: int, q: torch.Tensor, plan: _Plan, scale: float) -> tuple[torch.Tensor, Partial]:
        tokens: list[torch.Tensor] = []
        parts: list[Partial] = []
        if (g := plan.groups) is not None:
            qg = q[g.padded]  # [G, Tmax, H, D]
            part = ntk_partial(
                qg, plan.z[:, layer].unsqueeze(1), plan.k[:, layer].unsqueeze(1)
            )  # num [G, Tmax, H, D], den and m [G, Tmax, H]
            tokens.append(g.tokens)
            parts.append(Partial(part.num[g.valid], part.den[g.valid], part.m[g.valid]))
        for toks, state in plan.singles:  # every query of the prefix's rows at once
            tokens.append(toks)
            parts.append(ntk_partial(q[toks], state.z[layer], state.k[layer]))  # over [Tg, H, ..]
        return torch.cat(tokens) if len(tokens) > 1 else tokens[0], Partial.cat(parts)

    # ---- the fused CUDA decode kernel --------------------------------------------------------------
    def fuses(self, device: torch.device) -> bool:
        return fused_kernel_available(device)  # (Triton: CUDA, or CPU tensors under its interpreter)

    def fused_decode(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lens: torch.Tensor,
        plan: _Plan,
        scale: float,
    ) -> torch.Tensor:
        """A decode step whose every row has an NTK prefix, in one Triton kernel per layer (CUDA): the
        softmax over each row's own keys and the NTK terms together. q `[B, H, D]` (one token per row),
        k/v `[B, H, span, D]`, lens `[B]` int32 -> `[B, H, D]`."""
        rows, heads, d = q.shape
        z = q.new_empty(rows, heads, d, d)  # [B, H, D, D] each row's Z (token i is row i)
        kv = q.new_empty(rows, heads, d)  # [B, H, D]
        if (g := plan.groups) is not None:
            z[g.tokens] = per_query_head(plan.z[g.group_of, layer], heads, 1)
            kv[g.tokens] = per_query_head(plan.k[g.group_of, layer], heads, 1)
        for toks, state in plan.singles:
            z[toks], kv[toks] = (
                per_query_head(state.z[layer], heads, 0),
                per_query_head(state.k[layer], heads, 0),
            )
        return fused_ntk_decode(q, k, v, lens, z, kv, scale)


def _stack(states: list[NtkPrefix]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> z `[G, L, H, D, D]`, k `[G, L, H, D]`."""
    return torch.stack([s.z for s in states]), torch.stack([s.k for s in states])
