"""The one error boundary: every error becomes `{"error": {"type", "message"}}` with its status.

Each `PrefixServeError` carries its `status` and `kind`; `error_response` reads them, and client input
never reaches a 500 (architecture.md invariant 12).
"""

from __future__ import annotations

import json
import logging
import re
import reprlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store.store import NO_SPACE, InsufficientStorage

from ..errors import PrefixServeError
from ..inputs import parse_json
from ..metrics import CountRequests
from ..schemas.native import ErrorResponse

log = logging.getLogger(__name__)


class PayloadTooLarge(PrefixServeError):
    kind = "payload_too_large"
    status = 413


class Draining(PrefixServeError):
    kind = "unavailable"
    status = 503


class Forbidden(PrefixServeError):
    kind = "forbidden"
    status = 403


class DeadlineExceeded(PrefixServeError):
    kind = "timeout"
    status = 504


class ClientGone(PrefixServeError):
    """The client closed the connection, or was cut off as too slow, before its body arrived (499,
    as nginx logs it: no one reads the answer; it keeps a timed-out upload out of the 500s)."""

    kind = "client_closed_request"
    status = 499


ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 503, 507)}  # OpenAPI


def _describe(exc: Exception) -> tuple[Exception, int, str, str]:
    """(the error as answered, status, type, message): a named error's own, else a logged 500."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:  # a disk filled up outside the store's writes
        exc = InsufficientStorage("this request", exc)
    if isinstance(exc, PrefixServeError):
        return exc, exc.status, exc.kind, str(exc)
    log.exception("unhandled error", exc_info=exc)
    return exc, 500, "server_error", "internal server error"


def error_response(exc: Exception) -> JSONResponse:
    """The JSON answer for any exception, with its status (and Retry-After / WWW-Authenticate)."""
    exc, status, kind, message = _describe(exc)
    headers = {}
    if status in (429, 503):  # 503: draining or not ready yet
        headers["Retry-After"] = str(max(1, int(getattr(exc, "retry_after", 1))))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"type": kind, "message": message}}, status, headers=headers)


def error_event(exc: Exception, event: str | None = "error") -> str:
    """An error after a stream's headers went out: an SSE event with the same body, named `event` (None:
    an unnamed `data:` event, as OpenAI's streams carry errors)."""
    _, _, kind, message = _describe(exc)
    head = "" if event is None else f"event: {event}\n"
    return f"{head}data: {json.dumps({'error': {'type': kind, 'message': message}})}\n\n"


class CatchUnhandled:
    """Pure ASGI, outermost: an unexpected exception answers the JSON 500 of `error_response` and is
    not re-raised, so the keep-alive connection stays usable. (Starlette's ServerErrorMiddleware
    re-raises after its handler has answered, and uvicorn then closes the connection.) Once a
    response has started, a half-sent answer cannot be repaired: the error propagates."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise
            await error_response(exc)(scope, receive, send)


class _BoundedJsonRequest(Request):
    """FastAPI parses JSON bodies with `request.json()`; this one goes through `parse_json`, and any
    failure is a JSONDecodeError, which FastAPI answers as a 422 (other errors would be a vague 400)."""

    async def json(self) -> object:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body())
            except json.JSONDecodeError:
                raise
            except ValueError as exc:  # too deep, not UTF-8, an integer too long to convert
                raise json.JSONDecodeError(str(exc), "", 0) from None
        return self._json


class BoundedJsonRoute(APIRoute):
    """The route class of every router: JSON bodies are parsed bounded in depth (`parse_json`)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(_BoundedJsonRequest(request.scope, request.receive))

        return bounded


def install_error_handlers(app: FastAPI) -> None:
    """Named errors, validation errors and Starlette's HTTP errors all answer the one JSON shape."""

    @app.exception_handler(PrefixServeError)
    async def _known(request: Request, exc: PrefixServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(PydanticValidationError)
    async def _body_validation(request: Request, exc: PydanticValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}}, exc.status_code)

    app.add_middleware(CountRequests)
    app.add_middleware(CatchUnhandled)  # added last: outermost, so it also covers CountRequests


def _invalid(errors: list) -> JSONResponse:
    message = "; ".join(_validation_message(err) for err in errors)
    return JSONResponse({"error": {"type": "invalid_request", "message": message}}, 422)


_NAMES_A_FIELD = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*: ")


def _validation_message(err: dict) -> str:
    """One pydantic/FastAPI error as `field: expected ..., got ...` (what was found: for type errors)."""
    if err.get("type") == "json_invalid":  # FastAPI's: loc is ("body", character offset)
        at = err["loc"][-1] if len(err.get("loc", ())) > 1 else 0
        where = f" (at character {at})" if at else ""
        return f"body: invalid JSON{where}: {err.get('ctx', {}).get('error')}"
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    message = str(err.get("msg")).removeprefix("Value error, ")  # (our validators' messages name it)
    if str(err.get("type", "")).endswith("_type"):  # e.g. int_type: "3", 2.0 or true for an integer
        found = err.get("input")
        message += f", got {type(found).__name__} {reprlib.repr(found)}"
    if where:
        return f"{where}: {message}"
    # the body as a whole: a model validator's message names its field already; else it is the body's
    return message if _NAMES_A_FIELD.match(message) else f"body: {message}"
