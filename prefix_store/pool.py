"""The device pool: prefixes resident on the device within a byte budget, LRU, pinned while in use.

It implements the engine's `PrefixProvider`. `acquire` pins a prefix and, on a miss, starts loading
it on a worker thread (cache -> store -> validation -> device), so a cold prefix never stalls the
decode loop; the scheduler admits the waiting request once `is_ready`. Every step of the request reads
the resident prefix in place, so the engine releases the pin only when the request ends: a prefix is
never evicted while a request references it, and the pool may exceed its budget by the prefixes of the
requests in the engine (bounded by max_running + max_waiting). Unpinned prefixes are evicted
least-recently-used first when a load needs room.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .cache import Stats
from .errors import PrefixServeError
from .kinds import kind_of
from .state import PrefixState, prefix_length, prefix_nbytes

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    length: int
    kv: PrefixState | None = None  # K/V [n_layer, 2, n_head, P, head_dim] or NTK, on the device
    pins: int = 0
    loading: bool = False
    error: PrefixServeError | None = None
    deleted: bool = False  # deleted while pinned: dropped when the last pin goes

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else prefix_nbytes(self.kv)


class DevicePool:
    def __init__(
        self,
        load: Callable[[str], PrefixState],
        length: Callable[[str], int],
        budget_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
        workers: int = 2,
        stats: Stats | None = None,
    ) -> None:
        self._load, self._length = load, length
        self.budget, self.device, self.dtype = budget_bytes, device, dtype
        self.stats = stats or Stats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()
        # Loader threads run torch single-threaded: a load (dtype cast, copy) must not compete with the
        # decode loop for the intra-op thread pool (measured: ~10% slower steps while loads ran).
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="prefix-load",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._resident_bytes = 0

    # ---- PrefixProvider --------------------------------------------------------------------------
    def length(self, prefix_id: str) -> int:
        with self._lock:
            entry = self._entries.get(prefix_id)
            if entry is not None:
                return entry.length
        return self._length(prefix_id)  # raises PrefixNotFound

    def acquire(self, prefix_id: str) -> int:
        length = self.length(prefix_id)
        with self._lock:
            entry = self._entries.setdefault(prefix_id, _Entry(length))
            if entry.error is not None and entry.pins == 0:
                entry.error = None  # a new request retries a failed load
            entry.pins += 1
            self._entries.move_to_end(prefix_id)
            if entry.kv is not None:
                self.stats.inc("device", "hits")
                return length
            self.stats.inc("device", "misses")
            if not entry.loading and entry.error is None:
                entry.loading = True
                self._executor.submit(self._load_into_pool, prefix_id)
        return length

    def is_ready(self, prefix_id: str) -> bool:
        entry = self._entries.get(prefix_id)
        return entry is not None and entry.kv is not None

    def get(self, prefix_id: str) -> PrefixState:
        entry = self._entries[prefix_id]
        if entry.kv is None:
            raise RuntimeError(f"prefix {prefix_id!r} is not resident")
        return entry.kv

    def release(self, prefix_id: str) -> None:
        with self._lock:
            entry = self._entries.get(prefix_id)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                if entry.pins == 0 and entry.deleted:
                    self._drop(prefix_id)

    def failure(self, prefix_id: str) -> PrefixServeError | None:
        entry = self._entries.get(prefix_id)
        return entry.error if entry is not None else None

    # ---- management --------------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def resident(self) -> list[str]:
        with self._lock:
            return [pid for pid, e in self._entries.items() if e.kv is not None]

    def residency(self) -> tuple[int, int, int]:
        """(prefixes on the device, their bytes, the byte budget)."""
        with self._lock:
            count = sum(1 for e in self._entries.values() if e.kv is not None)
            return count, self._resident_bytes, self.budget

    def pins(self, prefix_id: str) -> int:
        entry = self._entries.get(prefix_id)
        return 0 if entry is None else entry.pins

    def put(self, prefix_id: str, kv: PrefixState) -> None:
        """Make a prefix resident now (e.g. right after it was created on this server)."""
        tensor = kind_of(kv).to(kv, self.device, self.dtype)
        with self._lock:
            entry = self._entries.setdefault(prefix_id, _Entry(prefix_length(kv)))
            self._install(prefix_id, entry, tensor)

    def evict(self, prefix_id: str) -> None:
        """Forget a prefix (it was deleted). Requests that already hold a pin still get it (loading
        completes for them); it is dropped with the last pin."""
        with self._lock:
            entry = self._entries.get(prefix_id)
            if entry is None:
                return
            if entry.pins > 0:
                entry.deleted = True
            else:
                self._drop(prefix_id)

    def _drop(self, prefix_id: str) -> None:
        entry = self._entries.pop(prefix_id)
        self._resident_bytes -= entry.nbytes

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- loading (worker threads) ----------------------------------------------------------------
    def _load_into_pool(self, prefix_id: str) -> None:
        try:
            state = self._load(prefix_id)
            tensor = kind_of(state).to(state, self.device, self.dtype)  # its device layout
        except PrefixServeError as exc:
            self._loaded(prefix_id, None, exc)
        except Exception as exc:  # an unexpected loader fault must still release the waiting requests
            log.exception("loading prefix %s failed", prefix_id)
            self._loaded(
                prefix_id, None, PrefixServeError(f"prefix {prefix_id!r} could not be loaded: {exc}")
            )
        else:
            self._loaded(prefix_id, tensor, None)

    def _loaded(self, prefix_id: str, tensor: PrefixState | None, error: PrefixServeError | None) -> None:
        with self._lock:
            entry = self._entries.get(prefix_id)
            if entry is None:  # evicted (deleted) while loading
                return
            entry.loading = False
            if error is not None:
                entry.error = error
                self.stats.inc("device", "load_errors")
                return
            self._install(prefix_id, entry, tensor)

    def _install(self, prefix_id: str, entry: _Entry, tensor: PrefixState) -> None:
        """Place a prefix (lock held) and evict unpinned LRU entries until the budget holds."""
        self._resident_bytes -= entry.nbytes
        entry.kv, entry.length = tensor, prefix_length(tensor)
        self._resident_bytes += entry.nbytes
        self._entries.move_to_end(prefix_id)
        for pid in list(self._entries):
            if self._resident_bytes <= self.budget:
                break
            victim = self._entries[pid]
            if pid == prefix_id or victim.pins > 0 or victim.kv is None:
                continue
            self._resident_bytes -= victim.nbytes
            del self._entries[pid]
            self.stats.inc("device", "evictions")
