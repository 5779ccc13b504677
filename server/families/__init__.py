"""The model families the engine serves, each one readable file: its checkpoint's spec, its frozen
weights laid out for serving, and its computation around attention (the runner owns batching and
attention; engine/runner.py).

- gpt2.py: GPT-2 (`model_type` gpt2).
- llama.py: the Llama family (`model_type` llama, qwen2, mistral; SmolLM is llama).

A family module gives `MODEL_TYPES`, `SITES` (where weight-side adapters attach), `spec_from_config`,
`WEIGHTS` (its weights class: `from_hf`, `hashed`, `dense_layers`) and `FORWARD` (its forward class:
`embed`, `positions`, `rotate`, `pre`, `post`, `adapted`, `norm`, `lm_head`).
"""

from __future__ import annotations

from types import ModuleType

from transformers import PretrainedConfig

from prefix_store.spec import ModelSpec

from ..errors import UnsupportedModel
from . import gpt2, llama

FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama}
MODEL_TYPES: dict[str, ModuleType] = {t: module for module in FAMILIES.values() for t in module.MODEL_TYPES}
Forward = gpt2.Gpt2Forward | llama.LlamaForward
Weights = gpt2.Gpt2Weights | llama.LlamaWeights


def family_of_config(config: PretrainedConfig) -> ModuleType:
    """The family serving a checkpoint's config; UnsupportedModel naming what is supported."""
    module = MODEL_TYPES.get(getattr(config, "model_type", None))
    if module is None:
        raise UnsupportedModel(
            f"model_type {getattr(config, 'model_type', None)!r} is not supported; expected one of"
            f" {sorted(MODEL_TYPES)} (GPT-2, or the Llama family: Llama, Qwen2, Mistral, SmolLM)"
        )
    return module


def spec_from_config(config: PretrainedConfig) -> ModelSpec:
    """The spec of a supported checkpoint's config; UnsupportedModel for anything else."""
    return family_of_config(config).spec_from_config(config)


def weights_from_hf(spec: ModelSpec, model) -> Weights:
    """A loaded HF module's frozen weights, laid out for the spec's family."""
    return FAMILIES[spec.family].WEIGHTS.from_hf(model)


def forward_of(spec: ModelSpec, weights: Weights, dense: list, lm_head) -> Forward:
    """The family's computation over the given dense layers."""
    return FAMILIES[spec.family].FORWARD(spec, weights, dense, lm_head)
