"""The KV block allocator: which blocks of the paged KV pool are free (pure CPU, no tensors).

A row's own tokens (input and generated) live in fixed-size blocks of `block_size` tokens; its block
table lists them in order, so token i sits in block `table[i // block_size]` at offset
`i % block_size` (vLLM's PagedAttention layout). Block 0 is never handed out: it stays zero and pads
block tables, so a padded read sees finite numbers.
"""

from __future__ import annotations

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
        self._free: list[int] = []  # returned blocks, reused first (LIFO)
        self._fresh = 1  # blocks >= this were never handed out (block 0 is the null block)

    @property
    def capacity(self) -> int:
        """Blocks a row can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_blocks - self._fresh

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} are free")
        reused = min(n, len(self._free))
        taken = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        fresh = n - reused
        taken += range(self._fresh, self._fresh + fresh)
        self._fresh += fresh
        return taken

    def free(self, blocks: list[int]) -> None:
        bad = [b for b in blocks if not NULL_BLOCK < b < self._fresh]
        if bad:
            raise RuntimeError(f"freeing KV blocks that were never handed out: {bad[:4]}")
        self._free.extend(blocks)
