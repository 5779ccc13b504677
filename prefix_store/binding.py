"""What the store needs of the served model, as a protocol the server implements.

The store checks prefixes against the model's dimensions and fingerprint, bounds their magnitudes,
places them on the model's device in its dtype, and has a text or a PEFT soft prompt compiled into
K/V. Compiling runs the frozen model and measuring the bounds needs its weights and its own K/V, so
both are done on the server side (`prefixserve.compile.bind_model` wraps a loaded model); the store
imports no model code (docs/architecture.md, "The parts and the direction of imports").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .spec import ModelSpec

if TYPE_CHECKING:
    from .bounds import MagnitudeBounds


class ModelBinding(Protocol):
    @property
    def spec(self) -> ModelSpec: ...

    @property
    def fingerprint(self) -> str:
        """Dims + weight hash; every stored prefix is bound to it (architecture.md invariant 4)."""
        ...

    @property
    def served_name(self) -> str:
        """The model's name as clients see it (named in PEFT mismatch errors)."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def bounds(self) -> MagnitudeBounds | None:
        """Upload magnitude bounds (format.MagnitudeBounds); None: magnitudes are not checked."""
        ...

    def compile_text(self, text: str, max_len: int) -> torch.Tensor:
        """A text compiled into its K/V `[n_layer, 2, n_head, P, head_dim]` (CPU, fp32); raises
        InvalidPrefixFile for an empty text or one over `max_len` tokens."""
        ...

    def compile_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """A soft prompt `[P, n_embd]` run through the frozen model -> K/V `[n_layer, 2, n_head, P,
        head_dim]` (CPU, fp32)."""
        ...
