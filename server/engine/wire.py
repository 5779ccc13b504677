"""The messages between API processes and the engine process (ZeroMQ frames, MessagePack via msgspec).

Compact and pickle-free: every message is a typed msgspec Struct, decoded against its schema (a
malformed frame is an error, never code). The engine answers each step with one `Step` per client,
carrying every new token of that client's rows for the step, so the API side receives one message per
step, not one per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch

from prefix_store.bounds import MagnitudeBounds
from prefix_store.spec import ModelSpec

from ..errors import PrefixServeError
from .request import FinishReason, Request, RequestOutput, SamplingParams, Tenancy, TokenLogprob


@dataclass(frozen=True)
class EngineStats:
    """What the engine reports with every step and heartbeat (the API's /metrics gauges read it)."""

    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_blocks_prefixes: int = 0  # held by resident KV prefixes (unified paging); the rest are rows'
    preemptions: int = 0
    steps: int = 0  # forward passes run since the engine started
    prefix_loads: dict[str, int] = field(default_factory=dict)  # the engine's own store counters, by
    # "tier_result" (its device pool and caches live in its process); empty for an engine in-process
    # residency, for gateways that route by prefix affinity (vLLM's lora_requests_info): the prefix
    # ids of the rows in the batch and of the waiting requests (distinct, sorted), and how many
    # prefixes this engine holds at most (0: not capped by count, only by the device pool's bytes)
    running_prefixes: list[str] = field(default_factory=list)
    waiting_prefixes: list[str] = field(default_factory=list)
    max_prefixes: int = 0
    # the batch's size limit and the device pool's state (the web console's Server page)
    max_running: int = 0
    resident_prefixes: int = 0
    resident_bytes: int = 0
    pool_budget_bytes: int = 0
    cpu_threads: int = 0  # the forward pass's CPU threads now (0: not on the CPU)
    # the dense pieces (graphs.py): "graphs" (captured, replayed), "eager" (no graphs on this device),
    # "failed" (a capture failed: eager from then on), "off" (not configured)
    cuda_graphs: str = "off"
    decode_kernel: str = "gather"  # how decode rows read their K/V blocks: "c", "triton" (in place), "gather"


# ---- API -> engine ---------------------------------------------------------------------------
class Hello(msgspec.Struct, tag="hello"):
    """A client (re)connects; the engine answers Welcome."""


class Add(msgspec.Struct, tag="add"):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefix_id: str | None
    prefix_len: int
    adapter_id: str | None = None
    tenancy: Tenancy = Tenancy()  # whose request: the engine shares itself fairly by it

    @staticmethod
    def of(request: Request, wire_id: str) -> Add:
        r = request
        return Add(wire_id, r.prompt_ids, r.params, r.prefix_id, r.prefix_len, r.adapter_id, r.tenancy)

    def request(self) -> Request:
        return Request(
            self.request_id,
            self.prompt_ids,
            self.params,
            self.prefix_id,
            self.prefix_len,
            adapter_id=self.adapter_id,
            tenancy=self.tenancy,
        )


class Abort(msgspec.Struct, tag="abort"):
    request_id: str


class Evict(msgspec.Struct, tag="evict"):
    """A prefix was deleted: drop it from the engine's device pool (once no request holds it)."""

    prefix_id: str


class Compile(msgspec.Struct, tag="compile"):
    """Compile a prefix's K/V with the engine's model (an API process holds no model): a text's token ids,
    or a soft prompt's input embeddings (float32 bytes of `[P, n_embd]`)."""

    compile_id: str
    token_ids: list[int] = []
    embeds: bytes = b""
    embeds_rows: int = 0

    @staticmethod
    def of(compile_id: str, token_ids: list[int] | None, embeds: torch.Tensor | None) -> Compile:
        if embeds is None:
            return Compile(compile_id, list(token_ids or []))
        rows = embeds.detach().float().cpu().contiguous()  # [P, C]
        return Compile(compile_id, embeds=rows.numpy().tobytes(), embeds_rows=rows.shape[0])

    def embeddings(self) -> torch.Tensor | None:
        """The soft prompt `[P, C]` (float32, CPU), or None for token ids."""
        if not self.embeds:
            return None
        return torch.from_numpy(
            np.frombuffer(self.embeds, dtype=np.float32).reshape(self.embeds_rows, -1).copy()
        )


ToEngine = Hello | Add | Abort | Evict | Compile


# ---- engine -> API ---------------------------------------------------------------------------
class Error(msgspec.Struct, array_like=True):
    kind: str
    status: int
    message: str


class Output(msgspec.Struct, array_like=True):
    """New tokens of one request in one step (text is made on the API side)."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    prefix_tokens: int
    prompt_tokens: int
    completion_tokens: int
    error: Error | None = None
    logprobs: list[TokenLogprob] = []
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @staticmethod
    def of(out: RequestOutput) -> Output:
        """An engine's output as it crosses a process boundary (token ids only: no text yet)."""
        reason = None if out.finish_reason is None else str(out.finish_reason)
        error = None if out.error is None else RemoteError.wire(out.error)
        counts = (out.prefix_tokens, out.prompt_tokens, out.completion_tokens)
        logprobs = (out.logprobs, out.prompt_logprobs)
        return Output(out.request_id, out.token_ids, reason, *counts, error, *logprobs)

    def result(self, request_id: str) -> RequestOutput:
        """The output again on the front-end's side, for its request id there (an error as RemoteError)."""
        return RequestOutput(
            request_id=request_id,
            token_ids=list(self.token_ids),
            text="",
            finish_reason=None if self.finish_reason is None else FinishReason(self.finish_reason),
            prefix_tokens=self.prefix_tokens,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            error=None if self.error is None else RemoteError(*msgspec.structs.astuple(self.error)),
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )


class Step(msgspec.Struct, tag="step"):
    outputs: list[Output]
    sampled: int  # rows sampled in the step (all clients): the batch-size histogram
    stats: EngineStats


class ModelCard(msgspec.Struct):
    """What an API process needs of the served model without loading it: its names, and the upload
    magnitude bounds derived from its weights (prefix_store/bounds.py)."""

    served_name: str
    fingerprint: str
    bounds: MagnitudeBounds | None


class Welcome(msgspec.Struct, tag="welcome"):
    engine_id: str  # a new id per engine process: a client sees a restart
    stats: EngineStats
    model: ModelCard | None = None


class Compiled(msgspec.Struct, tag="compiled"):
    """A `Compile`'s answer: K/V as float32 bytes of `[n_layer, 2, n_head, P, head_dim]` (P = `length`),
    or the error that stopped it."""

    compile_id: str
    kv: bytes = b""
    length: int = 0
    error: Error | None = None

    @staticmethod
    def of(compile_id: str, kv: torch.Tensor) -> Compiled:
        kv = kv.float().cpu().contiguous()  # [L, 2, H, P, D]
        return Compiled(compile_id, kv.numpy().tobytes(), kv.shape[3])

    def tensor(self, spec: ModelSpec) -> torch.Tensor:
        """The K/V `[n_layer, 2, n_head, P, head_dim]` (float32, CPU); the error raised as RemoteError."""
        if self.error is not None:
            raise RemoteError(self.error.kind, self.error.status, self.error.message)
        kv = np.frombuffer(self.kv, dtype=np.float32)
        return torch.from_numpy(kv.reshape(spec.n_layer, 2, spec.n_head, self.length, spec.head_dim).copy())


class Beat(msgspec.Struct, tag="beat"):
    """The engine is alive (sent to every known client while idle, at least every HEARTBEAT_S)."""

    stats: EngineStats


FromEngine = Step | Welcome | Beat | Compiled
HEARTBEAT_S = 0.5

to_engine = msgspec.msgpack.Decoder(ToEngine)
from_engine = msgspec.msgpack.Decoder(FromEngine)
encode = msgspec.msgpack.Encoder().encode


class RemoteError(PrefixServeError):
    """An error the engine process raised for one request, as the API answers it (its kind, status
    and message cross the process boundary; the class stays behind)."""

    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status

    @staticmethod
    def wire(exc: PrefixServeError) -> Error:
        return Error(exc.kind, exc.status, str(exc))
