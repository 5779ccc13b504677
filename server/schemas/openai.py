"""The OpenAI-compatible API's request and response bodies (`/v1/completions`, `/v1/models`): every field
of the spec is either honoured or refused with a 422 naming it (`extra="forbid"`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine import SamplingParams
from ..inputs import Text, check_text
from ..limits import (
    MAX_CHOICES,
    MAX_INPUT_CHARS,
    MAX_LOGIT_BIAS,
    MAX_MODEL_CHARS,
    MAX_NEW_TOKENS,
    MAX_PENALTY,
    MAX_SEED,
    MAX_STOP_STRINGS,
    OPENAI_MAX_LOGPROBS,
)
from .native import stop_strings

Prompt = str | list[int]  # one prompt: text or token ids


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",  # a field we do not know is refused by name, never dropped
        strict=True,  # integers are JSON integers; float fields still accept 1 (as OpenAI SDKs send)
        json_schema_extra={
            "examples": [
                {
                    "model": "pfx-3f9a0c1d2e4b5a69",
                    "prompt": "name : Aromi",
                    "max_tokens": 32,
                    "temperature": 0.7,
                }
            ]
        },
    )

    model: Text = Field(..., min_length=1, max_length=MAX_MODEL_CHARS)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    suffix: str | None = Field(None, description="not supported (insertion): must be null")
    max_tokens: int | None = Field(16, ge=0, le=MAX_NEW_TOKENS, description="0: only with echo (scoring)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="only equal to n")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=OPENAI_MAX_LOGPROBS)
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: Text | None = Field(None, max_length=MAX_MODEL_CHARS, description="recorded nowhere; accepted")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        prompts = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else list(v)
        if not prompts:
            raise ValueError("expected at least one prompt, got an empty list")
        for p in prompts:
            if not p:
                raise ValueError("expected non-empty prompts, got an empty one")
            if isinstance(p, str) and len(p) > MAX_INPUT_CHARS:
                raise ValueError(f"expected prompts of at most {MAX_INPUT_CHARS} characters, got {len(p)}")
        return [check_text(p) if isinstance(p, str) else p for p in prompts]

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return stop_strings(v, MAX_STOP_STRINGS) or []  # (OpenAI allows 4; lm-eval adds EOS to a task's)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids written as decimal strings, got {key[:20]!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases must be in [-100, 100], got {bias!r} for token {key}")
        return v

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix is not None:
            raise ValueError("suffix: not supported (GPT-2 does not insert text); send null or leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of equal to n ({self.n}) is supported, got {self.best_of}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo: true (scoring the prompt)")
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise ValueError(
                f"n: prompts x n must be at most {MAX_CHOICES}, got {len(self.prompt)} x {self.n}"
            )
        return self

    def sampling_params(self, choice: int) -> SamplingParams:
        """Choice j of a prompt draws with seed + j, so the n choices differ and each is repeatable."""
        return SamplingParams(
            max_new_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
            stop=tuple(self.stop or ()),
            logprobs=self.logprobs,
            prompt_logprobs=self._prompt_logprobs(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
        )

    def _prompt_logprobs(self) -> int | None:
        """Echo with logprobs scores the prompt; so does max_tokens 0 (echo alone: scored, not shown)."""
        if self.echo and self.logprobs is not None:
            return self.logprobs
        return 0 if self.max_tokens == 0 else None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
