"""Typed exceptions, built from the server's `{"error": {"type", "message"}}` body."""

from __future__ import annotations


class PrefixServeError(Exception):
    """Base class: `status` is the HTTP status (0 for transport errors), `type` the server's error type."""

    def __init__(self, message: str, status: int = 0, type: str = "error") -> None:
        super().__init__(message)
        self.message, self.status, self.type = message, status, type


class AuthenticationError(PrefixServeError):
    """401: the API key is missing or wrong."""


class PermissionDenied(PrefixServeError):
    """403: e.g. deleting another tenant's public prefix."""


class NotFound(PrefixServeError):
    """404: an unknown id (or one that belongs to another tenant)."""


class PrefixNotFound(NotFound):
    """404 for a prefix id."""


class JobNotFound(NotFound):
    """404 for a job id."""


class ValidationError(PrefixServeError):
    """422 (or 413, 400): the request was refused; `message` names the reason."""


class Overloaded(PrefixServeError):
    """429: the server's queue or the tenant's rate limit is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, status: int = 429, type: str = "overloaded", retry_after: float = 1.0):
        super().__init__(message, status, type)
        self.retry_after = retry_after


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
        return PermissionDenied(message, status, kind)
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
        return Overloaded(message, status, kind, retry_after if retry_after is not None else 1.0)
    if status == 504:
        return Timeout(message, status, kind)
    if status >= 500:
        return ServerError(message, status, kind)
    return ValidationError(message, status, kind)
