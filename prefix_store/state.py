"""What a loaded prefix is in memory: canonical K/V or an NTK prefix (pure data types).

The kinds (`prefix_store.kinds`) validate and attend with these, the engine serves them;
the store builds them from files and keeps them in the device pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        return sum(t.numel() * t.element_size() for t in (self.z, self.k))


# What a provider hands the runner: K/V `[n_layer, 2, n_head, P, head_dim]` or an NTK prefix (length 0)
PrefixState = torch.Tensor | NtkPrefix


def prefix_length(state: PrefixState) -> int:
    """Positions the prefix occupies before a row's own tokens (its kind says; NTK: none)."""
    from .kinds import kind_of  # (the kinds build on these types)

    return kind_of(state).length(state)


def prefix_nbytes(state: PrefixState) -> int:
    from .kinds import kind_of

    return kind_of(state).nbytes(state)
