"""EngineCore: validation, then the step cycle schedule -> execute -> sample -> update -> detokenize.

Synchronous and single-threaded; `AsyncEngine` drives it from a background thread.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..errors import ContextTooLong, EngineOverloaded, InvalidRequest, PrefixServeError
from ..model import LoadedModel
from .detokenizer import Detokenizer
from .prefixes import PrefixProvider, PrefixTable
from .request import FinishReason, Request, SamplingParams
from .runner import ModelRunner, RowInput
from .sampling import make_generator, sample_rows
from .scheduler import Scheduler, SchedulerConfig, Sequence

MAX_INPUT_CHARS = 1_000_000


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
        failed = self._fail_unloadable()
        plan = self.scheduler.schedule()
        for rid in plan.freed:
            self.runner.free(rid)
        if not plan.chunks:
            return failed
        rows = [self._row(c.request_id, c.start, c.num_tokens, c.first, c.sample) for c in plan.chunks]
        sample_ids, logits = self.runner.execute(rows)  # logits [n_sample, V]
        self._unpin_after_first_chunk(rows)
        lives = [self._live[rid] for rid in sample_ids]
        tokens = sample_rows(logits, [lv.request.params for lv in lives], [lv.generator for lv in lives])
        sampled = dict(zip(sample_ids, tokens, strict=True))
        finished = {f.request_id: f.reason for f in self.scheduler.update(sampled)}
        record = logits if self.config.record_logits else None
        return failed + [
            self._output(rid, tok, i, record, finished) for i, (rid, tok) in enumerate(sampled.items())
        ]

    def _fail_unloadable(self) -> list[RequestOutput]:
        """End the waiting requests whose prefix failed to load, with that error."""
        out: list[RequestOutput] = []
        for seq in self.scheduler.waiting():
            error = self.prefixes.failure(seq.prefix_id) if seq.prefix_id is not None else None
            if error is None:
                continue
            req = self._live[seq.request_id].request
            self.scheduler.finish(seq.request_id, FinishReason.ERROR)
            self._drop(seq.request_id)
            out.append(
                RequestOutput(
                    request_id=seq.request_id,
                    token_ids=[],
                    text="",
                    finish_reason=FinishReason.ERROR,
                    prefix_tokens=req.prefix_len,
                    prompt_tokens=len(req.prompt_ids),
                    error=error,
                )
            )
        return out

    def _row(self, request_id: str, start: int, n: int, first: bool, sample: bool) -> RowInput:
        req = self._live[request_id].request
        p = req.prompt_ids  # a chunk lies inside the prompt, or is the last sampled token
        tokens = (
            p[start : start + n] if start < len(p) else req.output_ids[start - len(p) : start - len(p) + n]
        )
        prefix = self.prefixes.get(req.prefix_id) if first and req.prefix_id is not None else None
        return RowInput(request_id, tokens, req.prefix_len + start, prefix, open_slot=first, sample=sample)

    def _unpin_after_first_chunk(self, rows: list[RowInput]) -> None:
        for row in rows:
            live = self._live[row.request_id]
            # K/V now live in the slot; an NTK prefix stays pinned while the row uses it
            if isinstance(row.prefix, torch.Tensor) and live.prefix_pinned:
                self.prefixes.release(live.request.prefix_id)
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
        return ids

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until idle; every output grouped by request (tests, benchmarks, batch jobs)."""
        outputs: dict[str, list[RequestOutput]] = {}
        while self.has_work:
            for out in self.step():
                outputs.setdefault(out.request_id, []).append(out)
        return outputs
