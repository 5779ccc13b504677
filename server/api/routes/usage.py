"""GET /usage: the calling tenant's own usage per day, what it stores now, and its limits."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query

from ...limits import MAX_USAGE_DAYS
from ...schemas.native import StoredNow, UsageDay, UsageReport
from ...usage import totals
from ..errors import ERRORS, BoundedJsonRoute
from ..state import AppState, TenantName

router = APIRouter(tags=["usage"], route_class=BoundedJsonRoute)


@router.get("/usage", response_model=UsageReport, responses=ERRORS)
async def usage(
    state: AppState,
    tenant: TenantName,
    days: int = Query(7, ge=1, le=MAX_USAGE_DAYS, description="this many days back, today included"),
) -> UsageReport:
    """Your usage per UTC day (newest first): requests, prompt / prefix / generated tokens, training
    examples x epochs, evaluation examples and bytes of prefixes added; their totals; the prefixes you
    store now; and the limits that apply to you (0: unlimited)."""
    rows = await state.usage.read(days, tenant)
    count, size = await asyncio.to_thread(state.service.owned, tenant)
    return UsageReport(
        tenant=tenant,
        days=[UsageDay(**row) for row in rows],
        totals=UsageDay(**totals(rows, tenant)),
        stored=StoredNow(prefixes=count, bytes=size),
        limits=vars(state.limits(tenant)),
    )
