"""Engine behaviour on the tiny model: sampling, stopping, cancelling, validation, waiting prefixes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prefixserve.engine import EngineConfig, EngineCore, FinishReason, OfflineEngine, SamplingParams
from prefixserve.engine.sampling import filter_logits
from prefixserve.errors import ContextTooLong, EngineOverloaded, InvalidPrefix, InvalidRequest, PrefixNotFound

from .helpers import PROMPTS, collect, make_prefixes
from .reference import hf_greedy


@pytest.fixture
def prefixes(tiny_model):
    return make_prefixes(tiny_model, [2, 4, 6, 8])


def new_engine(model, prefixes, **config) -> EngineCore:
    engine = EngineCore(model, EngineConfig(**config))
    for pid, kv in prefixes.items():
        engine.prefixes.register(pid, kv)
    return engine


def text_of(outputs) -> str:
    return collect(outputs)[2]


# ---- seeded sampling ---------------------------------------------------------------------------
SAMPLED = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=1234)


def run_target(
    model, prefixes, companions: list[tuple[str | None, SamplingParams]], join_at: int = 0
) -> list[int]:
    engine = new_engine(model, prefixes, max_running=8, max_tokens_per_step=16)
    for i, (pid, params) in enumerate(companions):
        engine.add_request(PROMPTS[i % len(PROMPTS)], params, prefix_id=pid)
    outputs: list = []
    for _ in range(join_at):
        engine.step()
    engine.add_request(PROMPTS[0], SAMPLED, prefix_id="p4", request_id="target")
    while engine.has_work:
        outputs += [o for o in engine.step() if o.request_id == "target"]
    return collect(outputs)[0]


def test_seeded_sampling_is_independent_of_batch_companions(tiny_model, prefixes):
    alone = run_target(tiny_model, prefixes, [])
    greedy = SamplingParams(max_new_tokens=30)
    others = [
        ("p2", dataclasses.replace(SAMPLED, seed=1)),
        (None, greedy),
        ("p8", SamplingParams(max_new_tokens=25, temperature=1.3)),  # unseeded
        ("p4", dataclasses.replace(SAMPLED, seed=1234)),  # same prefix and seed, other input
        ("p6", SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.5, seed=9)),
    ]
    assert run_target(tiny_model, prefixes, others) == alone
    assert run_target(tiny_model, prefixes, others, join_at=3) == alone  # joins a running batch
    assert run_target(tiny_model, prefixes, others[::-1], join_at=1) == alone
    assert len(alone) == 20


def test_seed_changes_the_sample_and_sampling_differs_from_greedy(tiny_model, prefixes):
    def tokens(params: SamplingParams) -> list[int]:
        engine = new_engine(tiny_model, prefixes)
        rid = engine.add_request(PROMPTS[0], params, prefix_id="p4")
        return collect(engine.run_to_completion()[rid])[0]

    assert tokens(SAMPLED) == tokens(SAMPLED)
    assert tokens(SAMPLED) != tokens(dataclasses.replace(SAMPLED, seed=4321))
    assert tokens(SAMPLED) != tokens(SamplingParams(max_new_tokens=20))


def test_extreme_temperatures_sample_finite_distributions(tiny_model):
    engine = EngineCore(tiny_model)
    for t in (1e-300, 1e-6, 1e-4, 100.0):
        rid = engine.add_request(
            PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=t, top_p=1e-200, seed=1)
        )
        assert engine.run_to_completion()[rid][-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    logits = torch.tensor([1e30, -1e30, 0.0])
    assert torch.isfinite(filter_logits(logits, SamplingParams(temperature=1e-5)).softmax(-1)).all()


def test_filters_keep_only_the_allowed_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    top_k = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(top_k).tolist() == [True, True, False, False, False]
    probs = logits.softmax(-1)  # [0.636, 0.234, 0.086, 0.032, 0.012]
    top_p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(top_p).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.8 <= probs[:2].sum()
    tiny_p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert torch.isfinite(tiny_p).tolist() == [True, False, False, False, False]  # the top token stays
    hot = filter_logits(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(hot.softmax(-1), (logits / 2).softmax(-1))


# ---- finishing: length, stop strings, EOS --------------------------------------------------------
def test_stop_string_truncates_text_and_is_never_streamed(tiny_model, prefixes):
    engine = OfflineEngine(new_engine(tiny_model, prefixes))  # (text and stop strings: a front-end's)
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=40), prefix_id="p6")
    full = text_of(engine.run_to_completion()[rid])
    stop = full[15:19]
    assert len(full) > 25 and stop.strip(), full
    engine = OfflineEngine(new_engine(tiny_model, prefixes))
    params = SamplingParams(max_new_tokens=40, stop=("never-produced-xyz", stop))
    rid = engine.add_request(PROMPTS[2], params, prefix_id="p6")
    outs = engine.run_to_completion()[rid]
    streamed = [o.text for o in outs]
    assert "".join(streamed) == full[: full.index(stop)]
    assert outs[-1].finish_reason == FinishReason.STOP
    assert all(stop not in "".join(streamed[: i + 1]) for i in range(len(streamed)))
    assert len(outs) < 40


def test_length_and_eos_finish_reasons(tiny_model, hf_model, prefixes):
    engine = new_engine(tiny_model, prefixes)
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=7), prefix_id="p2")
    outs = engine.run_to_completion()[rid]
    assert outs[-1].finish_reason == FinishReason.LENGTH and outs[-1].completion_tokens == 7
    tokens = collect(outs)[0]
    # Make the 4th greedy token the model's EOS: generation ends there, and the EOS is not text.
    eos_model = dataclasses.replace(tiny_model, eos_token_id=tokens[3])
    engine = new_engine(eos_model, prefixes)
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=7), prefix_id="p2")
    outs = engine.run_to_completion()[rid]
    assert collect(outs)[0] == tokens[: tokens.index(tokens[3]) + 1]
    assert outs[-1].finish_reason == FinishReason.EOS
    engine = new_engine(eos_model, prefixes)
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=7, ignore_eos=True), prefix_id="p2")
    assert collect(engine.run_to_completion()[rid])[0] == tokens


def test_usage_counts(tiny_model, prefixes):
    engine = new_engine(tiny_model, prefixes)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5), prefix_id="p8")
    last = engine.run_to_completion()[rid][-1]
    n_prompt = len(tiny_model.tokenizer.encode(PROMPTS[0]))
    assert (last.prefix_tokens, last.prompt_tokens, last.completion_tokens) == (8, n_prompt, 5)


# ---- cancellation and slots ----------------------------------------------------------------------
def test_cancel_frees_slot_at_next_step_and_others_are_unaffected(tiny_model, hf_model, prefixes):
    engine = new_engine(tiny_model, prefixes, max_running=3, record_logits=True)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=30), prefix_id="p2")
    b = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=12), prefix_id="p6")
    c = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=30))
    outs: dict[str, list] = {}
    for _ in range(3):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert engine.num_running == 3
    assert engine.abort(a) and not engine.abort(a)
    for o in engine.step():
        outs.setdefault(o.request_id, []).append(o)
    assert engine.num_running == 2  # freed within one step
    assert engine.prefixes.pins("p2") == 0
    d = engine.add_request(PROMPTS[4], SamplingParams(max_new_tokens=5), prefix_id="p4")  # reuses the slot
    while engine.has_work:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert a not in outs or len(outs[a]) == 3
    for rid, pid in [(b, "p6"), (c, None), (d, "p4")]:
        prompt = tiny_model.tokenizer.encode(PROMPTS[{b: 1, c: 3, d: 4}[rid]])
        ref, _ = hf_greedy(hf_model, prompt, prefixes.get(pid), len(outs[rid]))
        assert collect(outs[rid])[0] == ref  # slot compaction moved rows without corrupting them
    assert engine.num_running == 0


# ---- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "field", "needle"),
    [
        (SamplingParams(top_p=0.0), "top_p", "expected a number in (0, 1], got 0.0"),
        (SamplingParams(top_p=1.5), "top_p", "got 1.5"),
        (SamplingParams(temperature=-1.0), "temperature", "got -1.0"),
        (SamplingParams(top_k=-1), "top_k", "got -1"),
        (SamplingParams(top_k=10**6), "top_k", "got 1000000"),
        (SamplingParams(max_new_tokens=0), "max_new_tokens", "expected an integer >= 1, got 0"),
        (SamplingParams(seed=-5), "seed", "got -5"),
        (SamplingParams(stop=("",)), "stop[0]", "non-empty"),
        (SamplingParams(stop=tuple("abcdefghijklmnopq")), "stop", "at most 16 stop strings, got 17"),
    ],
)
def test_parameters_out_of_range_are_named(tiny_model, params, field, needle):
    engine = EngineCore(tiny_model)
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("hello", params)
    assert err.value.field == field and needle in str(err.value)


def test_context_length_error_names_the_numbers(tiny_model, prefixes):
    engine = new_engine(tiny_model, prefixes)
    n = len(tiny_model.tokenizer.encode(PROMPTS[0]))
    with pytest.raises(ContextTooLong) as err:
        engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=250), prefix_id="p8")
    assert str(err.value) == (
        f"input: prefix length 8 + input tokens {n} + max_new_tokens 250 = {8 + n + 250}"
        " exceeds the model's n_positions of 256"
    )
    small = new_engine(tiny_model, prefixes, max_seq_len=64)
    with pytest.raises(ContextTooLong, match="exceeds the engine's max_seq_len of 64"):
        small.add_request(PROMPTS[0], SamplingParams(max_new_tokens=60))
    fits = 256 - 8 - n
    engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=fits), prefix_id="p8")  # exactly fits


def test_input_and_prefix_errors(tiny_model, prefixes):
    engine = new_engine(tiny_model, prefixes)
    with pytest.raises(InvalidRequest, match="expected at least one input token, got an empty input"):
        engine.add_request("")
    with pytest.raises(InvalidRequest, match=r"token ids must be integers in \[0, 512\), got 9999"):
        engine.add_request([1, 9999])
    with pytest.raises(PrefixNotFound, match="prefix 'nope' not found"):
        engine.add_request("hi", prefix_id="nope")
    spec = tiny_model.spec
    with pytest.raises(
        InvalidPrefix, match=r"prefix shape must be \[3, 2, 4, 5, 16\] for this model, got \[3, 2, 4, 5, 8\]"
    ):
        engine.prefixes.register("bad", torch.zeros(3, 2, 4, 5, 8))
    bad = torch.zeros(spec.prefix_shape(3))
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidPrefix, match="NaN or Inf"):
        engine.prefixes.register("nan", bad)
    with pytest.raises(InvalidPrefix, match=r"prefix length must be in \[1, 128\], got 200"):
        engine.prefixes.register("long", torch.zeros(spec.prefix_shape(200)))
    assert "bad" not in engine.prefixes and "nan" not in engine.prefixes


def test_duplicate_request_id_is_refused_without_leaking_a_pin(tiny_model, prefixes):
    engine = new_engine(tiny_model, prefixes)
    engine.add_request("a", prefix_id="p2", request_id="same")
    with pytest.raises(InvalidRequest, match="'same' is already in use"):
        engine.add_request("b", prefix_id="p2", request_id="same")
    assert engine.prefixes.pins("p2") == 1


def test_waiting_queue_is_bounded(tiny_model):
    engine = EngineCore(tiny_model, EngineConfig(max_running=1, max_waiting=2))
    engine.add_request("a")
    engine.add_request("b")
    with pytest.raises(EngineOverloaded, match="2 requests waiting, limit 2"):
        engine.add_request("c")


# ---- prefixes that are not on the device yet -------------------------------------------------
def test_request_waits_for_its_prefix_without_blocking_others(tiny_model, hf_model, prefixes):
    engine = new_engine(tiny_model, prefixes, max_running=4)
    engine.prefixes.announce("cold", 5)  # known to exist, still loading
    slow = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6), prefix_id="cold")
    fast = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=6), prefix_id="p2")
    outs: dict[str, list] = {}
    for _ in range(10):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs[fast][-1].finished and slow not in outs
    assert engine.scheduler.get(slow).status.value == "waiting"
    cold = make_prefixes(tiny_model, [5], seed=7)["p5"]
    engine.prefixes.register("cold", cold)  # the loader finished
    outs.update(engine.run_to_completion())
    ref, _ = hf_greedy(hf_model, tiny_model.tokenizer.encode(PROMPTS[0]), cold, 6)
    assert collect(outs[slow])[0] == ref
    assert engine.prefixes.pins("cold") == 0
