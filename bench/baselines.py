"""The serving baselines of bench/serve.py, behind the same HTTP interface as prefixserve.

    python -m bench.baselines --mode sequential|grouped --model DIR --store DIR --port N

Both run HF `GPT2LMHeadModel.generate` with the request's prefix as `past_key_values` (prefixes come
from the same store and device pool as prefixserve's, so loading costs the same):

  sequential  one request at a time, in arrival order: how PEFT users serve a prefix-tuned model
  grouped     a static batcher: the oldest waiting request's prefix picks the batch, which takes every
              waiting request with that prefix (up to --max-batch); the batch runs to completion before
              the next one starts (no request joins a running batch)

`POST /generate` takes prefixserve's request body and answers the same JSON or SSE events (`token`,
then `done` with usage); a full waiting queue answers 429 with Retry-After, as prefixserve does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import GPT2LMHeadModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model
from prefixserve.errors import PrefixServeError
from prefixserve.model import LoadedModel, hf_cache_kwargs, load_hf_model, load_model
from prefixserve.schemas.native import GenerateRequest

MODES = ("sequential", "grouped")


@dataclass(frozen=True)
class BaselineConfig:
    mode: str = "sequential"
    max_waiting: int = 64  # queued requests beyond this are answered 429
    max_batch: int = 64  # grouped: rows per static batch


@dataclass(eq=False)
class Job:
    """One request: its tokens travel from the generate thread to the HTTP handler through `queue`."""

    prompt_ids: list[int]
    prefix_id: str | None
    max_new_tokens: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    produced: int = 0
    done: bool = False
    cancelled: bool = False

    def emit(self, item: tuple[str, object]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _RowStreamer(BaseStreamer):
    """Routes each generated column [B] to the batch's jobs; a job ends at its own length or EOS."""

    def __init__(self, jobs: list[Job], tokenizer, eos: int | None) -> None:
        self.jobs, self.tokenizer, self.eos = jobs, tokenizer, eos
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for job, tok in zip(self.jobs, value.view(-1).tolist(), strict=True):
            if job.done:
                continue
            if job.cancelled:
                job.done = True
                continue
            job.produced += 1
            job.emit(("token", (tok, self.tokenizer.decode([tok]))))
            eos = not job.ignore_eos and tok == self.eos
            if eos or job.produced >= job.max_new_tokens:
                job.done = True
                job.emit(("done", "eos" if eos else "length"))

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                job.done = True
                job.emit(("done", "cancelled"))


class _RowsDone(StoppingCriteria):
    """Marks finished (or abandoned) rows done, so generate() stops once every row is."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([j.done or j.cancelled for j in self.jobs], device=input_ids.device)


class Baseline:
    """A waiting queue and one thread that runs HF generate on one request or one same-prefix batch."""

    def __init__(self, model: LoadedModel, hf: GPT2LMHeadModel, service: PrefixService, cfg: BaselineConfig):
        self.model, self.hf, self.service, self.cfg = model, hf, service, cfg
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"baseline-{cfg.mode}", daemon=True)

    # ---- HTTP side -----------------------------------------------------------------------------
    def submit(self, job: Job) -> bool:
        with self.cond:
            if len(self.waiting) >= self.cfg.max_waiting:
                return False
            self.waiting.append(job)
            self.cond.notify()
        return True

    def abandon(self, job: Job) -> None:
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)

    # ---- generate thread -----------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.waiting and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            if self.cfg.mode == "sequential":
                return [self.waiting.popleft()]
            pid = self.waiting[0].prefix_id
            batch = [j for j in self.waiting if j.prefix_id == pid][: self.cfg.max_batch]
            for j in batch:
                self.waiting.remove(j)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # one failed batch ends its requests, not the server
                for job in batch:
                    if not job.done:
                        job.done = True
                        job.emit(("error", str(exc)))

    def _prefix(self, prefix_id: str) -> torch.Tensor:
        """The prefix from the device pool (loading it through the Redis/store tiers if needed)."""
        pool = self.service.pool
        pool.acquire(prefix_id)
        while not pool.is_ready(prefix_id):
            if (err := pool.failure(prefix_id)) is not None:
                pool.release(prefix_id)
                raise err
            time.sleep(0.0005)
        return pool.get(prefix_id)  # [L, 2, H, P, D]

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        dev, b = self.model.device, len(batch)
        kv = self._prefix(batch[0].prefix_id) if batch[0].prefix_id else None
        try:
            p = 0 if kv is None else kv.shape[3]
            t = max(len(j.prompt_ids) for j in batch)
            ids = torch.zeros(b, t, dtype=torch.long)  # [B, T], left-padded
            mask = torch.zeros(b, p + t, dtype=torch.long)  # [B, P+T]: prefix, padding, input
            mask[:, :p] = 1
            for i, j in enumerate(batch):
                n = len(j.prompt_ids)
                ids[i, t - n :] = torch.tensor(j.prompt_ids)
                mask[i, p + t - n :] = 1
            cache = {}
            if kv is not None:  # each layer's [H, P, D] key and value, shared by the B rows
                cache = hf_cache_kwargs(
                    self.hf,
                    [
                        (kv[i, 0].expand(b, -1, -1, -1), kv[i, 1].expand(b, -1, -1, -1))
                        for i in range(len(kv))
                    ],
                )
            self.hf.generate(
                ids.to(dev),
                attention_mask=mask.to(dev),
                **cache,
                max_new_tokens=max(j.max_new_tokens for j in batch),
                do_sample=False,
                eos_token_id=None,  # rows stop on EOS one by one in the streamer
                pad_token_id=0,
                streamer=_RowStreamer(batch, self.model.tokenizer, self.model.eos_token_id),
                stopping_criteria=StoppingCriteriaList([_RowsDone(batch)]),
            )
        finally:
            if kv is not None:
                self.service.pool.release(batch[0].prefix_id)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def create_app(model_path: str, store_url: str, device: str, dtype: str, cfg: BaselineConfig) -> FastAPI:
    state: dict[str, Baseline] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = await asyncio.to_thread(load_model, model_path, dtype, device)
        hf = await asyncio.to_thread(load_hf_model, model_path, model.dtype, model.device)
        service = PrefixService(bind_model(model), StoreConfig(url=store_url))
        state["b"] = baseline = Baseline(model, hf, service, cfg)
        baseline.start()
        yield
        baseline.stop()
        service.close()

    app = FastAPI(title=f"baseline-{cfg.mode}", lifespan=lifespan)

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/generate")
    async def generate(body: GenerateRequest):
        baseline = state["b"]
        ids = baseline.model.tokenizer.encode(body.input, add_special_tokens=False)
        try:
            p = baseline.service.length(body.prefix_id) if body.prefix_id else 0
        except PrefixServeError as exc:
            return _error(404, "prefix_not_found", str(exc))
        if p + len(ids) + body.max_new_tokens > baseline.model.spec.n_positions:
            return _error(400, "invalid_request", "prefix + input + max_new_tokens exceeds n_positions")
        job = Job(ids, body.prefix_id, body.max_new_tokens, body.ignore_eos, asyncio.get_running_loop())
        if not baseline.submit(job):
            return _error(429, "overloaded", "the waiting queue is full", {"Retry-After": "1"})
        usage = {"prefix_tokens": p, "prompt_tokens": len(ids)}
        if body.stream:
            return StreamingResponse(_sse(baseline, job, usage), media_type="text/event-stream")
        text, reason = [], "length"
        async for kind, value in _events(baseline, job):
            if kind == "token":
                text.append(value[1])
            elif kind == "done":
                reason = value
            else:
                return _error(500, "internal", str(value))
        usage["completion_tokens"] = job.produced
        return {
            "id": "b",
            "prefix_id": body.prefix_id,
            "text": "".join(text),
            "finish_reason": reason,
            "usage": usage,
        }

    return app


async def _events(baseline: Baseline, job: Job) -> AsyncIterator[tuple[str, object]]:
    """The job's events until it ends; leaving early (client gone) abandons the job."""
    try:
        while True:
            kind, value = await job.queue.get()
            yield kind, value
            if kind != "token":
                return
    finally:
        if not job.done:
            baseline.abandon(job)


async def _sse(baseline: Baseline, job: Job, usage: dict[str, int]) -> AsyncIterator[str]:
    async for kind, value in _events(baseline, job):
        if kind == "token":
            tok, text = value
            yield f"event: token\ndata: {json.dumps({'token_ids': [tok], 'text': text})}\n\n"
        elif kind == "done":
            done = {"finish_reason": value, "usage": {**usage, "completion_tokens": job.produced}}
            yield f"event: done\ndata: {json.dumps(done)}\n\n"
        else:
            yield f"event: error\ndata: {json.dumps({'error': {'type': 'internal', 'message': value}})}\n\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--store", required=True, help="the prefix store directory prefixserve uses")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-waiting", type=int, default=BaselineConfig.max_waiting)
    ap.add_argument("--max-batch", type=int, default=BaselineConfig.max_batch)
    args = ap.parse_args()
    cfg = BaselineConfig(args.mode, args.max_waiting, args.max_batch)
    app = create_app(args.model, args.store, args.device, args.dtype, cfg)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
