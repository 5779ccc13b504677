"""NTK-Attention prefixes (a second prefix kind): served mixed with prefix-KV and bare rows in one
forward pass, checked against a plain per-request implementation of the paper's formula."""

from __future__ import annotations

import pytest
import torch

from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.engine.ntk import NtkPrefix
from prefixserve.errors import InvalidPrefix
from prefixserve.model import LoadedModel

from .reference import hf_generate, ntk_generate
from .test_engine_reference import PROMPTS, collect, make_prefixes


def make_ntk(model: LoadedModel, seed: int) -> NtkPrefix:
    """Values of the size a trained state has: the NTK term is comparable to attention's own."""
    s = model.spec
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(s.n_layer, s.n_head, s.head_dim, s.head_dim, generator=g) * 0.3  # [L, H, D, D]
    k = torch.rand(s.n_layer, s.n_head, s.head_dim, generator=g) * 0.2  # [L, H, D]
    return NtkPrefix(z, k)


def run(engine: EngineCore, plan: list[tuple[str | None, str, int, int]]) -> dict[str, tuple]:
    """plan: (prefix, prompt, max_new_tokens, step at which it joins) -> {rid: (tokens, logits, prompt)}."""
    prompts, outputs, step = {}, {}, 0
    while step < 1000 and (engine.has_work or any(join >= step for *_, join in plan)):
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


@pytest.mark.parametrize("budget", [512, 7])  # 7: prompts are prefilled in chunks across steps
def test_batched_ntk_attention_matches_the_formula_in_a_mixed_batch(tiny_model, hf_model, budget):
    kv = make_prefixes(tiny_model, [5, 12])
    ntk = {"n1": make_ntk(tiny_model, 1), "n2": make_ntk(tiny_model, 2)}
    results = run(new_engine(tiny_model, budget, {**kv, **ntk}), PLAN)
    assert set(results) == {f"r{i}" for i in range(len(PLAN))}
    for i, (pid, _, max_new, _) in enumerate(PLAN):
        tokens, logits, prompt = results[f"r{i}"]
        if pid in ntk:
            ref_tokens, ref_logits = ntk_generate(hf_model, prompt, ntk[pid].z, ntk[pid].k, max_new)
        else:
            ref_tokens, ref_logits = hf_generate(hf_model, prompt, kv.get(pid), max_new)
        assert tokens == ref_tokens, f"r{i} ({pid}): engine {tokens} != reference {ref_tokens}"
        for a, b in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the NTK term is not negligible: without it the NTK rows decode differently
    bare = hf_generate(hf_model, results["r0"][2], None, 10)[0]
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
