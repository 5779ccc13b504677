"""Where the Triton kernels run, and their ahead-of-time compile checks.

The kernels (kinds/ntk_triton.py, the engine's triton_decode.py) serve CUDA tensors. Under Triton's own
interpreter (`TRITON_INTERPRET=1`, set before triton is first imported) the same kernels run on CPU
tensors, slowly and without bounds checks: the tests use it to check every kernel and the engine's
Triton paths against their eager references on machines without a GPU (scripts/test.sh's kernel stage).
A server is never started with it.

`compile_report` compiles a kernel for an NVIDIA architecture without a GPU (Triton's compiler and the
`ptxas` in its wheel) and reads the registers and spills ptxas reports, so CI sees a kernel that no
longer fits its register budget or starts spilling to local memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without the test extras: the eager paths serve
    triton = tl = None


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (on CPU tensors)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device) -> bool:
    """Whether this process runs Triton kernels on tensors of `device`: CUDA, or the CPU under the
    interpreter."""
    if triton is None:
        return False
    return device.type == "cpu" if interpreting() else device.type == "cuda"


@dataclass(frozen=True)
class CompileReport:
    """What ptxas reports for one compiled kernel."""

    arch: int  # 80: sm_80 (A100), 90: sm_90 (H100)
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes of static shared memory


def compile_report(
    kernel, signature: dict[str, str], constexprs: dict[str, object], arch: int, num_warps: int = 4
) -> CompileReport:
    """Compile `kernel` (a `@triton.jit` function) for sm_`arch` with the argument types `signature`
    (e.g. `{"q_ptr": "*fp16", "n": "i32"}`, constexprs included as "constexpr") and the `constexprs`
    values, then assemble its PTX with ptxas -v. Needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return _ptxas_usage(compiled.asm["ptx"], arch)


def _ptxas_usage(ptx: str, arch: int) -> CompileReport:
    """Run ptxas -v on `ptx` for sm_`arch` -> its resource report."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "kernel.cubin")],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    text = out.stderr + out.stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return CompileReport(
        arch=arch,
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        shared=number(r"(\d+) bytes smem"),
    )
