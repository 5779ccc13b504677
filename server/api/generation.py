"""Generation shared by /generate and /v1/completions: admission and limits (`start_generation`),
then either a whole answer (`collect`) or a stream (`first_output`, then `sse`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from prefix_store.format import PrefixMeta
from prefix_store.kinds import WEIGHT_KINDS

from ..engine import FinishReason, RequestOutput, SamplingParams
from ..engine.request import Request as EngineRequest
from ..engine.request import TokenLogprob
from ..errors import InvalidRequest
from ..schemas.native import Alternative, GenerateResponse, TokenScore, Usage
from .errors import ClientGone, DeadlineExceeded, Draining, error_event
from .state import State

T = TypeVar("T")


async def start_generation(
    state: State,
    tenant: str,
    input: str | list[int],
    params: SamplingParams,
    prefix_id: str | None,
    rid: str,
    separator: bool = True,
    adapter_id: str | None = None,
) -> tuple[EngineRequest, AsyncIterator[RequestOutput]]:
    """Admission, tenant check, validation and rate limits, then the request's output stream. `input`:
    text, or token ids (used as they are); `separator`: a trained prefix's separator follows it (not
    when the input itself is scored); `adapter_id`: a weight-side adapter carried beside the prefix. No
    Redis or disk call waits on the event loop: the limiter is asyncio, a cold prefix's metadata is read
    on a thread (after which `prepare` finds it in memory)."""
    state.admit()
    metas = await steering(state, tenant, prefix_id, adapter_id)
    if separator:
        input = with_suffix(state, input, input_suffix(metas))
    prefix_len = metas[0].prefix_len if prefix_id is not None else 0
    tenancy = state.tenancy(tenant)
    prepared = state.engine.preparer.prepare(input, params, prefix_id, prefix_len, rid, adapter_id, tenancy)
    await state.limiter.check(tenant, len(prepared.prompt_ids) + params.max_new_tokens, state.limits(tenant))
    return prepared, _metered(state, tenant, state.engine.stream(prepared))


async def steering(
    state: State, tenant: str, prefix_id: str | None, adapter_id: str | None
) -> list[PrefixMeta]:
    """The metadata of what steers a request (404 unless the tenant may use each). `prefix_id` may name
    any kind; with `adapter_id` (a weight-side adapter: lora, adapter) it must be a prefix (prefix_kv,
    ntk), as a row carries at most one of each."""
    metas = [await state.visible(i, tenant) for i in (prefix_id, adapter_id) if i is not None]
    if adapter_id is not None:
        adapter = metas[-1]
        if adapter.kind not in WEIGHT_KINDS:
            raise InvalidRequest(
                "adapter_id",
                f"{adapter_id} is a {adapter.kind} prefix; expected an adapter ({', '.join(WEIGHT_KINDS)})",
            )
        if prefix_id is not None and metas[0].kind in WEIGHT_KINDS:
            raise InvalidRequest(
                "prefix_id",
                f"{prefix_id} is a {metas[0].kind} adapter; beside adapter_id it must be a prefix"
                " (prefix_kv, ntk): a row carries one prefix and one adapter",
            )
    return metas


def input_suffix(metas: list[PrefixMeta]) -> str:
    """The separator a trained prefix or adapter appends to inputs (the first that has one)."""
    return next((m.input_suffix for m in metas if m.input_suffix), "")


def with_suffix(state: State, input: str | list[int], suffix: str) -> str | list[int]:
    """A trained prefix's separator after the input (text, or its tokens after token ids)."""
    if not suffix:
        return input
    if isinstance(input, str):
        return input + suffix
    return input + state.engine.preparer.tokenizer.encode(suffix, add_special_tokens=False)


async def _metered(
    state: State, tenant: str, outputs: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    """Pass outputs through, recording time to first token, inter-token latency and token counts, and
    the request's usage once it ends, whatever ends it (its last output, an error midway, the client
    leaving): the tokens it was served. A request that ended before any output used nothing."""
    start = last = time.monotonic()
    first = True
    seen: RequestOutput | None = None
    try:
        async for out in outputs:
            now = time.monotonic()
            if out.token_ids:
                (state.metrics.ttft if first else state.metrics.itl).observe(now - (start if first else last))
                state.metrics.count_tokens(tenant, len(out.token_ids))
                first, last = False, now
            seen = out
            yield out
    finally:
        if seen is not None:
            state.usage.record(
                tenant,
                requests=1,
                prompt_tokens=seen.prompt_tokens,
                prefix_tokens=seen.prefix_tokens,
                generated_tokens=seen.completion_tokens,
            )


async def while_connected(request: Request, awaitable: Awaitable[T], timeout_s: float | None = None) -> T:
    """Await `awaitable`; the client leaving (ClientGone: a 499 no one reads, counted in the metrics,
    no traceback in the log) or, with `timeout_s`, the deadline passing cancels it. Nothing polls: the
    ASGI server's `http.disconnect` wakes the watcher (a request waiting in a full queue costs no CPU
    while it waits)."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if gone.done():  # the finally below cancels the task
            raise ClientGone("the client left before its answer began")
        raise DeadlineExceeded(f"generation did not finish within {timeout_s}s")
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


async def disconnected(request: Request) -> None:
    """Returns when the client has gone. Only for a request whose body has been read: after the body
    an ASGI server's `receive` blocks until the connection closes (or the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_output(request: Request, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The first output of a stream; a client that leaves while its request waits aborts it. Errors
    before the first token are plain HTTP errors; after it they travel in the stream."""
    try:
        return await while_connected(request, anext(outputs))
    except BaseException:
        await outputs.aclose()  # aborts the sequence (a no-op if the stream already ended)
        raise


def usage(out: RequestOutput) -> dict[str, int]:
    """A finished request's token counts, as the `usage` of /generate."""
    return {
        "prefix_tokens": out.prefix_tokens,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
    }


async def sse(
    state: State, rid: str, prefix_id: str | None, first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[str]:
    """SSE events; leaving this generator early (client gone) closes `rest`, which aborts the request."""
    try:
        out = first
        while True:
            if out.token_ids or out.text:
                token = {"id": rid, "token_ids": out.token_ids, "text": out.text}
                if out.logprobs:
                    token["logprobs"] = [t.model_dump() for t in token_scores(state, out.logprobs)]
                yield f"event: token\ndata: {json.dumps(token)}\n\n"
            if out.finished:
                done = {
                    "id": rid,
                    "prefix_id": prefix_id,
                    "finish_reason": out.finish_reason.value,
                    "usage": usage(out),
                }
                yield f"event: done\ndata: {json.dumps(done)}\n\n"
                return
            out = await anext(rest)
    except Exception as exc:  # after the headers went out, errors travel as an event
        yield error_event(exc)
    finally:
        await rest.aclose()


@dataclass
class Answer:
    """A whole answer: its text, tokens, log-probabilities (when asked) and last output."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None
    last: RequestOutput


async def gather_answer(request: Request, state: State, outputs: AsyncIterator[RequestOutput]) -> Answer:
    """Gather a whole answer; a client that disconnects or a passed deadline aborts the request."""

    async def gather() -> Answer:
        answer = Answer("", [], [], None, None)  # type: ignore[arg-type]  (last: set below)
        text = []
        async for out in outputs:
            text.append(out.text)
            answer.token_ids += out.token_ids
            answer.logprobs += out.logprobs
            if out.prompt_logprobs is not None:
                answer.prompt_logprobs = out.prompt_logprobs
            answer.last = out
        answer.text = "".join(text)
        return answer

    try:
        answer = await while_connected(request, gather(), state.settings.request_timeout_s)
    finally:
        await outputs.aclose()
    if answer.last.finish_reason == FinishReason.CANCELLED:
        raise Draining("the request was cancelled because the server is stopping")
    return answer


async def collect(
    request: Request,
    state: State,
    rid: str,
    prefix_id: str | None,
    outputs: AsyncIterator[RequestOutput],
    logprobs: bool = False,
) -> GenerateResponse:
    """A whole /generate answer (with each token's log-probability, when asked)."""
    answer = await gather_answer(request, state, outputs)
    return GenerateResponse(
        id=rid,
        prefix_id=prefix_id,
        text=answer.text,
        finish_reason=answer.last.finish_reason.value,
        usage=Usage(**usage(answer.last)),
        logprobs=token_scores(state, answer.logprobs) if logprobs else None,
    )


def token_scores(state: State, entries: list[TokenLogprob]) -> list[TokenScore]:
    """The engine's log-probabilities with each token's text."""
    text = state.engine.preparer.token_text
    return [
        TokenScore(
            token_id=e.token_id,
            token=text(e.token_id),
            logprob=e.logprob,
            top=[Alternative(token_id=t, token=text(t), logprob=lp) for t, lp in e.top],
        )
        for e in entries
    ]


async def model_ids(state: State, model: str | None, tenant: str) -> tuple[str | None, str | None]:
    """The (prefix, adapter) an OpenAI-style `model` names: the base model's served name (neither), one
    id (a prefix of any kind, or an adapter alone), or "PREFIX+ADAPTER" (a row carrying both). Anything
    the tenant may not use is a 404; a wrong pairing a 422."""
    if model is None or model == state.model.served_name:
        return None, None
    first, plus, second = model.partition("+")
    ids = (first, second) if plus else (first, None)
    await steering(state, tenant, *ids)
    return ids
