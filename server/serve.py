"""Run the app under uvicorn with a graceful, draining shutdown and slow-client deadlines."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .protocol import DrainState, guarded_protocol
from .settings import ServerSettings

log = logging.getLogger(__name__)


def uvicorn_config(app: FastAPI, settings: ServerSettings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration prefixserve runs with: the guarded HTTP protocol (header and body
    deadlines, drain gate: server/protocol.py) and the shutdown grace period."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "info",
        "http": guarded_protocol(settings.connection_limits()),
        "timeout_graceful_shutdown": max(1, int(settings.shutdown_grace_s)),
        **overrides,
    }
    return uvicorn.Config(app, **options)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT (or `should_exit`): drain, then stop.

    While draining, the listening socket stays open: new connections are accepted and every request
    whose headers arrive from then on is answered 503 + Retry-After by the protocol (its drain gate),
    /ready answers 503, and the requests already in flight run to their end. Once they have all
    finished, or `timeout_graceful_shutdown` has passed (the rest are then cancelled), uvicorn's own
    shutdown closes the listener and the connections and runs the app's lifespan shutdown. (uvicorn
    alone closes the listener at once, so clients were refused at connect.)"""

    def __init__(self, config: uvicorn.Config, app: FastAPI | None = None) -> None:
        super().__init__(config)
        self.server_state: DrainState = DrainState()
        self.fastapi_app = app
        self.grace_s: float | None = config.timeout_graceful_shutdown

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.begin_drain()
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        self.server_state.draining = True
        state = getattr(self.fastapi_app.state, "s", None) if self.fastapi_app is not None else None
        if state is not None:
            state.draining = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.begin_drain()
        start = time.monotonic()
        await self._drain(start)
        if self.grace_s is not None:  # uvicorn's shutdown gets what is left of the grace period
            self.config.timeout_graceful_shutdown = max(0.1, self.grace_s - (time.monotonic() - start))
        await super().shutdown(sockets)

    async def _drain(self, start: float) -> None:
        """Wait for the requests in flight when draining began (new ones meanwhile get 503)."""
        pending = set(self.server_state.tasks)
        if not pending:
            return
        log.info(
            "draining: %d requests in flight may finish within %ss; new requests get 503",
            len(pending),
            self.grace_s,
        )
        deadline = start + self.grace_s if self.grace_s is not None else float("inf")
        while pending and not self.force_exit and time.monotonic() < deadline:
            _, pending = await asyncio.wait(pending, timeout=min(0.1, deadline - time.monotonic()))


def serve(settings: ServerSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.check_exposure()
    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings), app).run()


def run_worker(settings: ServerSettings) -> None:
    """`prefixserve worker`: train jobs from the Redis queue until SIGTERM (the running job finishes)."""
    import signal
    import threading

    from prefix_store.redis_health import RedisHealth
    from prefix_store.service import PrefixService

    from .app import load_configured_model
    from .compile import bind_model
    from .training.jobs import RedisJobQueue
    from .training.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        raise SystemExit(
            "prefixserve worker needs PREFIXSERVE_REDIS_URL (without Redis the server trains in-process)"
        )
    model = load_configured_model(settings)
    health = RedisHealth(settings.redis_config())  # timeouts and the outage log, shared by cache and queue
    service = PrefixService(bind_model(model), settings.store_config(), redis_health=health)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Worker(RedisJobQueue(settings.redis_url, settings.job_reclaim_s, health), service).run(stop)
