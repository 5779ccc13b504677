"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...schemas.native import ErrorResponse, ServerStats, TierLoads
from ..errors import ERRORS, BoundedJsonRoute, Draining, error_response
from ..state import AppState, State, TenantName

router = APIRouter(tags=["ops"], route_class=BoundedJsonRoute)


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request):
    """Readiness: the model is loaded and warmed up (independent of Redis, whose state it reports:
    "up", "down" (generation still works, from the durable store) or "none" (not configured))."""
    state: State | None = getattr(request.app.state, "s", None)
    if state is None or not state.ready or state.draining:
        return error_response(Draining("not ready"))
    if not state.engine.running:  # e.g. its process died and is being started again
        return error_response(Draining("the engine is not running; retry shortly"))
    spec = state.model.spec
    return {
        "status": "ready",
        "redis": state.redis.state if state.redis is not None else "none",
        "model": {
            "name": state.model.served_name,  # the base model's id in /v1/models
            "fingerprint": state.model.fingerprint,
            "dtype": str(state.model.dtype),
            "family": spec.family,  # the forward pass: "gpt2" or "llama" (Llama, Qwen2, Mistral)
            "n_layer": spec.n_layer,
            "n_head": spec.n_head,
            "n_kv_head": spec.n_kv_head,
            "n_embd": spec.n_embd,
            "n_positions": spec.n_positions,
            "vocab_size": spec.vocab_size,
        },
    }


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)
async def metrics(request: Request, state: AppState) -> PlainTextResponse:
    """Prometheus metrics. With PREFIXSERVE_METRICS_KEY set, only for `Authorization: Bearer <that
    key>`; otherwise, when auth is on, only for loopback clients (401 / 403). Tenant labels are
    pseudonyms unless PREFIXSERVE_METRICS_TENANT_LABELS=true."""
    metrics = state.metrics
    metrics.access.check(request.headers.get("authorization"), request.client and request.client.host)
    return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/server/stats", response_model=ServerStats, responses=ERRORS)
async def server_stats(state: AppState, tenant: TenantName) -> ServerStats:
    """Batch occupancy, throughput, queue depth, device-pool residency and prefix-cache hit rates, for
    any tenant's key: aggregate figures only (no prefix ids, no tenant names; those stay in /metrics)."""
    metrics, engine = state.metrics, state.engine.stats()
    return ServerStats(
        model=state.model.served_name,
        redis=state.redis.state if state.redis is not None else "none",
        running=engine.running,
        max_running=engine.max_running,
        waiting=engine.waiting,
        kv_blocks_total=engine.kv_blocks_total,
        kv_blocks_free=engine.kv_blocks_free,
        kv_blocks_prefixes=engine.kv_blocks_prefixes,
        preemptions=engine.preemptions,
        tokens_per_s=metrics.token_rate.per_second(),
        tokens_total=metrics.tokens_total,
        resident_prefixes=engine.resident_prefixes,
        resident_bytes=engine.resident_bytes,
        pool_budget_bytes=engine.pool_budget_bytes,
        prefix_loads=tier_loads(metrics.prefix_loads()),
        cuda_graphs=engine.cuda_graphs,
        decode_kernel=engine.decode_kernel,
    )


def tier_loads(counts: dict[str, int]) -> dict[str, TierLoads]:
    """{"device_hits": 3, "device_evictions": 1, ...} -> {"device": TierLoads(hits=3, ...)}."""
    tiers: dict[str, TierLoads] = {}
    for key, n in sorted(counts.items()):
        tier, _, result = key.partition("_")
        loads = tiers.setdefault(tier, TierLoads())
        if result in ("hits", "misses"):
            setattr(loads, result, n)
        else:
            loads.other[result] = n
    for loads in tiers.values():
        looked = loads.hits + loads.misses
        loads.hit_rate = loads.hits / looked if looked else None
    return tiers
