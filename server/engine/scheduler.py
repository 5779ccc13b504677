"""Continuous-batching scheduler: a pure CPU object with no tensors.

Three-call cycle (as in vLLM v1): `schedule()` returns a plan, the runner executes it,
`update(sampled)` records the sampled tokens and decides which sequences finished.

Every scheduled row is the same kind of work: compute the tokens `[num_computed, num_computed + n)`
of one sequence (prompt tokens while prefilling, in chunks if the step's token budget is short;
the last sampled token while decoding). A row whose chunk reaches the last known token samples the
next one. Decoding rows come first (one token each, so they never starve), then prompt chunks of
running rows and admissions of waiting requests; a waiting request whose prefix is not on the device
yet is skipped without blocking those behind it.

Tenants (architecture.md invariant 10): every sequence belongs to a tenant with a weight, and the
waiting requests are kept per tenant, in arrival order. The budget left after the decoding rows goes
tenant by tenant, to the tenant that has received the least service for its weight first (Virtual
Token Counters, fairness.py): its running rows' next prompt chunks, then its next waiting request. So
a tenant that floods the server waits behind its own requests and prompts, not in front of everyone
else's. A tenant with requests waiting and fewer running rows than its weighted share of a full batch
may take the place of a row of a tenant above its share (only a row admitted before the request
arrived, so nothing churns in steady saturation): that row is paused, keeping its KV blocks, and goes
on where it stopped when its tenant gets a place again (its blocks are taken back, and its tokens
recomputed later, only if memory runs short meanwhile). A light tenant's request starts at the next
step even when a flood fills the batch, and the flood loses no work to it. With one tenant (or none
named) this is plain arrival order, and a tenant alone gets the whole machine.

Memory: a row's own tokens live in KV blocks (blocks.py) that the scheduler hands out as the row
grows. A waiting request is admitted while the blocks of its first chunk are free (beyond a small
watermark kept for the running rows to grow); when a running row needs a block and none is free, the
newest running row of the tenant furthest above its share (the highest counter) is preempted: its
blocks are freed and it goes back to the front of its tenant's queue, to recompute its tokens (prompt
and output so far) when memory allows. Its output is unchanged.

The pool is shared with the resident KV prefixes (unified paging, arena.py): before it preempts a row
the scheduler asks `reclaim` to evict prefixes no request uses, and admission keeps the blocks that
loaded prefixes wait for (`reserved`) out of reach of new rows, so that a prefix never starves behind
a stream of requests that do not need it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .blocks import BlockAllocator, blocks_for
from .fairness import TenantCounters
from .request import FinishReason
from .sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32  # sequences in the batch
    max_tokens_per_step: int = 512  # tokens computed per forward pass, prefill chunks included
    num_blocks: int = 1 << 40  # KV blocks in the pool (block 0 is the null block); default: unbounded
    block_size: int = 16  # tokens per KV block
    watermark_blocks: int = 0  # admission leaves this many blocks free for the running rows to grow
    # a tenant's service (fairness.py): prompt tokens x service_in + generated tokens x service_out
    service_in: float = 1.0
    service_out: float = 2.0
    # while tenants share the engine (`sharing_steps`), the prompt tokens a step carries for a tenant above
    # its share of the batch (None: no bound): keeps short the step in progress that a newcomer's first
    # token waits for
    crowded_prompt_tokens: int | None = None
    # a tenant counts as sharing the engine while it has work and for this many steps after its last
    # request ended: a client's next request follows the end of its previous one, and finds the step then
    # in progress as short as while it was there
    sharing_steps: int = 4

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.crowded_prompt_tokens is not None and self.crowded_prompt_tokens < 1:
            raise ValueError(f"crowded_prompt_tokens must be >= 1 or None, got {self.crowded_prompt_tokens}")
        if self.sharing_steps < 0:
            raise ValueError(f"sharing_steps must be >= 0, got {self.sharing_steps}")
        if self.max_tokens_per_step < self.max_running:
            raise ValueError(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= "
                f"max_running ({self.max_running}) so that every running sequence can decode in each step"
            )


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
        self._queues: dict[str, deque[Sequence]] = {}  # waiting, per tenant, in arrival order
        self._num_waiting = 0
        self._running: list[Sequence] = []  # admission order
        self._rows: Counter[str] = Counter()  # running rows per tenant
        self._paused: list[Sequence] = []  # waiting rows that gave their place but kept their blocks
        self._by_id: dict[str, Sequence] = {}
        self._to_free: list[str] = []  # left the batch since the last plan
        self._last_plan: SchedulePlan | None = None
        self._clock = 0  # ticks at every arrival and admission: orders them
        self._steps = 0  # plans made
        self._left: dict[str, int] = {}  # tenant -> the step its last request ended (while it has none)
        self.tenants = TenantCounters(config.service_in, config.service_out)
        self.blocks = BlockAllocator(config.num_blocks, config.block_size)
        self.num_preemptions = 0  # rows sent back to the queue for want of blocks or a fair place, ever

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._num_waiting or self._running or self._to_free)

    def waiting(self) -> list[Sequence]:
        """The waiting requests, tenant by tenant, each tenant's in arrival order."""
        return [seq for queue in self._queues.values() for seq in queue]

    def running(self) -> list[Sequence]:
        """The rows in the batch, oldest first."""
        return list(self._running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def in_flight(self, tenant: str) -> int:
        """The tenant's requests in the scheduler (waiting or running)."""
        return self.tenants.live[tenant]

    def can_ever_fit(self, tokens: int) -> bool:
        """Whether a row of `tokens` own tokens fits the KV pool at all (alone)."""
        return blocks_for(tokens, self.config.block_size) <= self.blocks.capacity

    # ---- the bounded queue, shared fairly --------------------------------------------------------
    def queue_share(self, tenant: str, weight: float) -> tuple[int, float]:
        """The places `tenant` holds in the waiting queue, and the fraction of the queue due to it: its
        weight over the weights of the tenants now waiting and its own."""
        others = {t for t, q in self._queues.items() if q and t != tenant}
        weights = sum(self.tenants.weight(t) for t in others) + weight
        return len(self._queues.get(tenant, ())), weight / weights

    def queue_victim(self, tenant: str) -> Sequence | None:
        """The request to refuse so that one of `tenant` (below its share) can wait instead: the youngest
        never-started waiting request of the tenant holding the most places for its weight. None if no
        other tenant has such a request."""
        holders = sorted(
            (t for t, q in self._queues.items() if q and t != tenant),
            key=lambda t: len(self._queues[t]) / self.tenants.weight(t),
            reverse=True,
        )
        for t in holders:
            fresh = next((s for s in reversed(self._queues[t]) if not s.num_preemptions), None)
            if fresh is not None:
                return fresh
        return None

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        self._clock += 1
        seq.arrival = self._clock
        self._by_id[seq.request_id] = seq
        self.tenants.join(seq.tenant, seq.weight)
        self._queues.setdefault(seq.tenant, deque()).append(seq)
        self._num_waiting += 1

    def finish(self, request_id: str, reason: FinishReason) -> bool:
        """End a sequence now (stop string, cancel, error); its blocks are free at once.

        Returns False if the request is unknown or already finished.
        """
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return False
        if seq.status is Status.WAITING:
            self._unqueue(seq)  # holds no blocks (never admitted, or preempted), unless paused
            if seq in self._paused:
                self._paused.remove(seq)
        else:
            self._running.remove(seq)
            self._rows[seq.tenant] -= 1
            self._to_free.append(request_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.tenants.leave(seq.tenant)
        if not self.tenants.live[seq.tenant]:
            self._left[seq.tenant] = self._steps
        self.blocks.free(seq.blocks)
        seq.blocks = []
        return True

    def _unqueue(self, seq: Sequence) -> None:
        queue = self._queues[seq.tenant]
        queue.remove(seq)
        if not queue:
            del self._queues[seq.tenant]
        self._num_waiting -= 1

    # ---- the cycle -----------------------------------------------------------------------------
    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan(freed=self._to_free)
        self._to_free = []
        self._steps += 1
        budget = self.config.max_tokens_per_step
        # decode rows first (one token each: they always fit the budget), then prompt chunks and admissions
        for seq in [s for s in self._running if s.num_tokens - s.num_computed == 1]:
            if seq.status is Status.RUNNING:  # (not preempted earlier in this loop)
                budget -= self._schedule_running(plan, seq, budget)
        self._prefill(plan, budget)
        self._last_plan = plan
        return plan

    def _prefill(self, plan: SchedulePlan, budget: int) -> None:
        """The rest of the budget, tenant by tenant, the least served first: a tenant's next item is a
        chunk of its running rows that are prefilling (prompts, and rows recomputing after a preemption),
        oldest first, else the admission of its next waiting request. So one tenant's prompts never hold
        back another's, and within a tenant a long prompt is not overtaken by later ones. Admission stops
        for this step when memory runs out (no later request jumps ahead for want of memory); once the
        batch is full a request is admitted only into a place due to its tenant (`_fair_place`).
        While tenants share the batch, a tenant above its share gets at most `crowded_prompt_tokens` of
        prompt a step, and none in a step that carries the prompt of a tenant within its share
        (`_crowding`): a newcomer's first token waits for a short step in progress and then for the
        flood's decoding rows, never for the flood's prompts (they wait a step; nothing is lost)."""
        rows: dict[str, deque[Sequence]] = {}  # each tenant's prefilling rows, in admission order
        for seq in self._running:
            if seq.num_tokens - seq.num_computed > 1:
                rows.setdefault(seq.tenant, deque()).append(seq)
        served = self.tenants.snapshot()  # service so far, this step's decode rows included
        blocked: set[str] = set()  # tenants with no place due in the full batch this step
        allowance = self._allowances()  # prompt tokens left this step to each tenant above its share
        held: set[str] = set()  # tenants above their share with no more prompt this step
        admitting = True
        while budget > 0:
            seq = self._next_prefill(rows, blocked if admitting else set(self._queues), held)
            if seq is None:
                return
            crowded = self._crowding(seq)
            room = min(budget, allowance.get(seq.tenant, budget))
            if seq.status is Status.RUNNING:
                rows[seq.tenant].popleft()
                used = self._schedule_running(plan, seq, room)
            else:
                if len(self._running) >= self.config.max_running:
                    freed = self._fair_place(plan, seq, served)
                    if freed is None:
                        blocked.add(seq.tenant)
                        continue
                    budget += freed
                    room = min(budget, allowance.get(seq.tenant, budget))
                admitting = seq.request_id not in plan.preempted and self._admit(plan, seq, room)
                if not admitting:
                    continue
                used = plan.chunks[-1].num_tokens
            budget -= used
            held |= crowded
            if seq.tenant in allowance:
                allowance[seq.tenant] -= used
                if allowance[seq.tenant] <= 0:
                    held.add(seq.tenant)

    def _next_prefill(
        self, rows: dict[str, deque[Sequence]], closed: set[str], held: set[str]
    ) -> Sequence | None:
        """The next item of the tenant with the least service for its weight (between equals, a tenant
        just lifted to the others' counter, the one with fewer rows in the batch for its weight; then
        the older item), tenants `held` aside: its oldest prefilling row, else its first admissible
        waiting request unless its admissions are `closed`."""
        best: tuple[float, float, int] | None = None
        found: Sequence | None = None
        for tenant in (set(rows) | set(self._queues)) - held:
            mine = rows.get(tenant)
            while mine and mine[0].status is not Status.RUNNING:  # preempted earlier in this step
                mine.popleft()
            if mine:
                seq, order = mine[0], mine[0].admitted
            elif tenant not in closed and (seq := self._head(tenant)) is not None:
                order = seq.arrival
            else:
                continue
            rank = (self.tenants.counter(tenant), self._rows[tenant] / self.tenants.weight(tenant), order)
            if best is None or rank < best:
                best, found = rank, seq
        return found

    def _allowances(self) -> dict[str, int]:
        """While tenants share the engine (`_sharing`): `crowded_prompt_tokens` for each tenant above its
        share."""
        sharing = self._sharing()
        cap = self.config.crowded_prompt_tokens
        if cap is None or len(sharing) < 2:
            return {}
        return {t: cap for t in self._above_share(sharing)}

    def _sharing(self) -> set[str]:
        """The tenants with work, and those whose last request ended within `sharing_steps` steps."""
        working = {t for t, n in self._rows.items() if n} | set(self._queues)
        recent = self._steps - self.config.sharing_steps
        self._left = {t: s for t, s in self._left.items() if s >= recent and t not in working}
        return working | set(self._left)

    def _crowding(self, seq: Sequence) -> set[str]:
        """If `seq`'s tenant, with `seq` in the batch, holds no more than its weighted share of the
        places: the tenants holding more than theirs (their prompts wait while its prompt runs)."""
        mine = self._rows[seq.tenant] + (seq.status is not Status.RUNNING)
        if mine > self._places({seq.tenant}) * self.tenants.weight(seq.tenant):
            return set()
        return self._above_share({seq.tenant})

    def _above_share(self, also: set[str]) -> set[str]:
        """The tenants holding more rows than their weighted share of the places, the shares taken over
        the tenants in the batch and `also`."""
        places = self._places(also)
        return {t for t, n in self._rows.items() if n > places * self.tenants.weight(t)}

    def _places(self, also: set[str]) -> float:
        """The batch's places per unit of weight, over the tenants in the batch and `also`."""
        tenants = {t for t, n in self._rows.items() if n} | also
        return self.config.max_running / sum(self.tenants.weight(t) for t in tenants)

    def _head(self, tenant: str) -> Sequence | None:
        """The tenant's first admissible waiting request (its prefix on the device: a request whose
        prefix is loading keeps its place without blocking the requests behind it)."""
        return next((s for s in self._queues.get(tenant, ()) if not self._prefix_pending(s)), None)

    def _admit(self, plan: SchedulePlan, seq: Sequence, budget: int) -> bool:
        """Admit a waiting request with the next chunk the budget allows (a paused row goes on from
        where it stopped, with the blocks it kept); False: blocks are short."""
        n = min(seq.num_tokens - seq.num_computed, budget)
        need = blocks_for(seq.num_computed + n, self.config.block_size) - len(seq.blocks)
        blocks = self._take(need, self._reserve(), spare=seq)
        if blocks is None:
            return False
        self._unqueue(seq)
        if seq in self._paused:
            self._paused.remove(seq)
        self._running.append(seq)
        self._rows[seq.tenant] += 1
        self._clock += 1
        seq.status, seq.blocks, seq.admitted = Status.RUNNING, seq.blocks + blocks, self._clock
        plan.chunks.append(self._chunk(seq, n, first=seq.num_computed == 0))
        return True

    def _fair_place(self, plan: SchedulePlan, seq: Sequence, served: dict[str, float]) -> int | None:
        """The batch is full: if `seq`'s tenant runs fewer rows than its weighted share of the batch, a
        row it may displace (`_displaced`) steps back for it (preempted). Returns the budget the
        preempted row gave back, or None when no place is due."""
        places = self._places({seq.tenant})
        rows = {t: n for t, n in self._rows.items() if n}

        def share(tenant: str) -> float:
            return places * self.tenants.weight(tenant)

        if rows.get(seq.tenant, 0) + 1 > share(seq.tenant):
            return None
        victim = self._displaced(seq, rows, share, served)
        return None if victim is None else self._preempt(plan, victim, pause=True)

    def _displaced(
        self,
        seq: Sequence,
        rows: dict[str, int],
        share: Callable[[str], float],
        served: dict[str, float],
    ) -> Sequence | None:
        """The row `seq` may take the place of: among the tenants that stay at or above their share of the
        batch without one row and had received at least as much service as `seq`'s, the one furthest above
        its share; its newest row admitted before `seq` arrived. So places only move towards the shares,
        and a backlog that admission already weighed (it was waiting when those rows were admitted) never
        displaces them: in steady saturation nothing is preempted, while a light tenant's new request
        starts at the next step whatever fills the batch."""
        mine = served.get(seq.tenant, 0.0)
        over = {
            t for t, n in rows.items() if t != seq.tenant and n - 1 >= share(t) and served.get(t, 0.0) >= mine
        }
        earlier = [r for r in self._running if r.tenant in over and r.admitted < seq.arrival]
        if not earlier:
            return None
        most = max(
            {r.tenant for r in earlier}, key=lambda t: (rows[t] / self.tenants.weight(t), served.get(t, 0.0))
        )
        return max((r for r in earlier if r.tenant == most), key=lambda r: r.admitted)

    def _prefix_pending(self, seq: Sequence) -> bool:
        """Its prefix is not on the device yet (a preempted row still holds the one it ran with)."""
        if seq.num_preemptions:
            return False
        return any(not self._prefix_ready(i) for i in seq.resident_ids)

    def _reserve(self) -> int:
        """Blocks admission leaves free: the running rows' watermark and what loaded prefixes wait for."""
        reserve = self.config.watermark_blocks if self._running else 0
        return reserve + (self._reserved() if self._reserved is not None else 0)

    def _take(self, n: int, keep: int = 0, spare: Sequence | None = None) -> list[int] | None:
        """n free blocks, leaving `keep` free; evicts unused prefixes, then takes back the blocks of
        paused rows (newest first; not `spare`'s), when that makes room. None: short."""
        blocks = self.blocks.try_allocate(n, keep)
        if blocks is None and self._reclaim is not None:
            self._reclaim(n + keep)
            blocks = self.blocks.try_allocate(n, keep)
        while blocks is None and (paused := [p for p in self._paused if p is not spare]):
            self._unpause(paused[-1])
            blocks = self.blocks.try_allocate(n, keep)
        return blocks

    def _unpause(self, seq: Sequence) -> None:
        """A paused row gives its blocks back: it recomputes its tokens when it runs again."""
        self._paused.remove(seq)
        self.blocks.free(seq.blocks)
        seq.blocks, seq.num_computed = [], 0

    def _schedule_running(self, plan: SchedulePlan, seq: Sequence, budget: int) -> int:
        """Schedule a running row's next chunk, growing its block table; preempts rows of the tenant
        furthest above its share while blocks are short (possibly this one). Returns the budget it used,
        less what preempted rows gave back."""
        n = min(seq.num_tokens - seq.num_computed, budget)
        if n <= 0:
            return 0
        need = blocks_for(seq.num_computed + n, self.config.block_size) - len(seq.blocks)
        returned = 0
        while (blocks := self._take(need)) is None:
            victim = self._memory_victim()
            returned += self._preempt(plan, victim)
            if victim is seq:
                return -returned
        seq.blocks += blocks
        plan.chunks.append(self._chunk(seq, n, first=False))
        return n - returned

    def _memory_victim(self) -> Sequence:
        """The newest running row of the tenant with the most service for its weight."""
        tenant = max({s.tenant for s in self._running}, key=self.tenants.counter)
        return next(s for s in reversed(self._running) if s.tenant == tenant)

    def _preempt(self, plan: SchedulePlan, seq: Sequence, pause: bool = False) -> int:
        """Send a running row back to the front of its tenant's queue. Out of memory its blocks are
        freed and its tokens so far recomputed when it runs again; to give its place (`pause`) it keeps
        its blocks and goes on where it stopped (unless memory runs short meanwhile: `_take`). Returns
        the tokens of its chunk already in `plan` (removed)."""
        self._running.remove(seq)
        self._rows[seq.tenant] -= 1
        seq.status = Status.WAITING
        if pause:
            self._paused.append(seq)
        else:
            self.blocks.free(seq.blocks)
            seq.blocks, seq.num_computed = [], 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._queues.setdefault(seq.tenant, deque()).appendleft(seq)
        self._num_waiting += 1
        plan.preempted.append(seq.request_id)
        mine = [c for c in plan.chunks if c.request_id == seq.request_id]
        plan.chunks = [c for c in plan.chunks if c.request_id != seq.request_id]
        self.tenants.charge_output(seq.tenant, -sum(c.sample for c in mine))  # it samples nothing now
        return sum(c.num_tokens for c in mine)

    def _chunk(self, seq: Sequence, n: int, first: bool) -> ScheduledChunk:
        """The chunk of `n` tokens from `seq.num_computed`, charged to its tenant as it is planned (so the
        admissions later in this step see this step's service): its prompt tokens not counted before (a
        recompute is not counted again) and the token it samples."""
        prompt_end = min(seq.num_computed + n, seq.num_prompt_tokens)
        if prompt_end > seq.num_charged:
            self.tenants.charge_prompt(seq.tenant, prompt_end - seq.num_charged)
            seq.num_charged = prompt_end
        done = seq.num_computed + n == seq.num_tokens and seq.max_new_tokens > 0  # 0: scoring only
        if done:
            self.tenants.charge_output(seq.tenant)
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
            seq.token_ids.append(token)
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
