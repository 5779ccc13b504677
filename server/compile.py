"""The model side of the prefix store: what needs the frozen model's forward pass or its weights.

The store (`prefix_store`) imports nothing from this package; it reaches the model through the
`prefix_store.binding.ModelBinding` protocol, which `bind_model` implements for a loaded model:
compiling a text or a PEFT prompt-tuning soft prompt into K/V (one forward pass through the engine's
runner), and the upload magnitude bounds (the weight arithmetic of `MagnitudeBounds.derive` with the
model's own K/V peaks on a probe text, measured here). An API process whose engine runs in a process of
its own holds a `RemoteModel` instead: no weights; the engine compiles, and sends its names and bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from prefix_store.bounds import PROBE_TEXT, MagnitudeBounds
from prefix_store.format import InvalidPrefixFile
from prefix_store.spec import ModelSpec

from .engine.runner import compile_prefix
from .engine.wire import ModelCard
from .model import LoadedModel


def text_to_kv(text: str, model: LoadedModel, max_len: int) -> torch.Tensor:
    """An instruction or few-shot block compiled once into its K/V."""
    return compile_prefix(model, token_ids=text_ids(text, model.tokenizer, max_len)).float().cpu()


def text_ids(text: str, tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[int]:
    """A text prefix's token ids: at least one, at most `max_len` (InvalidPrefixFile otherwise)."""
    ids = tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else []
    if not ids:
        raise InvalidPrefixFile("text must be a non-empty string")
    if len(ids) > max_len:
        raise InvalidPrefixFile(f"text is {len(ids)} tokens; a prefix may be at most {max_len}")
    return ids


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


COMPILE_WAIT_S = 120.0  # a compilation waits this long for the engine (it runs between its steps)


@dataclass(frozen=True)
class RemoteModel:
    """The served model as an API process holds it when the engine runs in a process of its own and
    training in worker processes: its config and tokenizer here, its names and upload bounds from the
    engine's welcome (`ModelCard`), and every compilation done by the engine's model over the wire.
    Implements `ModelBinding` for the store, and what the routes read of a model."""

    spec: ModelSpec
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype  # the served one
    compiler: Callable[..., Awaitable[torch.Tensor]]  # the engine client's `compile`
    loop: asyncio.AbstractEventLoop  # the engine client's
    card: ModelCard

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint

    @property
    def served_name(self) -> str:
        return self.card.served_name

    @property
    def bounds(self) -> MagnitudeBounds | None:
        return self.card.bounds

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # (where this process keeps what it reads: files, compiled K/V)

    def compile_text(self, text: str, max_len: int) -> torch.Tensor:
        return self._compile(token_ids=text_ids(text, self.tokenizer, max_len))

    def compile_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        return self._compile(embeds=embeds)

    def _compile(self, **what: object) -> torch.Tensor:
        """From a worker thread (the store's calls run off the event loop): the engine's answer."""
        if _on_loop(self.loop):
            raise RuntimeError("compile from a worker thread: the engine's answer arrives on this event loop")
        return asyncio.run_coroutine_threadsafe(self.compiler(**what), self.loop).result(COMPILE_WAIT_S)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def bind_model(model: LoadedModel) -> BoundModel:
    """`model` for the store (`PrefixService(bind_model(model), ...)`, `import_peft`), with its
    magnitude bounds measured once."""
    return BoundModel(model, magnitude_bounds(model))
