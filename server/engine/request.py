"""What a caller asks of the engine (validated before it is queued), and what it answers, step by step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from ..errors import InvalidRequest, PrefixServeError
from ..limits import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    stop_problem,
)

if TYPE_CHECKING:
    from torch import Tensor

GREEDY_BELOW = 1e-5


class FinishReason(StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string was produced
    EOS = "eos"  # the model produced its end-of-sequence token
    CANCELLED = "cancelled"  # the caller went away or aborted
    ERROR = "error"  # the request could not run (e.g. its prefix failed to load); see the error


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 disable those filters. A request with a
    seed draws from its own generator, so its text does not depend on its batch companions.

    Penalties and biases change the logits a row samples from (greedy rows too), as OpenAI defines
    them: `logit_bias` adds to given tokens; `presence_penalty` is subtracted from every token generated
    so far, `frequency_penalty` once per time it was generated. `logprobs` k: each new token comes with
    its log-probability and the k most likely tokens' (from the model's distribution, before penalties
    and temperature); `prompt_logprobs` k: the same for every prompt token after the first (scoring).
    max_new_tokens 0 scores the prompt without generating (prompt_logprobs required).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # tinier temperatures are argmax up to rounding anyway

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or biases apply: the row's logits are its own before it picks."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequest naming the first parameter out of range."""
        scoring = self.prompt_logprobs is not None
        _check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= (0 if scoring else 1),
            "max_new_tokens",
            f"expected an integer >= {0 if scoring else 1}, got {self.max_new_tokens!r}"
            + ("" if scoring else " (0 only when scoring the prompt: prompt_logprobs set)"),
        )
        _check(
            0.0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"expected a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {self.temperature!r}",
        )
        _check(
            isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size,
            "top_k",
            f"expected an integer in [0, {vocab_size}] (0 = off), got {self.top_k!r}",
        )
        _check(0.0 < self.top_p <= 1.0, "top_p", f"expected a number in (0, 1], got {self.top_p!r}")
        _check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED),
            "seed",
            f"expected an integer in [0, 2**63 - 1], got {self.seed!r}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            _check(
                k is None or (isinstance(k, int) and 0 <= k <= MAX_LOGPROBS),
                name,
                f"expected an integer in [0, {MAX_LOGPROBS}] (alternatives per token) or null, got {k!r}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                -MAX_PENALTY <= value <= MAX_PENALTY,
                name,
                f"expected a number in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}",
            )
        self._validate_logit_bias(vocab_size)
        problem = stop_problem(self.stop)
        if problem is not None:
            raise InvalidRequest(*problem)

    def _validate_logit_bias(self, vocab_size: int) -> None:
        _check(
            len(self.logit_bias) <= MAX_LOGIT_BIAS_TOKENS,
            "logit_bias",
            f"expected at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias)}",
        )
        for token, bias in self.logit_bias:
            _check(
                isinstance(token, int) and 0 <= token < vocab_size,
                "logit_bias",
                f"token ids must be integers in [0, {vocab_size}), got {token!r}",
            )
            _check(
                -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                f"logit_bias[{token}]",
                f"expected a number in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}",
            )


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(name, message)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and the `top` most likely tokens' (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)


@dataclass(frozen=True)
class Tenancy:
    """Whose request it is, as the engine's fair scheduling needs it (the API fills it in from the tenant
    registry with every request, so a changed weight or quota applies from the next request on)."""

    name: str = ""  # "": the engine's own callers (tests, benchmarks, evaluation), one anonymous tenant
    weight: float = 1.0  # its share of the engine relative to the other tenants' weights
    max_concurrent: int = 0  # its requests in the engine at once (waiting + running); 0: no cap

    def validate(self) -> None:
        _check(
            math.isfinite(self.weight) and self.weight > 0,
            "tenant.weight",
            f"expected a finite number > 0, got {self.weight!r}",
        )
        _check(
            isinstance(self.max_concurrent, int) and self.max_concurrent >= 0,
            "tenant.max_concurrent",
            f"expected an integer >= 0 (0: no cap), got {self.max_concurrent!r}",
        )


@dataclass
class Request:
    """A validated request as the engine holds it (token ids already computed)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefix_id: str | None = None
    prefix_len: int = 0
    adapter_id: str | None = None  # a weight-side adapter (LoRA, bottleneck) beside the prefix
    tenancy: Tenancy = Tenancy()

    @property
    def resident_ids(self) -> list[str]:
        """What the request needs on the device: its prefix and its adapter (either may be absent)."""
        return [i for i in (self.prefix_id, self.adapter_id) if i is not None]


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta: new tokens and text)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prefix_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logits: list[Tensor] = field(default_factory=list)  # [V] per new token, when recorded (record_logits)
    error: PrefixServeError | None = None  # set with finish_reason ERROR
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per new token, when asked (params.logprobs)
    # when asked (params.prompt_logprobs), on the request's first output: one per prompt token, the
    # first None (nothing before it to predict it from)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
