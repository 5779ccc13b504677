"""EngineCore: validation, then the step cycle schedule -> execute -> sample -> update -> detokenize.

Synchronous and single-threaded; `AsyncEngine` drives it from a background thread.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

# the store caps stored prefixes by these too, so they live in its limits (re-exported here)
from prefix_store.limits import MIN_REQUEST_TOKENS as MIN_REQUEST_TOKENS
from prefix_store.limits import longest_usable_prefix as longest_usable_prefix

from ..errors import (
    ContextTooLong,
    EngineFault,
    EngineOverloaded,
    InvalidRequest,
    PrefixError,
    PrefixServeError,
)
from ..limits import MAX_INPUT_CHARS
from ..model import LoadedModel
from .detokenizer import Detokenizer
from .prefixes import PrefixProvider, PrefixTable
from .request import FinishReason, Request, SamplingParams
from .runner import ModelRunner, RowInput, StepOutput
from .sampling import make_generator, sample_rows
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # sequences in one batch (KV slots allocated up front)
    max_tokens_per_step: int = 512  # tokens per forward pass; longer prompts are prefilled in chunks
    max_waiting: int = 256  # requests queued beyond the running ones; more -> EngineOverloaded
    max_seq_len: int | None = None  # slot capacity (prefix + input + output); None: the model's n_positions
    max_prefix_len: int | None = None  # None: half the slot capacity
    record_logits: bool = False  # attach each step's logits to the outputs (tests, debugging)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_running=self.max_running, max_tokens_per_step=self.max_tokens_per_step)


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
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per new token, when recorded
    error: PrefixServeError | None = None  # set with finish_reason ERROR

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Live:
    """Engine-side state of a request while it is in the engine."""

    request: Request
    detok: Detokenizer
    generator: torch.Generator | None
    prefix_pinned: bool


class EngineCore:
    def __init__(
        self, model: LoadedModel, config: EngineConfig | None = None, prefixes: PrefixProvider | None = None
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        spec = model.spec
        self.max_seq_len = min(self.config.max_seq_len or spec.n_positions, spec.n_positions)
        self.max_prefix_len = self.config.max_prefix_len or self.max_seq_len // 2
        self.prefixes = prefixes or PrefixTable(spec, model.dtype, model.device, self.max_prefix_len)
        self.scheduler = Scheduler(self.config.scheduler_config(), self.prefixes.is_ready)
        self.runner = ModelRunner(model, self.config.max_running, self.max_seq_len)
        self._live: dict[str, _Live] = {}
        self._scrub: set[str] = set()  # rows that ended with bad numbers: zero their slot when freed
        self._ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------------
    def prepare(
        self,
        input: str | list[int],
        params: SamplingParams | None = None,
        prefix_id: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize a request without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        params.validate(self.model.spec.vocab_size)
        prompt_ids = self._tokenize(input)
        prefix_len = self.prefixes.length(prefix_id) if prefix_id is not None else 0
        self._check_fits(prefix_len, len(prompt_ids), params.max_new_tokens)
        rid = request_id or f"req-{next(self._ids)}"
        return Request(rid, prompt_ids, params, prefix_id=prefix_id, prefix_len=prefix_len)

    def _tokenize(self, input: str | list[int]) -> list[int]:
        if isinstance(input, str):
            if len(input) > MAX_INPUT_CHARS:
                raise InvalidRequest(
                    "input", f"expected at most {MAX_INPUT_CHARS} characters, got {len(input)}"
                )
            ids = self.model.tokenizer.encode(input, add_special_tokens=False)
        else:
            ids = list(input)
            vocab = self.model.spec.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequest("input", f"token ids must be integers in [0, {vocab}), got {bad[0]!r}")
        if not ids:
            raise InvalidRequest("input", "expected at least one input token, got an empty input")
        return ids

    def _check_fits(self, prefix_len: int, input_len: int, max_new_tokens: int) -> None:
        total = prefix_len + input_len + max_new_tokens
        if total > self.model.spec.n_positions:
            raise ContextTooLong(
                prefix_len, input_len, max_new_tokens, self.model.spec.n_positions, "model's n_positions"
            )
        if total > self.max_seq_len:
            raise ContextTooLong(
                prefix_len, input_len, max_new_tokens, self.max_seq_len, "engine's max_seq_len"
            )

    def add(self, request: Request) -> None:
        """Queue a prepared request (engine thread only). Raises EngineOverloaded when full."""
        if self.scheduler.num_waiting >= self.config.max_waiting:
            raise EngineOverloaded(self.scheduler.num_waiting, self.config.max_waiting)
        if request.request_id in self._live:
            raise InvalidRequest(
                "request_id", f"{request.request_id!r} is already in use by a running request"
            )
        if request.prefix_id is not None:
            self.prefixes.acquire(request.prefix_id)  # may raise PrefixNotFound if it was removed
        params = request.params
        eos = None if params.ignore_eos else self.model.eos_token_id
        self.scheduler.add(
            Sequence(
                request.request_id, request.prefix_id, len(request.prompt_ids), params.max_new_tokens, eos
            )
        )
        self._live[request.request_id] = _Live(
            request,
            Detokenizer(self.model.tokenizer, params.stop),
            make_generator(params, self.model.device),
            request.prefix_id is not None,
        )

    def add_request(
        self,
        input: str | list[int],
        params: SamplingParams | None = None,
        prefix_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        request = self.prepare(input, params, prefix_id, request_id)
        self.add(request)
        return request.request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its slot is freed by the next step. False if it is not in the engine."""
        if not self.scheduler.finish(request_id, FinishReason.CANCELLED):
            return False
        self._drop(request_id)
        return True

    def _drop(self, request_id: str) -> None:
        live = self._live.pop(request_id)
        if live.prefix_pinned:
            self.prefixes.release(live.request.prefix_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_live(self) -> int:
        return len(self._live)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One cycle: free, admit, forward, drop the rows that went bad, sample, update, emit.

        A row whose numbers turn non-finite, whose prefix cannot be placed or whose draw fails ends
        alone with its error; the other rows' tokens are what they would have been without it. A
        forward pass that raises fails that step's rows only (logged); the engine carries on.
        """
        out = self._fail_unloadable()
        plan = self.scheduler.schedule()
        for rid in plan.freed:
            self.runner.free(rid, scrub=rid in self._scrub)
            self._scrub.discard(rid)
        if not plan.chunks:
            return out
        rows = [row for c in plan.chunks if (row := self._admit(c, out)) is not None]
        result = self._forward(rows, out)
        if result is None:
            self.scheduler.update({})
            return out
        out += self._drop_nonfinite(result)
        keep = [i for i, rid in enumerate(result.sample_ids) if rid in self._live]
        logits = result.logits if len(keep) == len(result.sample_ids) else result.logits[keep]  # [n, V]
        sampled = self._sample([result.sample_ids[i] for i in keep], logits, out)
        finished = {f.request_id: f.reason for f in self.scheduler.update(sampled)}
        record = logits if self.config.record_logits else None
        for i, (rid, tok) in enumerate(sampled.items()):
            out.append(self._emit(rid, tok, i, record, finished))
        return out

    def _admit(self, chunk: ScheduledChunk, out: list[RequestOutput]) -> RowInput | None:
        """The chunk's row input; a first chunk takes its slot and places its prefix here, so a prefix
        that cannot be placed ends its own request (appended to `out`) and nothing else."""
        rid = chunk.request_id
        prefix_id = self._live[rid].request.prefix_id
        try:
            if chunk.first:
                self._open(rid)
            return self._row(rid, chunk.start, chunk.num_tokens, chunk.sample)
        except PrefixServeError as exc:  # e.g. the provider's own error
            error = exc
        except ValueError as exc:  # the runner refused the prefix's shape
            error = PrefixError(prefix_id, f"it could not be placed in the row's KV slot: {exc}")
        except Exception as exc:  # anything else while admitting one row is still that row's alone
            log.exception("admitting request %s failed; ending it", rid)
            error = EngineFault(f"admitting this request failed ({type(exc).__name__}, logged)")
        out.append(self._end(rid, error))
        return None

    def _forward(self, rows: list[RowInput], out: list[RequestOutput]) -> StepOutput | None:
        """The batched forward pass. If it raises, no row can be blamed: the step's rows end with an
        EngineFault (appended to `out`), the traceback is logged, and None is returned."""
        if not rows:
            return None
        try:
            return self.runner.execute(rows)
        except Exception as exc:  # the engine must outlive any one step
            log.exception("engine step failed; ending its %d rows, the engine keeps serving", len(rows))
            error = EngineFault(
                f"the engine step running this request failed ({type(exc).__name__}, logged); the request"
                " was ended and may be retried"
            )
            out += [self._end(r.request_id, error) for r in rows]
            return None

    def _drop_nonfinite(self, result: StepOutput) -> list[RequestOutput]:
        """End the rows whose last hidden state or logits are NaN/Inf (one host sync of `[B]` bools)."""
        finite = result.finite.tolist()
        if all(finite):
            return []
        bad = [rid for rid, ok in zip(result.row_ids, finite, strict=True) if not ok]
        dtype = str(self.model.dtype).removeprefix("torch.")
        log.warning("ending %d rows whose values turned non-finite: %s", len(bad), bad)
        return [self._end(rid, self._nonfinite_error(rid, dtype)) for rid in bad]

    def _nonfinite_error(self, rid: str, dtype: str) -> PrefixError:
        req = self._live[rid].request
        when = f"at new token {len(req.output_ids) + 1}" if req.output_ids else "while reading the input"
        problem = f"the model's activations turned NaN/Inf {when} (serving dtype {dtype})"
        if req.prefix_id is not None:
            problem += ", so its values are unusable with this model"
        return PrefixError(req.prefix_id, problem)

    def _sample(self, ids: list[str], logits: torch.Tensor, out: list[RequestOutput]) -> dict[str, int]:
        """One token per row of `logits [n, V]`; a row whose draw fails ends alone (into `out`)."""
        lives = [self._live[rid] for rid in ids]
        params, gens = [lv.request.params for lv in lives], [lv.generator for lv in lives]
        try:
            tokens, failed = sample_rows(logits, params, gens)
        except Exception as exc:  # the shared greedy max: no one row explains it
            log.exception("sampling failed for a whole step; ending its %d rows", len(ids))
            error = EngineFault(f"sampling this step failed ({type(exc).__name__}, logged)")
            out += [self._end(rid, error) for rid in ids]
            return {}
        for i, exc in failed.items():
            prefix_id = lives[i].request.prefix_id
            out.append(self._end(ids[i], PrefixError(prefix_id, f"sampling from its logits failed: {exc}")))
        return {rid: tok for i, (rid, tok) in enumerate(zip(ids, tokens, strict=True)) if i not in failed}

    def _emit(
        self, rid: str, token: int, row: int, logits: torch.Tensor | None, finished: dict[str, FinishReason]
    ) -> RequestOutput:
        try:
            return self._output(rid, token, row, logits, finished)
        except Exception as exc:  # e.g. detokenizing: this row's fault alone
            log.exception("emitting a token of request %s failed; ending it", rid)
            error = EngineFault(f"emitting its token failed ({type(exc).__name__}, logged)")
            return self._end(rid, error, scrub=False)

    def _end(self, rid: str, error: PrefixServeError, scrub: bool = True) -> RequestOutput:
        """End a request with `error` now. `scrub`: its numbers may be bad, so its slot (if it has one)
        is zeroed when the next plan frees it."""
        live = self._live.get(rid)
        req = live.request if live is not None else None
        if self.scheduler.finish(rid, FinishReason.ERROR) and scrub:
            self._scrub.add(rid)  # finish() of a running row puts it in the next plan's freed list
        if live is not None:
            self._drop(rid)
        return RequestOutput(
            request_id=rid,
            token_ids=[],
            text="",
            finish_reason=FinishReason.ERROR,
            prefix_tokens=req.prefix_len if req else 0,
            prompt_tokens=len(req.prompt_ids) if req else 0,
            completion_tokens=len(req.output_ids) if req else 0,
            error=error,
        )

    def _fail_unloadable(self) -> list[RequestOutput]:
        """End the waiting requests whose prefix failed to load, with that error."""
        out: list[RequestOutput] = []
        for seq in self.scheduler.waiting():
            error = self.prefixes.failure(seq.prefix_id) if seq.prefix_id is not None else None
            if error is not None:
                out.append(self._end(seq.request_id, error, scrub=False))
        return out

    def _row(self, request_id: str, start: int, n: int, sample: bool) -> RowInput:
        req = self._live[request_id].request
        p = req.prompt_ids  # a chunk lies inside the prompt, or is the last sampled token
        tokens = (
            p[start : start + n] if start < len(p) else req.output_ids[start - len(p) : start - len(p) + n]
        )
        return RowInput(request_id, tokens, req.prefix_len + start, sample=sample)

    def _open(self, request_id: str) -> None:
        """Take the row's slot and place its prefix there. K/V are copied into the slot, so their pin
        goes now; an NTK prefix stays pinned while the row uses it."""
        live = self._live[request_id]
        prefix_id = live.request.prefix_id
        prefix = self.prefixes.get(prefix_id) if prefix_id is not None else None
        self.runner.open(request_id, prefix)
        if isinstance(prefix, torch.Tensor) and live.prefix_pinned:
            self.prefixes.release(prefix_id)
            live.prefix_pinned = False

    def _output(
        self, rid: str, token: int, row: int, logits: torch.Tensor | None, finished: dict[str, FinishReason]
    ) -> RequestOutput:
        live = self._live[rid]
        req = live.request
        req.output_ids.append(token)
        reason = finished.get(rid)
        if reason != FinishReason.EOS:  # the EOS token itself is not text
            live.detok.add(token)
        if reason is None and live.detok.stopped:
            self.scheduler.finish(rid, FinishReason.STOP)
            reason = FinishReason.STOP
        out = RequestOutput(
            request_id=rid,
            token_ids=[token],
            text=live.detok.emit(final=reason is not None),
            finish_reason=reason,
            prefix_tokens=req.prefix_len,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            logits=[logits[row]] if logits is not None else [],
        )
        if reason is not None:
            self._drop(rid)
        return out

    def fail_all(self) -> list[str]:
        """After a step raised: end every request and forget the runner's rows. Returns their ids."""
        ids = list(self._live)
        for rid in ids:
            self.scheduler.finish(rid, FinishReason.CANCELLED)
            self._drop(rid)
        self.scheduler.schedule()  # drain the freed list
        self.runner.reset()
        self._scrub.clear()  # reset zeroed every slot
        return ids

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until idle; every output grouped by request (tests, benchmarks, batch jobs)."""
        outputs: dict[str, list[RequestOutput]] = {}
        while self.has_work:
            for out in self.step():
                outputs.setdefault(out.request_id, []).append(out)
        return outputs
