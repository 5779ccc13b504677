"""The error base class and the store's own named errors, in the lowest layer that raises them.

Every class carries its HTTP `status` and its `kind` (the `type` of the JSON error body);
`prefixserve.errors` re-exports these (the same classes) beside the server's own, and the one HTTP
boundary (`prefixserve.api.errors`) reads both fields. No imports: every module may use these.
"""

from __future__ import annotations


class PrefixServeError(Exception):
    """Base class of every error prefixserve (server and store) raises on purpose: `kind` is the
    error's `type` in the JSON body, `status` its HTTP status code."""

    kind = "server_error"
    status = 500


class PrefixNotFound(PrefixServeError):
    """No prefix with this id is known (or the caller may not see it)."""

    kind = "prefix_not_found"
    status = 404

    def __init__(self, prefix_id: str) -> None:
        super().__init__(f"prefix {prefix_id!r} not found")
        self.prefix_id = prefix_id


class InvalidPrefixFile(PrefixServeError):
    """An uploaded or stored prefix file is malformed or does not fit the loaded model (HTTP 422)."""

    kind = "invalid_prefix"
    status = 422
