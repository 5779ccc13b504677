"""The Llama family's forward pass (Llama, Qwen2, Mistral, SmolLM): RMSNorm, rotary position embeddings
(the checkpoint's `rope_theta` and, where HF defines it, `rope_scaling`), a SwiGLU MLP, grouped-query
attention (n_kv_head KV heads, each serving n_head / n_kv_head query heads), optional attention biases
(Qwen2) and a tied or untied LM head.

The HF module is only a loader: q/k/v and gate/up are fused into one `[in, out]` matrix each (one GEMM
per step instead of three, two), the rotary frequencies are the HF module's own (`rotary_emb.inv_freq`,
`attention_scaling`), and the module is dropped. Positions follow invariant 2: a row's own token i is
rotated at position P + i after a prefix of P positions, whose keys are used as given (as HF and PEFT
do with `past_key_values`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from prefix_store.kinds.weights import LLAMA_SITES
from prefix_store.spec import ModelSpec

from ..dense import Dense, Int8Dense, LayerDense
from ..errors import UnsupportedModel
from .gpt2 import Adapt, Attend, dense_layers

MODEL_TYPES = ("llama", "qwen2", "mistral")
# rotary variants whose frequencies do not depend on the sequence's length (dynamic NTK and LongRoPE do)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SITES = LLAMA_SITES  # where weight-side adapters attach, in a layer's order


def rope_type(config: PretrainedConfig) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def spec_from_config(config: PretrainedConfig) -> ModelSpec:
    if config.hidden_act != "silu":
        raise UnsupportedModel(f"{config.model_type} with hidden_act {config.hidden_act!r}: expected 'silu'")
    if (kind := rope_type(config)) not in ROPE_TYPES:
        raise UnsupportedModel(f"rope type {kind!r} is not supported; expected one of {ROPE_TYPES}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    positions = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        positions = min(positions, window)  # within the window, sliding attention is full attention
    if heads % kv_heads:
        raise UnsupportedModel(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    return ModelSpec(
        n_layer=config.num_hidden_layers,
        n_head=heads,
        n_embd=config.hidden_size,
        n_positions=positions,
        vocab_size=config.vocab_size,
        layer_norm_eps=config.rms_norm_eps,
        activation="silu",
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        family="llama",
        n_kv_head=kv_heads,
        head_size=head_dim,
        intermediate_size=config.intermediate_size,
    )


@dataclass
class LayerWeights:
    """One layer, `[in, out]` for addmm. W = H*D + 2*Hkv*D (queries, keys, values); I: the MLP's width.
    The attribute names the magnitude bounds read (ln1_w, attn_w, attn_b, proj_w) are GPT-2's."""

    ln1_w: torch.Tensor  # [C] input_layernorm
    attn_w: torch.Tensor  # [C, W] q_proj | k_proj | v_proj
    attn_b: torch.Tensor | None  # [W] (Qwen2, or attention_bias)
    proj_w: torch.Tensor  # [H*D, C] o_proj
    proj_b: torch.Tensor | None  # [C]
    ln2_w: torch.Tensor  # [C] post_attention_layernorm
    fc_w: torch.Tensor  # [C, 2I] gate_proj | up_proj
    fc_b: torch.Tensor | None  # [2I] (mlp_bias)
    out_w: torch.Tensor  # [I, C] down_proj
    out_b: torch.Tensor | None  # [C]
    ln1_b = None  # RMSNorm has no bias (the bounds read it as zero)


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, C]
    layers: list[LayerWeights]
    norm_w: torch.Tensor  # [C]
    lm_head: torch.Tensor  # [C, V] contiguous (a copy of embed's transpose when tied)
    inv_freq: torch.Tensor  # [D/2] float32, the rotary frequencies
    rope_scaling: float  # HF's attention_scaling: cos and sin are multiplied by it (yarn; else 1)

    @classmethod
    def from_hf(cls, model) -> LlamaWeights:
        m = model.model

        def w(p: torch.Tensor) -> torch.Tensor:
            return p.detach().t().contiguous()  # nn.Linear's [out, in] -> [in, out]

        def cat_w(*mods) -> torch.Tensor:
            return torch.cat([mod.weight.detach() for mod in mods]).t().contiguous()

        def cat_b(*mods) -> torch.Tensor | None:
            if all(mod.bias is None for mod in mods):
                return None
            return torch.cat(
                [
                    mod.bias.detach() if mod.bias is not None else mod.weight.new_zeros(mod.out_features)
                    for mod in mods
                ]
            )

        def bias(mod) -> torch.Tensor | None:
            return None if mod.bias is None else mod.bias.detach().contiguous()

        layers = []
        for b in m.layers:
            a, f = b.self_attn, b.mlp
            layers.append(
                LayerWeights(
                    ln1_w=b.input_layernorm.weight.detach().contiguous(),
                    attn_w=cat_w(a.q_proj, a.k_proj, a.v_proj),
                    attn_b=cat_b(a.q_proj, a.k_proj, a.v_proj),
                    proj_w=w(a.o_proj.weight),
                    proj_b=bias(a.o_proj),
                    ln2_w=b.post_attention_layernorm.weight.detach().contiguous(),
                    fc_w=cat_w(f.gate_proj, f.up_proj),
                    fc_b=cat_b(f.gate_proj, f.up_proj),
                    out_w=w(f.down_proj.weight),
                    out_b=bias(f.down_proj),
                )
            )
        rotary = m.rotary_emb
        return cls(
            embed=m.embed_tokens.weight.detach().contiguous(),
            layers=layers,
            norm_w=m.norm.weight.detach().contiguous(),
            lm_head=w(model.lm_head.weight),
            inv_freq=rotary.inv_freq.detach().float().clone(),
            rope_scaling=float(rotary.attention_scaling),
        )

    def hashed(self) -> list[torch.Tensor]:
        """The frozen tensors the fingerprint hashes, in a fixed order (the rotary frequencies too: they
        are part of what a prefix was made for)."""
        tensors = [self.embed, self.norm_w, self.lm_head, self.inv_freq * self.rope_scaling]
        for lw in self.layers:
            tensors += [
                t for name in LayerWeights.__dataclass_fields__ if (t := getattr(lw, name)) is not None
            ]
        return tensors

    def dense_layers(self, layer: Callable[..., Dense | Int8Dense]) -> list[LayerDense]:
        """Each layer's dense layers (attn: fused QKV, proj: o_proj, fc: fused gate and up, out:
        down_proj), made by `layer(weight [in, out], bias)`."""
        return dense_layers(self.layers, layer)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalised in float32, cast back, then scaled. x `[n, C]` -> `[n, C]`."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary embedding in place (HF's `rotate_half` convention: the two halves of each head are the
    pairs). x `[N, h, D]` (a view), cos, sin `[N, 1, D/2]`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    x1.copy_(r1)
    x2.copy_(r2)


class LlamaForward:
    """The Llama family's computation around attention, over flat tokens x `[N, C]`."""

    def __init__(self, spec: ModelSpec, w: LlamaWeights, dense: list[LayerDense], lm_head: Dense) -> None:
        self.spec, self.w, self.dense, self.lm_head = spec, w, dense, lm_head
        self._q, self._kv, self._i = spec.q_width, spec.kv_width, spec.intermediate_size

    def embed(self, ids: torch.Tensor, pos: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        """Token (or given input) embeddings: `[N]` -> `[N, C]` (positions are rotations, `rotate`)."""
        return self.w.embed[ids] if embeds is None else embeds.clone()

    def positions(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rotary cos and sin `[N, 1, D/2]` (q's dtype) for absolute positions pos `[N]`:
        computed once per step, as HF does, in float32."""
        freqs = pos.float()[:, None] * self.w.inv_freq.to(pos.device)[None]  # [N, D/2]
        s = self.w.rope_scaling
        dtype = self.w.embed.dtype
        return (freqs.cos() * s).to(dtype)[:, None], (freqs.sin() * s).to(dtype)[:, None]

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Rotate the step's queries `[N, H, D]` and keys `[N, Hkv, D]` in place at their positions."""
        rotate_(q, *rope)
        rotate_(k, *rope)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm: `[n, C]` -> `[n, C]`."""
        return rms_norm(h, self.w.norm_w, self.spec.layer_norm_eps)

    def pre(self, layer: int, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm and the fused QKV projection: x `[n, C]` -> qkv `[n, W]` (into `qkv` when given)."""
        h = rms_norm(x, self.w.layers[layer].ln1_w, self.spec.layer_norm_eps)
        return self.dense[layer].attn(h, out=qkv)

    def post(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> None:
        """o_proj, the SwiGLU MLP and both residuals, in place on x `[n, C]`."""
        d = self.dense[layer]
        d.proj.add_to(attn, x)
        h = rms_norm(x, self.w.layers[layer].ln2_w, self.spec.layer_norm_eps)
        d.out.add_to(self._swiglu(d.fc(h)), x)  # fc: [n, 2I]

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up: `[n, 2I]` -> `[n, I]`."""
        gate, up = gate_up[:, : self._i], gate_up[:, self._i :]
        return F.silu(gate).mul_(up)

    def adapted(self, layer: int, x: torch.Tensor, attend: Attend, adapt: Adapt) -> torch.Tensor:
        """One layer with weight-side adapters at SITES: x `[N, C]` -> `[N, C]` (in place). LoRA adds to
        a projection's slice of the fused outputs; a bottleneck adapter reads and adds to a sublayer's
        output (attention's after o_proj, the MLP's after down_proj)."""
        d, eps, q, kv, i = self.dense[layer], self.spec.layer_norm_eps, self._q, self._kv, self._i
        lw = self.w.layers[layer]
        h = rms_norm(x, lw.ln1_w, eps)
        qkv = d.attn(h)  # [N, W]
        adapt("self_attn.q_proj", h, qkv[:, :q])
        adapt("self_attn.k_proj", h, qkv[:, q : q + kv])
        adapt("self_attn.v_proj", h, qkv[:, q + kv :])
        attn = x.new_empty(x.shape[0], q)  # [N, H*D]
        attend(qkv, attn)
        a = d.proj(attn)  # [N, C]
        adapt("self_attn.o_proj", attn, a)
        adapt("attn", a, a)
        x.add_(a)
        h = rms_norm(x, lw.ln2_w, eps)
        f = d.fc(h)  # [N, 2I]
        adapt("mlp.gate_proj", h, f[:, :i])
        adapt("mlp.up_proj", h, f[:, i:])
        g = self._swiglu(f)  # [N, I]
        m = d.out(g)  # [N, C]
        adapt("mlp.down_proj", g, m)
        adapt("mlp", m, m)
        return x.add_(m)


WEIGHTS, FORWARD = LlamaWeights, LlamaForward  # (families/__init__.py reads a family by these names)
