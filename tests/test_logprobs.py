"""Token scoring in the engine: prompt log-probabilities (echo / lm-eval's loglikelihood) equal
`log_softmax` of HF GPT-2 with the prefix as `past_key_values`, for bare, KV-prefix and NTK rows in
one mixed batch, across prefill chunks and preemption; sampled tokens' log-probabilities; scoring
without generating; OpenAI's penalties and logit_bias in the sampler."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from prefixserve.engine import EngineConfig, EngineCore, FinishReason, SamplingParams
from prefixserve.errors import InvalidRequest

from .helpers import PROMPTS, make_ntk, make_prefixes
from .reference import ntk_logits, prefix_cache


@torch.inference_mode()
def hf_log_probs(hf: GPT2LMHeadModel, ids: list[int], prefix) -> torch.Tensor:
    """log_softmax of HF's logits at every prompt position: `[T, V]` (row i predicts token i + 1)."""
    if prefix is None:
        logits = hf(input_ids=torch.tensor([ids])).logits[0]
    elif isinstance(prefix, torch.Tensor):
        p = prefix.shape[3]
        logits = hf(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, p + len(ids), dtype=torch.long),
            position_ids=torch.arange(p, p + len(ids))[None],
            **prefix_cache(hf, prefix),
        ).logits[0]
    else:  # NTK
        logits = ntk_logits(hf, ids, prefix.z, prefix.k)
    return torch.log_softmax(logits.float(), -1)


def _engine(model, prefixes: dict, **config) -> EngineCore:
    engine = EngineCore(model, EngineConfig(**config))
    for pid, state in prefixes.items():
        engine.prefixes.register(pid, state)
    return engine


def _run(engine: EngineCore, jobs: list[tuple[str | None, str, SamplingParams]]) -> dict[str, list]:
    for i, (pid, prompt, params) in enumerate(jobs):
        engine.add_request(prompt, params, prefix_id=pid, request_id=f"r{i}")
    return engine.run_to_completion()


@pytest.mark.parametrize(
    "config",
    [
        {"max_running": 8},
        {"max_running": 8, "max_tokens_per_step": 8},  # prompts scored chunk by chunk
        {"max_running": 8, "max_seq_len": 64, "kv_cache_tokens": 64, "block_size": 4},  # preemption
    ],
    ids=["whole", "chunked", "preempted"],
)
def test_prompt_logprobs_equal_hf_log_softmax_in_a_mixed_batch(tiny_model, hf_model, config):
    prefixes = {**make_prefixes(tiny_model, [3, 9]), "n1": make_ntk(tiny_model, 1)}
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, prompt_logprobs=3, logprobs=2)
    jobs = [
        (pid, PROMPTS[i % len(PROMPTS)], params) for i, pid in enumerate(["p3", None, "n1", "p9", None, "p3"])
    ]
    engine = _engine(tiny_model, prefixes, **config)
    outs = _run(engine, jobs)
    for i, (pid, prompt, _) in enumerate(jobs):
        ids = tiny_model.tokenizer.encode(prompt)
        first = [o for o in outs[f"r{i}"] if o.prompt_logprobs is not None]
        assert len(first) == 1, "the prompt's log-probabilities come once, with the first token"
        got = first[0].prompt_logprobs
        assert len(got) == len(ids) and got[0] is None
        want = hf_log_probs(hf_model, ids, prefixes.get(pid))  # [T, V]
        for j, entry in enumerate(got[1:], start=1):
            assert entry.token_id == ids[j]
            assert entry.logprob == pytest.approx(float(want[j - 1, ids[j]]), abs=2e-4)
            top_ids = [t for t, _ in entry.top]
            assert len(top_ids) == 3
            assert top_ids == want[j - 1].topk(3).indices.tolist() or torch.allclose(
                want[j - 1, top_ids], want[j - 1].topk(3).values, atol=1e-5
            )  # (ties may order differently)
    if "kv_cache_tokens" in config:
        assert engine.scheduler.num_preemptions > 0
        assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.capacity


def test_sampled_tokens_come_with_their_log_probabilities(tiny_model):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=3, logprobs=4)
    engine = _engine(tiny_model, make_prefixes(tiny_model, [5]), max_running=4, record_logits=True)
    outs = _run(engine, [("p5", PROMPTS[0], params), (None, PROMPTS[1], SamplingParams(max_new_tokens=3))])
    for out in outs["r0"]:
        (entry,) = out.logprobs
        (token,) = out.token_ids
        lp = torch.log_softmax(out.logits[0].float(), -1)
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(lp[token]), abs=1e-5)
        assert [t for t, _ in entry.top] == lp.topk(4).indices.tolist()
    assert all(o.logprobs == [] for o in outs["r1"])  # not asked: not computed


def test_scoring_without_generating_ends_after_the_prompt(tiny_model, hf_model):
    engine = _engine(tiny_model, {}, max_running=4, max_tokens_per_step=8)
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    outs = _run(engine, [(None, PROMPTS[2], params), (None, PROMPTS[0], SamplingParams(max_new_tokens=4))])
    (out,) = outs["r0"]
    assert out.finish_reason == FinishReason.LENGTH and out.token_ids == [] and out.completion_tokens == 0
    ids = tiny_model.tokenizer.encode(PROMPTS[2])
    want = hf_log_probs(hf_model, ids, None)
    got = [e.logprob for e in out.prompt_logprobs[1:]]
    torch.testing.assert_close(
        torch.tensor(got), want[torch.arange(len(ids) - 1), ids[1:]], atol=2e-4, rtol=0
    )
    assert len(outs["r1"]) == 4  # its neighbour generated as usual
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.capacity
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.prepare(PROMPTS[0], SamplingParams(max_new_tokens=0))  # generating nothing, scoring nothing


def test_logit_bias_and_penalties_change_what_a_row_picks_and_nothing_else(tiny_model):
    plain = SamplingParams(max_new_tokens=10, ignore_eos=True)
    biased = SamplingParams(max_new_tokens=10, ignore_eos=True, logit_bias=((7, 100.0),))
    penalised = SamplingParams(
        max_new_tokens=10, ignore_eos=True, frequency_penalty=2.0, presence_penalty=1.0
    )
    engine = _engine(tiny_model, {}, max_running=4, record_logits=True)
    outs = _run(
        engine, [(None, PROMPTS[0], plain), (None, PROMPTS[0], biased), (None, PROMPTS[0], penalised)]
    )
    alone = _run(_engine(tiny_model, {}, max_running=4), [(None, PROMPTS[0], plain)])
    tokens = {rid: [t for o in outs[rid] for t in o.token_ids] for rid in outs}
    assert tokens["r0"] == [t for o in alone["r0"] for t in o.token_ids]  # companions change nothing
    assert tokens["r1"] == [7] * 10
    generated: list[int] = []
    for out in outs["r2"]:  # each pick is the argmax of the penalised logits (logits are the model's)
        logits = out.logits[0].float().clone()
        for t in set(generated):
            logits[t] -= 1.0 + 2.0 * generated.count(t)
        assert out.token_ids == [int(logits.argmax())]
        generated += out.token_ids
    assert tokens["r2"] != tokens["r0"]
    assert len(set(tokens["r2"])) > len(set(tokens["r0"]))


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        (SamplingParams(logprobs=21), "logprobs", "[0, 20]"),
        (SamplingParams(prompt_logprobs=-1), "prompt_logprobs", "got -1"),
        (SamplingParams(presence_penalty=2.5), "presence_penalty", "[-2, 2]"),
        (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty", "got nan"),
        (SamplingParams(logit_bias=((10**6, 1.0),)), "logit_bias", "token ids must be integers"),
        (SamplingParams(logit_bias=((3, 101.0),)), "logit_bias[3]", "[-100, 100]"),
    ],
)
def test_scoring_and_penalty_parameters_are_validated(tiny_model, params, field, message):
    with pytest.raises(InvalidRequest) as info:
        params.validate(tiny_model.spec.vocab_size)
    assert info.value.field == field and message in str(info.value)


def test_a_row_whose_draw_fails_leaves_its_neighbours_logprobs_their_own(tiny_model, monkeypatch):
    """Fault injection: one sampling row's draw raises. The rows after it in the batch still get the
    log-probabilities (and recorded logits) of their own logits, as when they run alone."""
    from prefixserve.engine import sampling

    real = sampling.sample_one

    def failing(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("injected: this row's draw fails")
        return real(logits, params, generator)

    asks = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=3)
    alone = _run(_engine(tiny_model, {}, max_running=4), [(None, PROMPTS[1], asks)])["r0"]
    monkeypatch.setattr(sampling, "sample_one", failing)
    bad = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=1.0, seed=666)
    engine = _engine(tiny_model, {}, max_running=4, record_logits=True)
    outs = _run(engine, [(None, PROMPTS[3], bad), (None, PROMPTS[1], asks)])  # the bad row's is 1 token:
    # it comes first in the step's rows
    assert outs["r0"][-1].finish_reason == FinishReason.ERROR
    got = [e for o in outs["r1"] for e in o.logprobs]
    want = [e for o in alone for e in o.logprobs]
    assert [e.token_id for e in got] == [e.token_id for e in want]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-5)
    for out in outs["r1"]:
        (entry,) = out.logprobs
        assert entry.logprob == pytest.approx(
            float(torch.log_softmax(out.logits[0].float(), -1)[entry.token_id]), abs=1e-5
        )
