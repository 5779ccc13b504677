"""Creating prefixes and queuing jobs for the routes: each creation runs under an id planned before any
work, through `Idempotency` when the request carries a key (a retry gets the first answer, even after a
restart), and a job is queued only after its tenant's quotas allow it and its examples are stored
durably (`queue_job`). The routes parse bodies and call these."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from prefix_store.format import PrefixMeta
from prefix_store.service import Admit, new_prefix_id
from prefix_store.store import PrefixExists

from ..errors import PrefixNotFound
from ..schemas.native import JobInfo, PrefixInfo
from ..training.data import Hyperparameters, TrainExample, validate_dataset
from ..training.jobs import Job, JobNotFound
from .quotas import check_job, prefix_admission
from .state import State


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:16]}"


def job_accepted(job: Job) -> JSONResponse:
    """202 with the job (and where to follow it)."""
    return JSONResponse(JobInfo.of(job).model_dump(), 202, headers={"Location": f"/jobs/{job.id}"})


@dataclass(frozen=True)
class Creation:
    """One POST /prefixes: its work runs under a planned id, through `Idempotency` when the request
    carries a key (a retry then gets the first answer), directly otherwise."""

    state: State
    tenant: str
    key: str | None

    async def prefix(
        self, fingerprint: Callable[[], str], add: Callable[[str, Admit | None], Awaitable[PrefixMeta]]
    ) -> JSONResponse:
        """`add(prefix_id, admit)` creates it; `admit` checks its size against the tenant's quota."""

        async def create(prefix_id: str) -> JSONResponse:
            admit = await prefix_admission(self.state, self.tenant)
            meta = await add(prefix_id, admit)  # new: no evaluations yet
            return await self._created(meta)

        return await self._run(fingerprint, new_prefix_id(), create, self._recover_prefix)

    async def job(
        self, fingerprint: Callable[[], str], submit: Callable[[str], Awaitable[JSONResponse]]
    ) -> JSONResponse:
        """`submit(job_id)` queues it (`submit_training`)."""
        return await self._run(fingerprint, new_job_id(), submit, self._recover_job)

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
        return await self._created(meta)  # (counted now if the stop came between storing and counting)

    async def _created(self, meta: PrefixMeta) -> JSONResponse:
        """The answer for a prefix this request created; its bytes counted in the tenant's usage once
        per prefix (a replayed or resumed request counts nothing again)."""
        size = self.state.service.size(meta.id)
        await asyncio.to_thread(
            self.state.usage.record_once, f"prefix:{meta.id}", self.tenant, stored_bytes=size or 0
        )
        return JSONResponse(PrefixInfo.of(meta, [], size).model_dump(), 201)

    async def _recover_job(self, job_id: str) -> JSONResponse | None:
        """The answer for a planned job id already queued (by this tenant), else None."""
        try:
            job = await asyncio.to_thread(self.state.jobs.get, job_id)
        except JobNotFound:
            return None
        if job.tenant != self.tenant:
            return None
        return job_accepted(job)


async def submit_training(
    state: State,
    tenant: str,
    hyper: Hyperparameters,
    examples: list[TrainExample],
    name: str,
    visibility: str,
    job_id: str,
) -> JSONResponse:
    """Validate the dataset now (not in the worker), store it durably, queue the job -> 202.
    `job_id`: the planned id (a resumed idempotent request may find its dataset already stored)."""
    cfg = hyper.config()
    data = await asyncio.to_thread(
        validate_dataset, examples, cfg, state.model, state.service.expect.max_prefix_len
    )
    job = Job(
        id=job_id,
        tenant=tenant,
        config=cfg.to_dict(),
        n_examples=len(examples),
        name=name,
        visibility=visibility,
    )
    return await queue_job(state, job, data, "submitting a training job")


async def queue_job(state: State, job: Job, data: bytes, doing: str) -> JSONResponse:
    """Check the tenant's job quotas, store the job's examples durably, then queue it -> 202."""
    if state.redis is not None:  # known down: 503 before writing anything that would need undoing
        state.redis.check(doing)
    await check_job(state, job.tenant, trains=job.kind == "train")
    store = state.service.store
    # 507 when the disk is full; PrefixExists: a resumed idempotent request whose dataset (same
    # fingerprint) was stored before a stop
    with contextlib.suppress(PrefixExists):
        await asyncio.to_thread(store.put_training_data, job.id, data)
    try:
        await asyncio.to_thread(state.jobs.submit, job)  # 503 + Retry-After when Redis is unavailable
    except Exception:
        await asyncio.to_thread(store.delete_training_data, job.id)  # no orphan dataset
        raise
    return job_accepted(job)
