"""GPT-2's forward pass: learned positions added to the token embeddings, LayerNorm, a fused QKV
projection, a GELU MLP, Conv1D weights (already `[in, out]`, as `addmm` wants them).

The HF module is only a loader: its weights are copied into `Gpt2Weights` and the module is dropped.
The runner (engine/runner.py) owns batching and attention; this file owns what a layer computes around
attention (`pre`, `post`, the adapted layer) and the embeddings and final norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from prefix_store.kinds.weights import GPT2_SITES
from prefix_store.spec import ModelSpec

from ..dense import Dense, Int8Dense, LayerDense
from ..errors import UnsupportedModel

MODEL_TYPES = ("gpt2",)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
SITES = GPT2_SITES  # where weight-side adapters attach, in a layer's order
_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)


def spec_from_config(config: PretrainedConfig) -> ModelSpec:
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModel("GPT-2 checkpoints with cross-attention are not supported")
    if config.activation_function not in ACTIVATIONS:
        raise UnsupportedModel(
            f"activation {config.activation_function!r} is not supported; expected one of {ACTIVATIONS}"
        )
    if config.n_embd % config.n_head:
        raise UnsupportedModel(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    return ModelSpec(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        layer_norm_eps=config.layer_norm_epsilon,
        activation=config.activation_function,
        scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        family="gpt2",
    )


@dataclass
class LayerWeights:
    ln1_w: torch.Tensor  # [C]
    ln1_b: torch.Tensor  # [C]
    attn_w: torch.Tensor  # [C, 3C]
    attn_b: torch.Tensor  # [3C]
    proj_w: torch.Tensor  # [C, C]
    proj_b: torch.Tensor  # [C]
    ln2_w: torch.Tensor  # [C]
    ln2_b: torch.Tensor  # [C]
    fc_w: torch.Tensor  # [C, 4C]
    fc_b: torch.Tensor  # [4C]
    out_w: torch.Tensor  # [4C, C]
    out_b: torch.Tensor  # [C]


@dataclass
class Gpt2Weights:
    wte: torch.Tensor  # [V, C]
    wpe: torch.Tensor  # [n_positions, C]
    layers: list[LayerWeights]
    lnf_w: torch.Tensor  # [C]
    lnf_b: torch.Tensor  # [C]
    lm_head: torch.Tensor  # [C, V] contiguous (a transposed view of wte costs ~5%)

    @classmethod
    def from_hf(cls, model) -> Gpt2Weights:
        t = model.transformer

        def w(p: torch.Tensor) -> torch.Tensor:
            return p.detach().contiguous()

        layers = [
            LayerWeights(
                ln1_w=w(b.ln_1.weight),
                ln1_b=w(b.ln_1.bias),
                attn_w=w(b.attn.c_attn.weight),
                attn_b=w(b.attn.c_attn.bias),
                proj_w=w(b.attn.c_proj.weight),
                proj_b=w(b.attn.c_proj.bias),
                ln2_w=w(b.ln_2.weight),
                ln2_b=w(b.ln_2.bias),
                fc_w=w(b.mlp.c_fc.weight),
                fc_b=w(b.mlp.c_fc.bias),
                out_w=w(b.mlp.c_proj.weight),
                out_b=w(b.mlp.c_proj.bias),
            )
            for b in t.h
        ]
        return cls(
            wte=w(t.wte.weight),
            wpe=w(t.wpe.weight),
            layers=layers,
            lnf_w=w(t.ln_f.weight),
            lnf_b=w(t.ln_f.bias),
            lm_head=model.lm_head.weight.detach().t().contiguous(),
        )

    def hashed(self) -> list[torch.Tensor]:
        """The frozen tensors the fingerprint hashes, in a fixed order."""
        tensors = [self.wte, self.wpe, self.lnf_w, self.lnf_b]
        for lw in self.layers:
            tensors += [getattr(lw, name) for name in LayerWeights.__dataclass_fields__]
        return tensors

    def dense_layers(self, layer: Callable[..., Dense | Int8Dense]) -> list[LayerDense]:
        """Each layer's four dense layers, made by `layer(weight [in, out], bias)`."""
        return dense_layers(self.layers, layer)


def dense_layers(layers: list, layer: Callable[..., Dense | Int8Dense]) -> list[LayerDense]:
    """Per layer (weights with GPT-2's attribute names: attn_w/_b, proj_w/_b, fc_w/_b, out_w/_b) its four
    dense layers, made by `layer(weight [in, out], bias)`."""
    return [
        LayerDense(
            attn=layer(lw.attn_w, lw.attn_b),
            proj=layer(lw.proj_w, lw.proj_b),
            fc=layer(lw.fc_w, lw.fc_b),
            out=layer(lw.out_w, lw.out_b),
        )
        for lw in layers
    ]


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximate GELU, in place: 0.5x(1 + tanh(u)) == x * sigmoid(2u).

    Same function as `F.gelu(x, approximate="tanh")` (within 5e-7 in fp32), about 3x faster on CPU.
    """
    u = torch.addcmul(x, x * x, x, value=0.044715)  # x + 0.044715 x^3
    return x.mul_(u.mul_(_GELU_K).sigmoid_())


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place activation of a fresh matmul output."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return gelu_tanh_
    if name == "gelu":
        return F.gelu
    return F.relu


Attend = Callable[[torch.Tensor, torch.Tensor], None]  # (qkv [N, W], out [N, H*D])
Adapt = Callable[[str, torch.Tensor, torch.Tensor], None]  # (site, module input, its output to add to)


class Gpt2Forward:
    """GPT-2's computation around attention, over flat tokens x `[N, C]`."""

    def __init__(self, spec: ModelSpec, w: Gpt2Weights, dense: list[LayerDense], lm_head: Dense) -> None:
        self.spec, self.w, self.dense, self.lm_head = spec, w, dense, lm_head
        self._act = _activation(spec.activation)

    def embed(self, ids: torch.Tensor, pos: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        """Token (or given input) embeddings plus position embeddings: ids, pos `[N]` -> `[N, C]`."""
        tok = self.w.wte[ids] if embeds is None else embeds
        return tok + self.w.wpe[pos]

    def positions(self, pos: torch.Tensor) -> None:
        return None  # (positions were added to the embeddings)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope: None) -> None:
        pass

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final layer norm: `[n, C]` -> `[n, C]`."""
        return F.layer_norm(h, (h.shape[1],), self.w.lnf_w, self.w.lnf_b, self.spec.layer_norm_eps)

    def pre(self, layer: int, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """Layer norm and the QKV projection: x `[n, C]` -> qkv `[n, 3C]` (into `qkv` when given: graphs.py
        captures this)."""
        lw = self.w.layers[layer]
        h = F.layer_norm(x, (x.shape[1],), lw.ln1_w, lw.ln1_b, self.spec.layer_norm_eps)
        return self.dense[layer].attn(h, out=qkv)

    def post(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> None:
        """Output projection, MLP and both residuals, in place on x `[n, C]` (graphs.py captures this)."""
        lw, d = self.w.layers[layer], self.dense[layer]
        d.proj.add_to(attn, x)
        h = F.layer_norm(x, (x.shape[1],), lw.ln2_w, lw.ln2_b, self.spec.layer_norm_eps)
        d.out.add_to(self._act(d.fc(h)), x)  # fc: [n, 4C]

    def adapted(self, layer: int, x: torch.Tensor, attend: Attend, adapt: Adapt) -> torch.Tensor:
        """One layer with weight-side adapters at SITES: x `[N, C]` -> `[N, C]` (in place). The same
        dense matmuls as pre/post, each sublayer's output kept apart so that LoRA can add to a module's
        output and a bottleneck adapter can read and add to a sublayer's output."""
        lw, d, eps = self.w.layers[layer], self.dense[layer], self.spec.layer_norm_eps
        h = F.layer_norm(x, (x.shape[1],), lw.ln1_w, lw.ln1_b, eps)
        qkv = d.attn(h)  # [N, 3C]
        adapt("attn.c_attn", h, qkv)
        attn = torch.empty_like(x)  # [N, C]
        attend(qkv, attn)
        a = d.proj(attn)  # [N, C] attention's output
        adapt("attn.c_proj", attn, a)
        adapt("attn", a, a)  # a bottleneck adapter reads the sublayer's output
        x.add_(a)
        h = F.layer_norm(x, (x.shape[1],), lw.ln2_w, lw.ln2_b, eps)
        f = d.fc(h)  # [N, 4C]
        adapt("mlp.c_fc", h, f)
        g = self._act(f)
        m = d.out(g)  # [N, C] the MLP's output
        adapt("mlp.c_proj", g, m)
        adapt("mlp", m, m)
        return x.add_(m)


WEIGHTS, FORWARD = Gpt2Weights, Gpt2Forward  # (families/__init__.py reads a family by these names)
