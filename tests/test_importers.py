"""Importers: generation with an imported prefix is token-identical to the reference that defines it.

PEFT adapters are checked against PEFT's *definition* of the adapter (its `get_prompt()`: prefix K/V or
soft-prompt embeddings) decoded greedily with plain HF forwards, so a regression of PEFT's own
`generate` (which has broken with transformers releases before) cannot fail these tests while a
regression of ours still does. One more test compares PEFT's own `generate` on the locked set and,
when it disagrees, says which side departs from the plain-HF reference.
"""

from __future__ import annotations

import peft as peft_pkg
import pytest
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import GPT2LMHeadModel

from prefix_store.importers import import_peft
from prefixserve.compile import bind_model, text_to_kv
from prefixserve.engine import EngineCore, SamplingParams

from .helpers import PROMPTS, collect
from .reference import hf_greedy

MAX_BYTES = 1 << 20
NEW_TOKENS = 12
PEFT_CONFIGS = pytest.mark.parametrize(
    "config",
    [
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
        PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=9, prefix_projection=True, encoder_hidden_size=32
        ),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    ],
    ids=["prefix-tuning", "prefix-tuning-projection", "prompt-tuning"],
)


def peft_adapter(model_dir, config, seed: int, out_dir):
    """A PEFT adapter with random (non-default) trained weights, saved the way PEFT saves it."""
    torch.manual_seed(seed)
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(model_dir), config)
    for p in peft.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.6)
    peft.save_pretrained(out_dir)
    return PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model_dir), out_dir).eval()


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) `[1, H, P, D]` from whichever container this PEFT's `get_prompt` returns:
    a transformers Cache (`.layers`, or `.key_cache`/`.value_cache` before 4.56) or a tuple of
    per-layer `[2, 1, H, P, D]` tensors."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(t[0], t[1]) for t in cache]


@torch.inference_mode()
def peft_reference_tokens(peft: PeftModel, prompt_ids: list[int]) -> list[int]:
    """Greedy tokens from PEFT's definition of the adapter, decoded with plain HF forwards."""
    prompt = peft.get_prompt(batch_size=1)
    hf = peft.get_base_model()
    if peft.active_peft_config.peft_type == "PREFIX_TUNING":
        kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in cache_layers(prompt)])  # [L, 2, H, P, D]
        return hf_greedy(hf, prompt_ids, kv, NEW_TOKENS)[0]
    return hf_greedy(hf, prompt_ids, None, NEW_TOKENS, soft_prompt=prompt[0])[0]  # prompt [1, P, C]


def peft_generate_tokens(peft: PeftModel, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = peft.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def engine_tokens(model, kv, prompt: str) -> list[int]:
    engine = EngineCore(model)
    engine.prefixes.register("imported", kv)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW_TOKENS), prefix_id="imported")
    return collect(engine.run_to_completion()[rid])[0]


def imported(tmp_path, model) -> torch.Tensor:
    return import_peft(
        (tmp_path / "adapter_config.json").read_bytes(),
        (tmp_path / "adapter_model.safetensors").read_bytes(),
        bind_model(model),
        MAX_BYTES,
    )


@PEFT_CONFIGS
def test_peft_adapter_is_served_as_peft_defines_it(tiny_model, tiny_model_dir, tmp_path, config):
    peft = peft_adapter(tiny_model_dir, config, seed=config.num_virtual_tokens, out_dir=tmp_path)
    kv = imported(tmp_path, tiny_model)
    assert list(kv.shape) == list(tiny_model.spec.prefix_shape(config.num_virtual_tokens))
    for prompt in PROMPTS[:3]:
        ids = tiny_model.tokenizer.encode(prompt)
        assert engine_tokens(tiny_model, kv, prompt) == peft_reference_tokens(peft, ids)
    bare = engine_tokens(tiny_model, torch.zeros_like(kv), PROMPTS[0])
    assert bare != peft_reference_tokens(peft, tiny_model.tokenizer.encode(PROMPTS[0]))  # it matters


@PEFT_CONFIGS
def test_peft_own_generate_agrees_on_the_locked_set(tiny_model, tiny_model_dir, tmp_path, config):
    """PEFT's own `generate` gives the reference's tokens with the tested versions (requirements/lock.txt).
    It has broken with transformers releases before; then this message says whose bug it is."""
    peft = peft_adapter(tiny_model_dir, config, seed=config.num_virtual_tokens, out_dir=tmp_path)
    kv = imported(tmp_path, tiny_model)
    versions = f"PEFT {peft_pkg.__version__} with transformers {transformers.__version__}"
    for prompt in PROMPTS[:3]:
        ids = tiny_model.tokenizer.encode(prompt)
        reference, theirs = peft_reference_tokens(peft, ids), peft_generate_tokens(peft, ids)
        ours = engine_tokens(tiny_model, kv, prompt)
        assert ours == reference, (
            f"the engine departs from the plain-HF reference of PEFT's adapter ({prompt!r})"
        )
        assert theirs == reference, (
            f"{versions}: PEFT's own generate departs from the plain-HF reference of its own adapter, which"
            f" the engine matches ({prompt!r}: generate {theirs}, reference {reference}); a PEFT/transformers"
            " incompatibility, not a prefixserve bug. Keep the locked set until it is fixed."
        )


def test_text_prefix_generates_like_the_text_followed_by_the_input(tiny_model, hf_model):
    text = "name : The Mill | food : Chinese | area : riverside\nThe Mill is a Chinese restaurant.\n"
    kv = text_to_kv(text, tiny_model, max_len=128)
    text_ids = tiny_model.tokenizer.encode(text)
    assert kv.shape[3] == len(text_ids)
    for prompt in PROMPTS[:3]:
        ids = tiny_model.tokenizer.encode(prompt)
        expected, _ = hf_greedy(hf_model, text_ids + ids, None, NEW_TOKENS)
        assert engine_tokens(tiny_model, kv, prompt) == expected


def test_text_errors(tiny_model):
    from prefix_store.format import InvalidPrefixFile

    with pytest.raises(InvalidPrefixFile, match="non-empty string"):
        text_to_kv("", tiny_model, max_len=8)
    with pytest.raises(InvalidPrefixFile, match=r"text is \d+ tokens; a prefix may be at most 8"):
        text_to_kv("a long instruction " * 10, tiny_model, max_len=8)
