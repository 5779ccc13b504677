"""The model side of the prefix store: what needs the frozen model's forward pass or its weights.

The store (`prefix_store`) imports nothing from this package; it reaches the model through the
`prefix_store.binding.ModelBinding` protocol, which `bind_model` implements for a loaded model:
compiling a text or a PEFT prompt-tuning soft prompt into K/V (one forward pass through the engine's
runner), and the upload magnitude bounds (the weight arithmetic of `MagnitudeBounds.derive` with the
model's own K/V peaks on a probe text, measured here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefix_store.bounds import PROBE_TEXT, MagnitudeBounds
from prefix_store.format import InvalidPrefixFile
from prefix_store.spec import ModelSpec

from .engine.runner import compile_prefix
from .model import LoadedModel


def text_to_kv(text: str, model: LoadedModel, max_len: int) -> torch.Tensor:
    """An instruction or few-shot block compiled once into its K/V."""
    ids = model.tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else []
    if not ids:
        raise InvalidPrefixFile("text must be a non-empty string")
    if len(ids) > max_len:
        raise InvalidPrefixFile(f"text is {len(ids)} tokens; a prefix may be at most {max_len}")
    return compile_prefix(model, token_ids=ids).float().cpu()


def own_kv_peaks(model: LoadedModel) -> torch.Tensor:
    """The largest |key| and |value| per layer `[L, 2]` that the model gives the probe text."""
    ids = model.tokenizer.encode(PROBE_TEXT)[: model.spec.n_positions]
    kv = compile_prefix(model, token_ids=ids).float()  # [L, 2, H, P, D]
    return kv.abs().flatten(2).max(-1).values.cpu()  # [L, 2]


def magnitude_bounds(model: LoadedModel) -> MagnitudeBounds:
    """The loaded model's upload magnitude bounds (docs/prefixes.md, 'Magnitudes')."""
    return MagnitudeBounds.derive(model.spec, model.weights.layers, own_kv_peaks(model))


@dataclass(frozen=True)
class BoundModel:
    """A loaded model as the store sees it (implements `prefix_store.binding.ModelBinding`)."""

    loaded: LoadedModel
    bounds: MagnitudeBounds | None

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @property
    def served_name(self) -> str:
        return self.loaded.served_name

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    def compile_text(self, text: str, max_len: int) -> torch.Tensor:
        return text_to_kv(text, self.loaded, max_len)

    def compile_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        return compile_prefix(self.loaded, embeds=embeds).float().cpu()


def bind_model(model: LoadedModel) -> BoundModel:
    """`model` for the store (`PrefixService(bind_model(model), ...)`, `import_peft`), with its
    magnitude bounds measured once."""
    return BoundModel(model, magnitude_bounds(model))
