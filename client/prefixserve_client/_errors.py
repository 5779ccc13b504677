"""Typed exceptions, built from the server's `{"error": {"type", "message"}}` body.

The classes follow the HTTP status (401 `AuthenticationError`, 403 `PermissionDenied`, 404 `NotFound`, 429
`Overloaded`, ...). A tenant's quota refusal is also a `QuotaExceeded`, through one of two concrete
classes that keep its status's class as well:

    StorageQuotaExceeded(QuotaExceeded, PermissionDenied)   403: stored prefixes or bytes; only deleting
                                                            something frees it
    TransientQuotaExceeded(QuotaExceeded, Overloaded)       429 + Retry-After: requests or tokens per
                                                            minute, concurrency, active jobs; they free
                                                            up by themselves (so the client retries them)

so `except QuotaExceeded` catches every quota refusal, and `except Overloaded` / `except PermissionDenied`
keep catching what they caught before quotas existed.
"""

from __future__ import annotations


class PrefixServeError(Exception):
    """Base class: `status` is the HTTP status (0 for transport errors), `type` the server's error type."""

    def __init__(self, message: str, status: int = 0, type: str = "error") -> None:
        super().__init__(message)
        self.message, self.status, self.type = message, status, type


class AuthenticationError(PrefixServeError):
    """401: the API key is missing or wrong."""


class PermissionDenied(PrefixServeError):
    """403: e.g. deleting another tenant's public prefix, a disabled tenant's key, a tenant's key on the
    admin API (type `forbidden`), or a storage quota (a `StorageQuotaExceeded`)."""


class NotFound(PrefixServeError):
    """404: an unknown id (or one that belongs to another tenant)."""


class PrefixNotFound(NotFound):
    """404 for a prefix id."""


class JobNotFound(NotFound):
    """404 for a job id."""


class ValidationError(PrefixServeError):
    """422 (or 413, 400, 409: e.g. creating a tenant that exists): the request was refused; `message` names
    the reason."""


class Overloaded(PrefixServeError):
    """429: the server's queue or the tenant's rate limit is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, status: int = 429, type: str = "overloaded", retry_after: float = 1.0):
        super().__init__(message, status, type)
        self.retry_after = retry_after


class QuotaExceeded(PrefixServeError):
    """A tenant's quota refused the request (error type `quota_exceeded`, or `rate_limited` for the per-minute
    rates); the message names the quota, the usage and the limit. Never raised itself: it is either a
    `StorageQuotaExceeded` (403) or a `TransientQuotaExceeded` (429). `retry_after`: the seconds the server
    said to wait (None for storage: waiting frees nothing)."""

    retry_after: float | None = None


class StorageQuotaExceeded(QuotaExceeded, PermissionDenied):
    """403: max_stored_prefixes or max_stored_bytes is reached; delete a prefix to make room."""


class TransientQuotaExceeded(QuotaExceeded, Overloaded):
    """429: a per-minute rate, max_concurrent or max_active_jobs is reached; retry after `retry_after`."""


QUOTA_TYPES = ("quota_exceeded", "rate_limited")


class ServerError(PrefixServeError):
    """5xx, or the connection failed."""


class Timeout(ServerError):
    """The request or the deadline ran out."""


def error_for(status: int, body: object, retry_after: float | None) -> PrefixServeError:
    """The exception for an error response."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    kind = str(err.get("type", "error")) if isinstance(err, dict) else "error"
    message = str(err.get("message", body)) if isinstance(err, dict) else str(body)
    if status == 401:
        return AuthenticationError(message, status, kind)
    if status == 403:
        cls = StorageQuotaExceeded if kind in QUOTA_TYPES else PermissionDenied
        return cls(message, status, kind)
    if status == 404:
        cls = (
            JobNotFound
            if kind == "job_not_found"
            else PrefixNotFound
            if kind == "prefix_not_found"
            else NotFound
        )
        return cls(message, status, kind)
    if status == 429:
        cls = TransientQuotaExceeded if kind in QUOTA_TYPES else Overloaded
        return cls(message, status, kind, retry_after if retry_after is not None else 1.0)
    if status == 504:
        return Timeout(message, status, kind)
    if status >= 500:
        return ServerError(message, status, kind)
    return ValidationError(message, status, kind)
