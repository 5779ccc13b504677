"""Ahead-of-time compile checks of every Triton kernel, for sm_80 (A100) and sm_90 (H100) in every dtype it
serves, without a GPU: Triton compiles each to PTX and the `ptxas` in its wheel assembles it. Each must
compile, spill nothing to local memory, and stay within the register budget its module states
(`REGISTER_BUDGET`): a kernel edit that bloats registers or starts spilling fails here, on the CPU."""

from __future__ import annotations

import pytest

from prefix_store.triton_env import compile_report, interpreting, triton

pytestmark = [
    pytest.mark.skipif(triton is None, reason="Triton is in the test extras (scripts/setup.sh --test)"),
    pytest.mark.skipif(
        interpreting(), reason="under TRITON_INTERPRET=1 kernels are interpreted, not compiled"
    ),
]

ARCHS = (80, 90)
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}  # the dtypes the kernels serve


def paged_decode_cases(dt: str):
    from prefixserve.engine import triton_decode as m

    pointers = {p: f"*{dt}" for p in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ints = {"table_ptr": "*i64", "lens_ptr": "*i32", "pre_slot_ptr": "*i64", "pre_len_ptr": "*i32"}
    state = {"lse_ptr": "*fp32", "acc_ptr": "*fp32", "ml_ptr": "*fp32"}
    scalars = {
        "q_stride": "i32",
        "nb": "i32",
        "num_slots": "i64",
        "block_size": "i32",
        "group": "i32",
        "scale": "fp32",
    }
    for splits in (1, 8):
        const = dict(
            H=12, H_KV=12, D=64, BLOCK_D=64, BLOCK_N=m.BLOCK_N, SPLITS=splits, HAS_PREFIX=True, HAS_LSE=True
        )
        sig = {**pointers, **ints, **state, **scalars, **dict.fromkeys(const, "constexpr")}
        yield f"_decode_part splits={splits}", m._decode_part, sig, const, m.REGISTER_BUDGET
    const = dict(H=12, D=64, BLOCK_D=64, SPLITS=8, HAS_LSE=True)
    sig = {"out_ptr": f"*{dt}", **state, **dict.fromkeys(const, "constexpr")}
    yield "_merge_parts", m._merge_parts, sig, const, m.REGISTER_BUDGET


def ntk_cases(dt: str):
    from prefix_store.kinds import ntk_triton as m

    names = ["q_ptr", "k_ptr", "v_ptr", "lens_ptr", "z_ptr", "kv_ptr", "out_ptr"]
    sig = {n: ("*i32" if n == "lens_ptr" else f"*{dt}") for n in names}
    strides = ["sq_s", "sq_h", "sk_s", "sk_h", "sk_n", "sz_s", "sz_h", "skv_s", "skv_h", "so_s", "so_h"]
    sig |= dict.fromkeys(strides, "i32") | {
        "scale": "fp32",
        "d_root4": "fp32",
        "D": "constexpr",
        "BLOCK_N": "constexpr",
    }
    yield "_ntk_decode_kernel", m._ntk_decode_kernel, sig, {"D": 64, "BLOCK_N": m.BLOCK_N}, m.REGISTER_BUDGET


def cases():
    for dt in DTYPES:
        for arch in ARCHS:
            for name, kernel, sig, const, budget in (*paged_decode_cases(dt), *ntk_cases(dt)):
                yield pytest.param(kernel, sig, const, budget, arch, id=f"{name}-{dt}-sm{arch}")


@pytest.mark.parametrize("kernel,signature,constexprs,budget,arch", list(cases()) if triton else [])
def test_kernel_compiles_without_spills_within_its_register_budget(
    kernel, signature, constexprs, budget, arch
):
    report = compile_report(kernel, signature, constexprs, arch)
    assert report.registers > 0, "ptxas reported no register count"
    assert report.spill_stores == report.spill_loads == 0, f"spills to local memory: {report}"
    assert report.registers <= budget, f"{report.registers} registers per thread, budget {budget}"
