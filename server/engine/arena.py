"""KV prefixes inside the engine's paged KV pool (S-LoRA's unified paging).

A resident KV prefix takes a run of consecutive blocks of the same pool that holds the rows' own
tokens, `kv [n_layer, 2, num_blocks, block_size, n_head, head_dim]`, and is read in place through a
strided view `[n_layer, 2, n_head, P, head_dim]`: exactly the layout the prefix kinds read, so
attention (Hydragen's shared matmul, the padded stack of short prefixes) is unchanged. One budget of
blocks then serves both: a burst of long prefixes and a burst of long requests trade memory. The
device pool (prefix_store/pool.py) places prefixes here and gives their blocks back when it evicts
them; the scheduler asks it to evict unpinned ones before it preempts a row for want of blocks.
"""

from __future__ import annotations

import threading

import torch

from prefix_store.state import KvPrefix

from .blocks import BlockAllocator, blocks_for


class KvArena:
    """`prefix_cap`: the most blocks prefixes may hold together. The rest is the rows' alone, at least
    one longest row: however many waiting requests pin prefixes, some request can always run."""

    def __init__(self, kv: torch.Tensor, blocks: BlockAllocator, prefix_cap: int) -> None:
        self.kv, self.blocks = kv, blocks  # kv [L, 2, NB, bs, H, D]
        self.prefix_cap = prefix_cap
        self.prefix_blocks = 0  # held by placed prefixes
        self._runs: dict[int, tuple[int, int]] = {}  # view's data_ptr -> (first block, blocks)
        self._lock = threading.Lock()

    def blocks_needed(self, prefix: KvPrefix) -> int:
        """Blocks a prefix of P positions takes."""
        return blocks_for(prefix.length, self.blocks.block_size)

    def fits(self, blocks: int) -> bool:
        """Whether a prefix of `blocks` blocks can ever be placed (under the cap)."""
        return blocks <= self.prefix_cap

    def room(self) -> int:
        """Blocks prefixes may still take under the cap."""
        return self.prefix_cap - self.prefix_blocks

    @property
    def num_free(self) -> int:
        return self.blocks.num_free

    @property
    def generation(self) -> int:
        return self.blocks.generation

    def place(self, prefix: KvPrefix) -> KvPrefix | None:
        """Copy a prefix (its K/V on any device, in any dtype) into a run of free blocks: -> the prefix
        read in place there (a view `[L, 2, H, P, D]` of the pool), or None when no run of free blocks
        is long enough now."""
        n = self.blocks_needed(prefix)
        with self._lock:
            if n > self.room():
                return None
            first = self.blocks.allocate_run(n)
            if first is None:
                return None
            self.prefix_blocks += n
        L, _, _, bs, H, D = self.kv.shape
        run = self.kv[:, :, first : first + n].view(L, 2, n * bs, H, D)  # [L, 2, n*bs, H, D]
        p = prefix.length
        run[:, :, p:].zero_()  # the last block's tail: never read, kept finite
        view = run[:, :, :p].transpose(2, 3)  # [L, 2, H, P, D]
        view.copy_(prefix.kv)
        with self._lock:
            self._runs[view.data_ptr()] = (first, n)
        return KvPrefix(view)

    def first_slot(self, prefix: KvPrefix) -> int | None:
        """The pool slot (block * block_size) holding a placed prefix's first position; None for a
        prefix not placed here. Its positions are the slots that follow (one run of blocks)."""
        with self._lock:
            run = self._runs.get(prefix.kv.data_ptr())
        return None if run is None else run[0] * self.blocks.block_size

    def release(self, prefix: KvPrefix) -> None:
        """Give a placed prefix's blocks back (nothing may read its view afterwards)."""
        with self._lock:
            first, n = self._runs.pop(prefix.kv.data_ptr())
            self.prefix_blocks -= n
            self.blocks.free_run(first, n)

    def usage(self) -> tuple[int, int]:
        """(free blocks, blocks held by prefixes), read together (prefixes are placed from the device
        pool's loader threads)."""
        with self._lock:
            return self.blocks.num_free, self.prefix_blocks
