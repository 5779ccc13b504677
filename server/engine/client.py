"""EngineClient: the API process's side of an engine running in its own process (process.py).

It offers what the API uses of `AsyncEngine` (preparer, stream, abort, stats, running) over one
ZeroMQ DEALER socket on the event loop: requests go out as they come, each engine step comes back as
one message with this client's new tokens, and the text is made here (incremental detokenization
and stop strings: a stop string found here aborts the request in the engine and ends the stream).

Liveness: the engine answers `Hello` with `Welcome` and sends a heartbeat while idle. If the owned
engine process has exited (or nothing has been heard for DEAD_AFTER_S), every stream in flight ends with
EngineStopped (HTTP 503), `running` turns False (so /ready says 503), and the client says Hello again
until an engine (restarted by its supervisor) welcomes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio
from transformers import PreTrainedTokenizerBase

from .async_engine import EngineStopped
from .core import RequestOutput
from .detokenizer import Detokenizer
from .prepare import RequestPreparer
from .process import EngineProcess
from .request import FinishReason, Request, SamplingParams
from .wire import (
    HEARTBEAT_S,
    Abort,
    Add,
    EngineStats,
    Evict,
    Hello,
    Output,
    RemoteError,
    Step,
    Welcome,
    encode,
    from_engine,
)

log = logging.getLogger(__name__)
# silence this long and the engine is taken for gone: an engine this process started is watched
# through its process (it exited: gone at once), so only a hung one needs the long wait; an engine
# started elsewhere (API workers) is known only by what it sends. Both allow for a long step.
DEAD_AFTER_S = {True: 30.0, False: 10.0}  # by: this process owns the engine


@dataclass
class _Stream:
    queue: asyncio.Queue[Output | BaseException]
    detok: Detokenizer


class EngineClient:
    def __init__(
        self,
        address: str,
        preparer: RequestPreparer,
        tokenizer: PreTrainedTokenizerBase,
        owner: EngineProcess | None = None,
    ) -> None:
        self.address, self.preparer, self.tokenizer, self.owner = address, preparer, tokenizer, owner
        self._sock: zmq.asyncio.Socket | None = None
        self._ns = uuid.uuid4().hex[:12] + ":"  # request ids on the wire: unique across API processes
        self._streams: dict[str, _Stream] = {}
        self._stats = EngineStats()
        self._engine_id: str | None = None
        self._alive = False
        self._last_heard = 0.0
        self._tasks: list[asyncio.Task] = []
        self.on_step: Callable[[int], None] | None = None  # called with the rows sampled in each step

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self, timeout_s: float = 600.0) -> None:
        """Connect and wait for the engine's welcome (it may still be loading its model)."""
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, uuid.uuid4().hex.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._sock = sock
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
        deadline = time.monotonic() + timeout_s
        while not self._alive:
            if time.monotonic() > deadline:
                raise EngineStopped(f"no engine answered on {self.address} within {timeout_s:.0f}s")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._fail_all(EngineStopped("the server is stopping"))
        if self._sock is not None:
            self._sock.close()
        if self.owner is not None:
            self.owner.stop()

    @property
    def running(self) -> bool:
        return self._alive

    def stats(self) -> EngineStats:
        return self._stats

    def replica_stats(self) -> dict[str, EngineStats]:
        """Per engine replica (one here): what the residency gauge shows."""
        return {"0": self.stats()}

    # ---- requests ------------------------------------------------------------------------------
    async def generate(
        self, input: str | list[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request without a prefix (the warm-up)."""
        async for out in self.stream(self.preparer.prepare(input, params, None, 0)):
            yield out

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Send a prepared request and stream its outputs (one per new token, text made here)."""
        if not self._alive:
            raise EngineStopped("the engine is not running; retry shortly")
        rid = self._ns + request.request_id
        stream = _Stream(asyncio.Queue(), Detokenizer(self.tokenizer, request.params.stop))
        self._streams[rid] = stream
        self._send(Add.of(request, rid))
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    done = True
                    raise RemoteError(item.error.kind, item.error.status, item.error.message)
                out = self.output(item, stream.detok, request.request_id)
                done = out.finished
                if done and item.finish_reason is None:  # a stop string, found here
                    self._send(Abort(rid))
                yield out
        finally:
            if not done:
                self.abort(rid)
            self._streams.pop(rid, None)

    @staticmethod
    def output(item: Output, detok: Detokenizer, request_id: str) -> RequestOutput:
        """An engine's output for one request, with its text made here (and a stop string found)."""
        reason = None if item.finish_reason is None else FinishReason(item.finish_reason)
        for token in item.token_ids:
            if reason != FinishReason.EOS:  # the EOS token itself is not text
                detok.add(token)
        if reason is None and detok.stopped:
            reason = FinishReason.STOP
        return RequestOutput(
            request_id=request_id,
            token_ids=list(item.token_ids),
            text=detok.emit(final=reason is not None),
            finish_reason=reason,
            prefix_tokens=item.prefix_tokens,
            prompt_tokens=item.prompt_tokens,
            completion_tokens=item.completion_tokens,
            logprobs=item.logprobs,
            prompt_logprobs=item.prompt_logprobs,
        )

    def abort(self, request_id: str) -> None:
        """Cancel a request (by its id on the wire, as `stream` sent it)."""
        self._send(Abort(request_id))

    def evict(self, prefix_id: str) -> None:
        """A prefix was deleted: the engine drops it from its device pool."""
        self._send(Evict(prefix_id))

    def _send(self, msg: Hello | Add | Abort | Evict) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):  # a closed socket (stopping): nothing to tell
            self._sock.send(encode(msg), zmq.NOBLOCK)

    # ---- receiving -----------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg = from_engine.decode(frame)
            except msgspec.DecodeError as exc:
                log.warning("dropping a malformed message from the engine: %s", exc)
                continue
            self._last_heard = time.monotonic()
            self._stats = msg.stats
            if isinstance(msg, Step):
                self._deliver(msg)
            elif isinstance(msg, Welcome):
                self._welcome(msg)

    def _deliver(self, step: Step) -> None:
        if self.on_step is not None and step.sampled:
            self.on_step(step.sampled)
        for out in step.outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.queue.put_nowait(out)

    def _welcome(self, msg: Welcome) -> None:
        if self._engine_id is not None and msg.engine_id != self._engine_id:
            log.warning("a new engine process answered: requests in flight were lost with the old one")
            self._fail_all(EngineStopped("the engine restarted; retry the request"))
        self._engine_id, self._alive = msg.engine_id, True

    async def _watch(self) -> None:
        """Say Hello until welcomed; then notice silence (or the owned process exiting)."""
        while True:
            if not self._alive:
                self._send(Hello())
            elif self._gone():
                log.error("the engine stopped answering; failing %d requests in flight", len(self._streams))
                self._alive = False
                self._fail_all(EngineStopped("the engine process stopped; retry the request"))
                continue
            await asyncio.sleep(HEARTBEAT_S / 2)

    def _gone(self) -> bool:
        owned = self.owner is not None
        silent = time.monotonic() - self._last_heard > DEAD_AFTER_S[owned]
        return silent or (owned and not self.owner.alive)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(error)
