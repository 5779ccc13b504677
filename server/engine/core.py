"""EngineCore: validation, then the step cycle schedule -> execute -> sample -> update.

Synchronous and single-threaded; it makes token ids, never text. A front-end (frontend.py: in a thread,
in an engine process, on Ray Serve, or `OfflineEngine` in the caller's own thread) makes the text and
finds stop strings, and aborts a row that reached one (as vLLM v1 splits them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from prefix_store.kinds import kind_of

# the store caps stored prefixes by these too, so they live in its limits (re-exported here)
from prefix_store.limits import MIN_REQUEST_TOKENS as MIN_REQUEST_TOKENS
from prefix_store.limits import longest_usable_prefix as longest_usable_prefix
from prefix_store.staging import Readback

from ..dense import QUANTIZE
from ..errors import (
    EngineFault,
    EngineOverloaded,
    InvalidRequest,
    PrefixError,
    PrefixServeError,
    QuotaExceeded,
)
from ..model import LoadedModel, ModelSpec
from ..settings import ENV_PREFIX, ServerSettings
from .arena import KvArena
from .blocks import blocks_for
from .prefixes import PrefixProvider, PrefixState, PrefixTable
from .prepare import RequestPreparer
from .request import FinishReason, Request, RequestOutput, SamplingParams, Tenancy, TokenLogprob
from .runner import ModelRunner, RowInput, Scores, StepOutput, log_probs
from .sampling import first_maxima, make_generator, plain_greedy, sample_rows
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from .sequence import Sequence
from .threads import ThreadGovernor
from .wire import EngineStats

log = logging.getLogger(__name__)


DEFAULT_MAX_RUNNING = {"cuda": 256, "cpu": 64}  # rows per batch by device type (others: the CPU's)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int | None = None  # rows in one batch; None: DEFAULT_MAX_RUNNING for the device
    max_tokens_per_step: int | None = None  # tokens per forward pass (None: max(512, max_running));
    # longer prompts are prefilled in chunks
    max_waiting: int = 256  # requests queued beyond the running ones; more -> EngineOverloaded
    max_seq_len: int | None = None  # longest row (prefix + input + output); None: the model's n_positions
    max_prefix_len: int | None = None  # None: half of max_seq_len
    # the paged KV pool of the rows' own tokens, in tokens; None: max_running * max_seq_len / 2 (each row
    # half full on average; rows needing more preempt the newest), on CUDA at most half the free device
    # memory. At least max_seq_len.
    kv_cache_tokens: int | None = None
    block_size: int = 16  # tokens per KV block
    # decode rows read their KV blocks in place: a compiled C kernel on the CPU (cpu_kernels.py), a Triton
    # kernel on CUDA (triton_decode.py); False, or neither available: the blocks are gathered per layer
    # (slower, same numbers)
    paged_kernel: bool = True
    # on the CPU, the dense layers also packed once for oneDNN's GEMM, run by decode-sized steps (dense.py);
    # False: addmm on the plain layout alone (one copy of the weights less)
    packed_gemm: bool = True
    # "int8": every dense layer and the LM head as int8 GEMMs (float32 models on an x86 CPU; dense.py),
    # exact relative to the quantized model; None: the model's own precision
    quantize: str | None = None
    # on the CPU, the forward pass's threads: 0: as many as the cores other processes leave free (all
    # of torch's when the machine is quiet; threads.py); n: always n
    cpu_threads: int = 0
    # each layer's dense part (everything but attention) as CUDA graphs at token-count buckets (graphs.py);
    # None: on for CUDA, off elsewhere. True on the CPU runs the same pieces without capture (tests)
    cuda_graphs: bool | None = None
    # while tenants share the engine, the prompt tokens a step carries for a tenant above its share of the
    # batch, in tokens (the step a newcomer waits behind stays short); None: a quarter of the budget on
    # the CPU, where a step's time grows with its tokens; unbounded on CUDA, where it hardly does
    crowded_prompt_tokens: int | None = None
    record_logits: bool = False  # attach each step's logits to the outputs (tests, debugging)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> EngineConfig:
        """The server's engine, as its settings (PREFIXSERVE_*) configure it. ValueError names a bad one."""
        if settings.quantize not in ("", *QUANTIZE):
            raise ValueError(
                f"{ENV_PREFIX}QUANTIZE: expected one of {list(QUANTIZE)} or empty, got {settings.quantize!r}"
            )
        if settings.cpu_threads < 0:
            raise ValueError(
                f"{ENV_PREFIX}CPU_THREADS: expected 0 (fitted) or a thread count, got {settings.cpu_threads}"
            )
        return cls(
            max_running=settings.max_running or None,
            max_tokens_per_step=settings.max_tokens_per_step or None,
            max_waiting=settings.max_waiting,
            max_seq_len=settings.max_seq_len or None,
            kv_cache_tokens=settings.kv_cache_tokens or None,
            block_size=settings.kv_block_size,
            cuda_graphs=None if settings.cuda_graphs else False,  # None: on CUDA only
            packed_gemm=settings.cpu_packed,
            cpu_threads=settings.cpu_threads,
            quantize=settings.quantize or None,
        )

    def resolved(self, device: torch.device, max_seq_len: int, fits: int | None = None) -> EngineConfig:
        """The configuration with every default filled in for this device and row length. `fits`: the
        most KV tokens the device's memory allows (caps the default pool, not an explicit one)."""
        running = self.max_running or DEFAULT_MAX_RUNNING.get(device.type, DEFAULT_MAX_RUNNING["cpu"])
        tokens = self.kv_cache_tokens or min(running * max_seq_len // 2, fits or 1 << 62)
        tokens = max(tokens, max_seq_len)
        budget = self.max_tokens_per_step or max(512, running)
        crowded = self.crowded_prompt_tokens or (budget if device.type == "cuda" else budget // 4)
        return replace(
            self,
            cuda_graphs=device.type == "cuda" if self.cuda_graphs is None else self.cuda_graphs,
            max_running=running,
            max_tokens_per_step=budget,
            crowded_prompt_tokens=crowded,
            max_seq_len=max_seq_len,
            kv_cache_tokens=tokens,
        )

    def scheduler_config(self) -> SchedulerConfig:
        """For a resolved configuration."""
        num_blocks = blocks_for(self.kv_cache_tokens, self.block_size) + 1  # + the null block
        return SchedulerConfig(
            max_running=self.max_running,
            max_tokens_per_step=self.max_tokens_per_step,
            crowded_prompt_tokens=self.crowded_prompt_tokens,
            num_blocks=num_blocks,
            block_size=self.block_size,
            watermark_blocks=max(1, num_blocks // 100),
        )


@dataclass
class LaunchedStep:
    """A step between `EngineCore.launch` and `finish`."""

    out: list[RequestOutput]  # requests already ended (a prefix that failed, a forward pass that raised)
    rows: list[RowInput] = field(default_factory=list)
    result: StepOutput | None = None  # None: nothing ran


class EngineCore:
    def __init__(
        self, model: LoadedModel, config: EngineConfig | None = None, prefixes: PrefixProvider | None = None
    ) -> None:
        self.model = model
        spec = model.spec
        config = config or EngineConfig()
        self.preparer = RequestPreparer.serving(model.tokenizer, spec, config.max_seq_len)
        self.max_seq_len = self.preparer.max_seq_len
        self.config = config.resolved(model.device, self.max_seq_len, _tokens_that_fit(model))
        self.max_prefix_len = self.config.max_prefix_len or self.max_seq_len // 2
        self.prefixes = prefixes or PrefixTable(spec, model.dtype, model.device, self.max_prefix_len)
        scheduler = self.config.scheduler_config()
        self.scheduler = Scheduler(
            scheduler, self.prefixes.is_ready, self.prefixes.reclaim, self.prefixes.blocks_wanted
        )
        self.runner = ModelRunner(
            model,
            scheduler.num_blocks,
            scheduler.block_size,
            self.config.paged_kernel,
            graphs=self.config.cuda_graphs,
            max_tokens=self.config.max_tokens_per_step,
            pack=self.config.packed_gemm,
            quantize=self.config.quantize,
        )
        # KV prefixes share the rows' KV pool (unified paging), all but one longest row's blocks
        row = blocks_for(self.max_seq_len, scheduler.block_size)
        self.arena = KvArena(self.runner.kv, self.scheduler.blocks, self.scheduler.blocks.capacity - row)
        self.prefixes.attach(self.arena)
        self.readback = Readback(model.device)  # each step's flags and greedy picks: one transfer
        cpu = model.device.type == "cpu"
        self.threads = ThreadGovernor.for_this_process(self.config.cpu_threads) if cpu else None
        self._live: dict[str, Sequence] = {}  # the requests in the engine (the scheduler's own objects)
        self._ended: list[RequestOutput] = []  # requests `add_request` ended, out with the next step
        self.num_steps = 0  # forward passes run (the stats' `steps`)
        log.info(
            "engine on %s: decode attention %s, dense pieces %s",
            model.device,
            self.runner.decode_kernel,
            self.runner.graphs_mode,
        )

    # ---- requests ------------------------------------------------------------------------------
    def prepare(
        self,
        input: str | list[int],
        params: SamplingParams | None = None,
        prefix_id: str | None = None,
        request_id: str | None = None,
        adapter_id: str | None = None,
        tenancy: Tenancy | None = None,
    ) -> Request:
        """Validate and tokenize a request without touching engine state (safe from any thread)."""
        prefix_len = self.prefixes.length(prefix_id) if prefix_id is not None else 0
        return self.preparer.prepare(input, params, prefix_id, prefix_len, request_id, adapter_id, tenancy)

    def add(self, request: Request) -> list[RequestOutput]:
        """Queue a prepared request (engine thread only). Raises QuotaExceeded when its tenant has
        `max_concurrent` requests in the engine, EngineOverloaded when the queue is full and its tenant
        already holds its share of it. Returns the outputs of requests it ended instead: when the queue is
        full and its tenant holds less than its share, the youngest waiting request of the tenant holding
        the most places is refused (EngineOverloaded) to make room."""
        if request.request_id in self._live:
            raise InvalidRequest(
                "request_id", f"{request.request_id!r} is already in use by a running request"
            )
        tenancy = request.tenancy
        tenancy.validate()
        in_flight = self.scheduler.in_flight(tenancy.name)
        if tenancy.max_concurrent and in_flight >= tenancy.max_concurrent:
            raise QuotaExceeded(
                tenancy.name, "max_concurrent", in_flight, tenancy.max_concurrent, "requests in the engine"
            )
        pinned: list[str] = []
        try:
            for resident_id in request.resident_ids:
                self.prefixes.acquire(resident_id)  # may raise PrefixNotFound if it was removed
                pinned.append(resident_id)
            ended = self._make_room(tenancy)  # (only once nothing else can refuse it)
        except BaseException:
            for resident_id in pinned:
                self.prefixes.release(resident_id)
            raise
        params = request.params
        eos = None if params.ignore_eos else self.model.eos_token_id
        seq = Sequence(request, eos, generator=make_generator(params, self.model.device), pinned=pinned)
        self.scheduler.add(seq)
        self._live[request.request_id] = seq
        return ended

    def _make_room(self, tenancy: Tenancy) -> list[RequestOutput]:
        """The bounded waiting queue, shared fairly by weight: a full queue refuses a request whose tenant
        holds at least its share of the places, else ends another tenant's youngest waiting request."""
        limit, waiting = self.config.max_waiting, self.scheduler.num_waiting
        if waiting < limit:
            return []
        held, fraction = self.scheduler.queue_share(tenancy.name, tenancy.weight)
        share = fraction * limit
        if held >= share:
            who = f" (tenant {tenancy.name!r})" if tenancy.name else ""
            raise EngineOverloaded(
                waiting, limit, f"; you{who} hold {held} places, your fair share is {share:.0f}"
            )
        victim = self.scheduler.queue_victim(tenancy.name)
        if victim is None:
            raise EngineOverloaded(waiting, limit)
        error = EngineOverloaded(
            waiting, limit, "; this request was waiting beyond its tenant's fair share of the queue and"
            " gave its place to a tenant below its share",
        )  # fmt: skip
        return [self._end(victim.request_id, error, scrub=False)]

    def add_request(
        self,
        input: str | list[int],
        params: SamplingParams | None = None,
        prefix_id: str | None = None,
        request_id: str | None = None,
        adapter_id: str | None = None,
        tenancy: Tenancy | None = None,
    ) -> str:
        """Prepare and queue a request (errors are raised; requests it ended go out with the next step)."""
        request = self.prepare(input, params, prefix_id, request_id, adapter_id, tenancy)
        self._ended += self.add(request)
        return request.request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks are free at once. False if it is not in the engine."""
        if not self.scheduler.finish(request_id, FinishReason.CANCELLED):
            return False
        self._drop(request_id)
        return True

    def _drop(self, request_id: str) -> None:
        seq = self._live.pop(request_id)
        for resident_id in seq.pinned:
            self.prefixes.release(resident_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._ended)

    @property
    def num_live(self) -> int:
        return len(self._live)

    def stats(self) -> EngineStats:
        s = self.scheduler
        resident, resident_bytes, budget = self.prefixes.residency()
        free, prefix_blocks = self.arena.usage()
        return EngineStats(
            waiting=s.num_waiting,
            running=s.num_running,
            kv_blocks_total=s.blocks.capacity,
            kv_blocks_free=free,
            kv_blocks_prefixes=prefix_blocks,
            preemptions=s.num_preemptions,
            steps=self.num_steps,
            running_prefixes=_prefix_ids(s.running()),
            waiting_prefixes=_prefix_ids(s.waiting()),
            max_running=s.config.max_running,
            resident_prefixes=resident,
            resident_bytes=resident_bytes,
            pool_budget_bytes=budget,
            cpu_threads=self.threads.threads if self.threads is not None else 0,
            cuda_graphs=self.runner.graphs_mode,
            decode_kernel=self.runner.decode_kernel,
        )

    @property
    def num_running(self) -> int:
        """Rows in the batch (holding KV blocks)."""
        return self.scheduler.num_running

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One cycle: free, admit, forward, drop the rows that went bad, sample, update, emit.

        A row whose numbers turn non-finite, whose prefix cannot be placed or whose draw fails ends
        alone with its error; the other rows' tokens are what they would have been without it. A
        forward pass that raises fails that step's rows only (logged); the engine carries on.
        """
        return self.finish(self.launch())

    def launch(self) -> LaunchedStep:
        """The first half of `step`: schedule, admit, start the forward pass, the plain greedy rows'
        picks and the finite flags, and their readback (one transfer). On CUDA this returns while the
        device still runs, so the caller can take in requests meanwhile (`add` and `abort` are fine
        before `finish`)."""
        out, self._ended = self._ended + self._fail_unloadable(), []
        if self.threads is not None:
            self.threads.tick()
        plan = self.scheduler.schedule()  # blocks of finished rows are back; preempted rows wait again
        if not plan.chunks:
            return LaunchedStep(out)
        self.num_steps += 1
        rows = [row for c in plan.chunks if (row := self._admit(c, out)) is not None]
        result = self._forward(rows, out)
        if result is None:
            self.scheduler.update({})
            return LaunchedStep(out)
        return LaunchedStep(out, rows, result)

    def finish(self, step: LaunchedStep) -> list[RequestOutput]:
        """The second half of `step`: wait for the readback, then drop, sample, update and emit."""
        out, result = step.out, step.result
        if result is None:
            return out
        values = self.readback.wait()
        finite, maxima = values[: len(result.row_ids)], values[len(result.row_ids) :]
        out += self._drop_nonfinite(result, finite)
        self._record_scores(result.scores, step.rows)
        keep = [i for i, rid in enumerate(result.sample_ids) if rid in self._live]  # (ended: dropped)
        logits = result.logits if len(keep) == len(result.sample_ids) else result.logits[keep]  # [n, V]
        row_of = {result.sample_ids[i]: row for row, i in enumerate(keep)}  # request -> its row of logits
        picks = {row: maxima[i] for row, i in enumerate(keep)}  # row -> its first maximum
        sampled = self._sample(list(row_of), logits, picks, out)  # (rows whose draw failed are left out)
        finished = {f.request_id: f.reason for f in self.scheduler.update(sampled)}
        record = logits if self.config.record_logits else None
        logprobs = self._token_logprobs(sampled, logits, row_of)
        for rid, tok in sampled.items():
            out.append(self._emit(rid, tok, row_of[rid], record, finished, logprobs.get(rid)))
        out += [self._scored(rid) for rid in finished if rid not in sampled and rid in self._live]
        return out

    def _record_scores(self, scores: dict[str, Scores], rows: list[RowInput]) -> None:
        """Keep the prompt tokens' log-probabilities a step computed (a recomputed chunk, after a
        preemption, finds them already kept)."""
        for row in rows:
            got, seq = scores.get(row.request_id), self._live.get(row.request_id)
            if got is None or seq is None:
                continue
            kept = seq.prompt_logprobs
            for i, entry in enumerate(_token_logprobs(row.targets, got, [row.top] * len(row.targets))):
                if row.start + 1 + i == len(kept):  # position start+i predicts prompt token start+1+i
                    kept.append(entry)

    def _token_logprobs(
        self, sampled: dict[str, int], logits: torch.Tensor, row_of: dict[str, int]
    ) -> dict[str, TokenLogprob]:
        """The sampled tokens' log-probabilities for the rows that asked (one log_softmax for them all);
        `row_of`: each request's row of `logits`."""
        asked = [(row_of[rid], rid) for rid in sampled if self._live[rid].params.logprobs is not None]
        if not asked:
            return {}
        dev = logits.device
        targets = [sampled[rid] for _, rid in asked]
        tops = [self._live[rid].params.logprobs for _, rid in asked]
        rows = torch.tensor([i for i, _ in asked], device=dev)
        scores = Scores(*log_probs(logits[rows], torch.tensor(targets, device=dev), max(tops)))
        entries = _token_logprobs(targets, scores, tops)
        return {rid: entry for (_, rid), entry in zip(asked, entries, strict=True)}

    def _admit(self, chunk: ScheduledChunk, out: list[RequestOutput]) -> RowInput | None:
        """The chunk's row input; a first chunk looks its resident prefix up here, so a prefix that
        does not fit ends its own request (appended to `out`) and nothing else."""
        rid = chunk.request_id
        prefix_id = self._live[rid].prefix_id
        try:
            if chunk.first:
                self._open(rid)
            return self._row(rid, chunk)
        except PrefixServeError as exc:  # e.g. the provider's own error
            error = exc
        except ValueError as exc:  # the prefix does not fit the row
            error = PrefixError(prefix_id, f"it could not be placed in the row's batch: {exc}")
        except Exception as exc:  # anything else while admitting one row is still that row's alone
            log.exception("admitting request %s failed; ending it", rid)
            error = EngineFault(f"admitting this request failed ({type(exc).__name__}, logged)")
        out.append(self._end(rid, error))
        return None

    def _forward(self, rows: list[RowInput], out: list[RequestOutput]) -> StepOutput | None:
        """The batched forward pass, and the readback of its flags and picks started. If it raises, no
        row can be blamed: the step's rows end with an EngineFault (appended to `out`), the traceback is
        logged, and None is returned."""
        if not rows:
            return None
        try:
            result = self.runner.execute(rows)
            self.readback.start(result.finite, first_maxima(result.logits))  # [B] flags, [n_sample] picks
            return result
        except Exception as exc:  # the engine must outlive any one step
            log.exception("engine step failed; ending its %d rows, the engine keeps serving", len(rows))
            error = EngineFault(
                f"the engine step running this request failed ({type(exc).__name__}, logged); the request"
                " was ended and may be retried"
            )
            out += [self._end(r.request_id, error) for r in rows]
            return None

    def _drop_nonfinite(self, result: StepOutput, finite: list[int]) -> list[RequestOutput]:
        """End the rows whose last hidden state or logits are NaN/Inf (`finite`: a flag per row)."""
        if all(finite):
            return []
        bad = [rid for rid, ok in zip(result.row_ids, finite, strict=True) if not ok and rid in self._live]
        dtype = str(self.model.dtype).removeprefix("torch.")
        log.warning("ending %d rows whose values turned non-finite: %s", len(bad), bad)
        return [self._end(rid, self._nonfinite_error(rid, dtype)) for rid in bad]

    def _nonfinite_error(self, rid: str, dtype: str) -> PrefixError:
        seq = self._live[rid]
        n = seq.num_generated
        when = f"at new token {n + 1}" if n else "while reading the input"
        problem = f"the model's activations turned NaN/Inf {when} (serving dtype {dtype})"
        if seq.prefix_id is not None:
            problem += ", so its values are unusable with this model"
        return PrefixError(seq.prefix_id, problem)

    def _sample(
        self, ids: list[str], logits: torch.Tensor, maxima: dict[int, int], out: list[RequestOutput]
    ) -> dict[str, int]:
        """One token per row of `logits [n, V]` (`maxima`: each row's first maximum, read back with the
        step: a plain greedy row's token); a row whose draw fails ends alone (into `out`)."""
        seqs = [self._live[rid] for rid in ids]
        params, gens = [seq.params for seq in seqs], [seq.generator for seq in seqs]
        greedy = {i: maxima[i] for i, p in enumerate(params) if plain_greedy(p)}
        try:
            tokens, failed = sample_rows(logits, params, gens, lambda i: seqs[i].generated(), greedy)
        except Exception as exc:  # the shared read-back of the draws: no one row explains it
            log.exception("sampling failed for a whole step; ending its %d rows", len(ids))
            error = EngineFault(f"sampling this step failed ({type(exc).__name__}, logged)")
            out += [self._end(rid, error) for rid in ids]
            return {}
        for i, exc in failed.items():
            prefix_id = seqs[i].prefix_id
            out.append(self._end(ids[i], PrefixError(prefix_id, f"sampling from its logits failed: {exc}")))
        return {rid: tok for i, (rid, tok) in enumerate(zip(ids, tokens, strict=True)) if i not in failed}

    def _emit(
        self,
        rid: str,
        token: int,
        row: int,
        logits: torch.Tensor | None,
        finished: dict[str, FinishReason],
        logprob: TokenLogprob | None,
    ) -> RequestOutput:
        try:
            return self._output(rid, token, row, logits, finished, logprob)
        except Exception as exc:  # this row's fault alone
            log.exception("emitting a token of request %s failed; ending it", rid)
            error = EngineFault(f"emitting its token failed ({type(exc).__name__}, logged)")
            return self._end(rid, error, scrub=False)

    def _end(self, rid: str, error: PrefixServeError, scrub: bool = True) -> RequestOutput:
        """End a request with `error` now. `scrub`: its numbers may be bad, so its KV blocks (if it holds
        any) are zeroed before they are freed."""
        seq = self._live.get(rid)
        if scrub and seq is not None:
            self.runner.zero_blocks(seq.blocks)
        self.scheduler.finish(rid, FinishReason.ERROR)
        if seq is not None:
            self._drop(rid)
        return RequestOutput(
            request_id=rid,
            token_ids=[],
            text="",
            finish_reason=FinishReason.ERROR,
            prefix_tokens=seq.request.prefix_len if seq else 0,
            prompt_tokens=seq.num_prompt_tokens if seq else 0,
            completion_tokens=seq.num_generated if seq else 0,
            error=error,
        )

    def _fail_unloadable(self) -> list[RequestOutput]:
        """End the waiting requests whose prefix failed to load, with that error."""
        out: list[RequestOutput] = []
        for seq in self.scheduler.waiting():
            error = next((e for i in seq.resident_ids if (e := self.prefixes.failure(i)) is not None), None)
            if error is not None:
                out.append(self._end(seq.request_id, error, scrub=False))
        return out

    def _row(self, rid: str, chunk: ScheduledChunk) -> RowInput:
        seq = self._live[rid]
        start, end = chunk.start, chunk.start + chunk.num_tokens
        tokens = seq.token_ids[start:end]  # [n] the prompt's, then those it generated
        top = seq.params.prompt_logprobs
        if top is None:
            return RowInput(
                rid, tokens, start, chunk.blocks, seq.prefix, chunk.sample, adapter=seq.adapter,
                prefix_slot=seq.prefix_slot,
            )  # fmt: skip
        # the prompt tokens this chunk predicts (the first new token is sampled, not scored)
        targets = seq.token_ids[start + 1 : min(end + 1, seq.num_prompt_tokens)]
        return RowInput(
            rid, tokens, start, chunk.blocks, seq.prefix, chunk.sample, targets, top, seq.adapter,
            seq.prefix_slot,
        )  # fmt: skip

    def _open(self, request_id: str) -> None:
        """Look the row's resident prefix and adapter up (pinned, so resident, until the request ends):
        every step reads them in place. A weight-side state named as the prefix is the row's adapter."""
        seq = self._live[request_id]
        if seq.prefix is not None or seq.adapter is not None:  # (a preempted row keeps what it had)
            return
        states = [self.prefixes.get(i) for i in seq.resident_ids]
        adapters = [s for s in states if kind_of(s).weight_side]
        prefixes = [s for s in states if not kind_of(s).weight_side]
        if len(adapters) > 1 or len(prefixes) > 1:
            raise ValueError(
                "a row carries at most one prefix (prefix_kv, ntk) and one adapter (lora, adapter)"
            )
        misfit = _misfit(prefixes[0], self.model.spec, seq.request.prefix_len) if prefixes else None
        if misfit is not None:
            raise ValueError(misfit)
        seq.prefix = prefixes[0] if prefixes else None
        seq.adapter = adapters[0] if adapters else None
        if seq.prefix is not None and kind_of(seq.prefix).placed:
            seq.prefix_slot = self.arena.first_slot(seq.prefix)

    def _output(
        self,
        rid: str,
        token: int,
        row: int,
        logits: torch.Tensor | None,
        finished: dict[str, FinishReason],
        logprob: TokenLogprob | None,
    ) -> RequestOutput:
        seq = self._live[rid]  # (its token_ids already end with `token`: Scheduler.update)
        reason = finished.get(rid)
        out = RequestOutput(
            request_id=rid,
            token_ids=[token],
            text="",  # (made by the front-end)
            finish_reason=reason,
            prefix_tokens=seq.request.prefix_len,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_generated,
            logits=[logits[row]] if logits is not None else [],
            logprobs=[logprob] if logprob is not None else [],
            prompt_logprobs=self._prompt_logprobs(seq) if seq.num_generated == 1 else None,
        )
        if reason is not None:
            self._drop(rid)
        return out

    @staticmethod
    def _prompt_logprobs(seq: Sequence) -> list[TokenLogprob | None] | None:
        return seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None

    def _scored(self, rid: str) -> RequestOutput:
        """The one output of a request that scored its prompt without generating (max_new_tokens 0)."""
        seq = self._live[rid]
        self._drop(rid)
        return RequestOutput(
            request_id=rid,
            token_ids=[],
            text="",
            finish_reason=FinishReason.LENGTH,
            prefix_tokens=seq.request.prefix_len,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=0,
            prompt_logprobs=self._prompt_logprobs(seq),
        )

    def fail_all(self) -> list[str]:
        """After a step raised: end every request and forget the runner's rows. Returns their ids."""
        ids = list(self._live)
        for rid in ids:
            self.scheduler.finish(rid, FinishReason.CANCELLED)
            self._drop(rid)
        self.scheduler.schedule()  # drain the freed list
        self.runner.kv.zero_()  # whatever the failed step wrote is gone
        return ids

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until idle; every output grouped by request (tests, benchmarks, batch jobs)."""
        return drain(self)


class Stepped(Protocol):
    """An engine stepped by its caller: the core, or `frontend.OfflineEngine` around it."""

    @property
    def has_work(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...


def drain(engine: Stepped) -> dict[str, list[RequestOutput]]:
    """Step until idle; every output grouped by request."""
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def sampled_rows(outputs: list[RequestOutput]) -> int:
    """Rows that sampled a token in a step (the batch-size histogram, the same in every front-end)."""
    return sum(1 for out in outputs if out.token_ids)


def _prefix_ids(seqs: list[Sequence]) -> list[str]:
    return sorted({i for seq in seqs for i in seq.resident_ids})


def _token_logprobs(targets: list[int], scores: Scores, tops: list[int]) -> list[TokenLogprob]:
    """One entry per target, with its row's `tops[i]` alternatives (one host copy per tensor)."""
    lps, ids, values = scores.logprobs.tolist(), scores.top_ids.tolist(), scores.top_logprobs.tolist()
    return [
        TokenLogprob(t, lp, tuple(zip(i[:k], v[:k], strict=True)))
        for t, lp, i, v, k in zip(targets, lps, ids, values, tops, strict=True)
    ]


def _misfit(prefix: PrefixState, spec: ModelSpec, length: int) -> str | None:
    """Why a resident prefix cannot serve a row validated for `length` positions, or None (shapes only:
    its values were checked when it was loaded)."""
    kind = kind_of(prefix)
    if kind.length(prefix) != length:
        return f"it holds {kind.length(prefix)} positions, the request was checked for {length}"
    if kind.positional and tuple(prefix.shape) != spec.prefix_shape(length):
        want = f"[{spec.n_layer}, 2, {spec.n_head}, P, {spec.head_dim}]"
        return f"prefix K/V must be {want} with P = {length}, got {list(prefix.shape)}"
    return None


KV_MEMORY_FRACTION = 0.5  # of the device memory free at start-up, at most, for the default KV pool


def _tokens_that_fit(model: LoadedModel) -> int | None:
    """On CUDA: the KV tokens that fit in KV_MEMORY_FRACTION of the free device memory (the default
    pool never takes the device's last bytes, whatever the model's size). Elsewhere: no cap."""
    if model.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(model.device)
    return int(free * KV_MEMORY_FRACTION) // model.spec.kv_bytes(1, model.dtype.itemsize)
