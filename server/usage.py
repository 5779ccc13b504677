"""Usage metering: what each tenant used, per UTC day.

Counted: requests answered (generation and scoring, whatever their end), their prompt, prefix and
generated tokens; training work (examples x epochs of a job that succeeded) and evaluation examples;
bytes of the prefixes a tenant added. A request is counted once, when it ends (a request refused before
it reached the engine used nothing); a job's work and a prefix's bytes are counted once by their id
(`record_once`), so an idempotent retry or a job run again after its worker died counts nothing twice.

Where: the durable store, not Redis (which may be flushed: architecture.md invariant 5). Each process
keeps its own running totals per day and replaces its own record `usage/<day>-<process id>.json` with
them at least every `flush_s` and when it stops; a reader sums the day's records of every process. No
two processes ever write the same record, so nothing is lost to a race, a restart loses nothing already
flushed (a stop flushes; a crash loses at most the last `flush_s`), and a replica's counts add up with
every other's. The once-keys are write-once records (`usage-once/<hash>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from prefix_store.store import DurableStore, PrefixExists

log = logging.getLogger(__name__)

COUNTS = (
    "requests",
    "prompt_tokens",
    "prefix_tokens",
    "generated_tokens",
    "training_example_epochs",
    "evaluation_examples",
    "stored_bytes",
)
KIND, ONCE = "usage", "usage-once"


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def last_days(n: int) -> list[str]:
    """The last `n` UTC days, today first."""
    start = datetime.now(UTC).date()
    return [(start - timedelta(days=i)).isoformat() for i in range(n)]


class UsageMeter:
    def __init__(
        self,
        store: DurableStore,
        on_count: Callable[[str, dict[str, int]], None] | None = None,
        process: str | None = None,
    ) -> None:
        """`on_count(tenant, counts)`: called with every count (the Prometheus counters)."""
        self.store, self.on_count = store, on_count
        self.process = process or uuid.uuid4().hex[:12]
        self._totals: dict[str, dict[str, dict[str, int]]] = {}  # day -> tenant -> count -> n
        self._dirty: set[str] = set()  # days changed since the last flush
        self._lock = threading.Lock()
        self._flushing = threading.Lock()

    # ---- counting ------------------------------------------------------------------------------
    def record(self, tenant: str, **counts: int) -> None:
        """Count usage now (any thread, no I/O); `counts`: names from COUNTS."""
        unknown = set(counts) - set(COUNTS)
        if unknown:
            raise ValueError(f"unknown usage counts {sorted(unknown)}; expected names from {COUNTS}")
        counts = {k: int(v) for k, v in counts.items() if v}
        if not counts:
            return
        day = today()
        with self._lock:
            mine = self._totals.setdefault(day, {}).setdefault(tenant, {})
            for name, n in counts.items():
                mine[name] = mine.get(name, 0) + n
            self._dirty.add(day)
        if self.on_count is not None:
            self.on_count(tenant, counts)

    def record_once(self, key: str, tenant: str, **counts: int) -> bool:
        """Count usage the first time `key` is seen by any process (disk: call it on a thread). Returns
        whether it was counted."""
        name = hashlib.sha256(key.encode()).hexdigest()[:40]
        try:
            self.store.put_record(ONCE, name, json.dumps({"key": key, "tenant": tenant}).encode())
        except PrefixExists:
            return False
        self.record(tenant, **counts)
        return True

    # ---- writing and reading -------------------------------------------------------------------
    def flush(self) -> None:
        """Write this process's totals of every day changed since the last flush (disk: on a thread). A
        failed write keeps the day dirty, to be written with the next flush."""
        with self._flushing:
            with self._lock:
                days, self._dirty = self._dirty, set()
                records = {day: json.dumps(self._totals[day]).encode() for day in days}
            for day, data in records.items():
                try:
                    self.store.put_record(KIND, f"{day}-{self.process}", data, replace=True)
                except Exception:
                    with self._lock:
                        self._dirty.add(day)
                    raise
            with self._lock:  # past days written: they cannot change any more
                for day in [d for d in self._totals if d != today() and d not in self._dirty]:
                    del self._totals[day]

    async def run(self, stop: asyncio.Event, every_s: float) -> None:
        """Flush every `every_s` until `stop` is set, then once more (a task on the event loop)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            try:
                await asyncio.to_thread(self.flush)
            except Exception as exc:  # the store is full or down: kept, written with a later flush
                log.warning("writing usage counts failed (%s); they are kept and written later", exc)

    def read_sync(self, days: int, tenant: str | None = None) -> list[dict]:
        """One row per tenant and day with any usage over the last `days` days (newest day first, then by
        tenant), summed over every process's records. This process's counts are flushed first."""
        self.flush()
        wanted = last_days(days)
        names = self.store.record_names(KIND)
        rows: dict[tuple[str, str], dict] = {}
        for day in wanted:
            for name in (n for n in names if n.startswith(day + "-")):
                raw = self.store.get_record(KIND, name)
                if raw is None:
                    continue
                for who, counts in json.loads(raw).items():
                    if tenant is not None and who != tenant:
                        continue
                    row = rows.setdefault((day, who), {"day": day, "tenant": who, **dict.fromkeys(COUNTS, 0)})
                    for count, n in counts.items():
                        if count in COUNTS:
                            row[count] += int(n)
        order = {day: i for i, day in enumerate(wanted)}
        return sorted(rows.values(), key=lambda r: (order[r["day"]], r["tenant"]))

    async def read(self, days: int, tenant: str | None = None) -> list[dict]:
        return await asyncio.to_thread(self.read_sync, days, tenant)


def totals(rows: list[dict], tenant: str) -> dict:
    """The sum of `rows` as one row (day "total")."""
    out = {"day": "total", "tenant": tenant, **dict.fromkeys(COUNTS, 0)}
    for row in rows:
        for count in COUNTS:
            out[count] += row[count]
    return out
