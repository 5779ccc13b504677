"""Untrusted input primitives: bounded JSON and text that is real Unicode.

`parse_json` is the one JSON parser for client bytes (JSON request bodies, the multipart
`hyperparameters` field, JSONL training data, PEFT `adapter_config.json`, safetensors headers). It
raises only `ValueError` (malformed JSON, text that is not UTF-8, integers too long to convert, or
nesting deeper than `MAX_JSON_DEPTH`), never `RecursionError`, so each caller turns every failure
into its own named 4xx error. They live in the store, the lowest layer that parses client bytes;
`prefixserve.inputs` re-exports them beside its pydantic field type.
"""

from __future__ import annotations

import json

from .limits import MAX_JSON_DEPTH

__all__ = ["MAX_JSON_DEPTH", "JsonTooDeep", "check_text", "json_depth", "parse_json"]


class JsonTooDeep(ValueError):
    """A JSON document nests arrays/objects deeper than MAX_JSON_DEPTH."""

    def __init__(self, depth: int | None) -> None:
        got = "deeper than the parser's recursion limit" if depth is None else str(depth)
        super().__init__(f"expected JSON nested at most {MAX_JSON_DEPTH} levels deep, got {got}")
        self.depth = depth


def json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, `[]` and `{}` are 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def parse_json(raw: bytes | str) -> object:
    """`json.loads` bounded in depth; every failure is a `ValueError` with a message for the client."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JsonTooDeep(None) from None
    depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise JsonTooDeep(depth)
    return value


def check_text(value: str) -> str:
    """`value` unchanged if it can be encoded as UTF-8; else a ValueError naming the lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise ValueError(
            f"expected text encodable as UTF-8, got a lone surrogate {bad!r} at index {exc.start}"
        ) from None
    return value
