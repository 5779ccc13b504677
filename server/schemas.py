"""HTTP request and response bodies (pydantic v2). Field limits here are the API's contract."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefix_store.format import PREFIX_ID, PrefixMeta

from .engine import SamplingParams
from .engine.request import MAX_SEED, MAX_STOP_LEN, MAX_STOP_STRINGS
from .inputs import Text, check_text

MAX_INPUT_CHARS = 100_000
MAX_NEW_TOKENS = 4096


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # no coercion: "3", 2.0 and true are not integers (floats still accept 1)
        json_schema_extra={
            "examples": [
                {
                    "prefix_id": "pfx-3f9a0c1d2e4b5a69",
                    "input": "name : Aromi | food : Italian",
                    "max_new_tokens": 32,
                    "temperature": 0.7,
                    "top_p": 0.9,
                    "seed": 7,
                    "stop": ["\n"],
                }
            ]
        },
    )

    prefix_id: str | None = Field(
        None, pattern=PREFIX_ID.pattern, description="a prefix id; null runs the bare model"
    )
    input: Text = Field(..., min_length=1, max_length=MAX_INPUT_CHARS)
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] | str | None = Field(None, description=f"up to {MAX_STOP_STRINGS} stop strings")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-text token (benchmarks)")
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | str | None) -> list[str] | None:
        items = [v] if isinstance(v, str) else v
        if items is None:
            return None
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
        if any(not s or len(s) > MAX_STOP_LEN for s in items):
            raise ValueError(f"stop strings must be 1-{MAX_STOP_LEN} characters")
        return [check_text(s) for s in items]

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
        )


class Usage(BaseModel):
    prefix_tokens: int
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    prefix_id: str | None
    text: str
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage


class TextPrefixRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"text": "Answer politely and briefly.\n", "name": "polite", "visibility": "private"}
            ]
        },
    )

    text: Text = Field(..., min_length=1, max_length=MAX_INPUT_CHARS)
    name: Text = Field("", max_length=128)
    visibility: Literal["private", "public"] = "private"


class PrefixInfo(BaseModel):
    id: str
    name: str
    owner: str
    visibility: Literal["private", "public"]
    source: str
    kind: str
    prefix_len: int
    dtype: str
    model_fingerprint: str
    created_at: str
    sha256: str

    @classmethod
    def of(cls, meta: PrefixMeta) -> PrefixInfo:
        return cls(**{k: getattr(meta, k) for k in cls.model_fields})


class PrefixList(BaseModel):
    prefixes: list[PrefixInfo]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobInfo(BaseModel):
    """A training job: queued -> running (progress) -> succeeded (prefix_id) | failed (error) | cancelled."""

    id: str
    job_id: str = Field(description="the same as id")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    name: str
    visibility: str
    n_examples: int
    config: dict
    attempts: int
    epoch: int
    step: int
    total_steps: int
    loss: float | None
    eval_loss: float | None
    eta_s: float | None
    losses: list[float]
    eval_losses: list[float]
    error: str | None
    prefix_id: str | None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, job) -> JobInfo:
        flat = {**asdict(job.progress), **{k: v for k, v in vars(job).items() if k != "progress"}}
        return cls(job_id=job.id, **{k: flat[k] for k in cls.model_fields if k != "job_id"})


def inline_schema(model: type[BaseModel]) -> dict:
    """A model's JSON schema with its `$defs` inlined (for hand-written OpenAPI request bodies)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
