"""A live uvicorn serving the real app on a free loopback port (in a thread, so tests can look inside),
with the configuration `prefixserve serve` uses."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from prefix_store.redis_server import free_port
from prefixserve.app import create_app
from prefixserve.model import LoadedModel
from prefixserve.serve import DrainingServer, uvicorn_config
from prefixserve.settings import ServerSettings

from .helpers import settings_for


class LiveServer:
    def __init__(self, settings: ServerSettings, model: LoadedModel | None = None) -> None:
        self.port = free_port()
        self.app = create_app(settings, model)
        config = uvicorn_config(  # the production configuration (protocol guards, drain)
            self.app, settings, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = DrainingServer(config, self.app)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state.s

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class LiveServers:
    """Starts live servers for a fixture (`live_server`, `module_live_server` in conftest) and stops them
    all when the fixture's scope ends."""

    def __init__(self, new_dir: Callable[[], Path], model: LoadedModel) -> None:
        self.new_dir, self.model = new_dir, model
        self.started: list[LiveServer] = []

    def __call__(
        self,
        model: LoadedModel | None = None,
        settings: ServerSettings | None = None,
        data_dir: Path | None = None,
        **overrides,
    ) -> LiveServer:
        """A started server on `model` (default: the tiny model) with `settings`, or the tests' usual
        settings (helpers.settings_for) in `data_dir` (default: a fresh directory) with `overrides`."""
        settings = settings or settings_for(data_dir or self.new_dir(), **overrides)
        server = LiveServer(settings, model or self.model).start()
        self.started.append(server)
        return server

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()
