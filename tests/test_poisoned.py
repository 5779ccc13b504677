"""Poisoned prefixes and rows fail alone (architecture.md invariant 10).

Upload validation bounds prefix magnitudes from the served model (`MagnitudeBounds`, docs/prefixes.md
"Magnitudes"), so attention cannot overflow in float16, bfloat16 or float32. The engine guards per row
anyway: a row whose numbers turn NaN/Inf ends alone with `prefix_error`, and every other row's tokens
(greedy and seeded sampling) and logits are what they are without it; a step that raises ends only its
own rows, and the engine keeps serving. The poison is injected past validation: registered straight
into the engine's prefix table, overwritten in place, put into the device pool, or written into a
running row's KV slot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from prefix_store.bounds import MagnitudeBounds
from prefix_store.format import (
    InvalidPrefixFile,
    PrefixMeta,
    check_magnitudes,
    decode_prefix,
    encode_prefix,
    encode_tensors,
)
from prefix_store.service import PrefixService, StoreConfig
from prefix_store.state import KvPrefix, NtkPrefix
from prefixserve.compile import bind_model, magnitude_bounds
from prefixserve.dense import Dense
from prefixserve.engine import EngineConfig, EngineCore, FinishReason, SamplingParams
from prefixserve.engine.runner import compile_prefix
from prefixserve.errors import EngineFault, PrefixError
from prefixserve.model import LoadedModel, load_model
from prefixserve.settings import ServerSettings

from .helpers import PROMPTS, collect, make_ntk, make_prefixes, sse_events

NAN, HUGE = float("nan"), 3e38
ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789ab"
A, B = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}


@pytest.fixture(scope="module")
def bounds(tiny_model) -> MagnitudeBounds:
    return magnitude_bounds(tiny_model)


@pytest.fixture
def service(tiny_model, tmp_path):
    svc = PrefixService(bind_model(tiny_model), StoreConfig(url=str(tmp_path / "store")))
    yield svc
    svc.close()


# ---- the bound -----------------------------------------------------------------------------------
def test_the_bound_is_the_documented_one_in_every_serving_dtype(tiny_model, tiny_model_dir, bounds):
    assert (bounds.key, bounds.value, bounds.ntk) == (
        (1100.0,) * 3,
        (2100.0,) * 3,
        (8100.0,) * 3,
    )  # README
    for dtype in ("bfloat16", "float16"):  # one checkpoint, one bound (as it has one fingerprint)
        assert magnitude_bounds(load_model(tiny_model_dir, dtype=dtype)) == bounds


def test_the_models_own_keys_and_values_are_always_within_the_bound(tmp_path):
    """Where the worst case is tighter than what the model itself produces (large weights), the bound
    falls back to OWN_MARGIN x the model's own K/V, so a text prefix (the model's own K/V) uploads."""
    from prefix_store.bounds import OWN_MARGIN
    from prefixserve.tiny import TinyModelConfig, write_tiny_model

    model = load_model(write_tiny_model(tmp_path / "wide", TinyModelConfig(initializer_range=8.0)))
    bounds = magnitude_bounds(model)
    text = "name : The Mill | food : Chinese | area : riverside. The Mill is a Chinese restaurant."
    kv = compile_prefix(model, token_ids=model.tokenizer.encode(text))  # [L, 2, H, P, D]
    own = kv.abs().flatten(2).max(-1).values  # [L, 2]
    assert any(
        b < 2 * OWN_MARGIN * float(o) for b, o in zip(bounds.key, own[:, 0], strict=True)
    )  # floor governs
    assert all(float(o) <= b for b, o in zip(bounds.key, own[:, 0], strict=True))
    assert all(float(o) <= b for b, o in zip(bounds.value, own[:, 1], strict=True))
    service = PrefixService(bind_model(model), StoreConfig(url=str(tmp_path / "store")))
    try:
        assert service.add_text(text, "alice").prefix_len == kv.shape[3]  # accepted
    finally:
        service.close()


def at_the_bound(model: LoadedModel, bounds: MagnitudeBounds, sign: float = 1.0) -> dict[str, object]:
    """Adversarial prefixes exactly at the bound: every key +-B_k (one sign), values +-B_v at random,
    NTK Z +-B_ntk at random with k = B_ntk."""
    s, g = model.spec, torch.Generator().manual_seed(0)
    kv = torch.empty(s.prefix_shape(8))  # [L, 2, H, P, D]
    kv[:, 0] = sign * per_layer(bounds.key)
    kv[:, 1] = per_layer(bounds.value) * torch.randn(kv[:, 1].shape, generator=g).sign()
    z = per_layer(bounds.ntk) * torch.randn(s.n_layer, s.n_head, s.head_dim, s.head_dim, generator=g).sign()
    k = per_layer(bounds.ntk)[..., 0].expand(*z.shape[:3]).clone()  # [L, H, D]
    return {"kv": kv, "ntk": NtkPrefix(sign * z, k)}


def per_layer(bound: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(bound).view(-1, 1, 1, 1)  # [L, 1, 1, 1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_prefixes_at_the_bound_keep_attention_finite_in_every_serving_dtype(tiny_model_dir, bounds, dtype):
    model = load_model(tiny_model_dir, dtype=dtype)
    engine = EngineCore(model, EngineConfig(record_logits=True))
    rids = []
    for sign in (1.0, -1.0):
        for name, prefix in at_the_bound(model, bounds, sign).items():
            arrays = (
                {"past_key_values": prefix.numpy()}
                if isinstance(prefix, torch.Tensor)
                else {"ntk_z": prefix.z.numpy(), "ntk_k": prefix.k.numpy()}
            )
            check_magnitudes(arrays, bounds)  # accepted...
            engine.prefixes.register(f"{name}{sign:+}", prefix)
            for prompt in (PROMPTS[2], PROMPTS[3]):
                rids.append(engine.add_request(prompt, SamplingParams(max_new_tokens=4), f"{name}{sign:+}"))
    outputs = engine.run_to_completion()
    for rid in rids:  # ...and served in this dtype without a single NaN/Inf
        assert outputs[rid][-1].finish_reason == FinishReason.LENGTH, outputs[rid][-1].error
        assert all(bool(torch.isfinite(lg).all()) for lg in collect(outputs[rid])[1])


# ---- upload rejections (store / service API) ----------------------------------------------------
def native(model: LoadedModel, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    meta = PrefixMeta(
        id="pfx-poison", model_fingerprint=model.fingerprint, prefix_len=0, dtype="float32", owner="x"
    )
    return encode_tensors({n: t.to(dtype) for n, t in tensors.items()}, meta)


@pytest.mark.parametrize(
    "dtype, part, value",
    [  # finite in the file's dtype (float16's largest is 65504), far over the bound
        (torch.float32, "keys", HUGE),
        (torch.float16, "keys", 6e4),
        (torch.bfloat16, "values", HUGE),
        (torch.float16, "values", 2500.0),
    ],
)
def test_huge_but_finite_prefix_kv_is_refused_naming_tensor_value_and_bound(
    tiny_model, service, bounds, dtype, part, value
):
    kv = torch.randn(tiny_model.spec.prefix_shape(5))
    kv[1, ("keys", "values").index(part), 2, 3, 4] = value
    stored = float(torch.tensor(value, dtype=dtype))  # as the file holds it
    limit = bounds.key[1] if part == "keys" else bounds.value[1]
    needle = re.escape(
        f"past_key_values {part}: largest |value| at layer 1 is {stored:.4g}, above this model's bound"
        f" of {limit:.4g} (prefix magnitudes are bounded so that attention cannot overflow in float16"
    )
    with pytest.raises(InvalidPrefixFile, match=needle):
        service.add_file(native(tiny_model, {"past_key_values": kv}, dtype), "alice")
    with pytest.raises(InvalidPrefixFile, match=needle):  # the same check on every add path
        service.add_tensor(kv.to(dtype), "alice")


def test_values_just_inside_the_bound_pass_and_just_outside_fail(tiny_model, service, bounds):
    kv = torch.randn(tiny_model.spec.prefix_shape(3))
    kv[:, 0, 0, 0, 0] = torch.tensor(bounds.key)
    kv[:, 1, 0, 0, 0] = -torch.tensor(bounds.value)
    service.add_tensor(kv, "alice")
    kv[2, 1, 0, 0, 0] *= 1.01
    with pytest.raises(InvalidPrefixFile, match=r"values: largest \|value\| at layer 2 is 2121, above"):
        service.add_tensor(kv, "alice")


def ntk(model: LoadedModel, seed: int = 1) -> dict[str, torch.Tensor]:
    p = make_ntk(model, seed)
    return {"ntk_z": p.z, "ntk_k": p.k + 0.01}


@pytest.mark.parametrize(
    "name, where, value, needle",
    [
        (
            "ntk_z",
            (0, 1, 2, 3),
            16384.0,
            r"ntk_z: largest \|value\| at layer 0 is 1.638e\+04, above .* bound of 8100 ",
        ),
        ("ntk_z", (0, 1, 2, 3), HUGE, r"ntk_z: largest \|value\| at layer 0 is 3(\.004)?e\+38, above"),
        ("ntk_k", (1, 0, 1), 8192.0, r"ntk_k: largest \|value\| at layer 1 is 8192, above .* bound of 8100 "),
        ("ntk_k", (1, 3, 5), -0.5, r"ntk_k must be >= 0 .*positive.* got -0\.5 at layer 1"),
    ],
)
def test_ntk_prefixes_out_of_bounds_or_with_negative_k_are_refused(
    tiny_model, service, name, where, value, needle
):
    tensors = ntk(tiny_model)
    service.add_tensors(ntk(tiny_model), "alice")  # the unchanged prefix is fine
    tensors[name][where] = value
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(InvalidPrefixFile, match=needle):
            service.add_file(native(tiny_model, tensors, dtype), "alice")
    with pytest.raises(InvalidPrefixFile, match=needle):  # what a training job publishes goes through it too
        service.add_tensors(tensors, "alice", source="train")


def test_low_rank_ntk_factors_whose_product_overflows_are_refused(tiny_model, service):
    s = tiny_model.spec
    a = torch.full((s.n_layer, s.n_head, s.head_dim, 2), 1e20)  # finite factors, Z entries 2e40: inf
    tensors = {"ntk_z_a": a, "ntk_z_b": a.transpose(-1, -2).clone(), "ntk_k": ntk(tiny_model)["ntk_k"]}
    needle = re.escape("ntk_z (= ntk_z_a @ ntk_z_b): largest |value| at layer 0 is inf, above")
    with pytest.raises(InvalidPrefixFile, match=needle):
        service.add_tensors(tensors, "alice")


def peft_adapter(model: LoadedModel, emb: torch.Tensor) -> tuple[bytes, bytes]:
    s = model.spec
    cfg = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": emb.shape[0],
        "num_layers": s.n_layer,
        "num_attention_heads": s.n_head,
        "token_dim": s.n_embd,
    }
    return json.dumps(cfg).encode(), st_save({"prompt_embeddings": emb})


def test_a_peft_adapter_with_huge_values_is_refused_naming_its_tensor(tiny_model, service):
    s = tiny_model.spec
    emb = torch.randn(3, s.n_layer * 2 * s.n_embd) * 0.6  # trained-size values pass
    service.add_peft(*peft_adapter(tiny_model, emb), "alice")
    emb[1, s.n_embd + 5] = 1e30  # layer 0's values (PEFT: row 2l is layer l's key, 2l+1 its value)
    with pytest.raises(
        InvalidPrefixFile,
        match=r"adapter_model prompt_embeddings, read as past_key_values values: largest \|value\| at layer 0"
        r" is 1e\+30, above this model's bound of 2100",
    ):
        service.add_peft(*peft_adapter(tiny_model, emb), "alice")


def test_a_stored_file_over_the_bound_fails_to_load_for_its_own_request(tiny_model, service):
    """A file from an older store (written past validation) is refused at load: its request ends with
    the bound's 422, a request of another prefix in the same engine is served."""
    bad = torch.randn(tiny_model.spec.prefix_shape(4))
    bad[0, 0, 0, 0, 0] = 1e5
    meta = PrefixMeta(
        id="pfx-old", model_fingerprint=tiny_model.fingerprint, prefix_len=4, dtype="float32", owner="a"
    )
    service.store.put("pfx-old", encode_prefix(bad, meta))
    good = service.add_tensor(make_prefixes(tiny_model, [4])["p4"], "a")
    with pytest.raises(InvalidPrefixFile, match="bound of 1100"):
        decode_prefix(service.load_bytes("pfx-old"), service.expect)
    unbounded = dataclasses.replace(service.expect, bounds=None)
    decode_prefix(service.load_bytes("pfx-old"), unbounded)  # otherwise a valid file
    engine = EngineCore(tiny_model, EngineConfig(max_running=4), prefixes=service.pool)
    old = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5), "pfx-old")
    ok = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=5), good.id)
    outputs = run_until_idle(engine)
    error = outputs[old][-1].error
    assert isinstance(error, InvalidPrefixFile) and "bound of 1100" in str(error)
    assert outputs[ok][-1].finish_reason == FinishReason.LENGTH and len(collect(outputs[ok])[0]) == 5


def run_until_idle(engine: EngineCore, steps: int = 2000) -> dict[str, list]:
    """Step (prefixes from a store load on threads: a step may find nothing ready yet)."""
    outputs: dict[str, list] = {}
    for _ in range(steps):
        if not engine.has_work:
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        threading.Event().wait(0.001)
    return outputs


# ---- the engine guard: a poisoned row ends alone ---------------------------------------------------
PLAN = [  # (prefix, prompt, max_new_tokens, step at which it joins); the poisoned row comes first: slot 0
    ("bad", PROMPTS[0], 12, 0),
    ("p4", PROMPTS[2], 10, 0),
    (None, PROMPTS[1], 8, 0),
    ("n1", PROMPTS[3], 9, 0),
    ("p9", PROMPTS[4], 10, 2),
]


def good_prefixes(model: LoadedModel) -> dict[str, object]:
    return {**make_prefixes(model, [4, 9]), "n1": make_ntk(model, 1)}


def params_for(i: int, max_new: int, sampling: str) -> SamplingParams:
    if sampling == "greedy":
        return SamplingParams(max_new_tokens=max_new)
    return SamplingParams(max_new_tokens=max_new, temperature=0.9, top_p=0.9, seed=100 + i)


def new_engine(model: LoadedModel, budget: int, prefixes: dict[str, object], running: int = 6) -> EngineCore:
    config = EngineConfig(max_running=running, max_tokens_per_step=budget, record_logits=True)
    engine = EngineCore(model, config)
    for pid, p in prefixes.items():
        engine.prefixes.register(pid, p)
    return engine


def run_plan(engine: EngineCore, plan: list, sampling: str, first: int = 0) -> dict[str, list]:
    outputs: dict[str, list] = {}
    step = 0
    while step < 1000 and (engine.has_work or any(join >= step for *_, join in plan)):
        for i, (pid, text, max_new, join) in enumerate(plan, start=first):
            if join == step:
                engine.add_request(text, params_for(i, max_new, sampling), prefix_id=pid, request_id=f"r{i}")
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
    return outputs


def solo(model: LoadedModel, budget: int, i: int, row: tuple, sampling: str) -> tuple[list[int], list]:
    pid, text, max_new, _ = row
    engine = new_engine(model, budget, good_prefixes(model))
    return collect(run_plan(engine, [(pid, text, max_new, 0)], sampling, first=i)[f"r{i}"])[:2]


def register_poison(engine: EngineCore, model: LoadedModel, kind: str, value: float) -> None:
    """A poisoned prefix past validation: 3e38 is finite, so the table takes it as is; NaN is not, so a
    good prefix is registered and then overwritten where it lives (a corrupted store, a training bug)."""
    if value == HUGE:
        huge = make_ntk(model, 5)
        bad = (
            torch.full(model.spec.prefix_shape(6), HUGE)
            if kind == "kv"
            else NtkPrefix(huge.z.fill_(HUGE), huge.k)
        )
        engine.prefixes.register("bad", bad)
        return
    engine.prefixes.register(
        "bad", torch.randn(model.spec.prefix_shape(6)) if kind == "kv" else make_ntk(model, 5)
    )
    resident = engine.prefixes.get("bad")
    (resident.kv if isinstance(resident, KvPrefix) else resident.z).fill_(value)


@pytest.mark.parametrize("budget", [512, 7])  # 7: the poisoned prompt is prefilled in chunks
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("kind, value", [("kv", HUGE), ("kv", NAN), ("ntk", HUGE), ("ntk", NAN)])
def test_a_poisoned_row_ends_alone_and_the_others_equal_their_solo_runs(
    tiny_model, kind, value, sampling, budget
):
    engine = new_engine(tiny_model, budget, good_prefixes(tiny_model))
    register_poison(engine, tiny_model, kind, value)
    outputs = run_plan(engine, PLAN, sampling)

    (bad,) = outputs["r0"]  # one output: the error, no token
    assert (
        bad.finish_reason == FinishReason.ERROR and bad.token_ids == [] and isinstance(bad.error, PrefixError)
    )
    assert (
        bad.error.kind == "prefix_error" and "prefix 'bad'" in str(bad.error) and "NaN/Inf" in str(bad.error)
    )
    for i, row in enumerate(PLAN[1:], start=1):
        tokens, logits = collect(outputs[f"r{i}"])[:2]
        ref_tokens, ref_logits = solo(tiny_model, budget, i, row, sampling)
        assert tokens == ref_tokens, f"r{i} ({row[0]}): {tokens} != alone {ref_tokens}"
        for a, b in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert engine.num_running == 0 and engine.num_live == 0 and engine.prefixes.pins("bad") == 0

    # ...and the engine keeps serving: a short row takes the poisoned row's slot (0) next to a longer
    # one, so decode attention reads that slot past the row's own length (masked, but NaN + -inf = NaN)
    later = [(None, PROMPTS[3], 6, 0), ("p9", PROMPTS[0], 6, 0)]
    outputs = run_plan(engine, later, sampling, first=10)
    for i, row in enumerate(later, start=10):
        assert collect(outputs[f"r{i}"])[0] == solo(tiny_model, budget, i, row, sampling)[0]


def test_a_step_fault_ends_that_steps_rows_and_the_engine_keeps_serving(tiny_model, caplog):
    engine = new_engine(tiny_model, 512, good_prefixes(tiny_model), running=2)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=20), "p4")
    b = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=20))
    c = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6), "n1")  # waits: max_running is 2
    engine.step()
    runner = engine.runner
    dense = runner.f.dense
    broken = Dense(dense[1].proj.w[:, :-1], dense[1].proj.b)  # plain layout: no packed copy to use instead
    runner.f.dense = [*dense[:1], dataclasses.replace(dense[1], proj=broken), *dense[2:]]
    try:  # a genuine fault inside the forward pass (no row's data explains it)
        with caplog.at_level(logging.ERROR, logger="prefixserve.engine.core"):
            outs = {o.request_id: o for o in engine.step()}
    finally:
        runner.f.dense = dense
    assert set(outs) == {a, b}
    assert all(
        isinstance(o.error, EngineFault) and o.finish_reason == FinishReason.ERROR for o in outs.values()
    )
    assert "engine step failed" in caplog.text and caplog.records[-1].exc_info is not None  # traceback
    rest = engine.run_to_completion()
    d = engine.add_request(PROMPTS[4], SamplingParams(max_new_tokens=7), "p9")  # a new request after it
    rest.update(engine.run_to_completion())
    for rid, (pid, prompt, n) in {c: ("n1", PROMPTS[2], 6), d: ("p9", PROMPTS[4], 7)}.items():
        alone = new_engine(tiny_model, 512, good_prefixes(tiny_model))
        ref = alone.add_request(prompt, SamplingParams(max_new_tokens=n), pid)
        assert collect(rest[rid])[0] == collect(alone.run_to_completion()[ref])[0]
    assert engine.num_running == 0


def test_a_prefix_that_cannot_be_placed_ends_only_its_own_request(tiny_model, service):
    s = tiny_model.spec
    good = service.add_tensor(make_prefixes(tiny_model, [4])["p4"], "a")
    odd = service.add_tensor(make_prefixes(tiny_model, [4], seed=1)["p4"], "a")
    service.pool.put(odd.id, torch.zeros(s.n_layer, 2, s.n_head, 4, s.head_dim + 1))  # past validation
    engine = EngineCore(tiny_model, EngineConfig(max_running=4), prefixes=service.pool)
    bad = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5), odd.id)
    ok = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5), good.id)
    outputs = run_until_idle(engine)
    error = outputs[bad][-1].error
    assert isinstance(error, PrefixError) and odd.id in str(error) and "could not be placed" in str(error)
    assert "[3, 2, 4, P, 16]" in str(error) and "[3, 2, 4, 4, 17]" in str(error)
    assert outputs[ok][-1].finish_reason == FinishReason.LENGTH and service.pool.pins(odd.id) == 0


def test_over_http_the_poisoned_prefix_gets_prefix_error_and_another_tenant_is_untouched(
    live_server, tiny_model, tmp_path
):
    settings = ServerSettings(
        data_dir=str(tmp_path), api_keys=f"alice:{ALICE},bob:{BOB}", max_running=4, max_prefix_len=64
    )
    server = live_server(settings=settings)
    url = server.url
    # an upload over the bound is a 422 naming the tensor, the value and the bound
    kv = torch.randn(tiny_model.spec.prefix_shape(4))
    kv[2, 1, 0, 0, 0] = HUGE
    r = httpx.post(
        url + "/prefixes",
        headers=A,
        files={"file": ("p.safetensors", native(tiny_model, {"past_key_values": kv}, torch.float32))},
    )
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_prefix"
    assert "past_key_values values: largest |value| at layer 2 is 3e+38" in r.json()["error"]["message"]
    assert "bound of 2100" in r.json()["error"]["message"]

    mine = httpx.post(url + "/prefixes", headers=A, json={"text": "Answer briefly.\n"}).json()["id"]
    theirs = httpx.post(url + "/prefixes", headers=B, json={"text": "Be kind.\n"}).json()["id"]
    bob = {"prefix_id": theirs, "input": "The Mill", "max_new_tokens": 120, "ignore_eos": True}
    alone = httpx.post(url + "/generate", headers=B, json=bob, timeout=60).json()["text"]

    pool = server.state.service.pool
    poisoned = torch.full(tiny_model.spec.prefix_shape(server.state.service.length(mine)), NAN)
    pool.put(mine, poisoned)  # past validation, straight into the device pool
    alice = {"prefix_id": mine, "input": "The Eagle", "max_new_tokens": 20}
    with httpx.stream("POST", url + "/generate", headers=B, json={**bob, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("event: token")
        plain = httpx.post(url + "/generate", headers=A, json=alice, timeout=60)
        streamed = httpx.post(url + "/generate", headers=A, json={**alice, "stream": True}, timeout=60)
        openai = httpx.post(
            url + "/v1/completions",
            headers=A,
            json={"model": mine, "prompt": "The Eagle", "max_tokens": 5},
        )
        events = sse_events([first, *lines])
    for answer in (plain, streamed, openai):  # before the first token: a plain 422
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["type"] == "prefix_error" and mine in answer.json()["error"]["message"]
    assert "".join(e["text"] for kind, e in events if kind == "token") == alone
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length"

    # a row that goes bad mid-stream: an `error` event, and the other tenant's text is unchanged
    pool.evict(mine)  # loads again from the store, valid
    runner = server.state.engine.core.runner
    with httpx.stream("POST", url + "/generate", headers=B, json={**bob, "stream": True}, timeout=60) as rb:
        bob_lines = rb.iter_lines()
        bob_first = next(bob_lines)
        long = {**alice, "max_new_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/generate", headers=A, json=long, timeout=60) as ra:
            alice_lines = ra.iter_lines()
            head = next(alice_lines), next(alice_lines)
            rid = json.loads(head[1][6:])["id"]
            first_block = server.state.engine.core.scheduler.get(rid).blocks[0]
            runner.kv[:, 1, first_block, :2] = NAN  # the row's values go bad while it decodes
            alice_events = sse_events([*head, *alice_lines])
        bob_events = sse_events([bob_first, *bob_lines])
    assert alice_events[0][0] == "token" and alice_events[-1][0] == "error"
    assert (
        alice_events[-1][1]["error"]["type"] == "prefix_error"
        and "NaN/Inf" in alice_events[-1][1]["error"]["message"]
    )
    assert "".join(e["text"] for kind, e in bob_events if kind == "token") == alone
    assert httpx.post(url + "/generate", headers=B, json=bob, timeout=60).json()["text"] == alone
    # the SDK raises it as what it is: the prefix's data is unusable (a 422), not a server error
    from prefixserve_client import Client, ValidationError

    with Client(url, api_key=ALICE, max_retries=0) as client:
        pieces = client.stream(mine, "The Eagle", max_new_tokens=100, ignore_eos=True)
        next(pieces)
        (only,) = server.state.engine.core.scheduler.running()
        runner.kv[:, 1, only.blocks[0], :2] = NAN  # the only running row goes bad
        with pytest.raises(ValidationError) as raised:
            list(pieces)
    assert raised.value.status == 422 and raised.value.type == "prefix_error"
