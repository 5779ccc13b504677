"""The HTTP API (FastAPI). `create_app(settings)` builds one app; nothing is global.

One boundary (`_error_response`) maps every error to `{"error": {"type", "message"}}` with its
status; client input never reaches a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import reprlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store.format import InvalidPrefixFile, PrefixMeta
from prefix_store.redis_health import RedisHealth
from prefix_store.service import PrefixService, new_prefix_id
from prefix_store.store import NO_SPACE, InsufficientStorage, PrefixExists

from .auth import Tenants
from .engine import AsyncEngine, EngineCore, FinishReason, RequestOutput, SamplingParams
from .engine.request import Request as EngineRequest
from .errors import InvalidRequest, PrefixNotFound, PrefixServeError
from .idempotency import Idempotency, fingerprint, json_fingerprint, parse_key
from .inputs import check_text, parse_json
from .limits import RateLimiter
from .metrics import CountRequests, Metrics
from .model import LoadedModel, hub_model_available, load_model
from .schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    JobInfo,
    PrefixInfo,
    PrefixList,
    TextPrefixRequest,
    Usage,
    inline_schema,
)
from .settings import ServerSettings
from .tiny import write_tiny_model
from .training.data import Hyperparameters, TrainPrefixRequest, parse_jsonl, validate_dataset
from .training.jobs import Job, JobNotFound, JobQueue, LocalJobQueue, RedisJobQueue, cancel
from .training.worker import Worker

log = logging.getLogger(__name__)


class PayloadTooLarge(PrefixServeError):
    kind = "payload_too_large"


class Draining(PrefixServeError):
    kind = "unavailable"


class Forbidden(PrefixServeError):
    kind = "forbidden"


class DeadlineExceeded(PrefixServeError):
    kind = "timeout"


class ClientGone(PrefixServeError):
    """The client closed the connection, or was cut off as too slow, before its body arrived (499,
    as nginx logs it: no one reads the answer; it keeps a timed-out upload out of the 500s)."""

    kind = "client_closed_request"


STATUS = {
    "invalid_request": 422,
    "invalid_prefix": 422,
    "prefix_error": 422,  # a row's prefix turned its numbers NaN/Inf: the prefix's data is unusable
    "prefix_not_found": 404,
    "overloaded": 429,
    "rate_limited": 429,
    "unauthorized": 401,
    "forbidden": 403,
    "unavailable": 503,
    "conflict": 409,
    "payload_too_large": 413,
    "timeout": 504,
    "job_not_found": 404,
    "client_closed_request": 499,
    "insufficient_storage": 507,  # the durable store's disk is full or its quota spent
}
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 503, 507)}


def _error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:  # a disk filled up outside the store's writes
        exc = InsufficientStorage("this request", exc)
    if isinstance(exc, PrefixServeError):
        status, kind, message = STATUS.get(exc.kind, 500), exc.kind, str(exc)
    else:
        log.exception("unhandled error", exc_info=exc)
        status, kind, message = 500, "server_error", "internal server error"
    headers = {}
    if status in (429, 503):  # 503: draining or not ready yet
        headers["Retry-After"] = str(max(1, int(getattr(exc, "retry_after", 1))))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"type": kind, "message": message}}, status, headers=headers)


class CatchUnhandled:
    """Pure ASGI, outermost: an unexpected exception answers the JSON 500 of `_error_response` and is
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
            await _error_response(exc)(scope, receive, send)


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


class _BoundedJsonRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(_BoundedJsonRequest(request.scope, request.receive))

        return bounded


def _error_event(exc: Exception) -> str:
    kind = exc.kind if isinstance(exc, PrefixServeError) else "server_error"
    message = str(exc) if isinstance(exc, PrefixServeError) else "internal server error"
    return f"event: error\ndata: {json.dumps({'error': {'type': kind, 'message': message}})}\n\n"


# ---- state ---------------------------------------------------------------------------------------
@dataclass
class State:
    settings: ServerSettings
    model: LoadedModel
    service: PrefixService
    engine: AsyncEngine
    tenants: Tenants
    limiter: RateLimiter
    metrics: Metrics
    jobs: JobQueue
    redis: RedisHealth | None = None  # shared by the cache, the limiter and the job queue
    ready: bool = False
    draining: bool = False
    idempotency: Idempotency = field(kw_only=True)  # Idempotency-Key records on POST /prefixes


def _load(settings: ServerSettings) -> LoadedModel:
    """The configured model; "auto" is gpt2 from the hub (or its local cache), else the tiny model."""
    if settings.model == "auto":
        reason = None if hub_model_available("gpt2") else "the hub is unreachable and gpt2 is not cached"
        if reason is None:
            try:
                return load_model("gpt2", dtype=settings.dtype, device=settings.device)
            except OSError as exc:
                reason = str(exc).splitlines()[0]
        log.warning(
            "could not load gpt2 (%s); serving the OFFLINE TINY MODEL instead (random weights, for trying"
            " the API). Set PREFIXSERVE_MODEL to choose.",
            reason,
        )
        return _load(replace(settings, model="tiny"))
    name = settings.model
    if name == "tiny":
        path = Path(settings.data_dir) / "tiny-gpt2"
        if not (path / "config.json").exists():
            write_tiny_model(path)
        name = str(path)
    return load_model(name, dtype=settings.dtype, device=settings.device)


def create_app(settings: ServerSettings | None = None, model: LoadedModel | None = None) -> FastAPI:
    settings = settings or ServerSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model or await asyncio.to_thread(_load, settings)
        redis_cfg = settings.redis_config()
        redis_health = RedisHealth(redis_cfg) if redis_cfg is not None else None  # one per process
        # the store sweeps leftover temp files as it opens: disk work, so off the event loop
        service = await asyncio.to_thread(
            PrefixService, loaded, settings.store_config(), redis_health=redis_health
        )
        core = EngineCore(loaded, settings.engine_config(), prefixes=service.pool)
        engine = AsyncEngine(core)
        metrics = Metrics(engine, service, settings.metrics_config())
        engine.on_step = metrics.batch.observe
        tenants = Tenants.from_settings(settings.api_keys, settings.api_keys_file, settings.auth_enabled)
        limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, redis_health)
        jobs: JobQueue
        stop_worker = threading.Event()
        worker_thread: threading.Thread | None = None
        stop_watch, watched = asyncio.Event(), asyncio.Event()
        watch_task: asyncio.Task | None = None
        if redis_health is not None:  # workers run as their own processes (prefixserve worker)
            # no Redis call here: the server starts with Redis down, and everything reconnects by itself
            jobs = RedisJobQueue(settings.redis_url, settings.job_reclaim_s, redis_health)
            watch_task = asyncio.create_task(redis_health.watch(stop_watch, watched))
        else:  # the embedded default: the same worker code on a thread
            jobs = LocalJobQueue()
            worker_thread = threading.Thread(
                target=Worker(jobs, service).run, args=(stop_worker,), name="train-worker", daemon=True
            )
            worker_thread.start()
        state = State(
            settings,
            loaded,
            service,
            engine,
            tenants,
            limiter,
            metrics,
            jobs,
            redis_health,
            idempotency=Idempotency(service.store, settings.idempotency_ttl_s),
        )
        app.state.s = state
        engine.start()
        async for _ in engine.generate("warm up", None):  # one real pass before /ready says yes
            pass
        if watch_task is not None:  # /ready then says whether Redis is up (at most one timeout)
            await watched.wait()
        state.ready = True
        log.info("ready: model %s (%s) on %s", loaded.name, settings.dtype, settings.device)
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
            if watch_task is not None:
                await watch_task
            await limiter.close()

    app = FastAPI(
        title="prefixserve",
        version="0.1.0",
        description="Many prefix-tuning prefixes on one frozen GPT-2, mixed in one batched forward pass.",
        lifespan=lifespan,
    )
    app.router.route_class = _BoundedJsonRoute  # before any route is added
    _install_error_handlers(app)
    _install_routes(app)
    from . import openai_api  # imports helpers from this module

    openai_api.install(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PrefixServeError)
    async def _known(request: Request, exc: PrefixServeError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(_validation_message(err) for err in exc.errors())
        return JSONResponse({"error": {"type": "invalid_request", "message": message}}, 422)

    @app.exception_handler(PydanticValidationError)
    async def _body_validation(request: Request, exc: PydanticValidationError) -> JSONResponse:
        message = "; ".join(_validation_message(err) for err in exc.errors())
        return JSONResponse({"error": {"type": "invalid_request", "message": message}}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}}, exc.status_code)

    app.add_middleware(CountRequests)
    app.add_middleware(CatchUnhandled)  # added last: outermost, so it also covers CountRequests


def _validation_message(err: dict) -> str:
    """One pydantic/FastAPI error as `field: expected ..., got ...` (what was found: for type errors)."""
    if err.get("type") == "json_invalid":  # FastAPI's: loc is ("body", character offset)
        at = err["loc"][-1] if len(err.get("loc", ())) > 1 else 0
        where = f" (at character {at})" if at else ""
        return f"body: invalid JSON{where}: {err.get('ctx', {}).get('error')}"
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    message = str(err.get("msg"))
    if str(err.get("type", "")).endswith("_type"):  # e.g. int_type: "3", 2.0 or true for an integer
        found = err.get("input")
        message += f", got {type(found).__name__} {reprlib.repr(found)}"
    return f"{where}: {message}" if where else message


def _state(request: Request) -> State:
    return request.app.state.s


def tenant_of(request: Request) -> str:
    """Authenticate; new work is refused with 503 once the server is draining."""
    state = _state(request)
    tenant = state.tenants.authenticate(request.headers.get("authorization"))
    request.state.tenant = tenant
    return tenant


def _admit(state: State) -> None:
    if state.draining or not state.ready:
        raise Draining("the server is shutting down or not ready; retry on another replica")


def _install_routes(app: FastAPI) -> None:
    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def ready(request: Request):
        """Readiness: the model is loaded and warmed up (independent of Redis, whose state it reports:
        "up", "down" (generation still works, from the durable store) or "none" (not configured))."""
        state: State | None = getattr(request.app.state, "s", None)
        if state is None or not state.ready or state.draining:
            return _error_response(Draining("not ready"))
        spec = state.model.spec
        return {
            "status": "ready",
            "redis": state.redis.state if state.redis is not None else "none",
            "model": {
                "name": state.model.served_name,  # the base model's id in /v1/models
                "fingerprint": state.model.fingerprint,
                "dtype": str(state.model.dtype),
                "n_layer": spec.n_layer,
                "n_head": spec.n_head,
                "n_embd": spec.n_embd,
                "n_positions": spec.n_positions,
                "vocab_size": spec.vocab_size,
            },
        }

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=PlainTextResponse,
        responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus metrics. With PREFIXSERVE_METRICS_KEY set, only for `Authorization: Bearer <that
        key>`; otherwise, when auth is on, only for loopback clients (401 / 403). Tenant labels are
        pseudonyms unless PREFIXSERVE_METRICS_TENANT_LABELS=true."""
        metrics = _state(request).metrics
        metrics.access.check(request.headers.get("authorization"), request.client and request.client.host)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/generate",
        tags=["generate"],
        response_model=GenerateResponse,
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def generate(body: GenerateRequest, request: Request, tenant: str = Depends(tenant_of)):
        """Generate text from the frozen model steered by one prefix (`prefix_id` null: the bare model).

        With `stream: true` the answer is Server-Sent Events: one `token` event per token, then a `done`
        event with `finish_reason` and `usage` (or an `error` event if generation fails midway).
        """
        state = _state(request)
        rid = f"gen-{uuid.uuid4().hex[:16]}"
        _, outputs = await start_generation(
            state, tenant, body.input, body.sampling_params(), body.prefix_id, rid
        )
        if body.stream:
            first = await _first(request, outputs)  # errors before the first token are plain HTTP errors
            return StreamingResponse(
                _sse(rid, body.prefix_id, first, outputs), media_type="text/event-stream"
            )
        return await _collect(request, state, rid, body.prefix_id, outputs)

    @app.post(
        "/prefixes",
        tags=["prefixes"],
        status_code=201,
        response_model=PrefixInfo,
        responses={**ERRORS, 202: {"model": JobInfo, "description": "a training job was queued"}},
        openapi_extra=_UPLOAD_DOC,
    )
    async def add_prefix(request: Request, tenant: str = Depends(tenant_of)):
        """Add a prefix: upload a native `.safetensors` prefix (`file`) or a PEFT adapter
        (`adapter_config` + `adapter_model`) as multipart, compile a text prompt (JSON `{"text"}`), or
        train one: JSON `{"train": {"examples": [{"input", "output"}], ...hyperparameters}}` or a
        multipart `train` JSONL file (+ `hyperparameters` as JSON) -> 202 with the job.

        With an `Idempotency-Key` header (1-255 printable ASCII characters, per tenant), a retry of the
        same request within `PREFIXSERVE_IDEMPOTENCY_TTL_S` gets the first answer again (same status,
        same id, `Idempotent-Replayed: true`), even across a server restart; the same key with a
        different request is 422."""
        state = _state(request)
        _admit(state)
        creation = _Creation(state, tenant, parse_key(request.headers.get("idempotency-key")))
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            data = _json_object(await _read_limited(request, state.settings.max_upload_bytes))
            if "train" in data:
                body = TrainPrefixRequest.model_validate(data)
                return await creation.job(
                    lambda: json_fingerprint(data),
                    lambda job_id: _submit_training(
                        state, tenant, body.train, body.train.examples, body.name, body.visibility, job_id
                    ),
                )
            text = TextPrefixRequest.model_validate(data)
            return await creation.prefix(
                lambda: json_fingerprint(data),
                lambda pid: asyncio.to_thread(
                    state.service.add_text, text.text, tenant, text.name, text.visibility, pid
                ),
            )
        if not ctype.startswith("multipart/form-data"):
            raise InvalidPrefixFile(
                f"expected multipart/form-data or application/json, got {ctype or 'none'!r}"
            )
        return await _add_upload(request, state, creation)

    @app.get("/jobs/{job_id}", tags=["jobs"], response_model=JobInfo, responses=ERRORS)
    async def get_job(job_id: str, request: Request, tenant: str = Depends(tenant_of)) -> JobInfo:
        """A training job's status, progress and loss curve (your own jobs only)."""
        return JobInfo.of(await _own_job(_state(request), job_id, tenant))

    @app.delete("/jobs/{job_id}", tags=["jobs"], response_model=JobInfo, responses=ERRORS)
    async def cancel_job(job_id: str, request: Request, tenant: str = Depends(tenant_of)) -> JobInfo:
        """Cancel a job: a queued one ends now, a running one within about a second."""
        state = _state(request)
        await _own_job(state, job_id, tenant)
        return JobInfo.of(await asyncio.to_thread(cancel, state.jobs, job_id))

    @app.get("/prefixes", tags=["prefixes"], response_model=PrefixList, responses=ERRORS)
    async def list_prefixes(request: Request, tenant: str = Depends(tenant_of)) -> PrefixList:
        """Your own prefixes and every public one."""
        metas = await asyncio.to_thread(_state(request).service.list, tenant)
        return PrefixList(prefixes=[PrefixInfo.of(m) for m in metas])

    @app.get("/prefixes/{prefix_id}", tags=["prefixes"], response_model=PrefixInfo, responses=ERRORS)
    async def get_prefix(prefix_id: str, request: Request, tenant: str = Depends(tenant_of)) -> PrefixInfo:
        return PrefixInfo.of(await _visible(_state(request), prefix_id, tenant))

    @app.delete("/prefixes/{prefix_id}", tags=["prefixes"], status_code=204, responses={**ERRORS, 403: {}})
    async def delete_prefix(prefix_id: str, request: Request, tenant: str = Depends(tenant_of)) -> None:
        """Delete one of your prefixes (public ones too); others' prefixes cannot be deleted."""
        state = _state(request)
        meta = await _visible(state, prefix_id, tenant)
        if meta.owner != tenant:
            raise Forbidden(
                f"prefix {prefix_id!r} is public but owned by another tenant; only its owner can delete it"
            )
        await asyncio.to_thread(state.service.delete, prefix_id)


_UPLOAD_DOC = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            "description": "a retry with the same key (per tenant, 24 h) gets the first answer again;"
            " the same key with a different request is 422",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "a native prefix file"},
                        "adapter_config": {
                            "type": "string",
                            "format": "binary",
                            "description": "PEFT config",
                        },
                        "adapter_model": {
                            "type": "string",
                            "format": "binary",
                            "description": "PEFT weights",
                        },
                        "train": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL {input, output}",
                        },
                        "hyperparameters": {"type": "string", "description": "JSON, with a train upload"},
                        "name": {"type": "string", "maxLength": 128},
                        "visibility": {"type": "string", "enum": ["private", "public"]},
                    },
                }
            },
            "application/json": {
                "schema": {"oneOf": [inline_schema(TextPrefixRequest), inline_schema(TrainPrefixRequest)]}
            },
        },
    },
}


async def start_generation(
    state: State, tenant: str, text: str, params: SamplingParams, prefix_id: str | None, rid: str
) -> tuple[EngineRequest, AsyncIterator[RequestOutput]]:
    """Admission, tenant check, validation and rate limits, then the request's output stream. No
    Redis or disk call waits on the event loop: the limiter is asyncio, a cold prefix's metadata is
    read on a thread (after which `prepare` finds it in memory)."""
    _admit(state)
    if prefix_id is not None:
        text += (await _visible(state, prefix_id, tenant)).input_suffix  # a trained prefix's separator
    prepared = state.engine.core.prepare(text, params, prefix_id, rid)
    await state.limiter.check(tenant, len(prepared.prompt_ids) + params.max_new_tokens)
    return prepared, _timed(state, tenant, state.engine.stream(prepared))


def _json_object(raw: bytes | str, field: str = "body") -> dict:
    try:
        data = parse_json(raw)
    except ValueError as exc:  # malformed, not UTF-8, or nested too deeply
        raise InvalidRequest(field, f"expected a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(field, f"expected a JSON object, got {type(data).__name__}")
    return data


def _new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class _Creation:
    """One POST /prefixes: its work runs under a planned id, through `Idempotency` when the request
    carries a key (a retry then gets the first answer), directly otherwise."""

    state: State
    tenant: str
    key: str | None

    async def prefix(
        self, fingerprint: Callable[[], str], add: Callable[[str], Awaitable[PrefixMeta]]
    ) -> JSONResponse:
        async def create(prefix_id: str) -> JSONResponse:
            return JSONResponse(PrefixInfo.of(await add(prefix_id)).model_dump(), 201)

        return await self._run(fingerprint, new_prefix_id(), create, self._recover_prefix)

    async def job(
        self, fingerprint: Callable[[], str], submit: Callable[[str], Awaitable[JSONResponse]]
    ) -> JSONResponse:
        return await self._run(fingerprint, _new_job_id(), submit, self._recover_job)

    async def _run(
        self,
        fingerprint: Callable[[], str],
        planned_id: str,
        create: Callable[[str], Awaitable[JSONResponse]],
        recover: Callable[[str], Awaitable[JSONResponse | None]],
    ) -> JSONResponse:
        if self.key is None:
            return await create(planned_id)
        return await self.state.idempotency.run(
            self.tenant, self.key, fingerprint(), planned_id, create, recover
        )

    async def _recover_prefix(self, prefix_id: str) -> JSONResponse | None:
        """The answer for a planned prefix id already published (by this tenant), else None."""
        try:
            meta = await asyncio.to_thread(self.state.service.meta, prefix_id)
        except PrefixNotFound:
            return None
        if meta.owner != self.tenant:
            return None
        return JSONResponse(PrefixInfo.of(meta).model_dump(), 201)

    async def _recover_job(self, job_id: str) -> JSONResponse | None:
        """The answer for a planned job id already queued (by this tenant), else None."""
        try:
            job = await asyncio.to_thread(self.state.jobs.get, job_id)
        except JobNotFound:
            return None
        if job.tenant != self.tenant:
            return None
        return JSONResponse(JobInfo.of(job).model_dump(), 202, headers={"Location": f"/jobs/{job.id}"})


async def _submit_training(
    state: State,
    tenant: str,
    hyper: Hyperparameters,
    examples,
    name: str,
    visibility: str,
    job_id: str | None = None,
) -> JSONResponse:
    """Validate the dataset now (not in the worker), store it durably, queue the job -> 202.
    `job_id`: the id planned for an idempotent request (a resumed one may find its dataset stored)."""
    cfg = hyper.config()
    data = await asyncio.to_thread(
        validate_dataset, examples, cfg, state.model, state.service.expect.max_prefix_len
    )
    job = Job(
        id=job_id or _new_job_id(),
        tenant=tenant,
        config=cfg.to_dict(),
        n_examples=len(examples),
        name=name,
        visibility=visibility,
    )
    if state.redis is not None:  # known down: 503 before writing anything that would need undoing
        state.redis.check("submitting a training job")
    store = state.service.store
    try:
        await asyncio.to_thread(store.put_training_data, job.id, data)  # 507 when the disk is full
    except PrefixExists:
        if job_id is None:
            raise
        # a resumed idempotent request: the same dataset (same fingerprint) was stored before a stop
    try:
        await asyncio.to_thread(state.jobs.submit, job)  # 503 + Retry-After when Redis is unavailable
    except Exception:
        await asyncio.to_thread(store.delete_training_data, job.id)  # no orphan dataset
        raise
    return JSONResponse(JobInfo.of(job).model_dump(), 202, headers={"Location": f"/jobs/{job.id}"})


async def _own_job(state: State, job_id: str, tenant: str) -> Job:
    job = await asyncio.to_thread(state.jobs.get, job_id)  # 503 + Retry-After when Redis is unavailable
    if job.tenant != tenant:  # another tenant's job is indistinguishable from none
        raise JobNotFound(job_id)
    return job


async def _visible(state: State, prefix_id: str, tenant: str) -> PrefixMeta:
    """The prefix's metadata if the tenant may use it; read from the store on a thread the first time."""
    try:
        meta = state.service.cached_meta(prefix_id)
        if meta is None:
            meta = await asyncio.to_thread(state.service.meta, prefix_id)
        return state.service.visible(prefix_id, tenant, meta)
    except InvalidPrefixFile:  # an id that cannot exist is simply not found
        raise PrefixNotFound(prefix_id) from None


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"the client left after {size} bytes of the request body") from None
    return b"".join(chunks)


async def _add_upload(request: Request, state: State, creation: _Creation) -> JSONResponse:
    limit = state.settings.max_upload_bytes
    body = await _read_limited(request, limit + 64 * 1024)  # the files plus the multipart framing

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(
            request.headers, chunks(), max_files=3, max_fields=8, max_part_size=limit
        ).parse()
    except MultiPartException as exc:
        raise InvalidPrefixFile(f"malformed multipart upload: {exc.message}") from None
    name = str(form.get("name") or "")
    visibility = str(form.get("visibility") or "private")
    if len(name) > 128 or visibility not in ("private", "public"):
        raise InvalidPrefixFile("name must be at most 128 characters and visibility 'private' or 'public'")
    try:
        check_text(name)  # a form's charset (utf-7, unicode_escape, ...) can decode to lone surrogates
    except ValueError as exc:
        raise InvalidRequest("name", str(exc)) from None
    files = {k: await v.read() for k, v in form.multi_items() if hasattr(v, "read")}
    texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    parts = [*files.items(), *((k, v.encode("utf-8", "surrogatepass")) for k, v in texts.items())]
    tenant, service = creation.tenant, state.service
    if set(files) == {"train"}:
        examples = parse_jsonl(files["train"])
        hyper = Hyperparameters.model_validate(
            _json_object(str(form.get("hyperparameters") or "{}"), "hyperparameters")
        )
        return await creation.job(
            lambda: fingerprint("form", parts),
            lambda job_id: _submit_training(state, tenant, hyper, examples, name, visibility, job_id),
        )
    if set(files) == {"file"}:
        return await creation.prefix(
            lambda: fingerprint("form", parts),
            lambda pid: asyncio.to_thread(service.add_file, files["file"], tenant, name, visibility, pid),
        )
    if set(files) == {"adapter_config", "adapter_model"}:
        cfg, weights = files["adapter_config"], files["adapter_model"]
        return await creation.prefix(
            lambda: fingerprint("form", parts),
            lambda pid: asyncio.to_thread(service.add_peft, cfg, weights, tenant, name, visibility, pid),
        )
    raise InvalidPrefixFile(
        "upload either 'file' (a prefix .safetensors), 'adapter_config' + 'adapter_model' (PEFT)"
        " or 'train' (a JSONL dataset);"
        f" got {sorted(files)}"
    )


# ---- generation helpers ------------------------------------------------------------------------
async def _timed(
    state: State, tenant: str, outputs: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    """Pass outputs through, recording time to first token, inter-token latency and token counts."""
    start = last = time.monotonic()
    first = True
    async for out in outputs:
        now = time.monotonic()
        if out.token_ids:
            (state.metrics.ttft if first else state.metrics.itl).observe(now - (start if first else last))
            state.metrics.count_tokens(tenant, len(out.token_ids))
            first, last = False, now
        yield out


async def _while_connected(request: Request, awaitable, timeout_s: float | None = None):
    """Await `awaitable`, checking every 50 ms that the client is still there (and, with `timeout_s`,
    the deadline); a client that leaves or a passed deadline cancels it."""
    task = asyncio.ensure_future(awaitable)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.05)
            if task.done():
                break
            if await request.is_disconnected():
                raise asyncio.CancelledError  # the finally below cancels the task
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"generation did not finish within {timeout_s}s")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _first(request: Request, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The first output of a stream; a client that leaves while its request waits aborts it."""
    try:
        return await _while_connected(request, anext(outputs))
    except BaseException:
        await outputs.aclose()  # aborts the sequence (a no-op if the stream already ended)
        raise


def _usage(out: RequestOutput) -> dict[str, int]:
    return {
        "prefix_tokens": out.prefix_tokens,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
    }


async def _sse(rid: str, prefix_id: str | None, first: RequestOutput, rest: AsyncIterator[RequestOutput]):
    """SSE events; leaving this generator early (client gone) closes `rest`, which aborts the request."""
    try:
        out = first
        while True:
            if out.token_ids or out.text:
                token = {"id": rid, "token_ids": out.token_ids, "text": out.text}
                yield f"event: token\ndata: {json.dumps(token)}\n\n"
            if out.finished:
                done = {
                    "id": rid,
                    "prefix_id": prefix_id,
                    "finish_reason": out.finish_reason.value,
                    "usage": _usage(out),
                }
                yield f"event: done\ndata: {json.dumps(done)}\n\n"
                return
            out = await anext(rest)
    except Exception as exc:  # after the headers went out, errors travel as an event
        yield _error_event(exc)
    finally:
        await rest.aclose()


async def _collect(
    request: Request, state: State, rid: str, prefix_id: str | None, outputs: AsyncIterator[RequestOutput]
) -> GenerateResponse:
    """Gather a whole answer; a client that disconnects or a passed deadline aborts the request."""

    async def gather() -> tuple[str, RequestOutput]:
        text, last = [], None
        async for out in outputs:
            text.append(out.text)
            last = out
        return "".join(text), last

    try:
        text, last = await _while_connected(request, gather(), state.settings.request_timeout_s)
    finally:
        await outputs.aclose()
    if last.finish_reason == FinishReason.CANCELLED:
        raise Draining("the request was cancelled because the server is stopping")
    return GenerateResponse(
        id=rid,
        prefix_id=prefix_id,
        text=text,
        finish_reason=last.finish_reason.value,
        usage=Usage(**_usage(last)),
    )
