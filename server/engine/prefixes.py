"""Prefixes the engine can serve, by id: the provider protocol and an in-memory table.

The engine talks to prefixes through `PrefixProvider`: it asks a prefix's `length` when it validates
a request, `acquire`s it when the request is queued (pinning it, and starting a load if it is not on
the device), the scheduler admits the request once `is_ready`, every step of the request reads `get`'s
resident state in place (nothing is copied per row), and the engine `release`s the pin when the request
ends, so a prefix is evicted only when no request references it. A load that fails is reported by
`failure`, and the waiting requests for that prefix end with that error.

`PrefixTable` keeps prefixes in memory (registered directly, or announced and registered later);
the store's device pool (`prefix_store.pool.DevicePool`) implements the same protocol with an
asynchronous loader behind it. `PrefixState` and its helpers live in `prefix_store.state` and are
re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from prefix_store.kinds import kind_of, prefix_length, prefix_nbytes
from prefix_store.state import PrefixState, as_state

from ..errors import InvalidPrefix, PrefixNotFound, PrefixServeError
from ..model import ModelSpec
from .arena import KvArena

__all__ = [
    "PrefixProvider",
    "PrefixState",
    "PrefixTable",
    "prefix_length",
    "prefix_nbytes",
]


class PrefixProvider(Protocol):
    def length(self, prefix_id: str) -> int:
        """Prefix length P; raises PrefixNotFound for an unknown id."""
        ...

    def acquire(self, prefix_id: str) -> int:
        """Pin the prefix for one request (and start loading it); returns its length."""
        ...

    def is_ready(self, prefix_id: str) -> bool:
        """True once the prefix K/V are on the device."""
        ...

    def get(self, prefix_id: str) -> PrefixState:
        """The resident K/V `[n_layer, 2, n_head, P, head_dim]` or NTK prefix (only when ready)."""
        ...

    def release(self, prefix_id: str) -> None:
        """Drop one pin taken by `acquire`."""
        ...

    def failure(self, prefix_id: str) -> PrefixServeError | None:
        """The error of a load that failed, else None."""
        ...

    def residency(self) -> tuple[int, int, int]:
        """(prefixes on the device, their bytes, the byte budget; 0: no budget)."""
        ...

    def attach(self, arena: KvArena) -> None:
        """The engine's KV pool, where the provider may keep KV prefixes beside the rows' tokens."""
        ...

    def reclaim(self, blocks: int) -> bool:
        """Free arena blocks for rows by evicting prefixes no request uses; whether `blocks` are free."""
        ...

    def blocks_wanted(self) -> int:
        """Arena blocks that loaded prefixes wait for."""
        ...


@dataclass
class _Entry:
    length: int
    kv: PrefixState | None  # on the device; None while loading
    pins: int = 0
    error: PrefixServeError | None = None


class PrefixTable:
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device, max_len: int) -> None:
        self.spec, self.dtype, self.device, self.max_len = spec, dtype, device, max_len
        self._entries: dict[str, _Entry] = {}

    def register(self, prefix_id: str, state: PrefixState | torch.Tensor) -> None:
        """Make a prefix resident (validated by its kind, in the model's dtype, on its device); a bare
        K/V tensor `[L, 2, H, P, D]` is a KV prefix."""
        state = as_state(state)
        kind = kind_of(state)
        if (problem := kind.check(state, self.spec, self.max_len)) is not None:
            raise InvalidPrefix(problem)
        state, length = kind.to(state, self.device, self.dtype), kind.length(state)
        entry = self._entries.get(prefix_id)
        if entry is None:
            self._entries[prefix_id] = _Entry(length, state)
        elif entry.length != length:
            raise InvalidPrefix(
                f"prefix {prefix_id!r} was announced with length {entry.length}, got {length}"
            )
        else:
            entry.kv = state

    def announce(self, prefix_id: str, length: int) -> None:
        """Declare a prefix that exists but is not on the device yet; requests for it wait."""
        if not 1 <= length <= self.max_len:
            raise InvalidPrefix(f"prefix length must be in [1, {self.max_len}], got {length}")
        self._entries.setdefault(prefix_id, _Entry(length, None))

    def fail(self, prefix_id: str, error: PrefixServeError) -> None:
        """Mark an announced prefix as failed to load; requests waiting for it end with `error`."""
        self._get(prefix_id).error = error

    def failure(self, prefix_id: str) -> PrefixServeError | None:
        entry = self._entries.get(prefix_id)
        return entry.error if entry is not None else None

    def remove(self, prefix_id: str) -> None:
        self._entries.pop(prefix_id, None)

    def __contains__(self, prefix_id: str) -> bool:
        return prefix_id in self._entries

    def length(self, prefix_id: str) -> int:
        return self._get(prefix_id).length

    def is_ready(self, prefix_id: str) -> bool:
        entry = self._entries.get(prefix_id)
        return entry is not None and entry.kv is not None

    def acquire(self, prefix_id: str) -> int:
        """Pin a prefix for a request; returns its length."""
        entry = self._get(prefix_id)
        entry.pins += 1
        return entry.length

    def get(self, prefix_id: str) -> PrefixState:
        entry = self._get(prefix_id)
        if entry.kv is None:
            raise RuntimeError(f"prefix {prefix_id!r} is not on the device yet")
        return entry.kv

    def release(self, prefix_id: str) -> None:
        entry = self._entries.get(prefix_id)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def pins(self, prefix_id: str) -> int:
        return self._get(prefix_id).pins

    def residency(self) -> tuple[int, int, int]:
        states = [e.kv for e in self._entries.values() if e.kv is not None]
        return len(states), sum(prefix_nbytes(s) for s in states), 0

    # registered prefixes are never evicted, so they keep tensors of their own, out of the KV pool
    def attach(self, arena: KvArena) -> None:
        pass

    def reclaim(self, blocks: int) -> bool:
        return False

    def blocks_wanted(self) -> int:
        return 0

    def _get(self, prefix_id: str) -> _Entry:
        entry = self._entries.get(prefix_id)
        if entry is None:
            raise PrefixNotFound(prefix_id)
        return entry
