"""The per-app `State` (built by the lifespan in `prefixserve.app`) and the dependencies through which
routes reach it and the caller's tenant."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from prefix_store.format import InvalidPrefixFile, PrefixMeta
from prefix_store.redis_health import RedisHealth
from prefix_store.service import PrefixService

from ..auth import Authenticator
from ..compile import RemoteModel
from ..engine import EngineClient
from ..engine.request import Tenancy
from ..errors import PrefixNotFound
from ..idempotency import Idempotency
from ..metrics import Metrics
from ..model import LoadedModel
from ..ratelimit import RateLimiter
from ..settings import ServerSettings
from ..tenants import Limits, TenantRegistry
from ..training.jobs import JobQueue
from ..usage import UsageMeter
from .errors import Draining


@dataclass
class State:
    settings: ServerSettings
    model: LoadedModel | RemoteModel  # (RemoteModel: no weights here, the engine process has them)
    service: PrefixService
    engine: EngineClient  # in this process, in its own (engine/process.py), or on Ray Serve
    auth: Authenticator  # keys -> tenants (its registry holds the tenants, their weights and limits)
    limiter: RateLimiter
    metrics: Metrics
    jobs: JobQueue
    redis: RedisHealth | None = None  # shared by the cache, the limiter and the job queue
    ready: bool = False
    draining: bool = False
    idempotency: Idempotency = field(kw_only=True)  # Idempotency-Key records on POST /prefixes
    usage: UsageMeter = field(kw_only=True)  # what each tenant used, per day

    def admit(self) -> None:
        """Refuse new work (503) while the server is not ready yet or draining."""
        if self.draining or not self.ready:
            raise Draining("the server is shutting down or not ready; retry on another replica")

    @property
    def registry(self) -> TenantRegistry:
        return self.auth.registry

    def limits(self, tenant: str) -> Limits:
        """The tenant's limits: its registry record's over the server's defaults."""
        record = self.registry.tenant(tenant)
        defaults = self.settings.tenant_limits()
        return record.resolved(defaults) if record is not None else defaults

    def tenancy(self, tenant: str) -> Tenancy:
        """What the engine needs to know of the tenant to share itself fairly (weight, concurrency cap)."""
        record = self.registry.tenant(tenant)
        weight = record.weight if record is not None else 1.0
        return Tenancy(tenant, weight, self.limits(tenant).max_concurrent)

    async def visible(self, prefix_id: str, tenant: str) -> PrefixMeta:
        """The prefix's metadata if the tenant may use it; read from the store on a thread the first
        time. An unknown id and another tenant's private one are the same 404."""
        try:
            meta = self.service.cached_meta(prefix_id)
            if meta is None:
                meta = await asyncio.to_thread(self.service.meta, prefix_id)
            return self.service.visible(prefix_id, tenant, meta)
        except InvalidPrefixFile:  # an id that cannot exist is simply not found
            raise PrefixNotFound(prefix_id) from None


def get_state(request: Request) -> State:
    """The app's State (a route's dependency: `state: AppState`)."""
    return request.app.state.s


async def tenant_of(request: Request) -> str:
    """Authenticate; the tenant's name (401 without a valid key, 403 for a disabled tenant). A dependency
    of every tenant route: async, so FastAPI runs it on the loop (a hash and two lookups in memory, no
    I/O) rather than hop to a thread."""
    tenant = get_state(request).auth.tenant(request.headers.get("authorization")).name
    request.state.tenant = tenant
    return tenant


async def admin_of(request: Request) -> None:
    """Authenticate the admin key (the dependency of every /admin route): 401 without it, 403 for a
    tenant's key or when the server has no admin key."""
    get_state(request).auth.admin(request.headers.get("authorization"))


# what a route declares it needs: `state: AppState, tenant: TenantName`
AppState = Annotated[State, Depends(get_state)]  # the server's state
TenantName = Annotated[str, Depends(tenant_of)]  # the authenticated caller's tenant
