"""`Idempotency-Key` on POST /prefixes: a retried creation returns the first one's answer.

A client that sends a creation and never hears the reply (a crash of the server between storing the
prefix and answering, a dropped connection, a 503 while draining) cannot tell whether it happened;
with a key, retrying is safe. The scheme (Stripe's, and the IETF idempotency-key draft's):

1. The key is scoped to the tenant: the record's name is a hash of (tenant, key), so two tenants'
   identical keys never meet, and one tenant can learn nothing about another's.
2. Before any work, a *reservation* is written once to the durable store: the tenant, a fingerprint of
   the request (its parsed content, so a re-encoded multipart body matches) and the id the new
   resource will get (`pfx-...` or `job-...`), planned now.
3. The work runs under that planned id (a prefix file is published, or a job is queued), then the
   *reply* (status, body, headers) is written once beside the reservation.
4. A request with a known key: a different fingerprint is 422 (the key was used for another request);
   a stored reply is replayed (same status and body, `Idempotent-Replayed: true`); a reservation
   without a reply (the server stopped in between) is resumed: if the planned resource exists, its
   answer is rebuilt and stored; otherwise the work runs again under the same planned id (the store
   never publishes an id twice, so a concurrent twin converges on one resource).

Both records live in the durable store, not in Redis (Redis is only a cache: flushing it must not
turn a retry into a duplicate). They expire after `ttl_s` (the key may then be used afresh: the new
resource gets a new id) and are swept at most once per `SWEEP_EVERY_S`. A failed creation (4xx, 5xx)
drops its reservation, so a retry runs it again; a cancelled one (client gone) keeps it, because the
work may still finish on its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

from fastapi.responses import JSONResponse

from prefix_store.store import DurableStore, PrefixExists

from .errors import InvalidRequest
from .limits import MAX_IDEMPOTENCY_KEY_CHARS as MAX_KEY_CHARS

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
RECORD_KIND = "idempotency"
SWEEP_EVERY_S = 3600.0

Create = Callable[[str], Awaitable[JSONResponse]]  # run the work under this planned id
Recover = Callable[[str], Awaitable[JSONResponse | None]]  # the answer for a planned id, if it exists


class IdempotencyKeyReused(InvalidRequest):
    """The key was first used with a different request (HTTP 422, as the IETF draft advises)."""

    def __init__(self, first: str, now: str) -> None:
        super().__init__(
            HEADER,
            f"expected the request first sent with this key (fingerprint {first[:12]}), got a"
            f" different request (fingerprint {now[:12]}); use a new key for a new request",
        )


def parse_key(raw: str | None) -> str | None:
    """The header's key: 1-255 printable ASCII characters; None when absent."""
    if raw is None:
        return None
    key = raw.strip()
    if not 1 <= len(key) <= MAX_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        raise InvalidRequest(
            HEADER, f"expected 1-{MAX_KEY_CHARS} printable ASCII characters, got {len(key)} characters"
        )
    return key


def fingerprint(kind: str, parts: Iterable[tuple[str, bytes]]) -> str:
    """sha256 of a request's parsed content: its kind and its (field, bytes) parts in name order."""
    h = hashlib.sha256(kind.encode() + b"\0")
    for name, value in sorted(parts):
        h.update(f"{len(name)}:{name}:{len(value)}:".encode())
        h.update(value)
    return h.hexdigest()


def json_fingerprint(data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return fingerprint("json", [("body", canonical.encode())])


def record_name(tenant: str, key: str) -> str:
    return "k" + hashlib.sha256(f"{len(tenant)}:{tenant}:{key}".encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Reservation:
    tenant: str
    fingerprint: str
    resource_id: str  # the planned id: pfx-... or job-...
    created_at: float  # unix seconds


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, response: JSONResponse) -> Reply:
        kept = {k: v for k, v in response.headers.items() if k.lower() == "location"}
        return cls(response.status_code, json.loads(response.body), kept)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers={**self.headers, REPLAYED_HEADER: "true"})


class IdempotencyRecords:
    """Reservations and replies in the durable store (blocking calls: run them on a thread)."""

    def __init__(self, store: DurableStore, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.store, self.ttl_s, self.clock = store, ttl_s, clock
        self._last_sweep = clock()
        self._sweep_lock = threading.Lock()

    def reserve(self, name: str, wanted: Reservation) -> tuple[Reservation, bool]:
        """The live reservation for `name` and whether it is `wanted` (just written) or an older one."""
        for _ in range(3):
            current = self.reservation(name)
            if current is not None:
                return current, False
            try:
                self.store.put_record(RECORD_KIND, name, json.dumps(asdict(wanted)).encode())
                return wanted, True
            except PrefixExists:  # a twin reserved it between our read and our write: read again
                continue
        raise PrefixExists(f"idempotency record {name} keeps changing")

    def reservation(self, name: str) -> Reservation | None:
        """The reservation, or None when there is none or it expired (then it is removed)."""
        raw = self.store.get_record(RECORD_KIND, name)
        if raw is None:
            return None
        found = Reservation(**json.loads(raw))
        if self.clock() - found.created_at <= self.ttl_s:
            return found
        self.release(name)
        return None

    def reply(self, name: str) -> Reply | None:
        raw = self.store.get_record(RECORD_KIND, name + "-reply")
        return None if raw is None else Reply(**json.loads(raw))

    def save_reply(self, name: str, reply: Reply) -> None:
        with contextlib.suppress(PrefixExists):  # a twin stored the same answer first
            self.store.put_record(RECORD_KIND, name + "-reply", json.dumps(asdict(reply)).encode())

    def release(self, name: str) -> None:
        """Forget a key: the reply first, so a reply never outlives its reservation."""
        self.store.delete_record(RECORD_KIND, name + "-reply")
        self.store.delete_record(RECORD_KIND, name)

    def sweep_if_due(self) -> None:
        """Start a sweep of expired records on a thread, at most once per SWEEP_EVERY_S."""
        now = self.clock()
        with self._sweep_lock:
            if now - self._last_sweep < SWEEP_EVERY_S:
                return
            self._last_sweep = now
        threading.Thread(target=self.sweep, name="idempotency-sweep", daemon=True).start()

    def sweep(self) -> int:
        """Remove expired records; returns how many keys were forgotten."""
        removed = 0
        for name in self.store.record_names(RECORD_KIND):
            if name.endswith("-reply"):
                continue
            try:
                if self.reservation(name) is None:
                    removed += 1
            except (OSError, ValueError, TypeError) as exc:  # one bad record must not stop the sweep
                log.warning("idempotency sweep: skipping record %s: %s", name, exc)
        return removed


class Idempotency:
    """Runs a creation at most once per (tenant, key) (module docstring)."""

    def __init__(self, store: DurableStore, ttl_s: float) -> None:
        self.records = IdempotencyRecords(store, ttl_s)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def _one_at_a_time(self, name: str) -> AsyncIterator[None]:
        """Requests with the same key take turns in this process (replicas converge through the store)."""
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    async def run(
        self, tenant: str, key: str, fingerprint: str, planned_id: str, create: Create, recover: Recover
    ) -> JSONResponse:
        name = record_name(tenant, key)
        async with self._one_at_a_time(name):
            wanted = Reservation(tenant, fingerprint, planned_id, self.records.clock())
            held, fresh = await asyncio.to_thread(self.records.reserve, name, wanted)
            if (held.tenant, held.fingerprint) != (tenant, fingerprint):
                raise IdempotencyKeyReused(held.fingerprint, fingerprint)
            self.records.sweep_if_due()
            if not fresh:
                replay = await self._replay(name, held.resource_id, recover)
                if replay is not None:
                    return replay
            return await self._create(name, held.resource_id, create, recover)

    async def _replay(self, name: str, resource_id: str, recover: Recover) -> JSONResponse | None:
        """The stored reply; else, if the planned resource exists, its answer (stored now)."""
        reply = await asyncio.to_thread(self.records.reply, name)
        if reply is None:
            recovered = await recover(resource_id)
            if recovered is None:
                return None
            reply = Reply.of(recovered)
            await asyncio.to_thread(self.records.save_reply, name, reply)
        return reply.response()

    async def _create(self, name: str, resource_id: str, create: Create, recover: Recover) -> JSONResponse:
        try:
            response = await create(resource_id)
        except PrefixExists:  # a twin (another replica) published the planned id first
            recovered = await recover(resource_id)
            if recovered is None:
                raise
            response = recovered
        except Exception:
            await asyncio.to_thread(self.records.release, name)
            raise
        try:
            await asyncio.to_thread(self.records.save_reply, name, Reply.of(response))
        except Exception:  # the reservation and the resource still let a retry rebuild the answer
            log.warning("could not store the reply for idempotency record %s", name, exc_info=True)
        return response
