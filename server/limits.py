"""Every client-facing limit, in one place: the HTTP schemas, the OpenAI endpoint, the engine's own
validation, training submissions and the store all read these.

The store's limits (kind names, name length, default prefix length, JSON depth) live in
`prefix_store.limits`, the lowest layer that needs them, and are re-exported here.
"""

from __future__ import annotations

from prefix_store.limits import (
    DEFAULT_MAX_PREFIX_LEN,
    KIND_NTK,
    KIND_PREFIX_KV,
    MAX_JSON_DEPTH,
    MAX_NAME_LEN,
    VISIBILITIES,
)

__all__ = [
    "DEFAULT_MAX_PREFIX_LEN",
    "KIND_NTK",
    "KIND_PREFIX_KV",
    "MAX_CHOICES",
    "MAX_EXAMPLES",
    "MAX_FIELD_CHARS",
    "MAX_IDEMPOTENCY_KEY_CHARS",
    "MAX_INPUT_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_LOGIT_BIAS",
    "MAX_LOGIT_BIAS_TOKENS",
    "MAX_LOGPROBS",
    "MAX_MODEL_CHARS",
    "MAX_NAME_LEN",
    "MAX_NEW_TOKENS",
    "MAX_PENALTY",
    "MAX_SEED",
    "MAX_SEPARATOR_CHARS",
    "MAX_STOP_LEN",
    "MAX_STOP_STRINGS",
    "MAX_TEMPERATURE",
    "MAX_USAGE_DAYS",
    "OPENAI_MAX_LOGPROBS",
    "TENANT_NAME_MAX",
    "VISIBILITIES",
    "stop_problem",
]

# ---- generation ----------------------------------------------------------------------------------
MAX_INPUT_CHARS = 100_000  # one input (prompt) in characters, over HTTP and in the engine
MAX_NEW_TOKENS = 4096
MAX_TEMPERATURE = 100.0  # 0 = greedy
MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256  # characters of one stop string
MAX_MODEL_CHARS = 256  # the OpenAI `model` field (a prefix id or the base model's name)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's completions API allows 5, its chat API 20)
OPENAI_MAX_LOGPROBS = 5
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty, as OpenAI
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 300  # tokens one request may bias
MAX_CHOICES = 64  # completions per request (prompts x n), on the OpenAI endpoint

# ---- client input --------------------------------------------------------------------------------
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_JOBS_LISTED = 200  # GET /jobs?limit=
MAX_USAGE_DAYS = 366  # GET /usage?days=, GET /admin/usage?days=
TENANT_NAME_MAX = 64

# ---- training submissions ------------------------------------------------------------------------
MAX_EXAMPLES = 50_000
MAX_FIELD_CHARS = 20_000  # one example's input or output
MAX_SEPARATOR_CHARS = 16


def stop_problem(
    stops: list[str] | tuple[str, ...], max_count: int = MAX_STOP_STRINGS
) -> tuple[str, str] | None:
    """The one stop rule: `(field, message)` for the first problem (too many strings, an empty or too
    long one), or None when the list is fine. Schemas raise it as a ValueError, the engine as
    InvalidRequest."""
    if len(stops) > max_count:
        return "stop", f"expected at most {max_count} stop strings, got {len(stops)}"
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LEN:
            return (
                f"stop[{i}]",
                f"expected a non-empty string of at most {MAX_STOP_LEN} characters, got {s!r}",
            )
    return None
