"""What a caller asks of the engine, validated before it is queued."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import InvalidRequest
from ..limits import MAX_SEED, MAX_TEMPERATURE, stop_problem

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
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # tinier temperatures are argmax up to rounding anyway

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequest naming the first parameter out of range."""
        _check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "max_new_tokens",
            f"expected an integer >= 1, got {self.max_new_tokens!r}",
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
        problem = stop_problem(self.stop)
        if problem is not None:
            raise InvalidRequest(*problem)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(name, message)


@dataclass
class Request:
    """A validated request as the engine holds it (token ids already computed)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefix_id: str | None = None
    prefix_len: int = 0
    output_ids: list[int] = field(default_factory=list)
