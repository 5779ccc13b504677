"""Run the app under uvicorn with a graceful, draining shutdown and slow-client deadlines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .engine.process import SETTINGS_ENV, EngineProcess, engine_address
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
    if settings.api_workers > 1:
        serve_api_workers(settings)
        return
    app = create_app(settings)
    sockets = [reuse_port_socket(settings)] if settings.engine_address else None  # an API worker
    DrainingServer(uvicorn_config(app, settings), app).run(sockets=sockets)


def reuse_port_socket(settings: ServerSettings) -> socket.socket:
    """The listening socket of one of several API workers: SO_REUSEPORT, so the kernel spreads the
    connections over the workers bound to the same port."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))  # listening starts once the app is ready (uvicorn)
    return sock


def serve_api_workers(settings: ServerSettings) -> None:
    """`prefixserve serve --api-workers N`: one engine process and N API processes on one port. This
    process supervises them: a dead engine or worker is started again; SIGTERM drains the workers
    (each finishes its requests in flight), then stops the engine."""
    if not settings.redis_url:
        raise SystemExit(
            "--api-workers > 1 needs PREFIXSERVE_REDIS_URL: jobs, rate limits and idempotency keys are"
            " shared between the API processes through Redis"
        )
    address = engine_address()
    engine = EngineProcess(settings, address)
    engine.start()
    worker = replace(settings, api_workers=1, engine_address=address)
    env = {**os.environ, SETTINGS_ENV: json.dumps(asdict(worker))}
    command = [sys.executable, "-m", "prefixserve.serve"]
    workers = [subprocess.Popen(command, env=env) for _ in range(settings.api_workers)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("%d API workers on port %d, one engine process", len(workers), settings.port)
    while not stop.wait(0.5):
        for i, proc in enumerate(workers):
            if proc.poll() is not None:
                log.error("API worker (pid %d) exited (%s); starting it again", proc.pid, proc.returncode)
                workers[i] = subprocess.Popen(command, env=env)
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
    for proc in workers:
        try:
            proc.wait(settings.shutdown_grace_s + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
    engine.stop()


def main() -> None:
    """`python -m prefixserve.serve`: one API worker, its settings (engine address included) in
    SETTINGS_ENV (started by `serve_api_workers`)."""
    serve(ServerSettings(**json.loads(os.environ[SETTINGS_ENV])))


def run_worker(settings: ServerSettings) -> None:
    """`prefixserve worker`: train jobs from the Redis queue until SIGTERM (the running job finishes)."""
    import signal
    import threading

    from prefix_store.redis_health import RedisHealth
    from prefix_store.service import PrefixService

    from .compile import bind_model
    from .loading import load_configured_model
    from .training.jobs import RedisJobQueue
    from .training.worker import Worker, WorkerConfig
    from .usage import UsageMeter

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
    queue = RedisJobQueue(settings.redis_url, settings.job_reclaim_s, health)
    usage = UsageMeter(service.store)  # the jobs' work, counted (and written) as each one succeeds
    Worker(queue, service, WorkerConfig.from_settings(settings), usage=usage).run(stop)


if __name__ == "__main__":
    main()
