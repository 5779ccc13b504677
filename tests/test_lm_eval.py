"""EleutherAI's lm-evaluation-harness (the real `lm_eval` package) against a live server, as its users
run it: `local-completions` pointed at /v1/completions, two small local tasks (no downloads), one
`generate_until` and one `multiple_choice`, batch size 4, with `tokenized_requests` true and false and
with the harness's remote tokenizer (our /tokenize, /detokenize, /tokenizer_info). The harness's
loglikelihoods must equal HF GPT-2's own, computed here with the harness's context/continuation split.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from .helpers import ALICE, text_prefix

lm_eval = pytest.importorskip("lm_eval")  # the test extra installs it; only a bare `pip install .` lacks it

PREFIX_TEXT = "Answer with one word.\n"
MC_DOCS = [
    {"question": "The colour of the sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "A cat says", "choices": ["moo", "meow"], "label": 1},
    {"question": "name : Aromi | food :", "choices": ["Italian", "English", "French"], "label": 0},
    {"question": "One plus one is", "choices": ["two", "seven"], "label": 0},
    {"question": "Water is", "choices": ["wet", "dry", "square", "late"], "label": 0},
]
GEN_DOCS = [
    {"question": "name : The Eagle | food :", "answer": "Italian"},
    {"question": "Say hello:", "answer": "hello"},
    {"question": "x y z", "answer": "w"},
    {"question": "The Punter is a", "answer": "pub"},
    {"question": "1 2 3", "answer": "4"},
]


def _task_dir(tmp_path) -> str:
    """Two task YAMLs over local JSONL files (the `json` dataset builder needs no download)."""
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{question}}'\n"
    (tmp_path / "ps_mc.yaml").write_text(
        "task: ps_mc\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    (tmp_path / "ps_gen.yaml").write_text(
        "task: ps_gen\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return str(tmp_path)


@pytest.fixture(scope="module")
def live(module_live_server):
    return module_live_server(max_running=8)


@torch.inference_mode()
def hf_loglikelihood(hf, tokenizer, context: str, continuation: str, before: str = "") -> float:
    """The harness's split: trailing spaces of the context move to the continuation; the continuation's
    tokens are those of the whole text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    ids = tokenizer.encode(before) + whole if before else whole
    offset = len(ids) - len(whole)
    lp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(lp[offset + i - 1, ids[offset + i]]) for i in range(n_ctx, len(whole)))


@pytest.mark.parametrize(
    ("backend", "tokenized", "use_prefix"),
    [("huggingface", True, True), ("huggingface", False, False), ("remote", False, False)],
    ids=["tokenized-prefix", "text-bare", "remote-tokenizer"],
)
def test_lm_eval_harness_runs_both_task_kinds_and_agrees_with_hf(
    live, tiny_model, tiny_model_dir, hf_model, tmp_path, monkeypatch, backend, tokenized, use_prefix
):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", ALICE)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    if use_prefix:
        model = text_prefix(live, {"Authorization": f"Bearer {ALICE}"}, PREFIX_TEXT)["id"]
    else:
        model = httpx.get(live.url + "/ready").json()["model"]["name"]
    args = {
        "base_url": live.url + "/v1/completions",
        "model": model,
        "tokenizer_backend": backend,
        "tokenized_requests": tokenized,
        "num_concurrent": 1,
        "max_retries": 1,
        "auth_token": ALICE,
        "max_length": tiny_model.spec.n_positions,
    }
    if backend == "huggingface":
        args["tokenizer"] = str(tiny_model_dir)
    results = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["ps_mc", "ps_gen"],
        task_manager=TaskManager(include_path=_task_dir(tmp_path)),
        batch_size=4,
        log_samples=True,
    )
    assert 0.0 <= results["results"]["ps_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["ps_gen"]["exact_match,none"] <= 1.0
    mc = results["samples"]["ps_mc"]
    assert len(mc) == len(MC_DOCS) and len(results["samples"]["ps_gen"]) == len(GEN_DOCS)
    before = PREFIX_TEXT if use_prefix else ""
    for sample in mc:  # one (context, continuation) per choice, and the harness's (loglikelihood, greedy)
        pairs = zip(sample["arguments"], sample["filtered_resps"], strict=True)
        for (context, continuation), (got, _greedy) in pairs:
            want = hf_loglikelihood(hf_model, tiny_model.tokenizer, context, continuation, before)
            assert got == pytest.approx(want, abs=1e-3)
    for sample in results["samples"]["ps_gen"]:  # the harness's generations are the server's greedy text
        ((context, _kwargs),) = sample["arguments"]
        direct = httpx.post(
            live.url + "/v1/completions",
            headers={"Authorization": f"Bearer {ALICE}"},
            json={"model": model, "prompt": context, "max_tokens": 6, "temperature": 0, "stop": ["\n"]},
        ).json()
        assert sample["filtered_resps"] == [direct["choices"][0]["text"]]
