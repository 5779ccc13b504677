"""ProcessClient: the API process's side of an engine running in its own process (process.py).

A front-end (frontend.py: an `EngineClient`, its text made here) over one ZeroMQ DEALER socket on the
event loop: requests go out as they come, each engine step comes back as one message with this
client's new tokens.

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

import msgspec
import torch
import zmq
import zmq.asyncio

from .frontend import EngineStopped, Frontend
from .prepare import RequestPreparer
from .process import EngineProcess
from .request import Request, RequestOutput
from .wire import (
    HEARTBEAT_S,
    Abort,
    Add,
    Compile,
    Compiled,
    EngineStats,
    Evict,
    Hello,
    ModelCard,
    Output,
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


class ProcessClient(Frontend):
    def __init__(self, address: str, preparer: RequestPreparer, owner: EngineProcess | None = None) -> None:
        self.address, self.preparer, self.owner = address, preparer, owner
        self._sock: zmq.asyncio.Socket | None = None
        self._ns = uuid.uuid4().hex[:12] + ":"  # request ids on the wire: unique across API processes
        self._streams: dict[str, asyncio.Queue[Output | BaseException]] = {}  # by request id on the wire
        self._compiling: dict[str, asyncio.Future[Compiled]] = {}  # by compile id
        self.model: ModelCard | None = None  # the served model's names and upload bounds (the Welcome's)
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
    async def outputs(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Send a prepared request; its outputs as the engine makes them (token ids; an error output ends
        them). Closed early, it aborts the request in the engine. (`stream` checks that it is alive.)"""
        rid = self._ns + request.request_id
        queue: asyncio.Queue[Output | BaseException] = asyncio.Queue()
        self._streams[rid] = queue
        self._send(Add.of(request, rid))
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finish_reason is not None
                yield item.result(request.request_id)
        finally:
            if not done:
                self.abort(rid)
            self._streams.pop(rid, None)

    async def compile(
        self, token_ids: list[int] | None = None, embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A prefix's K/V `[n_layer, 2, n_head, P, head_dim]` (float32, CPU) made by the engine's model
        from a text's token ids or a soft prompt's embeddings `[P, n_embd]`."""
        if not self._alive:
            raise EngineStopped("the engine is not running; retry shortly")
        cid = uuid.uuid4().hex
        done = self._compiling[cid] = asyncio.get_running_loop().create_future()
        self._send(Compile.of(cid, token_ids, embeds))
        try:
            answer = await done
        finally:
            self._compiling.pop(cid, None)
        return answer.tensor(self.preparer.spec)

    def abort(self, request_id: str) -> None:
        """Cancel a request (by its id on the wire, as `outputs` sent it)."""
        self._send(Abort(request_id))

    def evict(self, prefix_id: str) -> None:
        """A prefix was deleted: the engine drops it from its device pool."""
        self._send(Evict(prefix_id))

    def _send(self, msg: Hello | Add | Abort | Evict | Compile) -> None:
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
            if isinstance(msg, Compiled):
                self._compiled(msg)
                continue
            self._stats = msg.stats
            if isinstance(msg, Step):
                self._deliver(msg)
            elif isinstance(msg, Welcome):
                self._welcome(msg)

    def _deliver(self, step: Step) -> None:
        if self.on_step is not None and step.sampled:
            self.on_step(step.sampled)
        for out in step.outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _compiled(self, msg: Compiled) -> None:
        done = self._compiling.get(msg.compile_id)
        if done is not None and not done.done():
            done.set_result(msg)

    def _welcome(self, msg: Welcome) -> None:
        if self._engine_id is not None and msg.engine_id != self._engine_id:
            log.warning("a new engine process answered: requests in flight were lost with the old one")
            self._fail_all(EngineStopped("the engine restarted; retry the request"))
        self._engine_id, self._alive, self.model = msg.engine_id, True, msg.model

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
        for queue in list(self._streams.values()):
            queue.put_nowait(error)
        for done in list(self._compiling.values()):
            if not done.done():
                done.set_exception(error)
