"""Storage and job quotas, checked where prefixes and jobs are created. (Rates are the limiter's,
`prefixserve.ratelimit`; concurrency is the engine's, which sees every API process's requests.)

A quota refusal names the quota, the usage and the limit: 403 for storage (only deleting frees it), 429
with Retry-After for jobs (they end by themselves). Two creations racing on different replicas may both
pass a check: a quota can be overshot by what was in flight at that moment, never more.
"""

from __future__ import annotations

import asyncio

from prefix_store.service import Admit

from ..errors import QuotaExceeded
from .state import State

JOB_RETRY_S = 30.0


async def prefix_admission(state: State, tenant: str) -> Admit | None:
    """Before a prefix is created: refuses (403) a tenant at its max_stored_prefixes; returns the check
    of the new file's size against max_stored_bytes (PrefixService's `admit`), or None (no quota)."""
    limits = state.limits(tenant)
    if not (limits.max_stored_prefixes or limits.max_stored_bytes):
        return None
    count, size = await asyncio.to_thread(state.service.owned, tenant)
    if limits.max_stored_prefixes and count + 1 > limits.max_stored_prefixes:
        raise QuotaExceeded(
            tenant, "max_stored_prefixes", count, limits.max_stored_prefixes, "prefixes stored", status=403
        )

    def admit(new_bytes: int) -> None:
        if limits.max_stored_bytes and size + new_bytes > limits.max_stored_bytes:
            what = f"bytes stored with this {new_bytes}-byte prefix"
            raise QuotaExceeded(
                tenant, "max_stored_bytes", size + new_bytes, limits.max_stored_bytes, what, status=403
            )

    return admit


async def check_job(state: State, tenant: str, trains: bool) -> None:
    """Before a job is queued: max_active_jobs (429), and for a training job the storage quotas, its
    queued and running jobs counted as prefixes to come (403)."""
    limits = state.limits(tenant)
    if not (limits.max_active_jobs or (trains and (limits.max_stored_prefixes or limits.max_stored_bytes))):
        return
    active = await asyncio.to_thread(state.jobs.active, tenant)
    if limits.max_active_jobs and active >= limits.max_active_jobs:
        raise QuotaExceeded(
            tenant, "max_active_jobs", active, limits.max_active_jobs, "jobs queued or running", JOB_RETRY_S
        )
    if not trains:
        return
    count, size = await asyncio.to_thread(state.service.owned, tenant)
    if limits.max_stored_prefixes and count + active + 1 > limits.max_stored_prefixes:
        raise QuotaExceeded(
            tenant,
            "max_stored_prefixes",
            count + active,
            limits.max_stored_prefixes,
            "prefixes stored or being trained",
            status=403,
        )
    if limits.max_stored_bytes and size >= limits.max_stored_bytes:
        raise QuotaExceeded(
            tenant, "max_stored_bytes", size, limits.max_stored_bytes, "bytes stored", status=403
        )
