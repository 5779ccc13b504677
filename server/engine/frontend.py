"""The engine's front-ends: what a caller holds of an engine, wherever the engine runs.

The core makes token ids (core.py). A front-end hands it prepared requests and makes their text:
incremental detokenization and stop strings happen here and nowhere else. A stop string found here ends
the request's stream and aborts its row in the engine (which may have made a token more meanwhile: it
is dropped), as vLLM v1's front-end asks its core to abort.

- `EngineClient`: the protocol the API holds (`State.engine`). Implemented by `AsyncEngine` (the core on
  a thread of this process), `ProcessClient` (the core in its own process, over ZeroMQ) and
  `RayEngineClient` (engine replicas on Ray Serve).
- `Frontend`: what they share: the one stream loop (`stream`) over each one's `outputs`.
- `OfflineEngine`: the same text for a caller that steps a core in its own thread (evaluation, tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import PrefixServeError
from .core import EngineCore, drain
from .detokenizer import Detokenizer
from .prepare import RequestPreparer
from .request import Request, RequestOutput, SamplingParams, Tenancy
from .wire import EngineStats, ModelCard


class EngineStopped(PrefixServeError):
    kind = "unavailable"
    status = 503


class EngineClient(Protocol):
    """An engine as the API uses it once started, in this process, in its own process, or on Ray Serve."""

    preparer: RequestPreparer  # validation and tokenization, done where the request arrives
    on_step: Callable[[int], None] | None  # called with the rows sampled in each step (the batch histogram)

    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...

    def stats(self) -> EngineStats: ...

    def replica_stats(self) -> dict[str, EngineStats]:
        """Per engine replica: what the residency gauge shows."""
        ...

    def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """A prepared request's outputs, one per new token, with text; the last has a finish_reason."""
        ...

    def generate(
        self, input: str | list[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """`stream` for an input without a prefix (the warm-up)."""
        ...

    def evict(self, prefix_id: str) -> None:
        """A prefix was deleted: the engine lets it go."""
        ...


class RemoteEngine(EngineClient, Protocol):
    """An engine elsewhere that an API process without the model reads it from (compile.RemoteModel)."""

    model: ModelCard | None  # its names and upload bounds, once it answered

    async def compile(
        self, token_ids: list[int] | None = None, embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A prefix's K/V `[n_layer, 2, n_head, P, head_dim]` (float32, CPU) made by the engine's model."""
        ...


class Frontend:
    """The part every front-end shares: text and stop strings over the engine's token ids. A subclass
    gives `preparer`, `running` and `outputs`."""

    preparer: RequestPreparer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.preparer.tokenizer  # (the one that tokenized the request detokenizes it)

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def outputs(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Submit a request; its outputs as the engine makes them (token ids, no text), up to the one
        that finishes it. Closed early, it aborts the request in the engine."""
        raise NotImplementedError

    async def generate(
        self, input: str | list[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        async for out in self.stream(self.preparer.prepare(input, params, None, 0)):
            yield out

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """The one stream loop: a request's outputs with their text. An output with an error raises it;
        a stop string found here ends the stream (and the request in the engine)."""
        if not self.running:
            raise EngineStopped("the engine is not running; retry shortly")
        text = Detokenizer(self.tokenizer, request.params.stop)
        outputs = self.outputs(request)
        try:
            async for item in outputs:
                if item.error is not None:
                    raise item.error
                out = text.apply(item)
                yield out
                if out.finished:
                    return
        finally:
            await outputs.aclose()  # (a request the engine still runs is aborted there)


class OfflineEngine:
    """A core stepped in the caller's own thread, its outputs given text as a front-end gives it:
    `add_request`, then `step` or `run_to_completion` (evaluation, tests, benchmarks)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._text: dict[str, Detokenizer] = {}

    def add_request(
        self,
        input: str | list[int],
        params: SamplingParams | None = None,
        prefix_id: str | None = None,
        request_id: str | None = None,
        adapter_id: str | None = None,
        tenancy: Tenancy | None = None,
    ) -> str:
        rid = self.core.add_request(input, params, prefix_id, request_id, adapter_id, tenancy)
        self._text[rid] = Detokenizer(self.core.model.tokenizer, (params or SamplingParams()).stop)
        return rid

    @property
    def has_work(self) -> bool:
        return self.core.has_work

    def step(self) -> list[RequestOutput]:
        """One engine step's outputs with their text (a request that reached a stop string is aborted)."""
        return [self._with_text(item) for item in self.core.step()]

    def _with_text(self, item: RequestOutput) -> RequestOutput:
        rid = item.request_id
        text = self._text.get(rid)
        if text is None or item.error is not None:
            self._text.pop(rid, None)
            return item
        out = text.apply(item)
        if out.finished:
            del self._text[rid]
            if item.finish_reason is None:  # a stop string, found here
                self.core.abort(rid)
        return out

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until idle; every output grouped by request."""
        return drain(self)
