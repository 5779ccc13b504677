"""AsyncEngine: the EngineCore stepping in a background thread, results streamed to asyncio callers
(a front-end: frontend.py makes the text).

Callers never touch the core's state directly: `generate` validates in the caller's thread
(`EngineCore.prepare` reads only immutable state), then posts the request to an inbox that the engine
thread drains between steps; there the core admits or refuses it (its bounded queue is shared fairly
between tenants, so the decision needs the engine's own state). Each step's outputs are handed to the
callers' event loops. A caller that stops iterating (client disconnect, task cancellation) aborts its
request, which frees its place in the batch (and its KV blocks) at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..errors import PrefixServeError
from .core import EngineCore, sampled_rows
from .frontend import EngineStopped, Frontend
from .prepare import RequestPreparer
from .request import Request, RequestOutput, SamplingParams
from .wire import EngineStats

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine(Frontend):
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_step: Callable[[int], None] | None = None  # called with the rows sampled in each step

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def replica_stats(self) -> dict[str, EngineStats]:
        """Per engine replica (one here): what the residency gauge shows."""
        return {"0": self.stats()}

    @property
    def preparer(self) -> RequestPreparer:
        """Validation and tokenization (safe from any thread), as the API process does it."""
        return self.core.preparer

    def evict(self, prefix_id: str) -> None:
        """Nothing to do: the store's device pool is this engine's (PrefixService.delete evicted it)."""

    # ---- requests ------------------------------------------------------------------------------
    async def generate(
        self,
        input: str | list[int],
        params: SamplingParams | None = None,
        prefix_id: str | None = None,
        request_id: str | None = None,
        adapter_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (one per new token, with text); the last one has a finish_reason."""
        request = self.core.prepare(input, params, prefix_id, request_id, adapter_id)
        async for out in self.stream(request):
            yield out

    async def outputs(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Submit a prepared request (`EngineCore.prepare`); its outputs as the core makes them (token
        ids; an error output ends them). Closed early, it aborts the request."""
        if not self.running:
            raise EngineStopped("the engine is not running; retry shortly")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(request, stream)
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:
                self.abort(request.request_id)
            self._streams.pop(request.request_id, None)

    def _submit(self, request: Request, stream: _Stream) -> None:
        """Post a request to the engine thread, which admits it or refuses it (a full queue, shared
        fairly between tenants, or a tenant's quota: EngineCore.add) before its next step."""
        self._streams[request.request_id] = stream
        self._inbox.put(("add", request))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.core.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception as exc:  # a failed step must not kill the engine; fail its requests
                log.exception("engine step failed; failing %d requests", self.core.num_live)
                for rid in self.core.fail_all():
                    self._deliver(rid, exc)
                continue
            if self.on_step is not None and (sampled := sampled_rows(outputs)):
                self.on_step(sampled)
            for out in outputs:
                self._deliver(out.request_id, out)
        for rid in self.core.fail_all():
            self._deliver(rid, EngineStopped("the engine stopped"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "abort":
                self.core.abort(arg)
                continue
            try:
                ended = self.core.add(arg)
            except PrefixServeError as exc:
                self._deliver(arg.request_id, exc)
                continue
            for out in ended:  # refused to make room for it (EngineCore.add)
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
