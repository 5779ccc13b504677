"""What a loaded prefix is in memory: canonical K/V or an NTK prefix (pure data types).

The kinds (`prefix_store.kinds`) validate and attend with these, the engine serves them;
the store builds them from files and keeps them in the device pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # identity: the rows reading one prefix share its reads
class KvPrefix:
    """A KV prefix (Li & Liang 2021) as the engine holds it: per-layer keys and values
    kv `[n_layer, 2, n_head, P, head_dim]`, in an object whose type names its kind, as every state's does."""

    kv: torch.Tensor  # [L, 2, H, P, D]

    @property
    def shape(self) -> torch.Size:
        return self.kv.shape

    @property
    def length(self) -> int:
        return self.kv.shape[3]


@dataclass(frozen=True)
class NtkPrefix:
    """One NTK prefix: z `[n_layer, n_head, D, D]` and k `[n_layer, n_head, D]`."""

    z: torch.Tensor  # [L, H, D, D]
    k: torch.Tensor  # [L, H, D]

    @staticmethod
    def from_factors(z_a: torch.Tensor, z_b: torch.Tensor, k: torch.Tensor) -> NtkPrefix:
        """Low-rank Z = Z_a Z_b, multiplied in fp32 and kept in k's dtype: z_a `[L, H, D, s]`,
        z_b `[L, H, s, D]`."""
        return NtkPrefix((z_a.float() @ z_b.float()).to(k.dtype), k)

    def to(self, device: torch.device, dtype: torch.dtype) -> NtkPrefix:
        return NtkPrefix(self.z.to(device, dtype), self.k.to(device, dtype))

    @property
    def nbytes(self) -> int:
        return _nbytes((self.z, self.k))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# GPT-2's four linear modules LoRA may adapt: name -> (in, out) as multiples of n_embd
LORA_MODULES = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}
# the Llama family's seven (PEFT's names; their widths: ModelSpec.lora_modules)
LLAMA_LORA_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


@dataclass(frozen=True)
class LoraAdapter:
    """LoRA (Hu et al. 2021) on some of a model's linear modules: per module a `[L, in, r]` and b
    `[L, r, out]`; the module's output gains `x a b` (lora_alpha / r is folded into b). Ranks may differ
    per module."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name (ModelSpec.lora_modules) -> (a, b)

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
        return LoraAdapter(
            {m: (a.to(device, dtype), b.to(device, dtype)) for m, (a, b) in self.modules.items()}
        )

    @property
    def nbytes(self) -> int:
        return _nbytes(t for ab in self.modules.values() for t in ab)


# where a bottleneck adapter sits: after attention's output projection, after the MLP
ADAPTER_SITES = ("attn", "mlp")


@dataclass(frozen=True)
class BottleneckAdapter:
    """Bottleneck adapters (Houlsby et al. 2019): at each of its sites a sublayer's output h becomes
    `h + gelu(h down + down_bias) up + up_bias`; down `[L, C, m]`, down_bias `[L, m]`, up `[L, m, C]`,
    up_bias `[L, C]`. Houlsby: sites "attn" and "mlp"; Pfeiffer: "mlp" only. (AdaMix trains M of them
    and averages them into one of these.)"""

    sites: dict[
        str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    ]  # site -> (down, db, up, ub)

    def to(self, device: torch.device, dtype: torch.dtype) -> BottleneckAdapter:
        return BottleneckAdapter({s: tuple(t.to(device, dtype) for t in ts) for s, ts in self.sites.items()})

    @property
    def nbytes(self) -> int:
        return _nbytes(t for ts in self.sites.values() for t in ts)


# What a provider hands the runner: K/V `[n_layer, 2, n_head, P, head_dim]`, an NTK prefix (length 0), or
# a weight-side adapter (LoRA, bottleneck; length 0)
PrefixState = KvPrefix | NtkPrefix | LoraAdapter | BottleneckAdapter


def as_state(state: PrefixState | torch.Tensor) -> PrefixState:
    """A loaded prefix's state; a bare K/V tensor `[L, 2, H, P, D]` (what a file or a compilation gives)
    is a KvPrefix."""
    return KvPrefix(state) if isinstance(state, torch.Tensor) else state
