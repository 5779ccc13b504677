"""The device pool: prefixes resident on the device within a byte budget, LRU, pinned while in use.

It implements the engine's `PrefixProvider`. `acquire` pins a prefix and, on a miss, starts loading
it on a worker thread (cache -> store -> validation -> device), so a cold prefix never stalls the
decode loop; the scheduler admits the waiting request once `is_ready`. Every step of the request reads
the resident prefix in place, so the engine releases the pin only when the request ends: a prefix is
never evicted while a request references it, and the pool may exceed its budget by the prefixes of the
requests in the engine (bounded by max_running + max_waiting). Unpinned prefixes are evicted
least-recently-used first when a load needs room.

Unified paging: once the engine `attach`es its KV arena (server/engine/arena.py), KV prefixes live in
the engine's paged KV pool beside the rows' own tokens, each in a run of blocks read in place. A
loaded prefix takes its run at once if one is free (evicting unpinned prefixes for it); otherwise it
waits, loaded, until rows give blocks back (`blocks_wanted` tells the scheduler to keep them), and
`reclaim` evicts unpinned prefixes when rows need their blocks. Other kinds (NTK, adapters) keep
tensors of their own. The byte budget still bounds all resident prefixes together.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from .cache import Stats
from .errors import PrefixServeError
from .kinds import kind_of, prefix_length, prefix_nbytes
from .state import KvPrefix, PrefixState, as_state

log = logging.getLogger(__name__)


class Arena(Protocol):
    """Where KV prefixes live beside the rows' own tokens: the engine's paged KV pool."""

    num_free: int  # free blocks
    generation: int  # changes whenever blocks are freed

    def blocks_needed(self, state: torch.Tensor) -> int: ...

    def fits(self, blocks: int) -> bool:
        """Whether a prefix of that many blocks can ever be placed."""
        ...

    def room(self) -> int:
        """Blocks prefixes may still take."""
        ...

    def place(self, state: torch.Tensor) -> torch.Tensor | None:
        """Copy a K/V prefix into a run of free blocks -> its view there, or None (no room now)."""
        ...

    def release(self, state: torch.Tensor) -> None:
        """Give a placed prefix's blocks back."""
        ...


@dataclass
class _Entry:
    length: int
    kv: PrefixState | None = None  # K/V [n_layer, 2, n_head, P, head_dim] or NTK, on the device
    pins: int = 0
    loading: bool = False
    error: PrefixServeError | None = None
    deleted: bool = False  # deleted while pinned: dropped when the last pin goes
    placed: bool = False  # kv is a view into the arena
    pending: PrefixState | None = None  # loaded, waiting for a run of free blocks in the arena
    tried: int = -1  # the arena's generation when it last had no room for `pending`

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
        self._arena: Arena | None = None
        self._wanted = 0  # blocks the pending prefixes wait for

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
            if not entry.loading and entry.error is None and entry.pending is None:
                entry.loading = True
                self._executor.submit(self._load_into_pool, prefix_id)
        return length

    def is_ready(self, prefix_id: str) -> bool:
        entry = self._entries.get(prefix_id)
        if entry is None:
            return False
        if entry.pending is not None and entry.tried != self._arena.generation:  # blocks came free
            with self._lock:
                if self._entries.get(prefix_id) is entry and entry.pending is not None:
                    self._settle(prefix_id, entry, entry.pending)
        return entry.kv is not None

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
                if entry.pins == 0 and (entry.deleted or entry.pending is not None):
                    self._drop(prefix_id)  # (a prefix waiting for arena room that nobody waits for)

    def failure(self, prefix_id: str) -> PrefixServeError | None:
        entry = self._entries.get(prefix_id)
        return entry.error if entry is not None else None

    # ---- unified paging ------------------------------------------------------------------------------
    def attach(self, arena: Arena) -> None:
        """Place KV prefixes in the engine's paged KV pool from now on (the engine calls it once)."""
        self._arena = arena

    def reclaim(self, blocks: int) -> bool:
        """Evict unpinned KV prefixes, least recently used first, until `blocks` blocks of the arena are
        free (rows need them). Returns whether they are."""
        if self._arena is None:
            return False
        with self._lock:
            while self._arena.num_free < blocks and self._evict_lru(placed_only=True):
                self.stats.inc("device", "reclaimed")
            return self._arena.num_free >= blocks

    def blocks_wanted(self) -> int:
        """Arena blocks that loaded prefixes wait for, as far as the arena's prefix cap lets them in
        (admission keeps that many free for them)."""
        return 0 if self._arena is None else min(self._wanted, self._arena.room())

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

    def put(self, prefix_id: str, kv: PrefixState | torch.Tensor) -> None:
        """Make a prefix resident now (e.g. right after it was created on this server); a bare K/V
        tensor is a KV prefix."""
        kv = as_state(kv)
        tensor = kv if self._placeable(kv) else kind_of(kv).to(kv, self.device, self.dtype)
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
        """Forget an entry (lock held): its device state and what it waited for."""
        entry = self._entries.pop(prefix_id)
        self._unload(entry)
        if entry.pending is not None:
            self._wanted -= self._arena.blocks_needed(entry.pending)

    def _unload(self, entry: _Entry) -> None:
        """Let go of an entry's device state (lock held): its bytes, and its arena run if it has one."""
        self._resident_bytes -= entry.nbytes
        if entry.placed:
            self._arena.release(entry.kv)
        entry.kv, entry.placed = None, False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- loading (worker threads) ----------------------------------------------------------------
    def _load_into_pool(self, prefix_id: str) -> None:
        try:
            state = as_state(self._load(prefix_id))  # (a loader may give a bare K/V tensor)
            # its device layout (a KV prefix going to the arena is copied there as it is)
            tensor = state if self._placeable(state) else kind_of(state).to(state, self.device, self.dtype)
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

    def _placeable(self, state: PrefixState) -> bool:
        """A KV prefix that fits the arena's prefix cap (a longer one keeps a tensor of its own)."""
        return (
            self._arena is not None
            and kind_of(state).placed
            and self._arena.fits(self._arena.blocks_needed(state))
        )

    def _install(self, prefix_id: str, entry: _Entry, tensor: PrefixState) -> None:
        """Make a loaded prefix resident (lock held): into the arena (`_settle`) or as it is."""
        if self._placeable(tensor):
            self._settle(prefix_id, entry, tensor)
        else:
            self._resident(prefix_id, entry, tensor)

    def _settle(self, prefix_id: str, entry: _Entry, state: KvPrefix) -> None:
        """Copy a KV prefix into a run of arena blocks (lock held), evicting unpinned placed prefixes
        when that can make room; without room it stays pending, loaded, until blocks are freed."""
        arena, need = self._arena, self._arena.blocks_needed(state)
        view = arena.place(state)
        if view is None and arena.num_free + self._evictable_blocks(prefix_id) >= need:
            while view is None and self._evict_lru(placed_only=True, keep=prefix_id):
                view = arena.place(state)
        if entry.pending is not None:
            self._wanted -= need
            entry.pending = None
        if view is None and entry.pins == 0:  # no request waits for it: loaded again when one does
            if entry.kv is None:
                self._drop(prefix_id)
            return
        if view is None:
            entry.pending, entry.tried = state, arena.generation
            self._wanted += need
            return
        self._resident(prefix_id, entry, view, placed=True)

    def _resident(self, prefix_id: str, entry: _Entry, tensor: PrefixState, placed: bool = False) -> None:
        """Record a resident prefix (lock held; `placed`: a view into the arena), in place of any state
        it had (a prefix put again), and evict unpinned LRU entries until the budget holds."""
        self._unload(entry)
        entry.kv, entry.length, entry.placed = tensor, prefix_length(tensor), placed
        self._resident_bytes += entry.nbytes
        self._entries.move_to_end(prefix_id)
        while self._resident_bytes > self.budget and self._evict_lru(keep=prefix_id):
            pass

    def _evict_lru(self, placed_only: bool = False, keep: str | None = None) -> bool:
        """Evict the least recently used unpinned resident entry (lock held); False if there is none."""
        for pid, entry in self._entries.items():
            if pid != keep and entry.pins == 0 and entry.kv is not None and (entry.placed or not placed_only):
                self._drop(pid)
                self.stats.inc("device", "evictions")
                return True
        return False

    def _evictable_blocks(self, keep: str) -> int:
        return sum(
            self._arena.blocks_needed(e.kv)
            for pid, e in self._entries.items()
            if e.placed and e.pins == 0 and pid != keep
        )
