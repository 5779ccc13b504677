"""The HTTP API (FastAPI). `create_app(settings)` builds one app; nothing is global.

The routes live in `prefixserve.api.routes` (one `APIRouter` per resource), the one error boundary in
`prefixserve.api.errors`; this module builds the parts in the lifespan and includes the routers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from transformers import PreTrainedTokenizerBase

from prefix_store.binding import ModelBinding
from prefix_store.redis_health import RedisHealth
from prefix_store.service import PrefixService

from .api.console import install_console
from .api.errors import install_error_handlers
from .api.routes import ROUTERS
from .api.state import State
from .auth import Authenticator
from .compile import RemoteModel, bind_model
from .engine import AsyncEngine, EngineClient, EngineConfig, EngineCore, ProcessClient
from .engine.frontend import RemoteEngine
from .engine.prepare import RequestPreparer
from .engine.process import EngineProcess, engine_address
from .idempotency import Idempotency
from .loading import configured_tokenizer_and_spec, load_configured_model
from .metrics import Metrics, MetricsConfig
from .model import LoadedModel, ModelSpec, parse_dtype
from .ratelimit import RateLimiter
from .settings import ServerSettings
from .tenants import TenantRegistry
from .training.jobs import JobQueue, LocalJobQueue, RedisJobQueue
from .training.worker import Worker, WorkerConfig
from .usage import UsageMeter

log = logging.getLogger(__name__)
# where the engine is when it is neither here nor a process of its own (Ray Serve replicas): made from the
# settings and what requests are prepared with (tokenizer, dimensions)
EngineFactory = Callable[[ServerSettings, PreTrainedTokenizerBase, ModelSpec], Awaitable[EngineClient]]


async def start_engine_process(
    settings: ServerSettings, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec
) -> ProcessClient:
    """The engine core in its own process: started here (and restarted whenever it dies), or the one
    at `settings.engine_address` (API workers of `prefixserve serve --api-workers N`)."""
    address = settings.engine_address or engine_address()
    owner = None if settings.engine_address else EngineProcess(settings, address)
    if owner is not None:
        owner.start()
    preparer = RequestPreparer.serving(tokenizer, spec, settings.max_seq_len)
    client = ProcessClient(address, preparer, owner)
    try:
        await client.start()
    except BaseException:
        client.stop()
        raise
    return client


async def start_engine(
    settings: ServerSettings,
    loaded: LoadedModel,
    given: bool,
    engine_factory: EngineFactory | None,
    service: PrefixService,
) -> EngineClient:
    """Where the engine runs: Ray replicas (`engine_factory`), a process of its own, or, for a model
    `given` by the caller (tests, embedding), a thread of this process on the store's device pool."""
    if engine_factory is not None:
        return await engine_factory(settings, loaded.tokenizer, loaded.spec)
    if not given and settings.engine_process:
        return await start_engine_process(settings, loaded.tokenizer, loaded.spec)
    engine = AsyncEngine(EngineCore(loaded, EngineConfig.from_settings(settings), prefixes=service.pool))
    engine.start()
    return engine


def holds_no_model(
    settings: ServerSettings, model: LoadedModel | None, engine_factory: EngineFactory | None
) -> bool:
    """Whether this API process works without the model's weights: the engine runs elsewhere (a process
    of its own, Ray replicas: it compiles text prefixes and soft prompts, and describes the model's names
    and upload bounds) and training runs in worker processes (Redis). It keeps the tokenizer and the
    config (`RemoteModel`)."""
    elsewhere = engine_factory is not None or settings.engine_process
    return model is None and elsewhere and settings.redis_config() is not None


async def remote_model(
    settings: ServerSettings, engine_factory: EngineFactory | None
) -> tuple[RemoteModel, RemoteEngine]:
    """The model as `holds_no_model` has it, and the engine it is read from."""
    tokenizer, spec = await asyncio.to_thread(configured_tokenizer_and_spec, settings)
    client: RemoteEngine = await (engine_factory or start_engine_process)(settings, tokenizer, spec)
    if client.model is None:
        client.stop()
        raise RuntimeError("the engine did not describe its model")
    loop, dtype = asyncio.get_running_loop(), parse_dtype(settings.dtype)
    return RemoteModel(spec, tokenizer, dtype, client.compile, loop, client.model), client


def create_app(
    settings: ServerSettings | None = None,
    model: LoadedModel | None = None,
    engine_factory: EngineFactory | None = None,
) -> FastAPI:
    """The app: the parts are built in its lifespan (`model`: an already loaded one, else the
    configured one is loaded on a thread; `engine_factory`: where the engine is, when it is neither
    in this process nor an engine process of its own, e.g. Ray Serve replicas, scale/ray_serve.py)."""
    settings = settings or ServerSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine: EngineClient | None = None
        loaded: LoadedModel | RemoteModel
        if holds_no_model(settings, model, engine_factory):
            loaded, engine = await remote_model(settings, engine_factory)
            binding: ModelBinding = loaded
        else:
            loaded = model or await asyncio.to_thread(load_configured_model, settings)
            binding = await asyncio.to_thread(bind_model, loaded)  # (a forward pass: the bounds)
        redis_cfg = settings.redis_config()
        redis_health = RedisHealth(redis_cfg) if redis_cfg is not None else None  # one per process
        # the store sweeps leftover temp files as it opens: disk work, so off the event loop
        service = await asyncio.to_thread(
            PrefixService, binding, settings.store_config(), redis_health=redis_health
        )
        if engine is None:  # (a RemoteModel's engine started first: it describes the model)
            engine = await start_engine(settings, loaded, model is not None, engine_factory, service)
        metrics = Metrics(engine, service, MetricsConfig.from_settings(settings))
        engine.on_step = metrics.batch.observe
        registry = TenantRegistry(
            service.store, settings.config_keys(), redis_health, settings.registry_refresh_s
        )
        await asyncio.to_thread(registry.reload)
        auth = Authenticator(registry, settings.auth, settings.admin_secret())
        auth.log_mode()
        limiter = RateLimiter(redis_health)
        usage = UsageMeter(service.store, on_count=metrics.count_usage)
        jobs: JobQueue
        stop_worker = threading.Event()
        worker_thread: threading.Thread | None = None
        stop_watch, watched = asyncio.Event(), asyncio.Event()
        watch_task: asyncio.Task | None = None
        registry_task: asyncio.Task | None = None
        if redis_health is not None:  # workers run as their own processes (prefixserve worker)
            # no Redis call here: the server starts with Redis down, and everything reconnects by itself
            jobs = RedisJobQueue(settings.redis_url, settings.job_reclaim_s, redis_health)
            watch_task = asyncio.create_task(redis_health.watch(stop_watch, watched))
            registry_task = asyncio.create_task(registry.watch(stop_watch))
        else:  # the embedded default: the same worker code on a thread
            jobs = LocalJobQueue()
            worker = Worker(jobs, service, WorkerConfig.from_settings(settings), usage=usage)
            worker_thread = threading.Thread(
                target=worker.run, args=(stop_worker,), name="train-worker", daemon=True
            )
            worker_thread.start()
        usage_task = asyncio.create_task(usage.run(stop_watch, settings.usage_flush_s))
        state = State(
            settings,
            loaded,
            service,
            engine,
            auth,
            limiter,
            metrics,
            jobs,
            redis_health,
            idempotency=Idempotency(service.store, settings.idempotency_ttl_s),
            usage=usage,
        )
        app.state.s = state
        async for _ in engine.generate("warm up", None):  # one real pass before /ready says yes
            pass
        if watch_task is not None:  # /ready then says whether Redis is up (at most one timeout)
            await watched.wait()
        state.ready = True
        log.info("ready: model %s (%s) on %s", loaded.served_name, settings.dtype, settings.device)
        try:
            yield
        finally:
            state.draining = True
            stop_worker.set()
            if worker_thread is not None:
                await asyncio.to_thread(worker_thread.join, 30)
            engine.stop()
            service.close()
            stop_watch.set()
            for task in (watch_task, registry_task, usage_task):  # (the usage meter flushes a last time)
                if task is not None:
                    await task
            await limiter.close()

    app = FastAPI(
        title="prefixserve",
        version="0.1.0",
        description="Many prefix-tuning prefixes on one frozen GPT-2, mixed in one batched forward pass.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from local assets (install_console)
        redoc_url=None,
    )
    install_error_handlers(app)
    install_console(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
