"""Run the app under uvicorn with a graceful, draining shutdown."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .settings import ServerSettings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: mark the app draining (new requests get 503, /ready turns 503), then let
    uvicorn finish in-flight requests within `timeout_graceful_shutdown`."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.fastapi_app = app

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.fastapi_app.state, "s", None)
        if state is not None:
            state.draining = True
        super().handle_exit(sig, frame)


def serve(settings: ServerSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
    )
    DrainingServer(config, app).run()


def run_worker(settings: ServerSettings) -> None:
    """`prefixserve worker`: train jobs from the Redis queue until SIGTERM (the running job finishes)."""
    import signal
    import threading

    from prefix_store.service import PrefixService

    from .app import _load
    from .training.jobs import RedisJobQueue
    from .training.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        raise SystemExit(
            "prefixserve worker needs PREFIXSERVE_REDIS_URL (without Redis the server trains in-process)"
        )
    model = _load(settings)
    service = PrefixService(model, settings.store_config())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Worker(RedisJobQueue(settings.redis_url, settings.job_reclaim_s), service).run(stop)
