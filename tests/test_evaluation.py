"""Evaluation jobs against a live server (the embedded queue and worker): POST
/prefixes/{id}/evaluations runs greedy generation through the engine and scores it; the metrics equal
those computed here from the server's own /generate answers and HF's loss; results are stored with the
prefix for the tenant who asked; a training job with a validation split evaluates it at the end; bad
input is a 422 naming the field."""

from __future__ import annotations

import httpx
import pytest
import torch

from prefixserve.training.evaluate import compute_metrics
from prefixserve.training.synthetic import table_to_text
from prefixserve.training.trainer import IGNORE, encode_example

from .helpers import ALICE, A, B, text_prefix, wait_job

PREFIX_TEXT = "name : The Punter | food : English\nThe Punter is a pub.\n"
EXAMPLES = [
    {"input": "name : Aromi | food : Italian", "output": "Aromi is an Italian place."},
    {"input": "name : Zizzi | food : French", "output": "Zizzi serves French food."},
    {"input": "name : Cotto | area : riverside", "output": "Cotto is by the river."},
]


@torch.inference_mode()
def hf_loss(hf, tokenizer, before: str, pairs: list[tuple[str, str]], separator: str = "") -> float:
    """Token-weighted mean NLL of output + eos after the input (and the text before it)."""
    total, count = 0.0, 0
    head = tokenizer.encode(before)
    for x, y in pairs:
        ids, labels = encode_example(tokenizer, x, y, separator)
        full = torch.tensor([head + ids])
        lp = torch.log_softmax(hf(input_ids=full).logits[0].float(), -1)
        for j, label in enumerate(labels):
            if label != IGNORE:
                total -= float(lp[len(head) + j - 1, label])
                count += 1
    return total / count


def test_an_evaluation_job_scores_what_the_server_generates(api, tiny_model, hf_model):
    prefix = text_prefix(api, A, PREFIX_TEXT, visibility="public")["id"]
    body = {"examples": EXAMPLES, "max_new_tokens": 8}
    r = httpx.post(api.url + f"/prefixes/{prefix}/evaluations", json=body, headers=A)
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "evaluate" and r.json()["target"] == prefix
    job = wait_job(api, r.json()["id"])
    assert job["status"] == "succeeded", job
    result = job["evaluation"]
    predictions = [
        httpx.post(
            api.url + "/generate",
            headers=A,
            json={"prefix_id": prefix, "input": e["input"], "max_new_tokens": 8},
        )
        .json()["text"]
        .strip()
        for e in EXAMPLES
    ]
    want = compute_metrics(("bleu", "rouge_l", "exact_match"), predictions, [e["output"] for e in EXAMPLES])
    for name, value in want.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-9), name
    pairs = [(e["input"], e["output"]) for e in EXAMPLES]
    assert result["metrics"]["loss"] == pytest.approx(
        hf_loss(hf_model, tiny_model.tokenizer, PREFIX_TEXT, pairs), abs=1e-3
    )
    assert [s["prediction"] for s in result["samples"]] == predictions
    # stored with the prefix, for the tenant who asked only (the prefix is public: bob sees it, not this)
    mine = httpx.get(api.url + f"/prefixes/{prefix}", headers=A).json()["evaluations"]
    assert [e["job_id"] for e in mine] == [job["id"]] and mine[0]["metrics"] == result["metrics"]
    assert httpx.get(api.url + f"/prefixes/{prefix}", headers=B).json()["evaluations"] == []
    assert httpx.get(api.url + f"/jobs/{job['id']}", headers=B).status_code == 404


def test_sdk_evaluates_from_a_jsonl_file_with_chosen_metrics(api, tmp_path):
    import json

    from prefixserve_client import Client

    prefix = text_prefix(api, A, PREFIX_TEXT)["id"]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    with Client(api.url, api_key=ALICE) as client:
        job = client.prefixes.evaluate(prefix, path, metrics=["exact_match", "loss"], max_new_tokens=4)
        evaluated = job.wait(timeout=120)
    assert evaluated.id == prefix and set(evaluated.evaluations[-1].metrics) == {"exact_match", "loss"}
    assert job.state.evaluation["config"]["max_new_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"examples": []}, "examples"),
        ({"examples": EXAMPLES, "metrics": ["bleu", "perplexity"]}, "metrics"),
        ({"examples": EXAMPLES, "metrics": []}, "metrics"),
        ({"examples": [{"input": "word " * 300, "output": "x"}]}, "examples[0]"),
        ({"examples": [{"input": "a", "output": " "}]}, "examples[0]"),
        ({"examples": EXAMPLES, "max_new_tokens": 0}, "max_new_tokens"),
        ({"examples": EXAMPLES, "temperature": 1}, "temperature"),
    ],
)
def test_bad_evaluation_requests_are_refused_by_name(api, body, field):
    prefix = text_prefix(api, A, "short\n")["id"]
    r = httpx.post(api.url + f"/prefixes/{prefix}/evaluations", json=body, headers=A)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_evaluating_another_tenants_private_prefix_is_not_found(api):
    private = text_prefix(api, A, "alice's own\n")["id"]
    r = httpx.post(api.url + f"/prefixes/{private}/evaluations", json={"examples": EXAMPLES}, headers=B)
    assert r.status_code == 404


def test_a_training_job_with_a_validation_split_evaluates_it(api):
    pairs = table_to_text(24)
    hyper = {"prefix_len": 4, "hidden": 32, "epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "seed": 0}
    body = {
        "train": {"examples": [{"input": x, "output": y} for x, y in pairs], "val_fraction": 0.25, **hyper}
    }
    r = httpx.post(api.url + "/prefixes", json=body, headers=A)
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"])
    assert job["status"] == "succeeded", job
    result = job["evaluation"]
    assert result["n_examples"] == 6 and set(result["metrics"]) == {"bleu", "rouge_l", "exact_match", "loss"}
    # the same held-out examples and loss as the trainer's own validation (fp32 HF there, the engine here)
    assert result["metrics"]["loss"] == pytest.approx(job["eval_loss"], rel=1e-3)
    shown = httpx.get(api.url + f"/prefixes/{job['prefix_id']}", headers=A).json()["evaluations"]
    assert [e["job_id"] for e in shown] == [job["id"]]
