"""Client input primitives shared by every entry point: bounded JSON and text that is real Unicode.

`parse_json` is the one JSON parser for client bytes (JSON request bodies, the multipart
`hyperparameters` field, JSONL training data, PEFT `adapter_config.json`, safetensors headers). It
raises only `ValueError` (malformed JSON, text that is not UTF-8, integers too long to convert, or
nesting deeper than `MAX_JSON_DEPTH`), never `RecursionError`, so each caller turns every failure
into its own named 4xx error. It and `check_text` live in `prefix_store.inputs` (the store parses
safetensors headers with them) and are re-exported here.

`Text` is a `str` field type that refuses strings which cannot be encoded as UTF-8: JSON may carry a
lone surrogate (`"\\ud800"`), which Python decodes into a `str` that the tokenizer, the store and
every JSON response would fail on later.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator

from prefix_store.inputs import MAX_JSON_DEPTH, JsonTooDeep, check_text, json_depth, parse_json

__all__ = ["MAX_JSON_DEPTH", "JsonTooDeep", "Text", "check_text", "json_depth", "parse_json"]


def _text(value: object) -> object:
    return check_text(value) if isinstance(value, str) else value  # other types: the str check's error


Text = Annotated[str, BeforeValidator(_text)]
