"""OpenAI-compatible `POST /v1/completions` (the legacy completions API that evaluation tools use) and
`GET /v1/models`.

A model name is a prefix id, or the base model's name for the bare model, so the official `openai`
SDK and lm-evaluation-harness's `local-completions` work unchanged. Every field of the spec is either
honoured or refused with a 422 naming it: nothing is silently dropped (`extra="forbid"`; the bodies are
in schemas/openai.py).

`prompt` is a string, a list of strings, a list of token ids or a list of token-id lists; each prompt
yields `n` choices, in order (`index = prompt * n + j`). `echo` puts the prompt (and, with `logprobs`,
its tokens' log-probabilities, the first `null`) before the completion; `max_tokens: 0` with `echo`
scores the prompt without generating. `logprobs` k gives every token's log-probability and a dict of
the k most likely tokens (plus the chosen one), with `text_offset` counted in the returned text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ...engine import FinishReason, RequestOutput
from ...engine.request import TokenLogprob
from ...schemas.openai import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    ModelCard,
    ModelList,
    Prompt,
)
from ..errors import ERRORS, BoundedJsonRoute, error_event
from ..generation import Answer, first_output, gather_answer, model_ids, start_generation
from ..state import AppState, State, TenantName

router = APIRouter(tags=["openai"], route_class=BoundedJsonRoute)
T = TypeVar("T")


def base_model_name(state: State) -> str:
    return state.model.served_name


def _openai_reason(reason: FinishReason) -> Literal["stop", "length"]:
    return "length" if reason == FinishReason.LENGTH else "stop"  # OpenAI reports EOS as "stop"


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(state: AppState, tenant: TenantName) -> ModelList:
    """The base model and every prefix this tenant may use, as OpenAI model cards."""
    cards = [ModelCard(id=base_model_name(state), created=0, owned_by="prefixserve")]
    for meta in await asyncio.to_thread(state.service.list, tenant):  # disk: off the event loop
        cards.append(ModelCard(id=meta.id, created=unix_seconds(meta.created_at), owned_by=meta.owner))
    return ModelList(data=cards)


def unix_seconds(stamp: str) -> int:
    """A stored ISO 8601 time ("2026-12-07T22:33:00+00:00"; one without an offset is UTC, as the store
    writes them) -> seconds since the epoch, whatever this machine's time zone."""
    moment = datetime.fromisoformat(stamp)
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


@dataclass
class _Choice:
    index: int
    prompt: Prompt  # as sent
    prompt_ids: list[int]  # as the engine runs it (a trained prefix's separator after it, unless echo)
    outputs: AsyncIterator[RequestOutput]


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def completions(body: CompletionRequest, request: Request, state: AppState, tenant: TenantName):
    """OpenAI text completions; `model` is a prefix id (of any kind: a LoRA or adapter id serves the row
    with that adapter), "PREFIX+ADAPTER" for a row carrying both, or the base model's name."""
    steer = await model_ids(state, body.model, tenant)
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    choices = await _start(state, tenant, body, steer, rid)
    created = int(time.time())
    if body.stream:
        firsts = await _first_outputs(request, choices)
        return StreamingResponse(
            _chunks(state, body, rid, created, choices, firsts), media_type="text/event-stream"
        )
    try:
        answers = await _all([gather_answer(request, state, c.outputs) for c in choices])
    finally:
        await _close(choices)
    text = _Text(state, body)
    result = [text.choice(c, a) for c, a in zip(choices, answers, strict=True)]
    usage = _usage(choices, [a.last for a in answers], body.n)
    return Completion(id=rid, created=created, model=body.model, choices=result, usage=usage)


async def _start(
    state: State, tenant: str, body: CompletionRequest, steer: tuple[str | None, str | None], rid: str
) -> list[_Choice]:
    """One engine request per choice; if one cannot start, those already started are aborted."""
    choices: list[_Choice] = []
    try:
        for i, prompt in enumerate(body.prompt):
            for j in range(body.n):
                index = i * body.n + j
                sub = rid if len(body.prompt) * body.n == 1 else f"{rid}-{index}"
                prefix_id, adapter_id = steer
                prepared, outputs = await start_generation(
                    state, tenant, prompt, body.sampling_params(j), prefix_id, sub, not body.echo, adapter_id
                )
                choices.append(_Choice(index, prompt, prepared.prompt_ids, outputs))
    except BaseException:
        await _close(choices)
        raise
    return choices


async def _first_outputs(request: Request, choices: list[_Choice]) -> list[RequestOutput]:
    """Every choice's first output (errors before the first token are plain HTTP errors)."""
    try:
        return await _all([first_output(request, c.outputs) for c in choices])
    except BaseException:
        await _close(choices)
        raise


async def _all(coros: list[Awaitable[T]]) -> list[T]:
    """Every result; if one raises (or this is cancelled), the others are cancelled and awaited first,
    so no choice keeps reading its stream, and the first error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _close(choices: list[_Choice]) -> None:
    """Abort every choice's request still running (a no-op for those that ended)."""
    for c in choices:
        with contextlib.suppress(RuntimeError):  # (its generator already closed itself)
            await c.outputs.aclose()


def _usage(choices: list[_Choice], lasts: list[RequestOutput], n: int) -> CompletionUsage:
    """Prompt tokens once per prompt (not per choice), completion tokens of every choice."""
    prompt = {c.index // n: last.prompt_tokens for c, last in zip(choices, lasts, strict=True)}
    completion = sum(last.completion_tokens for last in lasts)
    total = sum(prompt.values())
    return CompletionUsage(prompt_tokens=total, completion_tokens=completion, total_tokens=total + completion)


class _Text:
    """Token strings and `logprobs` objects, from the server's own tokenizer."""

    def __init__(self, state: State, body: CompletionRequest) -> None:
        self.preparer, self.tokenizer = state.engine.preparer, state.engine.preparer.tokenizer
        self.body = body

    def token(self, token_id: int) -> str:
        return self.preparer.token_text(token_id)

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def entries(self, out: RequestOutput | Answer) -> list[TokenLogprob | None]:
        """The tokens whose log-probabilities a choice shows: with echo, the prompt's first."""
        if self.body.echo and out.prompt_logprobs is not None:
            return [*out.prompt_logprobs, *out.logprobs]
        return list(out.logprobs)

    def choice(self, c: _Choice, answer: Answer) -> CompletionChoice:
        echo = self.prompt_text(c.prompt) if self.body.echo else ""
        logprobs = None
        if self.body.logprobs is not None:
            logprobs, _ = self.logprobs(self.entries(answer), c.prompt_ids[0], start=0)
        return CompletionChoice(
            text=echo + answer.text,
            index=c.index,
            logprobs=logprobs,
            finish_reason=_openai_reason(answer.last.finish_reason),
        )

    def logprobs(
        self, entries: list[TokenLogprob | None], first: int, start: int
    ) -> tuple[CompletionLogprobs, int]:
        """`entries`: one per token (None: the first prompt token `first`, which nothing predicts);
        `start`: the first token's offset in the choice's text. Returns the object and the offset after."""
        tokens, values, tops, offsets = [], [], [], []
        for e in entries:
            token = self.token(first if e is None else e.token_id)
            tokens.append(token)
            offsets.append(start)
            values.append(None if e is None else e.logprob)
            tops.append(None if e is None else self.top(e))
            start += len(token)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
        ), start

    def top(self, e: TokenLogprob) -> dict[str, float]:
        """The k most likely tokens and the chosen one (so up to k + 1 entries, as OpenAI)."""
        top = {self.token(t): lp for t, lp in e.top}
        top.setdefault(self.token(e.token_id), e.logprob)
        return top


async def _chunks(
    state: State,
    body: CompletionRequest,
    rid: str,
    created: int,
    choices: list[_Choice],
    firsts: list[RequestOutput],
) -> AsyncIterator[str]:
    """OpenAI streaming: `data: {chunk}` per new text of any choice (the prompt first, with echo), the
    last of each choice with its finish_reason; with `stream_options.include_usage` a final chunk with
    `usage` and no choices; then `data: [DONE]`."""
    text = _Text(state, body)
    queue: asyncio.Queue[tuple[_Choice, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(c: _Choice, first: RequestOutput) -> None:
        try:
            await queue.put((c, first))
            async for out in c.outputs:
                await queue.put((c, out))
        except Exception as exc:  # ends this choice; the stream reports it
            await queue.put((c, exc))
        else:
            await queue.put((c, None))

    def chunk(choice: CompletionChoice | None, usage: CompletionUsage | None = None) -> str:
        choices_ = [] if choice is None else [choice]
        part = Completion(id=rid, created=created, model=body.model, choices=choices_, usage=usage)
        return f"data: {part.model_dump_json()}\n\n"

    tasks = [asyncio.create_task(pump(c, f)) for c, f in zip(choices, firsts, strict=True)]
    lasts: dict[int, RequestOutput] = {}
    offsets = dict.fromkeys((c.index for c in choices), 0)  # text_offset of each choice's next token
    try:
        if body.echo:
            for c in choices:
                yield chunk(
                    CompletionChoice(text=text.prompt_text(c.prompt), index=c.index, finish_reason=None)
                )
        open_ = len(choices)
        while open_:
            c, item = await queue.get()
            if item is None:
                open_ -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            lasts[c.index] = item
            entries = text.entries(item)
            reason = _openai_reason(item.finish_reason) if item.finished else None
            logprobs = None
            if body.logprobs is not None:
                logprobs, offsets[c.index] = text.logprobs(entries, c.prompt_ids[0], offsets[c.index])
            if item.text or entries or reason:
                yield chunk(
                    CompletionChoice(text=item.text, index=c.index, logprobs=logprobs, finish_reason=reason)
                )
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk(None, _usage(choices, [lasts[c.index] for c in choices], body.n))
        yield "data: [DONE]\n\n"
    except Exception as exc:
        yield error_event(exc, event=None)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(choices)
