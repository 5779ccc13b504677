"""OpenAI-compatible `POST /v1/completions` and `GET /v1/models`.

A model name is a prefix id, or the base model's name for the bare model, so the official `openai`
SDK works unchanged (`client.completions.create(model=prefix_id, prompt=...)`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...engine import FinishReason, RequestOutput, SamplingParams
from ...inputs import Text, check_text
from ...limits import MAX_INPUT_CHARS, MAX_MODEL_CHARS, MAX_NEW_TOKENS, MAX_SEED, OPENAI_MAX_STOP_STRINGS
from ...schemas import stop_strings
from ..errors import ERRORS, BoundedJsonRoute, error_event
from ..generation import collect, first_output, start_generation
from ..state import State, get_state, tenant_of

router = APIRouter(tags=["openai"], route_class=BoundedJsonRoute)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",  # OpenAI clients send fields we do not use (user, logit_bias, ...)
        strict=True,  # integers are JSON integers; float fields still accept 1 (as OpenAI SDKs send)
        json_schema_extra={
            "examples": [
                {
                    "model": "pfx-3f9a0c1d2e4b5a69",
                    "prompt": "name : Aromi",
                    "max_tokens": 32,
                    "temperature": 0.7,
                }
            ]
        },
    )

    model: Text = Field(..., min_length=1, max_length=MAX_MODEL_CHARS)
    prompt: str | list[str] = Field(..., description="one prompt (a list must hold exactly one)")
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        items = [v] if isinstance(v, str) else v
        if (
            len(items) != 1
            or not isinstance(items[0], str)
            or not items[0]
            or len(items[0]) > MAX_INPUT_CHARS
        ):
            raise ValueError(f"expected one non-empty prompt of at most {MAX_INPUT_CHARS} characters")
        return check_text(items[0])

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return stop_strings(v, OPENAI_MAX_STOP_STRINGS) or []

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def base_model_name(state: State) -> str:
    return state.model.served_name


def _openai_reason(reason: FinishReason) -> Literal["stop", "length"]:
    return "length" if reason == FinishReason.LENGTH else "stop"  # OpenAI reports EOS as "stop"


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request, tenant: str = Depends(tenant_of)) -> ModelList:
    """The base model and every prefix this tenant may use, as OpenAI model cards."""
    state = get_state(request)
    cards = [ModelCard(id=base_model_name(state), created=0, owned_by="prefixserve")]
    for meta in await asyncio.to_thread(state.service.list, tenant):  # disk: off the event loop
        created = int(time.mktime(time.strptime(meta.created_at[:19], "%Y-%m-%dT%H:%M:%S")))
        cards.append(ModelCard(id=meta.id, created=created, owned_by=meta.owner))
    return ModelList(data=cards)


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def completions(body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
    """OpenAI text completions; `model` is a prefix id or the base model's name."""
    state = get_state(request)
    prefix_id = None if body.model == base_model_name(state) else body.model
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    _, outputs = await start_generation(state, tenant, body.prompt, body.sampling_params(), prefix_id, rid)
    created = int(time.time())
    if body.stream:
        first = await first_output(request, outputs)
        return StreamingResponse(
            _chunks(rid, body.model, created, first, outputs), media_type="text/event-stream"
        )
    result = await collect(request, state, rid, prefix_id, outputs)
    usage = result.usage
    return Completion(
        id=rid,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(
                text=result.text, finish_reason=_openai_reason(FinishReason(result.finish_reason))
            )
        ],
        usage=CompletionUsage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
        ),
    )


async def _chunks(
    rid: str, model: str, created: int, first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[str]:
    """OpenAI streaming: `data: {chunk}` per token, the last with finish_reason, then `data: [DONE]`."""
    try:
        out = first
        while True:
            reason = _openai_reason(out.finish_reason) if out.finished else None
            chunk = Completion(
                id=rid,
                created=created,
                model=model,
                choices=[CompletionChoice(text=out.text, finish_reason=reason)],
            )
            yield f"data: {chunk.model_dump_json()}\n\n"
            if out.finished:
                yield "data: [DONE]\n\n"
                return
            out = await anext(rest)
    except Exception as exc:
        yield error_event(exc).replace("event: error\n", "")
    finally:
        await rest.aclose()
