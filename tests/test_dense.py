"""The dense layers' layouts (dense.py): oneDNN's packed GEMM for decode-sized steps, addmm on the
plain `[C_in, C_out]` layout above PACKED_ROWS, the same numbers either way, and the engine's tokens
and logits the same with packing on or off; and the int8 option, exact relative to the quantized model
(each row's numbers independent of its step's other rows, every prefix and adapter kind)."""

from __future__ import annotations

import pytest
import torch

from prefixserve.dense import PACKED_ROWS, Dense, Int8Dense, packing_available, quantization_available
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.errors import InvalidRequest
from prefixserve.settings import ServerSettings

from .helpers import PROMPTS, collect, make_prefixes
from .test_adapters import LORA_SPECS, engine_for, lora_of, peft_model, random_bottleneck, random_ntk, run

__all__ = ["peft_model"]  # the fixture, shared with test_adapters

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
        assert (engine.runner.f.dense[0].attn.packed is not None) == packed
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


needs_int8 = pytest.mark.skipif(
    not quantization_available(torch.device("cpu"), torch.float32), reason="no fbgemm (x86) in this torch"
)


@needs_int8
def test_int8_rows_are_scaled_alone_and_the_integer_products_are_exact():
    w, b = layer(c_in=256, c_out=48)
    dense = Int8Dense(w, b)
    x = torch.randn(9, 256)
    x[3, 7] = 40.0  # one row with an outlier: only that row's scale is coarser
    y = dense(x)
    # the same arithmetic in int64: rows to [-127, 127] by their own max, weights per channel to [-63, 63]
    s = x.abs().amax(1, keepdim=True) / 127
    w_scale = w.abs().amax(0) / 63  # [C_out]
    qw = torch.round(w / w_scale)  # [C_in, C_out]
    want = (torch.round(x / s).long() @ qw.long()).double() * s.double() * w_scale.double() + b.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    for rows in ([3], [0, 1, 2], [8, 3]):  # any subset of rows gives those rows' numbers bit for bit
        assert torch.equal(dense(x[rows]), y[rows])
    torch.testing.assert_close(y, x @ w + b, rtol=0.05, atol=0.05 * float((x @ w).abs().max()))
    # saturation: full-scale rows of one sign against full-scale weights of one sign stay exact
    full = Int8Dense(torch.ones(768, 4), None)
    assert torch.allclose(full(torch.ones(2, 768)), torch.full((2, 4), 768.0), rtol=1e-5)
    bad = x.clone()
    bad[1, 0], bad[5, 2] = float("nan"), float("inf")
    finite = dense(bad).isfinite().all(1)
    assert finite.tolist() == [i not in (1, 5) for i in range(9)]  # bad rows stay visible, alone


@needs_int8
def test_int8_mixed_batch_of_every_kind_equals_each_row_alone(tiny_model, peft_model):
    g = torch.Generator().manual_seed(7)
    states = {
        "kv": torch.randn(tiny_model.spec.prefix_shape(5), generator=g),
        "ntk": random_ntk(tiny_model),
        "l0": lora_of(peft_model, tiny_model, "l0"),
        "houlsby": random_bottleneck(tiny_model, 16, seed=1),
    }
    assert "l0" in LORA_SPECS
    prompt = [list(torch.randint(0, 400, (n,), generator=g).tolist()) for n in (6, 9, 3, 7, 11, 8)]
    rows = [  # (id, prompt, max_new, prefix, adapter)
        ("bare", prompt[0], 6, None, None),
        ("kv", prompt[1], 5, "kv", None),
        ("ntk", prompt[2], 6, "ntk", None),
        ("l0", prompt[3], 7, None, "l0"),
        ("houlsby", prompt[4], 6, None, "houlsby"),
        ("kv+l0", prompt[5], 6, "kv", "l0"),
    ]
    mixed = run(engine_for(tiny_model, states, max_tokens_per_step=12, quantize="int8"), rows)
    fp32 = run(engine_for(tiny_model, states), rows)
    for row in rows:
        alone = run(engine_for(tiny_model, states, quantize="int8"), [row])[row[0]]
        assert mixed[row[0]][0] == alone[0], row[0]
        for a, b in zip(mixed[row[0]][1], alone[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, r=row[0]: f"{r}: {m}")
        # and it is the quantized model: close to float32, not equal to it
        first, want = mixed[row[0]][1][0], fp32[row[0]][1][0]
        assert not torch.equal(first, want)
        assert float((first - want).abs().mean()) < 0.1 * float(want.abs().mean())  # tiny model: ~5%


def test_quantize_refuses_what_it_cannot_run(tiny_model, tiny_model_dir):
    with pytest.raises(InvalidRequest, match="quantize"):
        EngineCore(tiny_model, EngineConfig(quantize="int4"))
    with pytest.raises(ValueError, match="PREFIXSERVE_QUANTIZE"):
        EngineConfig.from_settings(ServerSettings.from_env({"PREFIXSERVE_QUANTIZE": "fp8"}))
    assert (
        EngineConfig.from_settings(ServerSettings.from_env({"PREFIXSERVE_QUANTIZE": "int8"})).quantize
        == "int8"
    )
