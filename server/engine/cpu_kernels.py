"""The CPU decode kernel (paged_decode.c): built once per machine with the system C compiler, loaded
with ctypes. No torch headers, so a build takes about a second; the shared object is cached under
`$PREFIXSERVE_KERNEL_DIR` (default `~/.cache/prefixserve/kernels`), named by a hash of the source, the
flags and the CPU, and written atomically so processes starting together share it.

Where there is no compiler (or the build fails), `load_paged_decode()` returns None and the runner
gathers blocks instead: slower, same numbers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
# -O3 vectorises the dot products and sums; reassociation is allowed, finite-math is not (NaN must
# propagate: bad rows are found by their outputs)
FLAGS = [
    "-O3", "-march=native", "-fPIC", "-shared",
    "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
]  # fmt: skip
# The rows go to the OpenMP team torch already runs (libgomp.so.1, loaded once per process): a compiler
# without OpenMP builds the kernel serial instead.
OPENMP = ["-fopenmp"]


# the dtypes the C code serves, by its code for them (paged_decode.c's enum)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class PagedDecode:
    """`paged_decode(q, k_pool, v_pool, table, lens, out, lse, scale[, prefix])`: see `__call__`."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.paged_decode
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        # q, q_stride, k, v, table, nb, lens, pre_slot, pre_len, rows, block_size, heads, kv_heads, dim,
        # scale, out, lse, threads, dtype
        fn.argtypes = [
            ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, i32, i32, i32, i32, i32, ctypes.c_float, ptr,
            ptr, i32, i32,
        ]  # fmt: skip
        fn.restype = ctypes.c_int
        self._fn = fn
        served = lib.paged_decode_dtypes()  # bit 1 << code per dtype (float16 needs the compiler's _Float16)
        self.dtypes = frozenset(dt for dt, code in DTYPE_CODES.items() if served >> code & 1)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        table: torch.Tensor,
        lens: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor | None,
        scale: float,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Row r's query `q[r]` `[H, D]` over its own `lens[r]` tokens, found in the pool `k`/`v`
        `[num_blocks, block_size, H_kv, D]` through `table [R, nb]` (int64): writes `out [R, H, D]` and,
        when given, `lse [R, H]` (float32, log-sum-exp of the scaled scores). Query head h reads KV head
        `h // (H / H_kv)` (grouped-query attention, H_kv dividing H; GPT-2 has H_kv = H). On the CPU,
        q, the pools and out in one of `self.dtypes` (every sum float32); q may be a strided view of
        rows (each `[H, D]` contiguous), the rest contiguous.

        `prefix = (slot [R] int64, length [R] int32)`: row r's keys begin with `length[r]` prefix
        positions at the pool's flat slots `slot[r] ..` (a KV prefix placed in the pool; length 0: none)."""
        rows, heads, dim = q.shape
        _check_layout(q, k, v, table, lens, out, lse, prefix, self.dtypes)
        if rows == 0:
            return
        slot, length = (None, None) if prefix is None else (prefix[0].data_ptr(), prefix[1].data_ptr())
        failed = self._fn(
            q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), table.data_ptr(), table.shape[1],
            lens.data_ptr(), slot, length, rows, k.shape[1], heads, k.shape[2], dim, scale, out.data_ptr(),
            None if lse is None else lse.data_ptr(), torch.get_num_threads(), DTYPE_CODES[q.dtype],
        )  # fmt: skip
        if failed == 1:
            raise MemoryError("paged_decode: out of memory for its scratch buffers")
        if failed:
            raise ValueError(f"paged_decode: this build does not serve {q.dtype}")


def _check_layout(q, k, v, table, lens, out, lse, prefix, dtypes: frozenset) -> None:
    """What the C code takes for granted (it reads raw memory): one of the `dtypes` it serves, KV heads
    that divide the query's heads, and every row's tokens within its block table and every block and
    prefix slot within the pool (checked on the host: a CPU kernel has no device to wait for).
    ValueError otherwise."""
    rows, heads, _ = q.shape
    bad = layout_problems(q, k, v, table, lens, out, lse, prefix)
    names = sorted(str(dt).removeprefix("torch.") for dt in dtypes)
    bad += [] if q.dtype in dtypes else [f"tensors of one of {', '.join(names)}"]
    grouped = k.dim() == 4 and k.shape[2] > 0 and heads % k.shape[2] == 0
    bad += [] if grouped else ["pools whose KV heads divide the query's heads"]
    if not bad and rows:  # the layout is sound: the bounds can be read
        slots = k.shape[0] * k.shape[1]
        if not (int(lens.min()) >= 1 and int(lens.max()) <= table.shape[1] * k.shape[1]):
            bad.append("lens within tables")
        if not (int(table.min()) >= 0 and int(table.max()) < k.shape[0]):
            bad.append("block ids within the pool")
        if prefix is not None and (
            int(prefix[0].min()) < 0 or int(prefix[1].min()) < 0 or int((prefix[0] + prefix[1]).max()) > slots
        ):
            bad.append("prefix slots within the pool")
    if bad:
        raise ValueError(f"paged_decode: expected {', '.join(bad)}")


def layout_problems(q, k, v, table, lens, out, lse, prefix) -> list[str]:
    """What any paged decode kernel takes for granted about its arguments' dtypes, shapes and strides
    (read from metadata only: no host synchronisation) -> what is wrong, as phrases (none: all sound)."""
    rows, heads, dim = q.shape
    problems = [
        q.dtype == k.dtype == v.dtype == out.dtype or "q, K/V pools and out of one dtype",
        (q.stride(2) == 1 and q.stride(1) == dim) or "q rows of contiguous [H, D]",
        (k.is_contiguous() and v.is_contiguous() and k.shape == v.shape) or "contiguous K/V pools",
        (k.dim() == 4 and k.shape[3] == dim) or "pools [blocks, block_size, KV heads, the query's dim]",
        (table.dtype == torch.int64 and table.is_contiguous() and table.shape[0] == rows) or "an int64 table",
        (lens.dtype == torch.int32 and lens.shape == (rows,)) or "int32 lens per row",
        (out.is_contiguous() and out.shape == q.shape) or "a contiguous out like q",
        lse is None
        or (lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == (rows, heads))
        or "a contiguous float32 lse [R, H]",
    ]
    if prefix is not None:
        slot, length = prefix
        ok = (
            slot.dtype == torch.int64
            and length.dtype == torch.int32
            and slot.shape == length.shape == (rows,)
        )
        if not (ok and slot.is_contiguous() and length.is_contiguous()):
            problems.append("a contiguous int64 prefix slot and int32 prefix length per row")
    return [p for p in problems if p is not True]


def kernel_dir() -> Path:
    default = Path.home() / ".cache" / "prefixserve" / "kernels"
    return Path(os.environ.get("PREFIXSERVE_KERNEL_DIR") or default)


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        for extra in (OPENMP, []):
            done = subprocess.run(
                [compiler, *FLAGS, *extra, str(SOURCE), "-o", str(partial), "-lm"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if done.returncode == 0:
                break
        done.check_returncode()
        os.replace(partial, target)  # atomic: a process starting now sees the old state or this one
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def load_paged_decode() -> PagedDecode | None:
    """The kernel, built on first use; None where it cannot be built here (the runner gathers)."""
    try:
        flags = " ".join(FLAGS + OPENMP).encode()
        key = hashlib.sha256(SOURCE.read_bytes() + flags + _cpu_id().encode()).hexdigest()
        target = kernel_dir() / f"paged_decode-{key[:16]}.so"  # (no home directory: RuntimeError)
        if not target.exists():
            _build(target)
        return PagedDecode(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        log.warning("CPU decode kernel unavailable (%s%s); gathering KV blocks instead", e, detail[-500:])
        return None
