"""The dense layers' two layouts (dense.py): oneDNN's packed GEMM for decode-sized steps, addmm on the
plain `[C_in, C_out]` layout above PACKED_ROWS; the same numbers either way, and the engine's tokens
and logits the same with packing on or off."""

from __future__ import annotations

import pytest
import torch

from prefixserve.dense import PACKED_ROWS, Dense, packing_available
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams

from .test_engine_reference import PROMPTS, collect, make_prefixes

needs_packing = pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.float32), reason="this torch has no oneDNN"
)


def layer(c_in: int = 96, c_out: int = 160, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(c_in, c_out, generator=g) * 0.1  # [C_in, C_out]
    return w, torch.randn(c_out, generator=g) if bias else None


@needs_packing
@pytest.mark.parametrize("rows", [1, 7, 64, PACKED_ROWS, PACKED_ROWS + 1, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_and_plain_layouts_compute_the_same_layer(rows, bias):
    w, b = layer(bias=bias)
    x = torch.randn(rows, w.shape[0])
    want = x @ w + (0 if b is None else b)  # [rows, C_out]
    for dense in (
        Dense.of(w, b, pack=True),
        Dense.of(w, b, pack=False),
        Dense.of(w, b, True, keep_plain=False),
    ):
        torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)
        out = torch.full_like(want, float("nan"))
        assert dense(x, out=out) is out
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        acc = torch.randn(rows, w.shape[1])
        torch.testing.assert_close(dense.add_to(x, acc.clone()), acc + want, rtol=1e-5, atol=1e-5)


@needs_packing
def test_decode_sized_steps_take_the_packed_gemm_and_larger_ones_addmm():
    w, b = layer()
    dense = Dense.of(w, b, pack=True)
    assert dense.packed is not None and dense.packed.is_mkldnn and dense.w is w
    assert dense._packed_for(PACKED_ROWS) and not dense._packed_for(PACKED_ROWS + 1)
    head = Dense.of(w, None, True, keep_plain=False)  # the LM head: packed alone, every size
    assert head.w is None and head._packed_for(4096)
    assert Dense.of(w, b, pack=False).packed is None


def test_a_model_lays_its_dense_layers_out_once_per_choice(tiny_model):
    layers, head = tiny_model.dense(pack=True)
    assert tiny_model.dense(pack=True)[0] is layers  # made once (compile_prefix's runners reuse it)
    packed = packing_available(tiny_model.device, tiny_model.dtype)
    assert (layers[0].fc.packed is not None) == packed and (head.w is None) == packed
    plain, plain_head = tiny_model.dense(pack=False)
    assert plain[0].fc.packed is None and plain_head.w is tiny_model.weights.lm_head
    assert plain[0].fc.w is tiny_model.weights.layers[0].fc_w  # the plain layout is the model's own


def test_bfloat16_is_packed_only_where_onednn_runs_it_natively():
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert packing_available(torch.device("cpu"), torch.bfloat16) == native
    assert not packing_available(torch.device("cpu"), torch.float16)
    assert not packing_available(torch.device("meta"), torch.float32)


@needs_packing
def test_the_engine_gives_the_same_tokens_and_logits_packed_or_not(tiny_model):
    prefixes = make_prefixes(tiny_model, [3, 12])
    plan = [("p3", PROMPTS[0], 10), (None, PROMPTS[2], 8), ("p12", PROMPTS[4], 12)]
    results = []
    for packed in (True, False):
        engine = EngineCore(tiny_model, EngineConfig(max_running=4, record_logits=True, packed_gemm=packed))
        assert (engine.runner.dense[0].attn.packed is not None) == packed
        for pid, kv in prefixes.items():
            engine.prefixes.register(pid, kv)
        ids = [
            engine.add_request(text, SamplingParams(max_new_tokens=n), prefix_id=pid) for pid, text, n in plan
        ]
        outputs = engine.run_to_completion()
        results.append([collect(outputs[rid])[:2] for rid in ids])
    for (tokens, logits), (plain_tokens, plain_logits) in zip(*results, strict=True):
        assert tokens == plain_tokens
        for a, b in zip(logits, plain_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
