"""Continuous-batching scheduler: a pure CPU object with no tensors.

Three-call cycle (as in vLLM v1): `schedule()` returns a plan, the runner executes it,
`update(sampled)` records the sampled tokens and decides which sequences finished.

Every scheduled row is the same kind of work: compute the tokens `[num_computed, num_computed + n)`
of one sequence (prompt tokens while prefilling, in chunks if the step's token budget is short;
the last sampled token while decoding). A row whose chunk reaches the last known token samples the
next one. Running rows come first (so they never starve), then waiting requests in arrival order;
a waiting request whose prefix is not on the device yet is skipped without blocking those behind it.

Memory: a row's own tokens live in KV blocks (blocks.py) that the scheduler hands out as the row
grows. A waiting request is admitted while the blocks of its first chunk are free (beyond a small
watermark kept for the running rows to grow); when a running row needs a block and none is free, the
newest running row is preempted: its blocks are freed and it goes back to the front of the queue, to
recompute its tokens (prompt and output so far) when memory allows. Its output is unchanged.

The pool is shared with the resident KV prefixes (unified paging, arena.py): before it preempts a row
the scheduler asks `reclaim` to evict prefixes no request uses, and admission keeps the blocks that
loaded prefixes wait for (`reserved`) out of reach of new rows, so that a prefix never starves behind
a stream of requests that do not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .blocks import BlockAllocator, blocks_for
from .request import FinishReason


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32  # sequences in the batch
    max_tokens_per_step: int = 512  # tokens computed per forward pass, prefill chunks included
    num_blocks: int = 1 << 40  # KV blocks in the pool (block 0 is the null block); default: unbounded
    block_size: int = 16  # tokens per KV block
    watermark_blocks: int = 0  # admission leaves this many blocks free for the running rows to grow

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_tokens_per_step < self.max_running:
            raise ValueError(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= "
                f"max_running ({self.max_running}) so that every running sequence can decode in each step"
            )


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: `seq in list` compares objects, not fields
class Sequence:
    """The scheduler's view of one request: counts only."""

    request_id: str
    prefix_id: str | None
    num_prompt_tokens: int
    max_new_tokens: int
    eos_token_id: int | None  # None: never stop on EOS
    num_tokens: int = 0  # prompt + generated so far
    num_computed: int = 0  # tokens whose K/V are in the row's blocks
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    blocks: list[int] = field(default_factory=list)  # the row's block table
    num_preemptions: int = 0
    adapter_id: str | None = None  # a weight-side adapter it waits for too

    @property
    def resident_ids(self) -> list[str]:
        """Its prefix and its adapter (either may be absent): what must be on the device."""
        return [i for i in (self.prefix_id, self.adapter_id) if i is not None]

    def __post_init__(self) -> None:
        self.num_tokens = self.num_prompt_tokens

    @property
    def num_generated(self) -> int:
        return self.num_tokens - self.num_prompt_tokens


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    start: int  # index (into prompt + output tokens) of the first token computed
    num_tokens: int
    first: bool  # first chunk of this sequence (again, after a preemption)
    sample: bool  # the chunk reaches the last known token: sample the next one
    blocks: list[int]  # the row's block table, covering start + num_tokens (valid until the next plan)


@dataclass
class SchedulePlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)  # sequences that left the batch (blocks returned)
    preempted: list[str] = field(default_factory=list)  # running rows sent back to the queue

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.freed


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: FinishReason


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        prefix_ready: Callable[[str], bool],
        reclaim: Callable[[int], object] | None = None,
        reserved: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self._prefix_ready = prefix_ready
        self._reclaim = reclaim  # make n blocks free by evicting unused prefixes, if they can
        self._reserved = reserved  # blocks that loaded prefixes wait for
        self._waiting: list[Sequence] = []  # arrival order
        self._running: list[Sequence] = []  # admission order
        self._by_id: dict[str, Sequence] = {}
        self._to_free: list[str] = []  # left the batch since the last plan
        self._last_plan: SchedulePlan | None = None
        self.blocks = BlockAllocator(config.num_blocks, config.block_size)
        self.num_preemptions = 0  # rows sent back to the queue for want of blocks, ever

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._to_free)

    def waiting(self) -> list[Sequence]:
        return list(self._waiting)

    def running(self) -> list[Sequence]:
        """The rows in the batch, oldest first."""
        return list(self._running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def can_ever_fit(self, tokens: int) -> bool:
        """Whether a row of `tokens` own tokens fits the KV pool at all (alone)."""
        return blocks_for(tokens, self.config.block_size) <= self.blocks.capacity

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        self._by_id[seq.request_id] = seq
        self._waiting.append(seq)

    def finish(self, request_id: str, reason: FinishReason) -> bool:
        """End a sequence now (stop string, cancel, error); its blocks are free at once.

        Returns False if the request is unknown or already finished.
        """
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return False
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self._waiting:
            self._waiting.remove(seq)  # holds no blocks (never admitted, or preempted)
        else:
            self._running.remove(seq)
            self._to_free.append(request_id)
        self.blocks.free(seq.blocks)
        seq.blocks = []
        return True

    # ---- the cycle -----------------------------------------------------------------------------
    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan(freed=self._to_free)
        self._to_free = []
        budget = self.config.max_tokens_per_step
        # decode rows first (one token each: they always fit the budget), then chunks of prompts and of
        # rows recomputing after a preemption
        decoding = [s for s in self._running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self._running if s.num_tokens - s.num_computed > 1]
        for seq in decoding + prefilling:
            if seq.status is Status.RUNNING:  # (not preempted earlier in this loop)
                budget -= self._schedule_running(plan, seq, budget)
        for seq in list(self._waiting):
            if budget == 0 or len(self._running) >= self.config.max_running:
                break
            if seq.request_id in plan.preempted:
                break  # memory ran out this step: it waits for the next
            if self._prefix_pending(seq):
                continue  # keeps its place in line; does not block the requests behind it
            n = min(seq.num_tokens, budget)
            blocks = self._take(blocks_for(n, self.config.block_size), self._reserve())
            if blocks is None:
                break  # first come, first served: no later request jumps ahead for want of memory
            self._waiting.remove(seq)
            self._running.append(seq)
            seq.status = Status.RUNNING
            seq.blocks = blocks
            plan.chunks.append(self._chunk(seq, n, first=True))
            budget -= n
        self._last_plan = plan
        return plan

    def _prefix_pending(self, seq: Sequence) -> bool:
        """Its prefix is not on the device yet (a preempted row still holds the one it ran with)."""
        if seq.num_preemptions:
            return False
        return any(not self._prefix_ready(i) for i in seq.resident_ids)

    def _reserve(self) -> int:
        """Blocks admission leaves free: the running rows' watermark and what loaded prefixes wait for."""
        reserve = self.config.watermark_blocks if self._running else 0
        return reserve + (self._reserved() if self._reserved is not None else 0)

    def _take(self, n: int, keep: int = 0) -> list[int] | None:
        """n free blocks, leaving `keep` free; evicts unused prefixes when that makes room. None: short."""
        blocks = self.blocks.try_allocate(n, keep)
        if blocks is None and self._reclaim is not None:
            self._reclaim(n + keep)
            blocks = self.blocks.try_allocate(n, keep)
        return blocks

    def _schedule_running(self, plan: SchedulePlan, seq: Sequence, budget: int) -> int:
        """Schedule a running row's next chunk, growing its block table; preempts the newest rows
        while blocks are short (possibly this one). Returns the budget it used, less what preempted
        rows gave back."""
        n = min(seq.num_tokens - seq.num_computed, budget)
        if n <= 0:
            return 0
        need = blocks_for(seq.num_computed + n, self.config.block_size) - len(seq.blocks)
        returned = 0
        while (blocks := self._take(need)) is None:
            victim = self._running[-1]
            returned += self._preempt(plan, victim)
            if victim is seq:
                return -returned
        seq.blocks += blocks
        plan.chunks.append(self._chunk(seq, n, first=False))
        return n - returned

    def _preempt(self, plan: SchedulePlan, seq: Sequence) -> int:
        """Send a running row back to the front of the queue, freeing its blocks; its tokens so far are
        recomputed when it runs again. Returns the tokens of its chunk already in `plan` (removed)."""
        self._running.remove(seq)
        self.blocks.free(seq.blocks)
        seq.blocks, seq.num_computed, seq.status = [], 0, Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.insert(0, seq)
        plan.preempted.append(seq.request_id)
        mine = [c for c in plan.chunks if c.request_id == seq.request_id]
        plan.chunks = [c for c in plan.chunks if c.request_id != seq.request_id]
        return sum(c.num_tokens for c in mine)

    @staticmethod
    def _chunk(seq: Sequence, n: int, first: bool) -> ScheduledChunk:
        done = seq.num_computed + n == seq.num_tokens and seq.max_new_tokens > 0  # 0: scoring only
        return ScheduledChunk(seq.request_id, seq.num_computed, n, first, sample=done, blocks=seq.blocks)

    def update(self, sampled: dict[str, int]) -> list[Finished]:
        """Record the last plan's results: K/V computed, one new token per sampling row."""
        plan, self._last_plan = self._last_plan, None
        if plan is None:
            raise RuntimeError("update() called without a schedule() before it")
        finished: list[Finished] = []
        for chunk in plan.chunks:
            seq = self._by_id.get(chunk.request_id)
            if seq is None:  # finished by someone else while the step ran
                continue
            seq.num_computed += chunk.num_tokens
            if seq.max_new_tokens == 0 and seq.num_computed == seq.num_tokens:  # a prompt scored
                self.finish(seq.request_id, FinishReason.LENGTH)
                finished.append(Finished(seq.request_id, FinishReason.LENGTH))
            if not chunk.sample:
                continue
            token = sampled[chunk.request_id]
            seq.num_tokens += 1
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.finish(seq.request_id, reason)
                finished.append(Finished(seq.request_id, reason))
        return finished

    @staticmethod
    def _finish_reason(seq: Sequence, token: int) -> FinishReason | None:
        if seq.eos_token_id is not None and token == seq.eos_token_id:
            return FinishReason.EOS
        if seq.num_generated >= seq.max_new_tokens:
            return FinishReason.LENGTH
        return None
