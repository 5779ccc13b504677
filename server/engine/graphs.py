"""Piecewise CUDA graphs: each layer's dense part replayed as two captured graphs, attention eager.

A step's attention depends on its rows (block tables, which prefixes, how they group), but everything
else in a layer works on the step's tokens `[N, C]` alone, whatever rows they belong to. So, as vLLM v1
does, each layer is cut at attention: `pre` (layer norm, QKV projection) and `post` (output projection,
residual, layer norm, MLP, residual) are captured once per bucket of token counts and replayed; the K/V
write and the attention run eagerly between them. A step of N tokens uses the smallest bucket >= N: its
tokens go into the bucket's static buffers, the rows past N are padding whose values nobody reads (the
dense ops never mix rows). Capture happens the first time a bucket is needed; every bucket shares one
memory pool, and steps larger than the largest bucket run eagerly.

How a piece becomes replayable is the `Capture` seam: `CudaGraphs` captures on CUDA; `Eager` (the CPU)
runs the same pieces on the same buffers without capture, which is how the tests check the bucketing
and buffers without a GPU; the tests also plug in a stand-in that records a piece's operations, replays
them, and refuses a host synchronisation inside a piece (tests/test_graphs.py), as a CUDA capture does.
Whether graphs are in use is `PiecewiseGraphs.mode`: the engine reports it (log, the
`prefixserve_engine_cuda_graphs` gauge, /server/stats) rather than running eagerly unseen.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Protocol

import torch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)

# (layer, x [n, C], qkv) -> the QKV projection written into `qkv [n, 3C]`;
# (layer, x, attn [n, C]) -> x updated in place
Pre = Callable[[int, torch.Tensor, torch.Tensor], object]
Post = Callable[[int, torch.Tensor, torch.Tensor], None]
# (layer, qkv [n, 3C], attn out [n, C]) -> None: writes the K/V, then the attention into `attn`
Attend = Callable[[int, torch.Tensor, torch.Tensor], None]


class Capture(Protocol):
    """Turns a piece (a function over static buffers) into its replay. Raises RuntimeError when the
    piece cannot be captured (the graphs are then given up: steps run eagerly)."""

    captures: bool  # whether pieces are really captured (False: they run as written)

    def piece(self, fn: Callable[[], None]) -> Callable[[], None]: ...


class Eager:
    """No capture: each piece runs as written (the CPU)."""

    captures = False

    def piece(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn


class CudaGraphs:
    """Each piece as a CUDA graph, all of them in one memory pool."""

    captures = True

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def piece(self, fn: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture (lazy inits, cuBLAS workspaces)
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prefix pool's loader threads may copy to the device while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        return graph.replay


class _Bucket:
    """Static buffers for `size` tokens and each layer's two pieces over them."""

    def __init__(
        self,
        size: int,
        layers: int,
        widths: tuple[int, int, int],
        pre: Pre,
        post: Post,
        like: torch.Tensor,
        capture: Capture,
    ) -> None:
        width, qkv_width, attn_width = widths
        self.x = like.new_zeros(size, width)  # [Nb, C] the residual stream
        self.qkv = like.new_zeros(size, qkv_width)  # [Nb, W] queries, keys, values
        self.attn = like.new_zeros(size, attn_width)  # [Nb, H*D]
        self.pre = [capture.piece(lambda i=i: pre(i, self.x, self.qkv)) for i in range(layers)]
        self.post = [capture.piece(lambda i=i: post(i, self.x, self.attn)) for i in range(layers)]

    def run(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The layers over x `[n, C]` (n <= size) -> the final residual stream `[n, C]` (a view of the
        bucket's buffer, valid until its next run)."""
        n = x.shape[0]
        # rows n.. keep whatever earlier steps left (even inf/NaN in half precision): the dense pieces
        # never mix rows and only rows :n are read, so nothing looks at them
        self.x[:n].copy_(x)
        for layer, (pre, post) in enumerate(zip(self.pre, self.post, strict=True)):
            pre()
            attend(layer, self.qkv[:n], self.attn[:n])
            post()
        return self.x[:n]


class PiecewiseGraphs:
    """The buckets of one runner, made on first use."""

    def __init__(
        self,
        layers: int,
        widths: tuple[int, int, int],
        pre: Pre,
        post: Post,
        like: torch.Tensor,
        capture: Capture,
        max_tokens: int,
    ) -> None:
        """`widths`: the residual stream's (C), the fused QKV projection's, attention's output's (H*D)."""
        self._make = lambda size: _Bucket(size, layers, widths, pre, post, like, self.capture)
        self.capture = capture
        self.sizes = [b for b in BUCKETS if b <= max_tokens]
        self._buckets: dict[int, _Bucket] = {}
        self.failure: str | None = None  # why capturing failed (the graphs were then given up)

    @property
    def mode(self) -> str:
        """ "graphs": pieces captured and replayed; "eager": the same pieces run without capture (no
        graphs on this device); "failed": a capture failed, every step runs eagerly."""
        if self.failure is not None:
            return "failed"
        return "graphs" if self.capture.captures else "eager"

    def bucket(self, tokens: int) -> _Bucket | None:
        """The bucket for a step of `tokens` tokens; None past the largest (that step runs eagerly)."""
        i = bisect.bisect_left(self.sizes, tokens)
        if i == len(self.sizes):
            return None
        size = self.sizes[i]
        if size not in self._buckets:
            try:
                self._buckets[size] = self._make(size)
            except RuntimeError as e:  # a capture the platform refuses: serve eagerly rather than not at all
                log.exception("capturing the %d-token graphs failed; steps run eagerly from now on", size)
                self.failure = f"{size}-token bucket: {e}"
                self.sizes = []
                return None
        return self._buckets[size]

    @property
    def captured(self) -> list[int]:
        """The bucket sizes made so far."""
        return sorted(self._buckets)
