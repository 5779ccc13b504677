"""The HTTP/1.1 connection layer: uvicorn's httptools protocol plus the guards uvicorn lacks.

uvicorn bounds only the idle time between keep-alive requests (`timeout_keep_alive`); a client that
opens a connection and sends its headers or its body slowly ("slowloris") holds the connection, and
its file descriptor and buffers, for as long as it likes. `GuardedHttpToolsProtocol` adds:

- a header deadline (`header_timeout_s`, like nginx's `client_header_timeout`): from the moment a
  connection opens, or a keep-alive connection receives the first byte of its next request, to the
  end of that request's headers. Past it the server answers 408 (or, if nothing arrived at all,
  just closes) and closes the connection; the app never sees the request.
- a body deadline (`body_timeout_s`, like nginx's `client_body_timeout`, with Apache mod_reqtimeout's
  minimum rate): while a request body is being received, every `body_timeout_s` the client must have
  sent at least `body_min_bytes_per_s * body_timeout_s` bytes (and at least one) or finished the
  body. Otherwise: 408 if no response has started, and the connection is closed; the app's
  `receive()` reports a disconnect. Windows in which the server itself is not reading (flow control,
  `Expect: 100-continue` not yet answered) do not count against the client.
- a drain gate: once the server drains (`DrainState.draining`, set by `serve.DrainingServer` on
  SIGTERM), a request whose headers complete is answered 503 + `Retry-After` + `Connection: close`
  without reaching the app; requests whose headers completed before keep running.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

DRAIN_RETRY_AFTER_S = 1  # a refused client retries soon: on another replica, or on this one restarted


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection deadlines (ServerSettings.connection_limits())."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 15.0
    body_min_bytes_per_s: int = 500

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.body_min_bytes_per_s < 0:
            raise ValueError(f"body_min_bytes_per_s must be >= 0, got {self.body_min_bytes_per_s!r}")


class DrainState(ServerState):
    """uvicorn's state shared by every connection, plus whether the server is draining."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False


def _error_bytes(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message}}).encode()


def _error_head(status: int, reason: str, body: bytes, extra: list[tuple[bytes, bytes]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}".encode()]
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def refuse_draining(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI answer to a request that arrives while the server drains: 503 + Retry-After."""
    body = _error_bytes(
        "unavailable", "the server is shutting down; retry shortly (another replica will answer)"
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(DRAIN_RETRY_AFTER_S).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body deadlines and a drain gate (module docstring).
    Build it with `guarded_protocol(limits)`; uvicorn constructs one per connection."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._message_begun = False
        self._body_bytes = 0  # received in the current body window

    # ---- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a request is cut too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    # ---- parser callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_begun = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._message_begun = False
        if getattr(self.server_state, "draining", False):
            app, self.app = self.app, refuse_draining  # this one request only
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._body_bytes = 0
        self._arm_body_timer()  # cancelled at once by on_message_complete when there is no body

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()

    # ---- timers ------------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_body_timer(self) -> None:
        self._cancel_body_timer()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_window_ended)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()  # a pipelined request: judge it once the response before it is out
        elif self._message_begun:  # part of a request arrived: say why it is cut
            limit = self.limits.header_timeout_s
            self._close_with_408(f"the request headers did not arrive within {limit:g} s")
        else:  # a new connection that sent nothing
            self.transport.close()

    def _body_window_ended(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        got, self._body_bytes = self._body_bytes, 0
        if self.flow.read_paused or cycle.waiting_for_100_continue:  # waiting on us, not the client
            self._arm_body_timer()
            return
        window = self.limits.body_timeout_s
        needed = max(1, int(self.limits.body_min_bytes_per_s * window))
        if got >= needed:
            self._arm_body_timer()
            return
        message = (
            f"the request body arrived too slowly: {got} bytes in {window:g} s, expected at least {needed}"
        )
        cycle.disconnected = True  # the app's receive() now reports a disconnect; its sends are dropped
        cycle.message_event.set()
        if cycle.response_started:
            self.transport.close()
        else:
            self._close_with_408(message)

    def _close_with_408(self, message: str) -> None:
        body = _error_bytes("request_timeout", message)
        self.transport.write(_error_head(408, "Request Timeout", body, []) + body)
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`, bound to `limits`."""
    return functools.partial(GuardedHttpToolsProtocol, limits=limits)  # type: ignore[return-value]
