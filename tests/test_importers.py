"""Importers: generation with an imported prefix is token-identical to the reference that defines it."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import GPT2LMHeadModel

from prefix_store.importers import import_peft, text_to_kv
from prefixserve.engine import EngineCore, SamplingParams

from .reference import hf_generate
from .test_engine_reference import PROMPTS, collect

MAX_BYTES = 1 << 20
NEW_TOKENS = 12


def peft_adapter(model_dir, config, seed: int, out_dir):
    """A PEFT adapter with random (non-default) trained weights, saved the way PEFT saves it."""
    torch.manual_seed(seed)
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(model_dir), config)
    for p in peft.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.6)
    peft.save_pretrained(out_dir)
    return PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model_dir), out_dir).eval()


def engine_tokens(model, kv, prompt: str) -> list[int]:
    engine = EngineCore(model)
    engine.prefixes.register("imported", kv)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW_TOKENS), prefix_id="imported")
    return collect(engine.run_to_completion()[rid])[0]


def peft_tokens(peft, prompt_ids: list[int]) -> list[int]:
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


@pytest.mark.parametrize(
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
def test_peft_adapter_generates_exactly_like_peft(tiny_model, tiny_model_dir, tmp_path, config):
    peft = peft_adapter(tiny_model_dir, config, seed=config.num_virtual_tokens, out_dir=tmp_path)
    kv = import_peft(
        (tmp_path / "adapter_config.json").read_bytes(),
        (tmp_path / "adapter_model.safetensors").read_bytes(),
        tiny_model,
        MAX_BYTES,
    )
    assert list(kv.shape) == list(tiny_model.spec.prefix_shape(config.num_virtual_tokens))
    for prompt in PROMPTS[:3]:
        ids = tiny_model.tokenizer.encode(prompt)
        expected = peft_tokens(peft, ids)
        assert engine_tokens(tiny_model, kv, prompt) == expected
    bare = engine_tokens(tiny_model, torch.zeros_like(kv), PROMPTS[0])
    assert bare != peft_tokens(peft, tiny_model.tokenizer.encode(PROMPTS[0]))  # the prefix matters


def test_text_prefix_generates_like_the_text_followed_by_the_input(tiny_model, hf_model):
    text = "name : The Mill | food : Chinese | area : riverside\nThe Mill is a Chinese restaurant.\n"
    kv = text_to_kv(text, tiny_model, max_len=128)
    text_ids = tiny_model.tokenizer.encode(text)
    assert kv.shape[3] == len(text_ids)
    for prompt in PROMPTS[:3]:
        ids = tiny_model.tokenizer.encode(prompt)
        expected, _ = hf_generate(hf_model, text_ids + ids, None, NEW_TOKENS)
        assert engine_tokens(tiny_model, kv, prompt) == expected


def test_text_errors(tiny_model):
    from prefix_store.format import InvalidPrefixFile

    with pytest.raises(InvalidPrefixFile, match="non-empty string"):
        text_to_kv("", tiny_model, max_len=8)
    with pytest.raises(InvalidPrefixFile, match=r"text is \d+ tokens; a prefix may be at most 8"):
        text_to_kv("a long instruction " * 10, tiny_model, max_len=8)
