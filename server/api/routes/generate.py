"""POST /generate: one prefix (or none) steering the frozen model, whole or streamed as SSE."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ...schemas import GenerateRequest, GenerateResponse
from ..errors import ERRORS, BoundedJsonRoute
from ..generation import collect, first_output, sse, start_generation
from ..state import get_state, tenant_of

router = APIRouter(tags=["generate"], route_class=BoundedJsonRoute)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def generate(body: GenerateRequest, request: Request, tenant: str = Depends(tenant_of)):
    """Generate text from the frozen model steered by one prefix (`prefix_id` null: the bare model).

    With `stream: true` the answer is Server-Sent Events: one `token` event per token, then a `done`
    event with `finish_reason` and `usage` (or an `error` event if generation fails midway).
    """
    state = get_state(request)
    rid = f"gen-{uuid.uuid4().hex[:16]}"
    _, outputs = await start_generation(
        state, tenant, body.input, body.sampling_params(), body.prefix_id, rid
    )
    if body.stream:
        first = await first_output(request, outputs)
        return StreamingResponse(sse(rid, body.prefix_id, first, outputs), media_type="text/event-stream")
    return await collect(request, state, rid, body.prefix_id, outputs)
