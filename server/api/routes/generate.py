"""POST /generate: one prefix (or none) steering the frozen model, whole or streamed as SSE."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ...engine import SamplingParams
from ...schemas.native import GenerateRequest, GenerateResponse, ScoreRequest, ScoreResponse, Usage
from ..errors import ERRORS, BoundedJsonRoute
from ..generation import (
    collect,
    first_output,
    gather_answer,
    input_suffix,
    sse,
    start_generation,
    steering,
    token_scores,
    usage,
)
from ..state import AppState, TenantName

router = APIRouter(tags=["generate"], route_class=BoundedJsonRoute)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def generate(body: GenerateRequest, request: Request, state: AppState, tenant: TenantName):
    """Generate text from the frozen model steered by one prefix (`prefix_id` null: the bare model) of
    any kind (prefix_kv, ntk, or a LoRA / bottleneck adapter), and optionally an adapter beside a prefix
    (`adapter_id`).

    With `stream: true` the answer is Server-Sent Events: one `token` event per token, then a `done`
    event with `finish_reason` and `usage` (or an `error` event if generation fails midway).
    """
    rid = f"gen-{uuid.uuid4().hex[:16]}"
    _, outputs = await start_generation(
        state, tenant, body.input, body.sampling_params(), body.prefix_id, rid, adapter_id=body.adapter_id
    )
    if body.stream:
        first = await first_output(request, outputs)
        events = sse(state, rid, body.prefix_id, first, outputs)
        return StreamingResponse(events, media_type="text/event-stream")
    return await collect(request, state, rid, body.prefix_id, outputs, logprobs=body.logprobs is not None)


@router.post("/score", response_model=ScoreResponse, responses=ERRORS)
async def score(body: ScoreRequest, request: Request, state: AppState, tenant: TenantName) -> ScoreResponse:
    """The log-probability of `continuation` after `input` (and the prefix; a trained prefix's
    separator between them, as in training), token by token. Nothing is generated."""
    metas = await steering(state, tenant, body.prefix_id, body.adapter_id)
    context = body.input + input_suffix(metas)
    encode = state.engine.preparer.tokenizer.encode
    context_ids = encode(context, add_special_tokens=False)
    ids = context_ids + encode(body.continuation, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=body.top_logprobs)
    rid = f"score-{uuid.uuid4().hex[:16]}"
    _, outputs = await start_generation(
        state, tenant, ids, params, body.prefix_id, rid, separator=False, adapter_id=body.adapter_id
    )
    answer = await gather_answer(request, state, outputs)
    tokens = token_scores(state, answer.prompt_logprobs[len(context_ids) :])
    return ScoreResponse(
        prefix_id=body.prefix_id,
        total_logprob=sum(t.logprob for t in tokens),
        tokens=tokens,
        usage=Usage(**usage(answer.last)),
    )
