"""Scale-out on Ray Serve: N engine replicas behind the same FastAPI app, routed by prefix affinity.

Two deployments make the application:

  PrefixServeAPI   the ingress: the same app as `prefixserve serve` (auth, validation, tokenization,
                   detokenization, stop strings, SSE), with a `RayEngineClient` (a front-end,
                   engine/frontend.py) where the engine client was; one or more replicas.
  PrefixEngine     an engine replica: the EngineCore on a thread (AsyncEngine), its device pool, the
                   shared store (S3 or any fsspec URL) and the shared Redis (cache, limits, queue).

Each request is sent to the engine deployment through a deployment handle with its prefix id as the
**multiplexed model id** (`@serve.multiplexed`): Ray's router sends it to a replica that already holds
that prefix, and "loading the model" is making the prefix resident in that replica's device pool
(pinned while Ray counts it as loaded; released when Ray's LRU unloads it, after which the pool may
evict it). `max_num_models_per_replica` is the number of prefixes the device pool holds
(`ServerSettings.replica_prefixes`). Requests without a prefix carry no model id and go to any replica.
A prefix uploaded through any ingress replica is in the shared store, so every engine replica can
load it at once.

Payloads between the deployments are msgspec MessagePack bytes (engine/wire.py); Ray's own transport
between the cluster's processes carries them. Each engine replica announces its stats in Redis
(scale/replicas.py); the ingress reads them for /metrics (including the residency gauge) and /ready.
A replica that dies mid-request makes its streams end with 503 (`EngineStopped`, retryable: the SDK
retries), new requests go to the live replicas, and Ray Serve starts a new replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, replace

import msgspec
import ray
import torch
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from transformers import PreTrainedTokenizerBase

from prefix_store.redis_health import RedisHealth
from prefix_store.service import PrefixService

from ..compile import bind_model
from ..engine import AsyncEngine, EngineConfig, EngineCore
from ..engine.frontend import EngineStopped, Frontend
from ..engine.prepare import RequestPreparer
from ..engine.process import compile_answer
from ..engine.request import Request, RequestOutput
from ..engine.wire import Add, Compile, Compiled, EngineStats, ModelCard, Output, RemoteError, encode
from ..errors import PrefixServeError
from ..loading import load_configured_model
from ..model import ModelSpec, parse_dtype
from ..settings import ServerSettings
from .replicas import ReplicaPublisher, ReplicaWatcher

log = logging.getLogger(__name__)
APP_NAME = "prefixserve"
ENGINE = "PrefixEngine"
API = "PrefixServeAPI"
LOAD_POLL_S = 0.005
LOAD_WAIT_S = 30.0  # a prefix load that takes longer is left to the request's own admission

_decode_add = msgspec.msgpack.Decoder(Add)
_decode_output = msgspec.msgpack.Decoder(Output)
_decode_compile = msgspec.msgpack.Decoder(Compile)
_decode_compiled = msgspec.msgpack.Decoder(Compiled)
_decode_card = msgspec.msgpack.Decoder(ModelCard)


# ---- the engine replica ------------------------------------------------------------------------
class _Resident:
    """A prefix Ray counts as loaded on this replica: pinned in the device pool until unloaded."""

    def __init__(self, pool, prefix_id: str, pinned: bool) -> None:
        self.pool, self.prefix_id, self.pinned = pool, prefix_id, pinned

    def __del__(self) -> None:  # Ray calls it when its LRU unloads the prefix (and Python may again)
        if self.pinned:
            self.pinned = False
            self.pool.release(self.prefix_id)


class EngineReplica:
    """The body of the engine deployment (`engine_deployment` adds the multiplexed loader)."""

    def __init__(self, settings: dict, max_prefixes: int) -> None:
        self.settings = ServerSettings(**settings)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s engine replica: %(message)s"
        )
        self.model = model = load_configured_model(self.settings)
        redis_cfg = self.settings.redis_config()
        health = RedisHealth(redis_cfg) if redis_cfg is not None else None
        self.service = PrefixService(bind_model(model), self.settings.store_config(), redis_health=health)
        self.card = ModelCard(model.served_name, model.fingerprint, self.service.model.bounds)
        config = EngineConfig.from_settings(self.settings)  # (the ingress makes the text)
        self.engine = AsyncEngine(EngineCore(model, config, prefixes=self.service.pool))
        self.engine.start()
        self.max_prefixes = max_prefixes
        self.replica_id = _replica_id()
        self.publisher = ReplicaPublisher(redis_cfg, self.replica_id, self.stats) if redis_cfg else None
        if self.publisher is not None:
            self.publisher.start()

    async def describe(self) -> bytes:
        """The served model as an ingress that holds none needs it (a `ModelCard`, MessagePack)."""
        return encode(self.card)

    async def compile(self, frame: bytes) -> bytes:
        """A prefix's K/V made with this replica's model (a `Compile` in, a `Compiled` out, MessagePack)."""
        return encode(await asyncio.to_thread(compile_answer, self.model, _decode_compile.decode(frame)))

    def stats(self) -> EngineStats:
        return replace(
            self.engine.stats(), prefix_loads=self.service.stats.snapshot(), max_prefixes=self.max_prefixes
        )

    async def load_prefix(self, prefix_id: str) -> _Resident:
        """Make a prefix resident in this replica's device pool (Ray's "load the model"). A prefix that
        cannot load (or not within LOAD_WAIT_S) is not an error here: the request's own admission
        reports it, as on one machine. Ray loads one prefix at a time per replica, hence the deadline."""
        pool = self.service.pool
        try:
            await asyncio.to_thread(pool.acquire, prefix_id)  # (its length may come from the store)
        except PrefixServeError:
            return _Resident(pool, prefix_id, pinned=False)
        try:
            deadline = time.monotonic() + LOAD_WAIT_S
            while not pool.is_ready(prefix_id) and pool.failure(prefix_id) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError
                await asyncio.sleep(LOAD_POLL_S)
            if pool.failure(prefix_id) is not None:
                raise LookupError
        except (TimeoutError, LookupError):
            pool.release(prefix_id)
            return _Resident(pool, prefix_id, pinned=False)
        except BaseException:  # cancelled (the client went away): the pin goes with it
            pool.release(prefix_id)
            raise
        return _Resident(pool, prefix_id, pinned=True)

    async def generate(self, frame: bytes) -> AsyncIterator[bytes]:
        """Stream one request (an `Add`, MessagePack): one `Output` (MessagePack) per new token."""
        add = _decode_add.decode(frame)
        if add.prefix_id is not None:
            await self.get_prefix(add.prefix_id)  # multiplexed: resident here from now on
        try:
            async for out in self.engine.outputs(add.request()):
                yield encode(Output.of(out))
        except PrefixServeError as exc:  # refused at admission, or the engine stopped
            error = RemoteError.wire(exc)
            yield encode(Output(add.request_id, [], "error", add.prefix_len, len(add.prompt_ids), 0, error))

    def __del__(self) -> None:
        if getattr(self, "publisher", None) is not None:
            self.publisher.stop()


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (not expected): any unique name
        return uuid.uuid4().hex[:8]


def engine_deployment(settings: ServerSettings, max_prefixes: int):
    """The engine deployment class, its multiplexed loader sized to `max_prefixes` per replica."""

    class PrefixEngine(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_prefixes)
        async def get_prefix(self, prefix_id: str) -> _Resident:
            return await self.load_prefix(prefix_id)

    gpus = settings.ray_gpus_per_replica
    if gpus < 0:
        gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    options: dict = {
        "name": ENGINE,
        "ray_actor_options": {"num_cpus": settings.ray_cpus_per_replica, "num_gpus": gpus},
        # what the engine itself would take (batch + queue); beyond it Ray holds requests back
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        # a replica that stops answering is replaced within seconds (its requests answer 503 at once)
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }
    if settings.ray_max_replicas > settings.ray_replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_replicas,
            "initial_replicas": settings.ray_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
        }
    else:
        options["num_replicas"] = settings.ray_replicas
    return serve.deployment(**options)(PrefixEngine)


# ---- the ingress's engine client ---------------------------------------------------------------
class RayEngineClient(Frontend):
    """A front-end (an `EngineClient`, its text made here) over a Ray Serve deployment handle: each
    request is one streaming call with its prefix as the multiplexed model id."""

    def __init__(self, handles: list, preparer: RequestPreparer, watcher: ReplicaWatcher | None) -> None:
        # one handle (affinity routing), or one per single-replica deployment (random routing)
        self.handles, self.preparer, self.watcher = handles, preparer, watcher
        self.model: ModelCard | None = None  # the served model's names and upload bounds (a replica's)
        self.on_step = None  # (step sizes are the replicas' own; the batch histogram stays empty)
        self._stopping: asyncio.Task | None = None

    async def start(self) -> None:
        if self.watcher is not None:
            self.watcher.start()
        self.model = _decode_card.decode(await self.handles[0].describe.remote())

    async def compile(
        self, token_ids: list[int] | None = None, embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A prefix's K/V `[n_layer, 2, n_head, P, head_dim]` (float32, CPU) made by an engine replica's
        model from a text's token ids or a soft prompt's embeddings `[P, n_embd]`."""
        frame = encode(Compile.of(uuid.uuid4().hex, token_ids, embeds))
        try:
            answer = _decode_compiled.decode(await random.choice(self.handles).compile.remote(frame))
        except (RayError, BackPressureError, DeploymentUnavailableError) as exc:  # retryable
            raise EngineStopped("the engine replica compiling this prefix stopped; retry") from exc
        return answer.tensor(self.preparer.spec)

    def stop(self) -> None:
        if self.watcher is not None:
            self._stopping = asyncio.get_running_loop().create_task(self.watcher.stop())

    @property
    def running(self) -> bool:
        """Some engine replica is alive (announced itself within its record's TTL), as last read."""
        return self.watcher is None or not self.watcher.heard or bool(self.watcher.replicas)

    def replica_stats(self) -> dict[str, EngineStats]:
        return dict(self.watcher.replicas) if self.watcher is not None else {}

    def stats(self) -> EngineStats:
        """The replicas' stats summed (their residency lists merged)."""
        return merge_stats(list(self.replica_stats().values()))

    async def outputs(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Send a prepared request to an engine replica (by prefix affinity); its outputs as the replica
        makes them (token ids). Closed early, it cancels the call (the replica aborts the request)."""
        handle = random.choice(self.handles).options(
            multiplexed_model_id=request.prefix_id or "", stream=True
        )
        wire_id = uuid.uuid4().hex[:12] + ":" + request.request_id
        responses = handle.generate.remote(encode(Add.of(request, wire_id)))
        done = False
        try:
            async for frame in responses:
                item = _decode_output.decode(frame)
                done = item.finish_reason is not None
                yield item.result(request.request_id)
        except (RayError, BackPressureError, DeploymentUnavailableError) as exc:  # retryable
            log.warning("an engine replica failed a request: %s", type(exc).__name__)
            raise EngineStopped("the engine replica serving this request stopped; retry the request") from exc
        finally:
            if not done:
                responses.cancel()

    def evict(self, prefix_id: str) -> None:
        """A deleted prefix: the ingress no longer lets requests name it (the store says it is gone), and
        the replicas holding it let it go as their LRUs move on."""


def merge_stats(stats: list[EngineStats]) -> EngineStats:
    loads: dict[str, int] = {}
    for s in stats:
        for key, value in s.prefix_loads.items():
            loads[key] = loads.get(key, 0) + value
    return EngineStats(
        waiting=sum(s.waiting for s in stats),
        running=sum(s.running for s in stats),
        kv_blocks_total=sum(s.kv_blocks_total for s in stats),
        kv_blocks_free=sum(s.kv_blocks_free for s in stats),
        kv_blocks_prefixes=sum(s.kv_blocks_prefixes for s in stats),
        preemptions=sum(s.preemptions for s in stats),
        steps=sum(s.steps for s in stats),
        prefix_loads=loads,
        running_prefixes=sorted({p for s in stats for p in s.running_prefixes}),
        waiting_prefixes=sorted({p for s in stats for p in s.waiting_prefixes}),
        max_prefixes=sum(s.max_prefixes for s in stats),
        max_running=sum(s.max_running for s in stats),
        resident_prefixes=sum(s.resident_prefixes for s in stats),
        resident_bytes=sum(s.resident_bytes for s in stats),
        pool_budget_bytes=sum(s.pool_budget_bytes for s in stats),
        cuda_graphs=_agreed([s.cuda_graphs for s in stats], EngineStats.cuda_graphs),
        decode_kernel=_agreed([s.decode_kernel for s in stats], EngineStats.decode_kernel),
    )


def _agreed(values: list[str], default: str) -> str:
    """The replicas' one value (`default` without replicas), or "mixed: a, b" when they differ (say, a
    replica whose capture failed)."""
    found = sorted(set(values))
    return (found[0] if found else default) if len(found) <= 1 else "mixed: " + ", ".join(found)


async def ray_engine(
    settings: ServerSettings, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec
) -> RayEngineClient:
    """The ingress's engine: a handle on the engine deployment of this application."""
    names = [ENGINE] if settings.ray_routing == "affinity" else _random_names(settings)
    handles = [serve.get_deployment_handle(name, app_name=APP_NAME) for name in names]
    redis_cfg = settings.redis_config()
    watcher = ReplicaWatcher(redis_cfg) if redis_cfg is not None else None
    preparer = RequestPreparer.serving(tokenizer, spec, settings.max_seq_len)
    client = RayEngineClient(handles, preparer, watcher)
    await client.start()
    return client


# ---- the application ---------------------------------------------------------------------------
def replica_prefixes(settings: ServerSettings, spec: ModelSpec) -> int:
    """Prefixes per engine replica: the setting, or as many of the longest allowed prefix as the device
    pool's bytes hold (at least 1)."""
    if settings.replica_prefixes > 0:
        return settings.replica_prefixes
    per_prefix = spec.kv_bytes(settings.max_prefix_len, parse_dtype(settings.dtype).itemsize)
    return max(1, settings.device_pool_bytes // per_prefix)


def build_application(settings: ServerSettings, max_prefixes: int):
    """The Serve application: the ingress bound to the engine deployment."""
    from ..app import create_app

    values = asdict(settings)

    # the ingress holds no model with Redis (the replicas compile and describe it), else a copy on the CPU
    # for the training worker it runs: the GPUs are the engines'
    def build_api():
        return create_app(replace(ServerSettings(**values), device="cpu"), engine_factory=ray_engine)

    # the ingress waits on I/O (HTTP, the engines' streams): it reserves no core, so N engine replicas of
    # one core each fit an N-core host
    ingress = serve.deployment(
        name=API, num_replicas=settings.ray_api_replicas, ray_actor_options={"num_cpus": 0}
    )(serve.ingress(build_api)())
    if settings.ray_routing == "affinity":
        engines = [engine_deployment(settings, max_prefixes).bind(values, max_prefixes)]
    elif settings.ray_routing == "random":
        single = replace(settings, ray_replicas=1, ray_max_replicas=0)
        deployment = engine_deployment(single, max_prefixes)
        engines = [
            deployment.options(name=name).bind(values, max_prefixes) for name in _random_names(settings)
        ]
    else:
        raise ValueError(
            f"PREFIXSERVE_RAY_ROUTING: expected affinity or random, got {settings.ray_routing!r}"
        )
    return ingress.bind(*engines)


def _random_names(settings: ServerSettings) -> list[str]:
    return [f"{ENGINE}-{i}" for i in range(settings.ray_replicas)]


def app_builder(args: dict) -> serve.Application:
    """For `serve run prefixserve.scale.ray_serve:app_builder [key=value ...]` (or a Serve config file):
    ServerSettings from PREFIXSERVE_* variables, overridden by the given keys."""
    settings = ServerSettings.from_env(**{k: _typed(ServerSettings, k, v) for k, v in args.items()})
    return build_application(settings, _max_prefixes(settings))


def _typed(cls, name: str, value: str):
    kind = type(cls.__dataclass_fields__[name].default)
    if kind is bool:
        return str(value).strip().lower() in ("1", "true", "yes", "on")
    return kind(value)


def _max_prefixes(settings: ServerSettings) -> int:
    from ..loading import configured_spec

    return replica_prefixes(settings, configured_spec(settings))


def serve_ray(settings: ServerSettings) -> None:
    """`prefixserve serve --ray`: start (or join) a Ray cluster and run the application on it until
    interrupted. Redis (`PREFIXSERVE_REDIS_URL`) and a shared store (`PREFIXSERVE_STORE_URL`) are
    required: the replicas share them."""
    if not settings.redis_url:
        raise SystemExit("prefixserve serve --ray needs PREFIXSERVE_REDIS_URL (the replicas share Redis)")
    env = {k: v for k, v in os.environ.items() if k.startswith(("PREFIXSERVE_", "AWS_", "HF_"))}
    ray.init(address=settings.ray_address or None, runtime_env={"env_vars": env}, ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_application(settings, _max_prefixes(settings))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
