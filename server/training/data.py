"""Training submissions, validated when submitted (not in the worker): records, sizes, token lengths."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prefix_store.kinds.lora import ALL_MODULES

from ..errors import InvalidRequest
from ..inputs import Text, parse_json
from ..limits import (
    DEFAULT_MAX_PREFIX_LEN,
    MAX_EXAMPLES,
    MAX_FIELD_CHARS,
    MAX_NAME_LEN,
    MAX_NEW_TOKENS,
    MAX_SEPARATOR_CHARS,
)
from ..model import Tokenized
from .evaluate import METRICS
from .trainer import TRAIN_KINDS, TrainConfig, encode_example


class TrainExample(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input: Text = Field(..., max_length=MAX_FIELD_CHARS)
    output: Text = Field(..., max_length=MAX_FIELD_CHARS)


class Hyperparameters(BaseModel):
    """Every TrainConfig field, optional; defaults from the paper's table-to-text setting. Strict: an
    integer field takes only a JSON integer (not "3", 2.0 or true); float fields also take integers."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prefix_len: int | None = Field(None, ge=1, le=DEFAULT_MAX_PREFIX_LEN)
    hidden: int | None = Field(None, ge=1, le=4096)
    epochs: int | None = Field(None, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=256)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0, le=100_000)
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    max_length: int | None = Field(None, ge=2, le=4096)
    grad_clip: float | None = Field(None, gt=0.0, le=1000.0)
    val_fraction: float | None = Field(None, ge=0.0, le=0.5)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    separator: Text | None = Field(None, max_length=MAX_SEPARATOR_CHARS)
    kind: Literal[TRAIN_KINDS] | None = Field(
        None,
        description="prefix_kv (prefix tuning, the default), ntk (NTK-Attention), lora, adapter (a bottleneck"
        " adapter) or adamix (a mixture of adapters, averaged into one adapter when done)",
    )
    ntk_rank: int | None = Field(None, ge=0, le=1024, description="ntk: rank s of Z = Z_a Z_b; 0 = full Z")
    lora_rank: int | None = Field(None, ge=1, le=256, description="lora: r (default 8)")
    lora_alpha: float | None = Field(None, gt=0.0, le=4096.0, description="lora: scaling lora_alpha / r (16)")
    lora_modules: list[Literal[tuple(ALL_MODULES)]] | None = Field(
        None,
        min_length=1,
        max_length=len(ALL_MODULES),
        description='lora: the modules adapted (default ["attn.c_attn"], GPT-2\'s; a Llama-family model'
        ' names its own, e.g. ["self_attn.q_proj", "self_attn.v_proj"])',
    )
    adapter_size: int | None = Field(None, ge=1, le=4096, description="adapter, adamix: bottleneck m (64)")
    adapter_sites: Literal["houlsby", "pfeiffer"] | None = Field(
        None, description="adapter, adamix: houlsby (after attention and MLP, the default) or pfeiffer (MLP)"
    )
    adamix_experts: int | None = Field(None, ge=2, le=16, description="adamix: M projections per site (4)")
    adamix_consistency: float | None = Field(
        None, ge=0.0, le=100.0, description="adamix: weight of the consistency loss (1.0)"
    )

    def config(self) -> TrainConfig:
        chosen = self.model_dump(include=set(Hyperparameters.model_fields))  # not `examples` of a TrainSpec
        return TrainConfig(**{k: v for k, v in chosen.items() if v is not None})


class TrainSpec(Hyperparameters):
    examples: list[TrainExample] = Field(..., min_length=1, max_length=MAX_EXAMPLES)


class TrainPrefixRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "train": {
                        "examples": [
                            {"input": "name : Aromi | food : Italian", "output": "Aromi serves Italian food."}
                        ],
                        "prefix_len": 10,
                        "epochs": 5,
                        "learning_rate": 5e-5,
                    },
                    "name": "e2e",
                    "visibility": "private",
                }
            ]
        },
    )
    train: TrainSpec
    name: Text = Field("", max_length=MAX_NAME_LEN)
    visibility: str = Field("private", pattern="^(private|public)$")


class EvaluationRequest(BaseModel):
    """POST /prefixes/{id}/evaluations."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "examples": [
                        {"input": "name : Aromi | food : Italian", "output": "Aromi serves Italian food."}
                    ],
                    "metrics": ["bleu", "rouge_l", "loss"],
                    "max_new_tokens": 48,
                }
            ]
        },
    )
    examples: list[TrainExample] = Field(..., min_length=1, max_length=MAX_EXAMPLES)
    metrics: list[Literal[METRICS]] = Field(default_factory=lambda: list(METRICS), min_length=1)
    max_new_tokens: int = Field(
        64, ge=1, le=MAX_NEW_TOKENS, description="generated per example (ends at EOS)"
    )


def parse_jsonl(raw: bytes, field: str = "train") -> list[TrainExample]:
    """A JSONL upload (the form field `field`): one {"input", "output"} object per non-empty line."""
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InvalidRequest(field, "the JSONL file is not UTF-8 text") from None
    out: list[TrainExample] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(TrainExample.model_validate(parse_json(line)))
        except ValueError as exc:  # malformed or too deep JSON, or a record that does not validate
            raise InvalidRequest(
                f"{field} line {i + 1}", f'expected {{"input": str, "output": str}}: {exc}'
            ) from None
        if len(out) > MAX_EXAMPLES:
            raise InvalidRequest(field, f"at most {MAX_EXAMPLES} examples")
    if not out:
        raise InvalidRequest(field, "the JSONL file holds no examples")
    return out


def validate_dataset(
    examples: list[TrainExample], cfg: TrainConfig, model: Tokenized, max_prefix_len: int
) -> bytes:
    """Check every record against the model's limits; returns the dataset as JSONL for the store."""
    if cfg.prefix_len > max_prefix_len:
        raise InvalidRequest("prefix_len", f"expected at most {max_prefix_len}, got {cfg.prefix_len}")
    spec = model.spec
    if cfg.kind == "ntk" and spec.family != "gpt2":
        raise InvalidRequest(
            "kind", f"NTK training runs on GPT-2 models; this is a {spec.family}-family model"
        )
    if cfg.kind == "lora" and not set(cfg.lora_modules) <= set(spec.lora_modules()):
        raise InvalidRequest("lora_modules", f"expected a subset of this model's {list(spec.lora_modules())}")
    if cfg.ntk_rank > model.spec.head_dim:
        raise InvalidRequest(
            "ntk_rank", f"expected at most head_dim {model.spec.head_dim}, got {cfg.ntk_rank}"
        )
    limit = min(cfg.max_length, model.spec.n_positions - cfg.positions)
    for i, ex in enumerate(examples):
        for name in ("input", "output"):
            if not getattr(ex, name).strip():
                raise InvalidRequest(f"examples[{i}].{name}", "is empty")
        n = len(encode_example(model.tokenizer, ex.input, ex.output, cfg.separator)[0])
        if n > limit:
            raise InvalidRequest(
                f"examples[{i}]",
                f"{n} tokens (input + separator + output + eos) exceed {limit} (max_length {cfg.max_length}, "
                f"n_positions {model.spec.n_positions} - prefix_len {cfg.positions})",
            )
    return "\n".join(ex.model_dump_json() for ex in examples).encode()
