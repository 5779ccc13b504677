"""A step's small integer inputs (token ids, positions, KV slots, block tables, query groups), staged in
one persistent host buffer and copied to the device in one transfer.

Building each of them with `torch.tensor(list, device=...)` costs an allocation and a synchronous
host-to-device copy apiece (~6-15 per step); here every input is written into its aligned place in one
byte buffer (pinned on CUDA, so the copy is asynchronous) and `upload` sends the used bytes at once.
`put` returns the input's device view right away: on CUDA its values arrive with `upload`, which the
runner calls before it enqueues any kernel that reads them (same stream, so in order). On the CPU the
host buffer is the device buffer: nothing is copied.

The buffers live for the engine's lifetime. A step that needs more than the capacity gets separate
tensors for what does not fit (correct, just slower) and the buffers grow before the next step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ALIGN = 8  # bytes: every input starts at a multiple of its widest element type
_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


class StepInputs:
    def __init__(self, device: torch.device, capacity: int = 1 << 16) -> None:
        self.device = device
        self.uploads = 0  # host-to-device transfers made (tests)
        self._want = capacity
        self._used = 0
        self._copied: torch.cuda.Event | None = None  # the last upload, on CUDA
        self._allocate(capacity)

    def _allocate(self, nbytes: int) -> None:
        pinned = self.device.type == "cuda"
        self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)  # [nbytes]
        self._host_np = self._host.numpy()
        self._dev = self._host if not pinned else torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @property
    def capacity(self) -> int:
        return self._host.numel()

    def begin(self) -> None:
        """Start a step's inputs. The host buffer is reused only once the last upload has left it."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        if self._want > self.capacity:
            self._allocate(self._want)
        self._used = 0

    def put(self, values: Sequence[int] | np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Stage `values` (ints, or bools for dtype bool) -> their device tensor `[len(values)]` (its values
        are there once `upload` ran)."""
        n = len(values)
        nbytes = n * dtype.itemsize
        start = -(-self._used // ALIGN) * ALIGN
        if start + nbytes > self.capacity:  # does not fit this step: its own tensor, a bigger buffer next
            self._want = max(self._want, 2 * (start + nbytes))
            return torch.tensor(np.asarray(values, dtype=_NUMPY[dtype]), device=self.device)
        self._host_np[start : start + nbytes].view(_NUMPY[dtype])[:] = values
        self._used = start + nbytes
        return self._dev[start : start + nbytes].view(dtype)

    def put2d(self, rows: Sequence[Sequence[int]], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Stage equal-length rows -> their device tensor `[len(rows), len(rows[0])]`."""
        width = len(rows[0]) if rows else 0
        return self.put([v for row in rows for v in row], dtype).view(len(rows), width)

    def upload(self) -> None:
        """Send every staged input to the device: one transfer (nothing on the CPU)."""
        if self._dev is self._host or self._used == 0:
            return
        self._dev[: self._used].copy_(self._host[: self._used], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        self.uploads += 1


class Readback:
    """A step's small results (finite flags, greedy picks) read back to the host in one transfer: into a
    persistent pinned buffer, asynchronously on CUDA, so the host can do other work (receive requests)
    while the device finishes the step; `wait` then gives the values."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host = torch.empty(0, dtype=torch.int64)
        self._done: torch.cuda.Event | None = None
        self._values: torch.Tensor | None = None

    def start(self, *parts: torch.Tensor) -> None:
        """Start copying `parts` (1-d integer or bool device tensors) to the host, concatenated."""
        flat = torch.cat([p.to(torch.int64) for p in parts])  # [n]
        if self.device.type != "cuda":
            self._values = flat
            return
        if self._host.numel() < flat.numel():
            self._host = torch.empty(2 * flat.numel(), dtype=torch.int64, pin_memory=True)
        self._values = self._host[: flat.numel()]
        self._values.copy_(flat, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self) -> list[int]:
        """The values of the last `start`, once they are on the host."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        values, self._values = self._values, None
        return values.tolist() if values is not None else []
