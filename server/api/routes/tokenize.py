"""The server's own tokenizer, in the shape vLLM serves it: `POST /tokenize`, `POST /detokenize`,
`GET /tokenizer_info`, so a tool counts and splits tokens exactly as the engine will."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from ..errors import ERRORS, BoundedJsonRoute
from ..generation import model_ids
from ..state import AppState, TenantName

router = APIRouter(tags=["tokenizer"], route_class=BoundedJsonRoute)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(
    body: TokenizeRequest, request: Request, state: AppState, tenant: TenantName
) -> TokenizeResponse:
    """The prompt's token ids as the engine tokenizes a request's input (no separator added)."""
    await model_ids(state, body.model, tenant)
    tokenizer = state.engine.preparer.tokenizer
    ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=state.engine.preparer.max_seq_len, tokens=ids, token_strs=strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(state: AppState, body: DetokenizeRequest, tenant: TenantName) -> DetokenizeResponse:
    """The text of token ids (each must be in the vocabulary)."""
    await model_ids(state, body.model, tenant)
    ids = state.engine.preparer.token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.engine.preparer.tokenizer.decode(ids))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=ERRORS)
async def tokenizer_info(state: AppState, tenant: TenantName) -> TokenizerInfo:
    """What a client needs to tokenize as the server does."""
    del tenant  # (authenticated like every route)
    tok = state.engine.preparer.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tok).__name__,
        name_or_path=state.model.served_name,
        vocab_size=state.model.spec.vocab_size,
        model_max_length=state.engine.preparer.max_seq_len,
        eos_token=tok.eos_token,
        eos_token_id=tok.eos_token_id,
        bos_token=tok.bos_token,
        bos_token_id=tok.bos_token_id,
        pad_token=tok.pad_token,
    )
