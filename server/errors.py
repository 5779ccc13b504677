"""Named errors. Each message says what was expected and what was found.

Every class carries its HTTP `status` and its `kind` (the `type` of the JSON error body); the one
HTTP boundary (`prefixserve.api.errors`) reads both, the engine and store only raise them. The base
class and the store's errors live in `prefix_store.errors` (the lowest layer that raises them) and are
re-exported here: the same classes, so `except PrefixServeError` catches every one.
"""

from __future__ import annotations

from prefix_store.errors import PrefixNotFound, PrefixServeError

__all__ = [
    "ContextTooLong",
    "EngineFault",
    "EngineOverloaded",
    "InvalidPrefix",
    "InvalidRequest",
    "PrefixError",
    "PrefixNotFound",
    "PrefixServeError",
    "QuotaExceeded",
    "UnsupportedModel",
]


class InvalidRequest(PrefixServeError):
    """A request parameter is out of range or malformed (HTTP 422)."""

    kind = "invalid_request"
    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ContextTooLong(InvalidRequest):
    """prefix length + input tokens + max_new_tokens exceeds what the model can attend to."""

    def __init__(self, prefix_len: int, input_len: int, max_new_tokens: int, limit: int, what: str) -> None:
        total = prefix_len + input_len + max_new_tokens
        super().__init__(
            "input",
            f"prefix length {prefix_len} + input tokens {input_len} + max_new_tokens {max_new_tokens}"
            f" = {total} exceeds the {what} of {limit}",
        )


class InvalidPrefix(PrefixServeError):
    """A prefix tensor does not fit the loaded model (shape, dtype, values)."""

    kind = "invalid_prefix"
    status = 422


class EngineOverloaded(PrefixServeError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""

    kind = "overloaded"
    status = 429

    def __init__(self, waiting: int, limit: int, detail: str = "") -> None:
        super().__init__(f"engine queue is full: {waiting} requests waiting, limit {limit}" + detail)
        self.waiting = waiting
        self.limit = limit


class QuotaExceeded(PrefixServeError):
    """A tenant's quota or limit is reached: the message names the quota, the usage and the limit. Rates
    and concurrency answer 429 with Retry-After (they free up by themselves); storage answers `status`
    403 (only deleting something frees it)."""

    kind = "quota_exceeded"
    status = 429

    def __init__(
        self,
        tenant: str,
        quota: str,
        usage: float,
        limit: float,
        what: str,
        retry_after: float = 1.0,
        status: int = 429,
    ) -> None:
        used = f"{_num(usage)} {what}; the limit is {_num(limit)}"
        retry = f"; retry after {retry_after:.0f}s" if status == 429 else ""
        super().__init__(f"tenant {tenant!r} has reached its {quota} quota ({used}){retry}")
        self.tenant, self.quota, self.usage, self.limit = tenant, quota, usage, limit
        self.retry_after = retry_after
        self.status = status


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class UnsupportedModel(PrefixServeError):
    """The checkpoint is not a GPT-2-family model this engine can run."""

    kind = "unsupported_model"
    status = 500


class PrefixError(PrefixServeError):
    """A row's numbers went bad (non-finite logits or hidden state) or its prefix could not be placed:
    the data of its prefix (or, rarely, an unlucky input) is unusable. That row ends alone (HTTP 422);
    every other row of the batch carries on unchanged."""

    kind = "prefix_error"
    status = 422

    def __init__(self, prefix_id: str | None, problem: str) -> None:
        where = f"prefix {prefix_id!r}" if prefix_id is not None else "this request (no prefix)"
        super().__init__(f"{where}: {problem}; the request was ended, other requests are unaffected")
        self.prefix_id = prefix_id


class EngineFault(PrefixServeError):
    """An engine step failed for a reason no single row explains (logged with its traceback). The
    rows of that step end with this error (HTTP 500); the engine keeps serving."""

    kind = "server_error"
    status = 500
