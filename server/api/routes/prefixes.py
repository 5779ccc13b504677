"""Prefixes: add (upload, PEFT adapter, text, or a training job), list, read, delete.

POST /prefixes takes multipart uploads (size-capped before parsing) or JSON; with an
`Idempotency-Key` a retry gets the first answer again (`prefixserve.idempotency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from prefix_store.format import InvalidPrefixFile, PrefixMeta
from prefix_store.service import Admit, new_prefix_id
from prefix_store.store import PrefixExists

from ...errors import InvalidRequest, PrefixNotFound
from ...idempotency import fingerprint, json_fingerprint, parse_key
from ...inputs import check_text, parse_json
from ...limits import MAX_IDEMPOTENCY_KEY_CHARS, MAX_NAME_LEN, VISIBILITIES
from ...schemas import EvaluationInfo, JobInfo, PrefixInfo, PrefixList, TextPrefixRequest, inline_schema
from ...training.data import (
    EvaluationRequest,
    Hyperparameters,
    TrainExample,
    TrainPrefixRequest,
    parse_jsonl,
    validate_dataset,
)
from ...training.evaluate import EvalConfig, check_examples
from ...training.jobs import Job, JobNotFound
from ..errors import ERRORS, BoundedJsonRoute, ClientGone, Forbidden, PayloadTooLarge
from ..quotas import check_job, prefix_admission
from ..state import AppState, State, TenantName

router = APIRouter(tags=["prefixes"], route_class=BoundedJsonRoute)

MULTIPART_FRAMING_BYTES = 64 * 1024  # allowed beyond max_upload_bytes for boundaries and headers

_UPLOAD_DOC = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
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
                        "name": {"type": "string", "maxLength": MAX_NAME_LEN},
                        "visibility": {"type": "string", "enum": list(VISIBILITIES)},
                    },
                }
            },
            "application/json": {
                "schema": {"oneOf": [inline_schema(TextPrefixRequest), inline_schema(TrainPrefixRequest)]}
            },
        },
    },
}


@router.post(
    "/prefixes",
    status_code=201,
    response_model=PrefixInfo,
    responses={**ERRORS, 202: {"model": JobInfo, "description": "a training job was queued"}},
    openapi_extra=_UPLOAD_DOC,
)
async def add_prefix(request: Request, state: AppState, tenant: TenantName):
    """Add a prefix or adapter: upload a native `.safetensors` file of any kind (`file`: prefix_kv, ntk,
    lora, adapter) or a PEFT adapter (`adapter_config` + `adapter_model`: prefix tuning, prompt tuning or
    LoRA) as multipart, compile a text prompt (JSON `{"text"}`), or train one: JSON `{"train":
    {"examples": [{"input", "output"}], "kind": ..., ...hyperparameters}}` or a multipart `train` JSONL
    file (+ `hyperparameters` as JSON) -> 202 with the job.

    With an `Idempotency-Key` header (1-255 printable ASCII characters, per tenant), a retry of the
    same request within `PREFIXSERVE_IDEMPOTENCY_TTL_S` gets the first answer again (same status,
    same id, `Idempotent-Replayed: true`), even across a server restart; the same key with a
    different request is 422."""
    state.admit()
    creation = _Creation(state, tenant, parse_key(request.headers.get("idempotency-key")))
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        return await _add_json(request, state, creation)
    if not ctype.startswith("multipart/form-data"):
        raise InvalidPrefixFile(f"expected multipart/form-data or application/json, got {ctype or 'none'!r}")
    return await _add_upload(request, state, creation)


_EVALUATION_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(EvaluationRequest)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "examples": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL: {input, output}",
                        },
                        "config": {"type": "string", "description": "JSON: metrics, max_new_tokens"},
                    },
                    "required": ["examples"],
                }
            },
        },
    }
}


@router.get("/prefixes", response_model=PrefixList, responses=ERRORS)
async def list_prefixes(state: AppState, tenant: TenantName) -> PrefixList:
    """Your own prefixes and every public one."""
    service = state.service
    metas = await asyncio.to_thread(service.list, tenant)
    return PrefixList(prefixes=[PrefixInfo.of(m, size_bytes=service.size(m.id)) for m in metas])


@router.get("/prefixes/{prefix_id}", response_model=PrefixInfo, responses=ERRORS)
async def get_prefix(state: AppState, prefix_id: str, tenant: TenantName) -> PrefixInfo:
    """One prefix, with your evaluations of it."""
    meta = await state.visible(prefix_id, tenant)
    stored = await asyncio.to_thread(state.service.store.evaluations, prefix_id, tenant)  # disk: off the loop
    records = sorted(
        (parse_json(raw) for raw in stored), key=lambda r: (r.get("created_at", ""), r["job_id"])
    )
    evaluations = [EvaluationInfo.model_validate(r, strict=False) for r in records]
    return PrefixInfo.of(meta, evaluations, state.service.size(prefix_id))


@router.post(
    "/prefixes/{prefix_id}/evaluations",
    status_code=202,
    response_model=JobInfo,
    responses=ERRORS,
    openapi_extra=_EVALUATION_DOC,
)
async def evaluate_prefix(
    prefix_id: str, request: Request, state: AppState, tenant: TenantName
) -> JSONResponse:
    """Evaluate a prefix on examples: greedy generation through the engine, then the metrics asked
    (BLEU, ROUGE-L, exact match, mean per-token loss), as a job on the training queue -> 202 with the
    job; its result is stored with the prefix (GET /prefixes/{id}) and in the job. JSON
    `{"examples": [{"input", "output"}], "metrics", "max_new_tokens"}`, or a multipart `examples`
    JSONL file (+ `config` as JSON)."""
    meta = await state.visible(prefix_id, tenant)
    body = await _evaluation_request(request, state)
    cfg = EvalConfig(tuple(body.metrics), body.max_new_tokens, meta.input_suffix)
    pairs = [(e.input, e.output) for e in body.examples]
    await asyncio.to_thread(check_examples, pairs, state.model, meta.prefix_len, cfg)
    job = Job(
        id=_new_job_id(),
        tenant=tenant,
        config={"metrics": list(cfg.metrics), "max_new_tokens": cfg.max_new_tokens},
        n_examples=len(pairs),
        name=f"evaluate {prefix_id}",
        kind="evaluate",
        target=prefix_id,
    )
    data = "\n".join(e.model_dump_json() for e in body.examples).encode()
    return await _queue(state, job, data, "submitting an evaluation job")


async def _evaluation_request(request: Request, state: State) -> EvaluationRequest:
    """The body as JSON, or as a multipart `examples` JSONL file with an optional `config` field."""
    limit = state.settings.max_upload_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return EvaluationRequest.model_validate(_json_object(await _read_limited(request, limit)))
    malformed = partial(InvalidRequest, "body")
    form = await _read_form(request, limit, max_files=1, max_fields=2, malformed=malformed)
    upload = form.get("examples")
    if not hasattr(upload, "read"):
        raise InvalidRequest("examples", "expected a JSONL file field 'examples'")
    examples = parse_jsonl(await upload.read(), "examples")
    config = _json_object(str(form.get("config") or "{}"), "config")
    return EvaluationRequest.model_validate({**config, "examples": [e.model_dump() for e in examples]})


@router.delete("/prefixes/{prefix_id}", status_code=204, responses={**ERRORS, 403: {}})
async def delete_prefix(state: AppState, prefix_id: str, tenant: TenantName) -> None:
    """Delete one of your prefixes (public ones too); others' prefixes cannot be deleted."""
    meta = await state.visible(prefix_id, tenant)
    if meta.owner != tenant:
        raise Forbidden(
            f"prefix {prefix_id!r} is public but owned by another tenant; only its owner can delete it"
        )
    await asyncio.to_thread(state.service.delete, prefix_id)
    state.engine.evict(prefix_id)  # an engine in its own process has its own device pool


# ---- creation: planned ids, idempotency --------------------------------------------------------
def _new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:16]}"


def _job_accepted(job: Job) -> JSONResponse:
    return JSONResponse(JobInfo.of(job).model_dump(), 202, headers={"Location": f"/jobs/{job.id}"})


@dataclass(frozen=True)
class _Creation:
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
        return _job_accepted(job)


async def _submit_training(
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
    return await _queue(state, job, data, "submitting a training job")


async def _queue(state: State, job: Job, data: bytes, doing: str) -> JSONResponse:
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
    return _job_accepted(job)


# ---- request bodies ------------------------------------------------------------------------------
def _json_object(raw: bytes | str, field: str = "body") -> dict:
    try:
        data = parse_json(raw)
    except ValueError as exc:  # malformed, not UTF-8, or nested too deeply
        raise InvalidRequest(field, f"expected a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(field, f"expected a JSON object, got {type(data).__name__}")
    return data


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


async def _read_form(
    request: Request, limit: int, max_files: int, max_fields: int, malformed: Callable[[str], Exception]
) -> FormData:
    """A multipart body, size-capped before parsing (each part at most `limit` bytes); a malformed
    one raises `malformed(message)`."""
    body = await _read_limited(request, limit + MULTIPART_FRAMING_BYTES)

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    try:
        return await MultiPartParser(
            request.headers, chunks(), max_files=max_files, max_fields=max_fields, max_part_size=limit
        ).parse()
    except MultiPartException as exc:
        raise malformed(f"malformed multipart upload: {exc.message}") from None


async def _add_json(request: Request, state: State, creation: _Creation) -> JSONResponse:
    """JSON `{"text"}` compiles a text prefix; `{"train": {...}}` queues a training job."""
    tenant = creation.tenant
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
        lambda pid, admit: asyncio.to_thread(
            state.service.add_text, text.text, tenant, text.name, text.visibility, pid, admit
        ),
    )


async def _add_upload(request: Request, state: State, creation: _Creation) -> JSONResponse:
    """A multipart upload: a native file, a PEFT adapter, or a JSONL training set."""
    form = await _read_form(
        request, state.settings.max_upload_bytes, max_files=3, max_fields=8, malformed=InvalidPrefixFile
    )
    name = str(form.get("name") or "")
    visibility = str(form.get("visibility") or "private")
    if len(name) > MAX_NAME_LEN or visibility not in VISIBILITIES:
        raise InvalidPrefixFile(
            f"name must be at most {MAX_NAME_LEN} characters and visibility 'private' or 'public'"
        )
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
            lambda pid, admit: asyncio.to_thread(
                service.add_file, files["file"], tenant, name, visibility, pid, admit
            ),
        )
    if set(files) == {"adapter_config", "adapter_model"}:
        cfg, weights = files["adapter_config"], files["adapter_model"]
        return await creation.prefix(
            lambda: fingerprint("form", parts),
            lambda pid, admit: asyncio.to_thread(
                service.add_peft, cfg, weights, tenant, name, visibility, pid, admit
            ),
        )
    raise InvalidPrefixFile(
        "upload either 'file' (a prefix .safetensors), 'adapter_config' + 'adapter_model' (PEFT)"
        " or 'train' (a JSONL dataset);"
        f" got {sorted(files)}"
    )
