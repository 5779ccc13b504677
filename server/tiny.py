"""Build a small GPT-2 checkpoint entirely offline (`prefixserve tiny-model DIR`).

The result is a normal Hugging Face checkpoint directory: `config.json`, `model.safetensors` and a
byte-level BPE tokenizer (`tokenizer.json`, `vocab.json`, `merges.txt`), loadable with
`AutoModelForCausalLM` / `AutoTokenizer`. The tokenizer is trained on a small built-in corpus;
weights are random (seeded), so two builds with the same arguments are identical.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
)

EOS = "<|endoftext|>"

_NAMES = ["Aromi", "The Eagle", "Blue Spice", "The Mill", "Cotto", "Zizzi", "Fitzbillies", "The Punter"]
_FOODS = ["Italian", "French", "Chinese", "Indian", "English", "Japanese", "fast food"]
_AREAS = ["city centre", "riverside", "the north", "the old town"]
_PRICES = ["cheap", "moderate", "high", "less than £20", "more than £30"]
_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "that",
    "this",
    "be",
    "are",
    "or",
    "which",
    "has",
    "have",
    "not",
    "restaurant",
    "coffee",
    "shop",
    "pub",
    "food",
    "serves",
    "located",
    "near",
    "area",
    "price",
    "range",
    "rating",
    "customer",
    "family",
    "friendly",
    "question",
    "answer",
    "summary",
    "translate",
    "positive",
    "negative",
    "review",
    "text",
    "label",
    "sentence",
    "story",
    "said",
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "number",
    "group",
    "good",
    "new",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "right",
    "big",
    "high",
    "different",
    "small",
    "large",
    "next",
    "early",
]


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """Deterministic training text: table-to-text style records, prose-like word salad, digits."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(lines):
        name, food, area, price = (
            rng.choice(_NAMES),
            rng.choice(_FOODS),
            rng.choice(_AREAS),
            rng.choice(_PRICES),
        )
        if i % 3 == 0:
            out.append(f"name : {name} | food : {food} | area : {area} | price : {price}")
        elif i % 3 == 1:
            out.append(f"{name} is a {price} {food} restaurant in {area}. It is {rng.choice(_WORDS)}.")
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15)))
            out.append(f"{words.capitalize()}, {rng.randint(0, 9999)} times.")
    return out


@dataclass(frozen=True)
class TinyModelConfig:
    """Dimensions of the tiny checkpoint (defaults: ~0.2M parameters, builds in about a second).

    `family`: "gpt2", or a Llama-family `model_type` ("llama", "qwen2", "mistral"), which have
    grouped-query attention (`n_kv_head` KV heads) and a SwiGLU MLP of `intermediate_size`; the tiny
    Llama also has Llama 3's rotary scaling, Qwen2 its attention biases and a tied LM head."""

    vocab_size: int = 512
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 256
    # Larger than GPT-2's 0.02 so that a random model's logits are well separated and greedy
    # decoding is not decided by rounding noise.
    initializer_range: float = 0.15
    seed: int = 0
    family: str = "gpt2"
    n_kv_head: int = 2  # (the Llama family)
    intermediate_size: int = 160  # (the Llama family)


def _train_bpe(vocab_size: int, seed: int = 0) -> ByteLevelBPETokenizer:
    """A byte-level BPE tokenizer (the GPT-2 scheme) trained on the built-in corpus.

    The small corpus yields a few thousand merges at most; a larger vocab_size (e.g. GPT-2's 50257,
    for benchmarks at real dimensions) is filled with plain tokens that decode like any other but
    are never produced by the encoder.
    """
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(_corpus(seed), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    if bpe.get_vocab_size() < vocab_size:
        data = json.loads(bpe._tokenizer.to_str())
        vocab: dict[str, int] = data["model"]["vocab"]
        vocab.update({f"Ġ~{i}": i for i in range(len(vocab), vocab_size)})
        bpe._tokenizer = Tokenizer.from_str(json.dumps(data))
    return bpe


def write_tiny_model(directory: str | Path, config: TinyModelConfig | None = None) -> Path:
    """Write the tiny GPT-2 checkpoint (weights + tokenizer) into `directory` and return its path."""
    cfg = config or TinyModelConfig()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    bpe = _train_bpe(cfg.vocab_size, cfg.seed)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS
    )
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(cfg.seed)
    model = _random_model(cfg, len(tokenizer), eos_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    bpe.save_model(str(out))  # vocab.json + merges.txt, for loaders that predate tokenizer.json
    return out


def _random_model(cfg: TinyModelConfig, vocab: int, eos_id: int) -> PreTrainedModel:
    """A randomly initialised model of the config's family (torch's seed set by the caller)."""
    if cfg.family == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_positions=cfg.n_positions,
                n_embd=cfg.n_embd,
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                initializer_range=cfg.initializer_range,
                bos_token_id=eos_id,
                eos_token_id=eos_id,
            )
        )
    config_class, extra = LLAMA_FAMILY[cfg.family]
    config = config_class(
        vocab_size=vocab,
        max_position_embeddings=cfg.n_positions,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        initializer_range=cfg.initializer_range,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norm gains too, so that a swapped or missing norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, cfg.initializer_range)
    return model


# the tiny Llama-family checkpoints: config class and what sets each apart
LLAMA_FAMILY = {
    "llama": (
        LlamaConfig,
        {
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": (
        Qwen2Config,
        {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    ),
    "mistral": (MistralConfig, {"tie_word_embeddings": False, "sliding_window": 4096}),
}
