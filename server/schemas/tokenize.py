"""The tokenizer API's request and response bodies (`/tokenize`, `/detokenize`, `/tokenizer_info`, in the
shapes vLLM serves)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..inputs import Text
from ..limits import MAX_INPUT_CHARS, MAX_MODEL_CHARS


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = Field(None, max_length=MAX_MODEL_CHARS, description="a prefix id or the base model")
    prompt: Text = Field(..., max_length=MAX_INPUT_CHARS)
    add_special_tokens: bool = Field(True, description="GPT-2 adds none either way")
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = Field(None, max_length=MAX_MODEL_CHARS)
    tokens: list[int] = Field(..., max_length=MAX_INPUT_CHARS)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    name_or_path: str
    vocab_size: int
    model_max_length: int
    eos_token: str | None
    eos_token_id: int | None
    bos_token: str | None
    bos_token_id: int | None
    pad_token: str | None
