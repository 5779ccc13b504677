"""The model dimensions a prefix is checked against (pure data; no model code).

`prefixserve.model` re-exports `ModelSpec` and builds it from a checkpoint's config
(`spec_from_config`); the store only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions and options of a GPT-2-family model that the engine needs."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    layer_norm_eps: float
    activation: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def prefix_shape(self, prefix_len: int) -> tuple[int, int, int, int, int]:
        """Canonical prefix layout (architecture.md invariant 1): [n_layer, 2, n_head, P, head_dim]."""
        return (self.n_layer, 2, self.n_head, prefix_len, self.head_dim)

    def kv_bytes(self, tokens: int, itemsize: int) -> int:
        """Bytes of the K and V of `tokens` positions across all layers (a prefix, or a row's own tokens)."""
        return self.n_layer * 2 * self.n_embd * tokens * itemsize

    def attn_scale(self, layer: int) -> float:
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale
