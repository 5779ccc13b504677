"""Training jobs: status and cancellation (a tenant sees only its own jobs)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query

from ...limits import MAX_JOBS_LISTED
from ...schemas.native import JobInfo, JobList
from ...training.jobs import Job, JobNotFound, cancel
from ..errors import ERRORS, BoundedJsonRoute
from ..state import AppState, State, TenantName

router = APIRouter(tags=["jobs"], route_class=BoundedJsonRoute)


async def _own_job(state: State, job_id: str, tenant: str) -> Job:
    job = await asyncio.to_thread(state.jobs.get, job_id)  # 503 + Retry-After when Redis is unavailable
    if job.tenant != tenant:  # another tenant's job is indistinguishable from none
        raise JobNotFound(job_id)
    return job


@router.get("/jobs", response_model=JobList, responses=ERRORS)
async def list_jobs(
    state: AppState,
    tenant: TenantName,
    limit: int = Query(50, ge=1, le=MAX_JOBS_LISTED, description="at most this many, newest first"),
) -> JobList:
    """Your training and evaluation jobs, newest first (the web console's Jobs page)."""
    jobs = await asyncio.to_thread(state.jobs.list, tenant, limit)
    return JobList(jobs=[JobInfo.of(job) for job in jobs])


@router.get("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def get_job(state: AppState, job_id: str, tenant: TenantName) -> JobInfo:
    """A training job's status, progress and loss curve (your own jobs only)."""
    return JobInfo.of(await _own_job(state, job_id, tenant))


@router.delete("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def cancel_job(state: AppState, job_id: str, tenant: TenantName) -> JobInfo:
    """Cancel a job: a queued one ends now, a running one within about a second."""
    await _own_job(state, job_id, tenant)
    return JobInfo.of(await asyncio.to_thread(cancel, state.jobs, job_id))
