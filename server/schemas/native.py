"""The native API's request and response bodies (pydantic v2). Field limits here are the API's contract."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefix_store.format import PREFIX_ID, PrefixMeta

from ..engine import SamplingParams
from ..inputs import Text, check_text
from ..limits import (
    MAX_INPUT_CHARS,
    MAX_LOGPROBS,
    MAX_NAME_LEN,
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    VISIBILITIES,
    stop_problem,
)
from ..tenants import MAX_WEIGHT, TENANT_NAME


def stop_strings(value: list[str] | str | None, max_count: int = MAX_STOP_STRINGS) -> list[str] | None:
    """The `stop` field of a request body as a list (None stays None), checked by the one stop rule
    (`limits.stop_problem`) and for lone surrogates; a ValueError (-> 422) names the problem."""
    items = [value] if isinstance(value, str) else value
    if items is None:
        return None
    problem = stop_problem(items, max_count)
    if problem is not None:
        raise ValueError(": ".join(problem))
    return [check_text(s) for s in items]


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
        None,
        pattern=PREFIX_ID.pattern,
        description="a prefix id of any kind (prefix_kv, ntk, lora, adapter); null runs the bare model",
    )
    adapter_id: str | None = Field(
        None,
        pattern=PREFIX_ID.pattern,
        description="a weight-side adapter (lora, adapter) carried beside a prefix_kv or ntk prefix_id",
    )
    input: Text = Field(..., min_length=1, max_length=MAX_INPUT_CHARS)
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] | str | None = Field(None, description=f"up to {MAX_STOP_STRINGS} stop strings")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-text token (benchmarks)")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="each new token's logprob and this many alternatives"
    )
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | str | None) -> list[str] | None:
        return stop_strings(v)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prefix_id": "pfx-3f9a0c1d2e4b5a69",
                    "input": "name : Aromi",
                    "continuation": "Aromi is a pub.",
                }
            ]
        },
    )

    prefix_id: str | None = Field(
        None,
        pattern=PREFIX_ID.pattern,
        description="a prefix id of any kind; null scores with the bare model",
    )
    adapter_id: str | None = Field(
        None, pattern=PREFIX_ID.pattern, description="a weight-side adapter (lora, adapter) beside prefix_id"
    )
    input: Text = Field(..., min_length=1, max_length=MAX_INPUT_CHARS)
    continuation: Text = Field(..., min_length=1, max_length=MAX_INPUT_CHARS)
    top_logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS, description="alternatives per continuation token")


class Alternative(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenScore(BaseModel):
    token_id: int
    token: str
    logprob: float
    top: list[Alternative] = Field(default_factory=list, description="the most likely tokens, best first")


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
    logprobs: list[TokenScore] | None = None  # one per new token, when asked


class ScoreResponse(BaseModel):
    prefix_id: str | None
    total_logprob: float  # the continuation's log-probability given the input (and the prefix)
    tokens: list[TokenScore]  # the continuation's tokens
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
    name: Text = Field("", max_length=MAX_NAME_LEN)
    visibility: Literal[VISIBILITIES] = "private"


class EvaluationInfo(BaseModel):
    """An evaluation of a prefix: BLEU (0-100), ROUGE-L F1, exact match (0-1), mean per-token loss."""

    job_id: str
    n_examples: int
    metrics: dict[str, float]
    config: dict
    samples: list[dict]  # the first few examples: input, reference, prediction
    created_at: str


class PrefixInfo(BaseModel):
    id: str
    name: str
    owner: str
    visibility: Literal[VISIBILITIES]
    source: str
    kind: str
    prefix_len: int
    dtype: str
    model_fingerprint: str
    created_at: str
    sha256: str
    size_bytes: int | None = Field(None, description="the stored file's size in bytes")
    # your evaluations of it, oldest first (GET /prefixes/{id} only; lists leave them out)
    evaluations: list[EvaluationInfo] | None = None

    @classmethod
    def of(
        cls, meta: PrefixMeta, evaluations: list[EvaluationInfo] | None = None, size_bytes: int | None = None
    ) -> PrefixInfo:
        fields = {k: getattr(meta, k) for k in cls.model_fields if k not in ("evaluations", "size_bytes")}
        return cls(**fields, evaluations=evaluations, size_bytes=size_bytes)


class PrefixList(BaseModel):
    prefixes: list[PrefixInfo]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobInfo(BaseModel):
    """A training or evaluation job: queued -> running (progress) -> succeeded (prefix_id, evaluation) |
    failed (error) | cancelled."""

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
    kind: Literal["train", "evaluate"] = "train"
    target: str | None = Field(None, description="the prefix an evaluation job evaluates")
    evaluation: dict | None = Field(
        None, description="an evaluation job's result (or a training job's held-out split's)"
    )
    created_at: str
    updated_at: str
    started_at: str | None = Field(None, description="when a worker first began it (null: not yet)")

    @classmethod
    def of(cls, job) -> JobInfo:
        flat = {**asdict(job.progress), **{k: v for k, v in vars(job).items() if k != "progress"}}
        return cls(job_id=job.id, **{k: flat[k] for k in cls.model_fields if k != "job_id"})


class TierLoads(BaseModel):
    hits: int = 0
    misses: int = 0
    hit_rate: float | None = Field(None, description="hits / (hits + misses); null before any lookup")
    other: dict[str, int] = Field(
        default_factory=dict, description="the tier's other counts: errors, evictions, reads, load_errors..."
    )


class ServerStats(BaseModel):
    """Aggregate figures of this server (the web console's Server page): no prefix ids, no tenants."""

    model: str
    redis: str = Field(description='"up", "down" or "none" (not configured)')
    running: int = Field(description="rows in the batch")
    max_running: int = Field(description="the batch's row limit")
    waiting: int = Field(description="requests queued for the batch")
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_prefixes: int = Field(description="blocks held by resident KV prefixes; the rest are rows'")
    preemptions: int
    tokens_per_s: float = Field(description="generated tokens per second over the last 10 s")
    tokens_total: int = Field(description="generated tokens since start")
    resident_prefixes: int = Field(description="prefixes in the device pool")
    resident_bytes: int
    pool_budget_bytes: int = Field(description="the device pool's byte budget (0: none)")
    prefix_loads: dict[str, TierLoads] = Field(description="lookups per tier: device, local, redis, store")
    cuda_graphs: str = Field(
        description='the dense pieces: "graphs" (captured CUDA graphs replayed), "eager" (no graphs on this '
        'device), "failed" (a capture failed: eager from then on), "off" (not configured)'
    )
    decode_kernel: str = Field(
        description='how decode rows read their K/V blocks: "triton" or "c" (in place), "gather" (copied)'
    )


class JobList(BaseModel):
    jobs: list[JobInfo]


# ---- tenants, keys and usage (the admin API, GET /usage) ---------------------------------------------
class TenantLimits(BaseModel):
    """A tenant's limits (0: unlimited). In a request: only the ones given change; null resets one to
    the server's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0, description="input + max_new_tokens per minute")
    max_concurrent: int | None = Field(None, ge=0, description="generation requests in the engine at once")
    max_stored_prefixes: int | None = Field(None, ge=0, description="prefixes owned (queued training counts)")
    max_stored_bytes: int | None = Field(None, ge=0, description="bytes of the prefix files owned")
    max_active_jobs: int | None = Field(
        None, ge=0, description="training and evaluation jobs queued or running"
    )


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., pattern=TENANT_NAME.pattern, description="letters, digits, '.', '_', '@', '-'")
    status: Literal["active", "disabled"] = "active"
    weight: float = Field(1.0, gt=0, le=MAX_WEIGHT, description="its share of the engine relative to others'")
    limits: TenantLimits = Field(default_factory=TenantLimits)


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    status: Literal["active", "disabled"] | None = None
    weight: float | None = Field(None, gt=0, le=MAX_WEIGHT)
    limits: TenantLimits | None = None


class TenantInfo(BaseModel):
    name: str
    status: Literal["active", "disabled"]
    weight: float
    limits: dict[str, int] = Field(description="the limits set for this tenant (the others: the defaults)")
    effective_limits: dict[str, int] = Field(description="every limit as it applies (0: unlimited)")
    source: Literal["registry", "config"] = Field(
        description='"config": known only from PREFIXSERVE_API_KEYS (no record until changed)'
    )
    keys: int = Field(description="API keys issued by the admin API (live)")
    config_keys: int = Field(description="API keys configured by PREFIXSERVE_API_KEYS / _FILE")
    created_at: str
    updated_at: str


class TenantList(BaseModel):
    tenants: list[TenantInfo]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Text = Field("", max_length=MAX_NAME_LEN, description="a label for the key (e.g. where it is used)")


class KeyInfo(BaseModel):
    key_id: str = Field(description="the key's public id (the key starts psk-<key_id>-)")
    tenant: str
    name: str
    created_at: str


class KeyCreated(KeyInfo):
    key: str = Field(description="the API key itself: shown only in this answer, stored only as a digest")


class KeyList(BaseModel):
    keys: list[KeyInfo]
    config_keys: int = Field(description="keys configured by PREFIXSERVE_API_KEYS / _FILE (not listed)")


class UsageDay(BaseModel):
    day: str = Field(description="UTC date, YYYY-MM-DD")
    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    generated_tokens: int = 0
    training_example_epochs: int = 0
    evaluation_examples: int = 0
    stored_bytes: int = Field(0, description="bytes of the prefixes it added that day")


class StoredNow(BaseModel):
    prefixes: int
    bytes: int


class UsageReport(BaseModel):
    """A tenant's usage per day (newest first), its totals over those days, what it stores now and its
    limits."""

    tenant: str
    days: list[UsageDay]
    totals: UsageDay
    stored: StoredNow
    limits: dict[str, int]


class AdminUsage(BaseModel):
    days: list[UsageDay] = Field(description="one row per tenant and day with any usage, newest day first")


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
