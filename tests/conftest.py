"""Shared fixtures: the offline tiny GPT-2 (built once per run), loaded by the engine and by HF."""

from __future__ import annotations

import os
import shutil

# Tests never reach the hub (the model is built offline); set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model
from prefixserve.model import LoadedModel, load_model
from prefixserve.tiny import write_tiny_model

from .live import LiveServer, LiveServers


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def redis_url():
    """REDIS_URL if set, else a real redis-server started on a free port for this run."""
    from prefix_store.redis_server import RedisServer

    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer().start()
    yield server.url
    server.kill()


@pytest.fixture
def own_redis():
    """A redis-server this test may kill and restart (skipped only where REDIS_URL stands in for a
    missing redis-server binary, as scripts/setup.sh explains)."""
    from prefix_store.redis_server import RedisServer

    if os.environ.get("REDIS_URL") and shutil.which("redis-server") is None:
        pytest.skip("needs a redis-server binary to kill and restart (REDIS_URL is set, no binary)")

    server = RedisServer().start()
    yield server
    server.kill()


# ---- live servers: the real app on uvicorn ----------------------------------------------------------
@pytest.fixture
def live_server(tiny_model, tmp_path_factory):
    """A factory: `live_server(**overrides)` starts a live server (the tiny model, the tests' settings
    with `overrides`, a fresh data directory; or `model=`, `settings=`, `data_dir=`), stopped at the
    test's end."""
    servers = LiveServers(lambda: tmp_path_factory.mktemp("live"), tiny_model)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def module_live_server(tiny_model, tmp_path_factory):
    """The same factory for a module's shared servers, stopped after the module's last test."""
    servers = LiveServers(lambda: tmp_path_factory.mktemp("live"), tiny_model)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def api(module_live_server) -> LiveServer:
    """A module's live server with the tests' usual settings (tenants alice and bob)."""
    return module_live_server()


# ---- the prefix store ---------------------------------------------------------------------------
@pytest.fixture
def service_factory(tmp_path, tiny_model):
    """A factory of prefix services over one store directory (closed at the test's end)."""
    made: list[PrefixService] = []

    def make(redis_url: str | None = None, **over) -> PrefixService:
        cfg = StoreConfig(url=str(tmp_path / "store"), redis_url=redis_url, max_prefix_len=64, **over)
        svc = PrefixService(bind_model(tiny_model), cfg)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()
