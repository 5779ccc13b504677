"""The engine core in its own process (as vLLM v1 does): scheduler + runner in a busy loop, nothing else.
Each step is launched, then the socket is drained while the device runs it (on CUDA the launch returns
before the step ends), then it is finished and its tokens are sent.

The API process(es) do HTTP, auth, validation, tokenization, detokenization, stop strings and SSE
(their front-end: client.py), and talk to this process over one ZeroMQ ROUTER socket (wire.py:
MessagePack, no pickle). Each step's new tokens go back as one message per client. While idle the
engine sends a heartbeat, so a client notices within a couple of seconds when the engine is gone.

`EngineProcess` (in the process that owns the engine: the API process, or `prefixserve serve` with
several API workers) starts it as `python -m prefixserve.engine` and starts it again when it dies.
The settings travel as JSON in an environment variable (they may hold keys: not on argv).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace

import msgspec
import zmq

from ..errors import EngineFault, PrefixServeError
from ..model import LoadedModel
from .core import EngineConfig, EngineCore, sampled_rows
from .request import FinishReason, RequestOutput
from .runner import compile_prefix
from .wire import (
    HEARTBEAT_S,
    Abort,
    Add,
    Beat,
    Compile,
    Compiled,
    EngineStats,
    Evict,
    Hello,
    ModelCard,
    Output,
    RemoteError,
    Step,
    Welcome,
    encode,
    to_engine,
)

log = logging.getLogger(__name__)
SETTINGS_ENV = "PREFIXSERVE_ENGINE_SETTINGS"


class EngineLoop:
    """The engine process's loop: receive, step, send. Single-threaded; owns the core."""

    def __init__(
        self,
        core: EngineCore,
        address: str,
        evict: Callable[[str], None],
        load_counts: Callable[[], dict[str, int]] = dict,
        card: ModelCard | None = None,
    ) -> None:
        self.core, self.evict, self.load_counts, self.card = core, evict, load_counts, card
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.engine_id = uuid.uuid4().hex
        self.owner: dict[str, bytes] = {}  # request id -> the client that sent it
        self.clients: set[bytes] = set()
        self.stopping = False

    def run(self) -> None:
        last_beat = 0.0
        parent = os.getppid()
        while not self.stopping and os.getppid() == parent:  # an orphaned engine ends itself
            idle = not self.core.has_work
            if self.sock.poll(int(HEARTBEAT_S * 1000) if idle else 0):
                self._drain()
            if self.core.has_work:
                self._step()
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                beat = encode(Beat(self.stats()))
                for client in self.clients:
                    self.sock.send_multipart([client, beat])
                last_beat = now
        self.sock.close()

    def stats(self) -> EngineStats:
        return replace(self.core.stats(), prefix_loads=self.load_counts())

    def _drain(self) -> None:
        while True:
            try:
                client, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not one of ours
                continue
            try:
                self._handle(client, to_engine.decode(frame))
            except msgspec.DecodeError as exc:
                log.warning("dropping a malformed message from a client: %s", exc)

    def _handle(self, client: bytes, msg: Hello | Add | Abort | Evict) -> None:
        if isinstance(msg, Hello):
            self.clients.add(client)
            self.sock.send_multipart([client, encode(Welcome(self.engine_id, self.stats(), self.card))])
        elif isinstance(msg, Add):
            self.owner[msg.request_id] = client
            try:
                ended = self.core.add(msg.request())
            except PrefixServeError as exc:
                self.owner.pop(msg.request_id, None)
                error = Output(
                    msg.request_id, [], "error", msg.prefix_len, len(msg.prompt_ids), 0, RemoteError.wire(exc)
                )
                self.sock.send_multipart([client, encode(Step([error], 0, self.stats()))])
                return
            self._send(ended, sampled=0)  # requests refused to make room for it (EngineCore.add)
        elif isinstance(msg, Abort):
            if self.core.abort(msg.request_id):
                self.owner.pop(msg.request_id, None)
        elif isinstance(msg, Compile):
            self.sock.send_multipart([client, encode(compile_answer(self.core.model, msg))])
        else:
            self.evict(msg.prefix_id)

    def _step(self) -> None:
        try:
            launched = self.core.launch()
            self._drain()  # new requests and aborts are taken in while the device runs the step
            outputs = self.core.finish(launched)
        except Exception as exc:  # a failed step must not end the engine: its requests fail
            log.exception("engine step failed; failing %d requests", self.core.num_live)
            fault = EngineFault(f"the engine step failed ({type(exc).__name__}, logged)")
            outputs = [_failed(rid, fault) for rid in self.core.fail_all()]
        self._send(outputs, sampled=sampled_rows(outputs))

    def _send(self, outputs: list[RequestOutput], sampled: int) -> None:
        """Outputs to the clients that sent their requests: one message per client."""
        if not outputs:
            return
        by_client: dict[bytes, list[Output]] = {}
        for out in outputs:
            client = self.owner.get(out.request_id)
            if client is None:
                continue
            by_client.setdefault(client, []).append(Output.of(out))
            if out.finished:
                del self.owner[out.request_id]
        stats = self.stats()
        for client, outs in by_client.items():
            self.sock.send_multipart([client, encode(Step(outs, sampled, stats))])


def _failed(rid: str, error: PrefixServeError) -> RequestOutput:
    return RequestOutput(rid, [], "", finish_reason=FinishReason.ERROR, error=error)


def compile_answer(model: LoadedModel, msg: Compile) -> Compiled:
    """A prefix's K/V from the engine's model, for an API process that holds none (between steps: one
    forward pass of at most a prefix's length); a failure is the answer's, never the engine's."""
    try:
        embeds = msg.embeddings()  # [P, C] or None
        if embeds is not None:
            kv = compile_prefix(model, embeds=embeds.to(model.device, model.dtype))
        else:
            kv = compile_prefix(model, token_ids=list(msg.token_ids))
    except Exception as exc:  # (the ids and shapes were checked by the caller; anything else is logged)
        log.exception("compiling a prefix failed")
        error = exc if isinstance(exc, PrefixServeError) else EngineFault(f"compiling failed: {exc}")
        return Compiled(msg.compile_id, error=RemoteError.wire(error))
    return Compiled.of(msg.compile_id, kv)


def main() -> None:
    """`python -m prefixserve.engine ADDRESS`: settings from SETTINGS_ENV (JSON)."""
    from prefix_store.redis_health import RedisHealth
    from prefix_store.service import PrefixService

    from ..compile import bind_model
    from ..loading import load_configured_model
    from ..settings import ServerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine: %(message)s")
    address = sys.argv[1]
    settings = ServerSettings(**json.loads(os.environ[SETTINGS_ENV]))
    model = load_configured_model(settings)
    redis_cfg = settings.redis_config()
    health = RedisHealth(redis_cfg) if redis_cfg is not None else None
    service = PrefixService(bind_model(model), settings.store_config(), redis_health=health)
    core = EngineCore(model, EngineConfig.from_settings(settings), prefixes=service.pool)
    card = ModelCard(model.served_name, model.fingerprint, service.model.bounds)
    loop = EngineLoop(core, address, service.pool.evict, service.stats.snapshot, card)

    def stop(*_: object) -> None:
        loop.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("engine process %d serving on %s", os.getpid(), address)
    loop.run()
    service.close()


def engine_address() -> str:
    """A fresh local (ipc://) address for an engine process."""
    return f"ipc://{tempfile.gettempdir()}/prefixserve-engine-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class EngineProcess:
    """Starts the engine process and starts it again whenever it dies (until `stop`)."""

    def __init__(self, settings: object, address: str, restart_delay_s: float = 0.5) -> None:
        self.address, self.restart_delay_s = address, restart_delay_s
        self._env = {**os.environ, SETTINGS_ENV: json.dumps(asdict(settings))}  # type: ignore[call-overload]
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watch: threading.Thread | None = None
        self._started = 0.0
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        self._spawn()
        self._watch = threading.Thread(target=self._supervise, name="engine-supervisor", daemon=True)
        self._watch.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            # its own session: a terminal's Ctrl-C reaches the API process, which drains, then stops it
            command = [sys.executable, "-m", "prefixserve.engine", self.address]
            self._proc = subprocess.Popen(command, env=self._env, start_new_session=True)
            self._started = time.monotonic()
        log.info("started the engine process (pid %d) on %s", self._proc.pid, self.address)

    def _supervise(self) -> None:
        delay = self.restart_delay_s
        while not self._stop.wait(0.2):
            proc = self._proc
            if proc is not None and proc.poll() is not None and not self._stop.is_set():
                # one that keeps dying at start (a model that cannot load) is retried ever more slowly
                lived = time.monotonic() - self._started
                delay = self.restart_delay_s if lived > 60 else min(2 * delay, 30.0)
                log.error(
                    "the engine process (pid %d) exited with %s; starting it again", proc.pid, proc.returncode
                )
                self.restarts += 1
                time.sleep(delay)
                self._spawn()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
