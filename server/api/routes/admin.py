"""The admin API: tenants (weights, limits, status), their API keys, and every tenant's usage.

Every route needs the admin key (`PREFIXSERVE_ADMIN_KEY`), never a tenant's key. Changes are written to
the durable store and reach every replica within about `PREFIXSERVE_REGISTRY_REFRESH_S` (tenants.py):
a revoked key or a disabled tenant is refused everywhere without a restart.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query

from ...limits import MAX_USAGE_DAYS
from ...schemas.native import (
    AdminUsage,
    KeyCreate,
    KeyCreated,
    KeyInfo,
    KeyList,
    TenantCreate,
    TenantInfo,
    TenantList,
    TenantPatch,
    UsageDay,
)
from ...tenants import ApiKey, Tenant, TenantNotFound
from ..errors import ERRORS, BoundedJsonRoute
from ..state import AppState, State, admin_of

router = APIRouter(
    prefix="/admin", tags=["admin"], route_class=BoundedJsonRoute, dependencies=[Depends(admin_of)]
)
ADMIN_ERRORS = {**ERRORS, 403: ERRORS[401], 409: ERRORS[401]}


def tenant_info(state: State, tenant: Tenant) -> TenantInfo:
    registry = state.registry
    return TenantInfo(
        name=tenant.name,
        status=tenant.status,
        weight=tenant.weight,
        limits=tenant.limits,
        effective_limits=vars(state.limits(tenant.name)),
        source=tenant.source,
        keys=len(registry.keys_of(tenant.name)),
        config_keys=registry.config_keys_of(tenant.name),
        created_at=tenant.created_at,
        updated_at=tenant.updated_at,
    )


def key_info(key: ApiKey) -> KeyInfo:
    return KeyInfo(key_id=key.key_id, tenant=key.tenant, name=key.name, created_at=key.created_at)


def known(state: State, name: str) -> Tenant:
    tenant = state.registry.tenant(name)
    if tenant is None:
        raise TenantNotFound(name)
    return tenant


@router.post("/tenants", status_code=201, response_model=TenantInfo, responses=ADMIN_ERRORS)
async def create_tenant(state: AppState, body: TenantCreate) -> TenantInfo:
    """Add a tenant (409 if it exists); then issue it a key (`POST /admin/tenants/{name}/keys`)."""
    limits = body.limits.model_dump(exclude_none=True)
    tenant = await asyncio.to_thread(state.registry.create, body.name, body.status, body.weight, limits)
    return tenant_info(state, tenant)


@router.get("/tenants", response_model=TenantList, responses=ADMIN_ERRORS)
async def list_tenants(state: AppState) -> TenantList:
    """Every tenant: those in the registry and those known only from configured keys."""
    return TenantList(tenants=[tenant_info(state, t) for t in state.registry.tenants()])


@router.get("/tenants/{name}", response_model=TenantInfo, responses=ADMIN_ERRORS)
async def get_tenant(state: AppState, name: str) -> TenantInfo:
    return tenant_info(state, known(state, name))


@router.patch("/tenants/{name}", response_model=TenantInfo, responses=ADMIN_ERRORS)
async def update_tenant(state: AppState, name: str, body: TenantPatch) -> TenantInfo:
    """Change a tenant's status (`disabled`: its keys are refused by every replica within seconds),
    weight or limits (only the limits given change; null resets one to the server's default)."""
    limits = body.limits.model_dump(exclude_unset=True) if body.limits is not None else None
    tenant = await asyncio.to_thread(state.registry.update, name, body.status, body.weight, limits)
    return tenant_info(state, tenant)


@router.post("/tenants/{name}/keys", status_code=201, response_model=KeyCreated, responses=ADMIN_ERRORS)
async def issue_key(state: AppState, name: str, body: KeyCreate | None = None) -> KeyCreated:
    """A new API key for the tenant. The key is in this answer only: the server keeps its digest."""
    record, key = await asyncio.to_thread(state.registry.issue_key, name, (body or KeyCreate()).name)
    return KeyCreated(**key_info(record).model_dump(), key=key)


@router.get("/tenants/{name}/keys", response_model=KeyList, responses=ADMIN_ERRORS)
async def list_keys(state: AppState, name: str) -> KeyList:
    """The tenant's issued keys (ids and labels, never the keys)."""
    known(state, name)
    keys = [key_info(k) for k in state.registry.keys_of(name)]
    return KeyList(keys=keys, config_keys=state.registry.config_keys_of(name))


@router.delete("/tenants/{name}/keys/{key_id}", status_code=204, responses=ADMIN_ERRORS)
async def revoke_key(state: AppState, name: str, key_id: str) -> None:
    """Revoke a key: refused by every replica within seconds."""
    await asyncio.to_thread(state.registry.revoke_key, name, key_id)


@router.get("/usage", response_model=AdminUsage, responses=ADMIN_ERRORS)
async def all_usage(
    state: AppState,
    days: int = Query(7, ge=1, le=MAX_USAGE_DAYS, description="this many days back, today included"),
    tenant: str | None = Query(None, description="one tenant only"),
) -> AdminUsage:
    """Every tenant's usage per day (requests, tokens, training and evaluation work, bytes stored)."""
    rows = await state.usage.read(days, tenant)
    return AdminUsage(days=[UsageDay(**row) for row in rows])
