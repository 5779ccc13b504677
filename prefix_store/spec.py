"""The model dimensions a prefix is checked against (pure data; no model code).

`prefixserve.model` re-exports `ModelSpec` and builds it from a checkpoint's config
(`spec_from_config`); the store only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

# the forward passes the engine has (server/families/): GPT-2's, and the Llama family's
FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions and options of a served model that the engine and the store need.

    `family` names the forward pass (FAMILIES): "gpt2" (learned positions, LayerNorm, GELU MLP) or
    "llama" (Llama, Qwen2, Mistral: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention).
    Keys and values have `n_kv_head` heads (grouped-query attention: each serves n_head / n_kv_head
    query heads; GPT-2: n_kv_head = n_head), so a KV prefix is `[n_layer, 2, n_kv_head, P, head_dim]`."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    layer_norm_eps: float
    activation: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    family: str = "gpt2"
    n_kv_head: int = 0  # 0: one KV head per query head (set so in __post_init__)
    head_size: int = 0  # 0: n_embd // n_head (set so in __post_init__)
    intermediate_size: int = 0  # the MLP's hidden width (0: 4 n_embd, GPT-2's)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        object.__setattr__(self, "n_kv_head", self.n_kv_head or self.n_head)
        object.__setattr__(self, "head_size", self.head_size or self.n_embd // self.n_head)
        object.__setattr__(self, "intermediate_size", self.intermediate_size or 4 * self.n_embd)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.head_size

    @property
    def q_width(self) -> int:
        """Width of the queries (and of attention's output): n_head * head_dim."""
        return self.n_head * self.head_size

    @property
    def kv_width(self) -> int:
        """Width of the keys (and of the values): n_kv_head * head_dim."""
        return self.n_kv_head * self.head_size

    @property
    def qkv_width(self) -> int:
        """Width of the fused query, key and value projection."""
        return self.q_width + 2 * self.kv_width

    @property
    def rotary(self) -> bool:
        """Positions are rotations of the queries and keys (rather than added embeddings)."""
        return self.family == "llama"

    def prefix_shape(self, prefix_len: int) -> tuple[int, int, int, int, int]:
        """Canonical prefix layout (architecture.md invariant 1): [n_layer, 2, n_kv_head, P, head_dim]."""
        return (self.n_layer, 2, self.n_kv_head, prefix_len, self.head_dim)

    def kv_bytes(self, tokens: int, itemsize: int) -> int:
        """Bytes of the K and V of `tokens` positions across all layers (a prefix, or a row's own tokens)."""
        return self.n_layer * 2 * self.kv_width * tokens * itemsize

    def lora_modules(self) -> dict[str, tuple[int, int]]:
        """The linear modules LoRA may adapt in this family (PEFT's names): name -> (in, out) widths."""
        c, q, kv, i = self.n_embd, self.q_width, self.kv_width, self.intermediate_size
        if self.family == "gpt2":
            return {
                "attn.c_attn": (c, 3 * c),
                "attn.c_proj": (c, c),
                "mlp.c_fc": (c, i),
                "mlp.c_proj": (i, c),
            }
        return {
            "self_attn.q_proj": (c, q),
            "self_attn.k_proj": (c, kv),
            "self_attn.v_proj": (c, kv),
            "self_attn.o_proj": (q, c),
            "mlp.gate_proj": (c, i),
            "mlp.up_proj": (c, i),
            "mlp.down_proj": (i, c),
        }

    def attn_scale(self, layer: int) -> float:
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale
