"""Sequence: one request while it is in the engine, and the one place its state lives (as nano-vllm's
`Sequence`).

It owns the request's token ids (the prompt, then each sampled token appended by the scheduler's
`update`: one list), the scheduler's counts and the row's KV block table, and what the core's rows
read in place (the resident prefix and adapter, the request's generator, the prompt log-probabilities
scored so far). The scheduler, the core and the runner's row inputs read this object; nothing keeps a
copy of its tokens. The scheduler's tests make sequences without a model: the core's fields stay empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from .request import FinishReason, Request, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    import torch

    from .prefixes import PrefixState


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: `seq in list` compares objects, not fields
class Sequence:
    request: Request  # what was asked (validated, tokenized): never changed in the engine
    eos_token_id: int | None  # None: never stop on EOS
    token_ids: list[int] = field(init=False)  # the prompt, then the generated tokens
    # ---- the scheduler's
    num_computed: int = 0  # tokens whose K/V are in the row's blocks
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    blocks: list[int] = field(default_factory=list)  # the row's block table
    num_preemptions: int = 0
    arrival: int = 0  # when it arrived, on the scheduler's clock (set by `add`)
    admitted: int = 0  # when it was last admitted to the batch, on the same clock
    num_charged: int = 0  # prompt tokens counted as the tenant's service (a recompute is not counted)
    # ---- the core's: what its rows read in place
    generator: torch.Generator | None = None  # its own draws (a seeded request)
    pinned: list[str] = field(default_factory=list)  # resident ids held from `add` until it ends
    prefix: PrefixState | None = None  # the resident prefix, once the row is admitted
    prefix_slot: int | None = None  # its first slot in the KV pool, when it is a KV prefix placed there
    adapter: PrefixState | None = None  # the resident weight-side adapter, likewise
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])  # scored so far

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prefix_id(self) -> str | None:
        return self.request.prefix_id

    @property
    def adapter_id(self) -> str | None:
        return self.request.adapter_id

    @property
    def resident_ids(self) -> list[str]:
        """Its prefix and its adapter (either may be absent): what must be on the device."""
        return self.request.resident_ids

    @property
    def tenant(self) -> str:
        return self.request.tenancy.name  # "": the engine's own callers, one anonymous tenant

    @property
    def weight(self) -> float:
        return self.request.tenancy.weight

    @property
    def max_new_tokens(self) -> int:
        return self.request.params.max_new_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + generated so far."""
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_ids)

    def generated(self) -> list[int]:
        """The generated tokens (a copy: penalties read it, for the rows that have them)."""
        return self.token_ids[len(self.request.prompt_ids) :]
