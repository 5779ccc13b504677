"""Prefixes: add (upload, PEFT adapter, text, or a training job), list, read, delete.

POST /prefixes takes multipart uploads (size-capped before parsing: api/bodies.py) or JSON; with an
`Idempotency-Key` a retry gets the first answer again (api/creation.py, `prefixserve.idempotency`).
"""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from prefix_store.format import InvalidPrefixFile

from ...errors import InvalidRequest
from ...idempotency import fingerprint, json_fingerprint, parse_key
from ...inputs import check_text, parse_json
from ...limits import MAX_IDEMPOTENCY_KEY_CHARS, MAX_NAME_LEN, VISIBILITIES
from ...schemas.native import (
    EvaluationInfo,
    JobInfo,
    PrefixInfo,
    PrefixList,
    TextPrefixRequest,
    inline_schema,
)
from ...training.data import (
    EvaluationRequest,
    Hyperparameters,
    TrainPrefixRequest,
    parse_jsonl,
)
from ...training.evaluate import EvalConfig, check_examples
from ...training.jobs import Job
from ..bodies import json_object, read_form, read_limited
from ..creation import Creation, new_job_id, queue_job, submit_training
from ..errors import ERRORS, BoundedJsonRoute, Forbidden
from ..state import AppState, State, TenantName

router = APIRouter(tags=["prefixes"], route_class=BoundedJsonRoute)

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
    creation = Creation(state, tenant, parse_key(request.headers.get("idempotency-key")))
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
        id=new_job_id(),
        tenant=tenant,
        config={"metrics": list(cfg.metrics), "max_new_tokens": cfg.max_new_tokens},
        n_examples=len(pairs),
        name=f"evaluate {prefix_id}",
        kind="evaluate",
        target=prefix_id,
    )
    data = "\n".join(e.model_dump_json() for e in body.examples).encode()
    return await queue_job(state, job, data, "submitting an evaluation job")


async def _evaluation_request(request: Request, state: State) -> EvaluationRequest:
    """The body as JSON, or as a multipart `examples` JSONL file with an optional `config` field."""
    limit = state.settings.max_upload_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return EvaluationRequest.model_validate(json_object(await read_limited(request, limit)))
    malformed = partial(InvalidRequest, "body")
    form = await read_form(request, limit, max_files=1, max_fields=2, malformed=malformed)
    upload = form.get("examples")
    if not hasattr(upload, "read"):
        raise InvalidRequest("examples", "expected a JSONL file field 'examples'")
    examples = parse_jsonl(await upload.read(), "examples")
    config = json_object(str(form.get("config") or "{}"), "config")
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


# ---- POST /prefixes by body ----------------------------------------------------------------------
async def _add_json(request: Request, state: State, creation: Creation) -> JSONResponse:
    """JSON `{"text"}` compiles a text prefix; `{"train": {...}}` queues a training job."""
    tenant = creation.tenant
    data = json_object(await read_limited(request, state.settings.max_upload_bytes))
    if "train" in data:
        body = TrainPrefixRequest.model_validate(data)
        return await creation.job(
            lambda: json_fingerprint(data),
            lambda job_id: submit_training(
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


async def _add_upload(request: Request, state: State, creation: Creation) -> JSONResponse:
    """A multipart upload: a native file, a PEFT adapter, or a JSONL training set."""
    form = await read_form(
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
            json_object(str(form.get("hyperparameters") or "{}"), "hyperparameters")
        )
        return await creation.job(
            lambda: fingerprint("form", parts),
            lambda job_id: submit_training(state, tenant, hyper, examples, name, visibility, job_id),
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
