"""Piecewise CUDA graphs: each layer's dense part replayed as two captured graphs, attention eager.

A step's attention depends on its rows (block tables, which prefixes, how they group), but everything
else in a layer works on the step's tokens `[N, C]` alone, whatever rows they belong to. So, as vLLM v1
does, each layer is cut at attention: `pre` (layer norm, QKV projection) and `post` (output projection,
residual, layer norm, MLP, residual) are captured once per bucket of token counts and replayed; the K/V
write and the attention run eagerly between them. A step of N tokens uses the smallest bucket >= N: its
tokens go into the bucket's static buffers, the rows past N are padding whose values nobody reads (the
dense ops never mix rows). Capture happens the first time a bucket is needed; every bucket shares one
memory pool, and steps larger than the largest bucket run eagerly.

On the CPU nothing is captured: the same pieces run eagerly on the same buffers (`capture=False`),
which is how the tests check the bucketing and buffers without a GPU.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)

# (layer, x [n, C], qkv) -> the QKV projection written into `qkv [n, 3C]`;
# (layer, x, attn [n, C]) -> x updated in place
Pre = Callable[[int, torch.Tensor, torch.Tensor], object]
Post = Callable[[int, torch.Tensor, torch.Tensor], None]
# (layer, qkv [n, 3C], attn out [n, C]) -> None: writes the K/V, then the attention into `attn`
Attend = Callable[[int, torch.Tensor, torch.Tensor], None]


class _Bucket:
    """Static buffers for `size` tokens and each layer's two pieces over them."""

    def __init__(
        self, size: int, layers: int, width: int, pre: Pre, post: Post, like: torch.Tensor, pool: object
    ) -> None:
        self.x = like.new_zeros(size, width)  # [Nb, C] the residual stream
        self.qkv = like.new_zeros(size, 3 * width)  # [Nb, 3C]
        self.attn = like.new_zeros(size, width)  # [Nb, C]
        self.pre = [_piece(lambda i=i: pre(i, self.x, self.qkv), pool) for i in range(layers)]
        self.post = [_piece(lambda i=i: post(i, self.x, self.attn), pool) for i in range(layers)]

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


def _piece(fn: Callable[[], None], pool: object) -> Callable[[], None]:
    """`fn` as a replayable CUDA graph (pool given), or `fn` itself (no pool: the CPU)."""
    if pool is None:
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture (lazy inits, cuBLAS workspaces)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the prefix pool's loader threads may copy to the device while this thread captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph.replay


class PiecewiseGraphs:
    """The buckets of one runner, made on first use."""

    def __init__(
        self,
        layers: int,
        width: int,
        pre: Pre,
        post: Post,
        like: torch.Tensor,
        capture: bool,
        max_tokens: int,
    ) -> None:
        self._make = lambda size, pool: _Bucket(size, layers, width, pre, post, like, pool)
        self.sizes = [b for b in BUCKETS if b <= max_tokens]
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._buckets: dict[int, _Bucket] = {}

    def bucket(self, tokens: int) -> _Bucket | None:
        """The bucket for a step of `tokens` tokens; None past the largest (that step runs eagerly)."""
        i = bisect.bisect_left(self.sizes, tokens)
        if i == len(self.sizes):
            return None
        size = self.sizes[i]
        if size not in self._buckets:
            try:
                self._buckets[size] = self._make(size, self._pool)
            except RuntimeError:  # a capture the platform refuses: serve eagerly rather than not at all
                log.exception("capturing the %d-token graphs failed; steps run eagerly from now on", size)
                self.sizes = []
                return None
        return self._buckets[size]

    @property
    def captured(self) -> list[int]:
        """The bucket sizes made so far."""
        return sorted(self._buckets)
