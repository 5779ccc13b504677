"""NTK-Attention prefixes (Liang, Shi, Song, Yang 2024, "Towards Infinite-Long Prefix in Transformer").

An infinitely long prefix is approximated per layer and head by `Z [D, D]` and `k [D]`: a query q that
attends to its own (causal) keys K and values V gets

    out = (sum_j exp(q.k_j/sqrt(D)) v_j + phi(q) Z) / (sum_j exp(q.k_j/sqrt(D)) + phi(q).k)

with phi(x) = elu(x / D**0.25) + 1. The extra terms cost O(D^2) per token and head, whatever the
prefix "length". A row with an NTK prefix occupies no cache positions: its tokens start at 0.
The `NtkPrefix` data type lives in `prefix_store.state` (the store builds it from files) and is
re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefix_store.state import NtkPrefix

__all__ = ["NtkPrefix", "check_ntk", "ntk_combine", "phi"]


def phi(q: torch.Tensor) -> torch.Tensor:
    """The feature map elu(x / D**0.25) + 1 (positive), over the last dim. `[..., D]` -> `[..., D]`."""
    return F.elu(q / q.shape[-1] ** 0.25) + 1.0


def ntk_combine(
    o: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, z: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Add an NTK prefix's terms to softmax attention over the row's own keys.

    o `[..., H, D]`: attention output over the row's own keys, lse `[..., H]`: the log-sum-exp of those
    scaled scores, q `[..., H, D]`: the queries; this layer's z `[..., H, D, D]` and k `[..., H, D]`,
    broadcast over the leading dims (one prefix for all, or one per row). -> `[..., H, D]`.
    With S = exp(lse): out = (o S + phi(q) Z) / (S + phi(q).k), computed in float32 whatever the serving
    dtype (phi(q) Z could overflow float16), with S and the NTK terms both scaled by exp(-max(lse, 0)) so
    neither can overflow.
    """
    f = phi(q.float())  # [..., H, D]
    u = torch.matmul(f.unsqueeze(-2), z.float()).squeeze(-2)  # [..., H, D]
    w = (f * k.float()).sum(-1)  # [..., H]
    top = lse.clamp(min=0.0)  # [..., H]
    a = torch.exp(lse - top).unsqueeze(-1)  # [..., H, 1]
    c = torch.exp(-top).unsqueeze(-1)  # [..., H, 1]
    return ((o * a + u * c) / (a + w.unsqueeze(-1) * c)).to(o.dtype)  # lse is float32: back to o's dtype


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
