"""Typed results (pydantic v2). Unknown fields from newer servers are ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Usage(_Model):
    prefix_tokens: int
    prompt_tokens: int
    completion_tokens: int


class Alternative(_Model):
    token_id: int
    token: str
    logprob: float


class TokenScore(_Model):
    """One token's log-probability, and the most likely tokens at its place (best first)."""

    token_id: int
    token: str
    logprob: float
    top: list[Alternative] = []


class GenerateResult(_Model):
    id: str
    prefix_id: str | None
    text: str
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    logprobs: list[TokenScore] | None = None  # with generate(..., logprobs=k)


class ScoreResult(_Model):
    """`client.score(...)`: the continuation's log-probability, in total and token by token."""

    prefix_id: str | None
    total_logprob: float
    tokens: list[TokenScore]
    usage: Usage


class Evaluation(_Model):
    """A prefix evaluated on examples: `metrics` has bleu (0-100), rouge_l, exact_match (0-1), loss."""

    job_id: str
    n_examples: int
    metrics: dict[str, float]
    config: dict = {}
    samples: list[dict] = []
    created_at: str = ""


class Prefix(_Model):
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
    size_bytes: int | None = None  # the stored file's size
    evaluations: list[Evaluation] | None = None  # your evaluations (prefixes.get only)


class JobState(_Model):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    name: str = ""
    visibility: str = "private"
    n_examples: int = 0
    config: dict = {}
    attempts: int = 0
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    eta_s: float | None = None
    losses: list[float] = []
    eval_losses: list[float] = []
    error: str | None = None
    prefix_id: str | None = None
    kind: str = "train"  # or "evaluate"
    target: str | None = None
    evaluation: dict | None = None
    created_at: str = ""
    updated_at: str = ""
    started_at: str | None = None  # when a worker first began it (None: not yet)

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


# ---- tenants, keys, usage (the admin API and GET /usage) --------------------------------------------
class Tenant(_Model):
    """A tenant as the admin API shows it. `limits`: the ones set for it; `effective_limits`: every limit
    as it applies, the server's defaults included (0: unlimited). `keys`: API keys issued by the admin
    API; `config_keys`: keys configured on the server (PREFIXSERVE_API_KEYS), never listed."""

    name: str
    status: Literal["active", "disabled"]
    weight: float
    limits: dict[str, int] = {}
    effective_limits: dict[str, int] = {}
    source: str = "registry"  # or "config": known only from configured keys
    keys: int = 0
    config_keys: int = 0
    created_at: str = ""
    updated_at: str = ""


class ApiKey(_Model):
    """An issued API key's record (never the key itself: the server keeps only its digest)."""

    key_id: str
    tenant: str
    name: str = ""
    created_at: str = ""


class IssuedKey(ApiKey):
    """`admin.keys.issue(...)`: the record and, this once, the key itself."""

    key: str


class UsageDay(_Model):
    """A tenant's usage on one UTC day (`day` is "total" in `UsageReport.totals`)."""

    day: str
    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    generated_tokens: int = 0
    training_example_epochs: int = 0
    evaluation_examples: int = 0
    stored_bytes: int = 0  # bytes of the prefixes it added that day


class StoredUsage(_Model):
    """What a tenant stores now."""

    prefixes: int
    bytes: int


class UsageReport(_Model):
    """`client.usage(days)`: the calling tenant's usage per day (newest first), its totals over those days,
    what it stores now and the limits that apply to it (0: unlimited)."""

    tenant: str
    days: list[UsageDay]
    totals: UsageDay
    stored: StoredUsage
    limits: dict[str, int] = {}
