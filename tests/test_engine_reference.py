"""architecture.md invariant 3: a request's greedy tokens and logits are the same whether it runs alone, in
a batch of other prefixes, or joins the batch mid-flight, and the same as HF GPT-2's forward with that
prefix as `past_key_values` (invariant 2: its tokens sit at positions P .. P+T-1)."""

from __future__ import annotations

import pytest
import torch

from prefixserve.engine import EngineConfig, EngineCore, SamplingParams

from .helpers import PROMPTS, collect, make_prefixes
from .reference import hf_greedy


# graphs: each layer's dense pieces on the bucketed static buffers (graphs.py; captured on CUDA)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("budget", [512, 7])  # 7: prompts are prefilled in chunks across steps
def test_mixed_prefixes_join_mid_flight_match_hf(tiny_model, hf_model, budget, graphs):
    prefixes = make_prefixes(tiny_model, [1, 3, 7, 12, 30])
    config = EngineConfig(max_running=6, max_tokens_per_step=budget, record_logits=True, cuda_graphs=graphs)
    engine = EngineCore(tiny_model, config)
    for pid, kv in prefixes.items():
        engine.prefixes.register(pid, kv)
    plan = [  # (prefix, prompt, max_new_tokens, step at which it joins)
        ("p1", PROMPTS[0], 12, 0),
        (None, PROMPTS[1], 9, 0),
        ("p7", PROMPTS[2], 15, 0),
        ("p12", PROMPTS[3], 10, 2),
        ("p3", PROMPTS[4], 6, 3),
        ("p30", PROMPTS[5], 11, 5),
        ("p7", PROMPTS[1], 8, 9),  # same prefix as a running row, different input
    ]
    prompts: dict[str, tuple[str | None, list[int], int]] = {}
    outputs: dict[str, list] = {}
    step = 0
    while step < 1000 and (engine.has_work or any(join >= step for *_, join in plan)):
        for i, (pid, text, max_new, join) in enumerate(plan):
            if join == step:
                rid = engine.add_request(
                    text, SamplingParams(max_new_tokens=max_new), prefix_id=pid, request_id=f"r{i}"
                )
                prompts[rid] = (pid, engine._live[rid].request.prompt_ids, max_new)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
    assert set(outputs) == {f"r{i}" for i in range(len(plan))}
    for rid, (pid, prompt_ids, max_new) in prompts.items():
        tokens, logits, _ = collect(outputs[rid])
        ref_tokens, ref_logits = hf_greedy(hf_model, prompt_ids, prefixes.get(pid), max_new)
        assert tokens == ref_tokens, f"{rid}: engine {tokens} != HF {ref_tokens}"
        for i, (a, b) in enumerate(zip(logits, ref_logits, strict=True)):
            torch.testing.assert_close(
                a, b, rtol=1e-4, atol=1e-4, msg=lambda m, i=i, rid=rid: f"{rid} step {i}: {m}"
            )
    assert not engine.has_work and engine.num_running == 0  # every row left the batch


def test_alone_equals_in_batch(tiny_model):
    """The same request's logits alone and inside a full mixed batch (no HF involved)."""
    prefixes = make_prefixes(tiny_model, [2, 5, 9])
    params = SamplingParams(max_new_tokens=10)

    def run(companions: bool):
        engine = EngineCore(tiny_model, EngineConfig(max_running=8, record_logits=True))
        for pid, kv in prefixes.items():
            engine.prefixes.register(pid, kv)
        if companions:
            for i, pid in enumerate(["p2", None, "p9", "p2"]):
                engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=4 + 3 * i), prefix_id=pid)
        engine.add_request(PROMPTS[2], params, prefix_id="p5", request_id="target")
        return collect(engine.run_to_completion()["target"])

    alone, batched = run(False), run(True)
    assert alone[0] == batched[0]
    for a, b in zip(alone[1], batched[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefix_positions_follow_the_prefix(tiny_model, hf_model):
    """Invariant 2 made visible: shifting positions by P changes logits; the engine matches HF's P.."""
    kv = make_prefixes(tiny_model, [20])["p20"]
    engine = EngineCore(tiny_model, EngineConfig(record_logits=True))
    engine.prefixes.register("p20", kv)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=1), prefix_id="p20")
    logits = engine.run_to_completion()[rid][0].logits[0]
    prompt = tiny_model.tokenizer.encode(PROMPTS[0])
    _, ref = hf_greedy(hf_model, prompt, kv, 1)
    torch.testing.assert_close(logits, ref[0], rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # positions 0..T-1 instead of P..P+T-1 give different logits
        from .reference import prefix_cache

        wrong = hf_model(
            torch.tensor([prompt]),
            **prefix_cache(hf_model, kv),
            position_ids=torch.arange(len(prompt))[None],
        ).logits[0, -1]
    assert not torch.allclose(logits, wrong, atol=1e-3)
