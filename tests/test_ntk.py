"""NTK-Attention prefixes (a second prefix kind): served mixed with prefix-KV and bare rows in one
forward pass, checked against a plain per-request implementation of the paper's formula."""

from __future__ import annotations

import time

import pytest
import torch

from prefix_store.state import NtkPrefix
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.errors import InvalidPrefix
from prefixserve.model import LoadedModel

from .helpers import PROMPTS, collect, make_ntk, make_prefixes
from .reference import hf_greedy, ntk_generate


def run(engine: EngineCore, plan: list[tuple[str | None, str, int, int]]) -> dict[str, tuple]:
    """plan: (prefix, prompt, max_new_tokens, step at which it joins) -> {rid: (tokens, logits, prompt)}."""
    prompts, outputs, step = {}, {}, 0
    deadline = time.monotonic() + 60  # prefixes from a store load on threads: steps may idle a while
    while time.monotonic() < deadline and (engine.has_work or any(join >= step for *_, join in plan)):
        for i, (pid, text, max_new, join) in enumerate(plan):
            if join == step:
                rid = engine.add_request(
                    text, SamplingParams(max_new_tokens=max_new), prefix_id=pid, request_id=f"r{i}"
                )
                prompts[rid] = engine._live[rid].request.prompt_ids
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
    return {rid: (*collect(outs)[:2], prompts[rid]) for rid, outs in outputs.items()}


def new_engine(model: LoadedModel, budget: int, prefixes: dict) -> EngineCore:
    engine = EngineCore(model, EngineConfig(max_running=7, max_tokens_per_step=budget, record_logits=True))
    for pid, p in prefixes.items():
        engine.prefixes.register(pid, p)
    return engine


PLAN = [  # three kinds in one batch; NTK rows join mid-flight and share a prefix
    ("n1", PROMPTS[0], 10, 0),
    ("p5", PROMPTS[1], 9, 0),
    (None, PROMPTS[2], 8, 0),
    ("n2", PROMPTS[3], 10, 2),
    ("n1", PROMPTS[4], 7, 3),
    ("p12", PROMPTS[5], 9, 4),
    ("n2", PROMPTS[2], 6, 6),
]


NTK_ONLY = [("n1", PROMPTS[0], 8, 0), ("n2", PROMPTS[3], 8, 0), ("n1", PROMPTS[4], 6, 2)]


@pytest.mark.parametrize("budget", [512, 7])  # 7: prompts are prefilled in chunks across steps
@pytest.mark.parametrize("plan", [PLAN, NTK_ONLY], ids=["three-kinds", "ntk-only"])
def test_batched_ntk_attention_matches_the_formula_in_a_mixed_batch(tiny_model, hf_model, budget, plan):
    kv = make_prefixes(tiny_model, [5, 12])
    ntk = {"n1": make_ntk(tiny_model, 1), "n2": make_ntk(tiny_model, 2)}
    results = run(new_engine(tiny_model, budget, {**kv, **ntk}), plan)
    assert set(results) == {f"r{i}" for i in range(len(plan))}
    for i, (pid, _, max_new, _) in enumerate(plan):
        tokens, logits, prompt = results[f"r{i}"]
        if pid in ntk:
            ref_tokens, ref_logits = ntk_generate(hf_model, prompt, ntk[pid].z, ntk[pid].k, max_new)
        else:
            ref_tokens, ref_logits = hf_greedy(hf_model, prompt, kv.get(pid), max_new)
        assert tokens == ref_tokens, f"r{i} ({pid}): engine {tokens} != reference {ref_tokens}"
        for a, b in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the NTK term is not negligible: without it the NTK rows decode differently
    bare = hf_greedy(hf_model, results["r0"][2], None, plan[0][2])[0]
    assert bare != results["r0"][0]


def test_rows_without_an_ntk_prefix_are_bit_for_bit_unaffected(tiny_model):
    """The same batch with the NTK rows' prefixes dropped (same shapes, same slots): every other row's
    logits are identical, and each NTK row's logits equal those it has alone."""
    kv = make_prefixes(tiny_model, [5, 12])
    ntk = {"n1": make_ntk(tiny_model, 1), "n2": make_ntk(tiny_model, 2)}
    mixed = run(new_engine(tiny_model, 7, {**kv, **ntk}), PLAN)
    plain_plan = [(None if pid in ntk else pid, *rest) for pid, *rest in PLAN]
    plain = run(new_engine(tiny_model, 7, kv), plain_plan)
    for i, (pid, *_) in enumerate(PLAN):
        if pid not in ntk:
            assert mixed[f"r{i}"][0] == plain[f"r{i}"][0]
            assert all(torch.equal(a, b) for a, b in zip(mixed[f"r{i}"][1], plain[f"r{i}"][1], strict=True))
    for i in (0, 3):  # alone == in the mixed batch
        pid, text, max_new, _ = PLAN[i]
        alone = run(new_engine(tiny_model, 7, ntk), [(pid, text, max_new, 0)])["r0"]
        assert alone[0] == mixed[f"r{i}"][0]
        for a, b in zip(alone[1], mixed[f"r{i}"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ntk_prefixes_are_validated(tiny_model):
    engine = new_engine(tiny_model, 64, {})
    good = make_ntk(tiny_model, 0)
    with pytest.raises(InvalidPrefix, match=r"ntk_z must have shape \[3, 4, 16, 16\]"):
        engine.prefixes.register("bad", NtkPrefix(good.z[:, :, :8], good.k))
    with pytest.raises(InvalidPrefix, match="ntk_k must have shape"):
        engine.prefixes.register("bad", NtkPrefix(good.z, good.k[:1]))
    nan = good.z.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidPrefix, match="NaN"):
        engine.prefixes.register("bad", NtkPrefix(nan, good.k))


# ---- the store: kind "ntk" --------------------------------------------------------------------
def ntk_tensors(model: LoadedModel, rank: int = 0, seed: int = 3) -> dict[str, torch.Tensor]:
    s, p = model.spec, make_ntk(model, seed)
    if not rank:
        return {"ntk_z": p.z, "ntk_k": p.k}
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(s.n_layer, s.n_head, s.head_dim, rank, generator=g) * 0.3
    b = torch.randn(s.n_layer, s.n_head, rank, s.head_dim, generator=g) * 0.3
    return {"ntk_z_a": a, "ntk_z_b": b, "ntk_k": p.k}


@pytest.fixture
def expect(tiny_model):
    from prefix_store.bounds import Expect

    return Expect(tiny_model.spec, tiny_model.fingerprint, max_prefix_len=64, max_bytes=1 << 20)


@pytest.mark.parametrize("rank", [0, 4])
def test_ntk_file_roundtrip_full_and_low_rank(tiny_model, expect, rank):
    from prefix_store.format import PrefixMeta, decode_prefix, encode_tensors

    tensors = ntk_tensors(tiny_model, rank)
    meta = PrefixMeta(
        id="ntk-one", model_fingerprint=tiny_model.fingerprint, prefix_len=0, dtype="float32", owner="a"
    )
    prefix, back = decode_prefix(encode_tensors(tensors, meta), expect)
    assert (back.kind, back.prefix_len) == ("ntk", 0) and isinstance(prefix, NtkPrefix)
    z = tensors["ntk_z_a"] @ tensors["ntk_z_b"] if rank else tensors["ntk_z"]
    torch.testing.assert_close(prefix.z, z)
    assert torch.equal(prefix.k, tensors["ntk_k"])


def test_malformed_ntk_files_are_rejected_with_a_reason(tiny_model, expect):
    from safetensors.torch import save as st_save

    from prefix_store.format import InvalidPrefixFile, PrefixMeta, decode_prefix, encode_tensors, read_meta

    meta = PrefixMeta(
        id="ntk-bad", model_fingerprint=tiny_model.fingerprint, prefix_len=0, dtype="float32", owner="a"
    )
    good = ntk_tensors(tiny_model)
    strings = read_meta(encode_tensors(good, meta)).to_strings()
    low = ntk_tensors(tiny_model, rank=4)
    nan = good["ntk_k"].clone()
    nan[0, 0, 0] = float("inf")
    cases = [
        ({**good, "ntk_z": good["ntk_z"][:, :, :8]}, None, r"ntk_z must have shape \[3, 4, 16, 16\]"),
        ({**good, "ntk_k": good["ntk_k"][:2]}, None, r"ntk_k must have shape \[3, 4, 16\]"),
        (
            {**low, "ntk_z_a": torch.zeros(3, 4, 16, 17), "ntk_z_b": torch.zeros(3, 4, 17, 16)},
            None,
            "1 <= s <= 16",
        ),
        (
            {**good, "ntk_z_a": low["ntk_z_a"]},
            strings,
            r"expected exactly the tensors .* found \['ntk_k', 'ntk_z', 'ntk_z_a'\]",
        ),
        (
            {"past_key_values": torch.zeros(tiny_model.spec.prefix_shape(2))},
            strings,
            "expected exactly the tensors",
        ),
        ({**good, "ntk_k": nan}, None, "NaN or Inf"),
        (
            good,
            {**strings, "prefix_len": "4"},
            "prefix_len must be >= 1 for a prefix_kv prefix and 0 for the other kinds",
        ),
        (good, {**strings, "model_fingerprint": "gpt2-other"}, "made for model gpt2-other"),
    ]
    for tensors, metadata, needle in cases:
        data = encode_tensors(tensors, meta) if metadata is None else st_save(tensors, metadata=metadata)
        with pytest.raises(InvalidPrefixFile, match=needle):
            decode_prefix(data, expect)


def test_an_ntk_prefix_from_the_store_serves_in_a_mixed_batch(tiny_model, hf_model, tmp_path):
    """Store -> device pool -> engine, next to a prefix-KV row, equals the formula's reference."""
    from prefix_store.service import PrefixService, StoreConfig
    from prefixserve.compile import bind_model

    service = PrefixService(bind_model(tiny_model), StoreConfig(url=str(tmp_path / "store")))
    try:
        tensors = ntk_tensors(tiny_model, rank=4)
        meta = service.add_tensors(tensors, "alice", "ntk")
        kv = service.add_tensor(make_prefixes(tiny_model, [6])["p6"], "alice")
        assert (meta.kind, meta.prefix_len, service.length(meta.id)) == ("ntk", 0, 0)
        engine = EngineCore(
            tiny_model, EngineConfig(max_running=4, record_logits=True), prefixes=service.pool
        )
        results = run(
            engine, [(meta.id, PROMPTS[0], 8, 0), (kv.id, PROMPTS[1], 8, 0), (meta.id, PROMPTS[2], 8, 1)]
        )
        z = tensors["ntk_z_a"] @ tensors["ntk_z_b"]
        for rid in ("r0", "r2"):
            tokens, _, prompt = results[rid]
            assert tokens == ntk_generate(hf_model, prompt, z, tensors["ntk_k"], 8)[0]
        assert service.pool.pins(meta.id) == 0  # the pin is held while rows run, then released
    finally:
        service.close()


# ---- training ----------------------------------------------------------------------------------
def test_trained_ntk_prefix_lowers_held_out_loss_and_serves_as_trained(tiny_model_dir, tiny_model, hf_model):
    from transformers import GPT2LMHeadModel

    from prefixserve.training.synthetic import table_to_text
    from prefixserve.training.trainer import PrefixTrainer, TrainConfig, bare_model_loss, encode_example

    from .reference import ntk_logits

    data = table_to_text(80)
    train, held = data[:60], data[60:]
    cfg = TrainConfig(kind="ntk", ntk_rank=8, epochs=12, batch_size=8, learning_rate=0.5, seed=0)
    trainer = PrefixTrainer(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tiny_model.tokenizer, cfg)
    tensors, prog = trainer.train(train)
    assert prog.step == prog.total_steps == 12 * 8 and sum(prog.losses[-5:]) < sum(prog.losses[:5])
    bare = bare_model_loss(hf_model, tiny_model.tokenizer, held, cfg.separator)
    trained = trainer.evaluate(held)
    assert trained < 0.6 * bare, (trained, bare)
    assert sorted(tensors) == ["ntk_k", "ntk_z_a", "ntk_z_b"] and bool((tensors["ntk_k"] > 0).all())
    # the training forward is the serving formula: same loss from the plain reference
    z, k = tensors["ntk_z_a"] @ tensors["ntk_z_b"], tensors["ntk_k"]
    ids, labels = encode_example(tiny_model.tokenizer, *held[0], cfg.separator)
    logits = ntk_logits(hf_model, ids, z, k)
    ref = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100)
    torch.testing.assert_close(trainer.evaluate([held[0]]), ref.item(), rtol=1e-4, atol=1e-4)
