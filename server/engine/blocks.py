"""The KV block allocator: which blocks of the paged KV pool are free (pure CPU, no tensors).

A row's own tokens (input and generated) live in fixed-size blocks of `block_size` tokens; its block
table lists them in order, so token i sits in block `table[i // block_size]` at offset
`i % block_size` (vLLM's PagedAttention layout). Block 0 is never handed out: it stays zero and pads
block tables, so a padded read sees finite numbers.

The same pool holds the resident KV prefixes (S-LoRA's unified paging; arena.py): each one in a run
of consecutive blocks, so that it can be read in place as one strided tensor. Rows take the lowest
free blocks and prefix runs are cut from the top, which keeps the two apart and the free space at the
top in long runs. Free space is a sorted list of disjoint intervals. Thread-safe: the scheduler
allocates on the engine's thread while prefixes are placed by the device pool's loader threads.
"""

from __future__ import annotations

import bisect
import threading

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._starts: list[int] = [1]  # free intervals [start, end), sorted, disjoint, never adjacent
        self._ends: list[int] = [num_blocks]
        self._num_free = num_blocks - 1
        self._lock = threading.Lock()
        self.generation = 0  # bumped by every free: a caller waiting for a run knows when to look again

    @property
    def capacity(self) -> int:
        """Blocks a row can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return self._num_free

    def allocate(self, n: int) -> list[int]:
        """n blocks, the lowest free ones (a row's own tokens)."""
        taken = self.try_allocate(n)
        if taken is None:
            raise RuntimeError(f"asked for {n} KV blocks, {self._num_free} are free")
        return taken

    def try_allocate(self, n: int, keep: int = 0) -> list[int] | None:
        """n of the lowest free blocks if n + keep are free, else None (one atomic step: a prefix may be
        placed from another thread between a caller's look at `num_free` and its allocation)."""
        with self._lock:
            if n + keep > self._num_free:
                return None
            taken: list[int] = []
            while len(taken) < n:
                start, end = self._starts[0], self._ends[0]
                cut = min(end, start + n - len(taken))
                taken += range(start, cut)
                if cut == end:
                    del self._starts[0], self._ends[0]
                else:
                    self._starts[0] = cut
            self._num_free -= n
            return taken

    def allocate_run(self, n: int) -> int | None:
        """n consecutive blocks, from the highest free interval that holds them (a prefix); returns
        the first block, or None when no free run is that long."""
        with self._lock:
            for i in range(len(self._starts) - 1, -1, -1):
                if self._ends[i] - self._starts[i] >= n:
                    self._ends[i] -= n
                    first = self._ends[i]
                    if self._ends[i] == self._starts[i]:
                        del self._starts[i], self._ends[i]
                    self._num_free -= n
                    return first
            return None

    def free(self, blocks: list[int]) -> None:
        with self._lock:
            bad = [b for b in blocks if not NULL_BLOCK < b < self.num_blocks or self._is_free(b)]
            if bad or len(set(blocks)) != len(blocks):
                raise RuntimeError(
                    f"freeing KV blocks that were never handed out or are already free: {(bad or blocks)[:4]}"
                )
            for start, end in _runs(sorted(blocks)):
                self._insert(start, end)
            self._num_free += len(blocks)
            self.generation += 1

    def free_run(self, first: int, n: int) -> None:
        self.free(list(range(first, first + n)))

    def _is_free(self, block: int) -> bool:
        i = bisect.bisect_right(self._starts, block) - 1
        return i >= 0 and block < self._ends[i]

    def _insert(self, start: int, end: int) -> None:
        """Add the free interval [start, end), merging it with its neighbours (lock held)."""
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._ends[i - 1] == start:  # joins the interval before it
            i -= 1
            self._ends[i] = end
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
        if i + 1 < len(self._starts) and self._starts[i + 1] == self._ends[i]:  # and the one after
            self._ends[i] = self._ends[i + 1]
            del self._starts[i + 1], self._ends[i + 1]


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block ids -> the intervals [start, end) of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs
