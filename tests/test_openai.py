"""The evaluation protocol against a live server: /v1/completions as the OpenAI spec defines it (prompt
lists and token ids, n, echo, logprobs, scoring with max_tokens 0, penalties, logit_bias, streaming
with usage), fields it does not support refused by name, the tokenizer endpoints, and the native
/generate logprobs and /score, all checked against HF GPT-2's own log_softmax."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from .helpers import A, B, text_prefix

PROMPT = "name : Aromi | food : Italian"
PREFIX_TEXT = "name : The Punter | food : English\n"


@pytest.fixture(scope="module")
def api(module_live_server):
    return module_live_server(max_running=8)


@pytest.fixture(scope="module")
def prefix(api) -> str:
    return text_prefix(api, A, PREFIX_TEXT)["id"]


def post(api, path: str, body: dict, headers=A) -> httpx.Response:
    return httpx.post(api.url + path, json=body, headers=headers, timeout=60)


@torch.inference_mode()
def hf_log_probs(hf, tokenizer, ids: list[int], prefix_text: str | None = None) -> list[float]:
    """HF's log-probability of each token after the first, given those before it (and, for a text
    prefix, the prefix's text before them all: a text prefix is exactly that text's K/V)."""
    before = tokenizer.encode(prefix_text) if prefix_text else []
    lp = torch.log_softmax(hf(input_ids=torch.tensor([before + ids])).logits[0].float(), -1)
    return [float(lp[len(before) + i - 1, t]) for i, t in enumerate(ids) if i > 0]


def model_name(api) -> str:
    return httpx.get(api.url + "/ready").json()["model"]["name"]


def test_models_list_names_the_model_ready_names(api, prefix):
    ids = [m["id"] for m in httpx.get(api.url + "/v1/models", headers=A).json()["data"]]
    assert ids[0] == model_name(api) and prefix in ids


def test_a_prefix_cards_created_time_is_its_stored_utc_time_in_any_time_zone(api, prefix, monkeypatch):
    from datetime import UTC, datetime

    stored = httpx.get(f"{api.url}/prefixes/{prefix}", headers=A).json()["created_at"]
    want = int(datetime.fromisoformat(stored).astimezone(UTC).timestamp())
    for zone in ("Asia/Kolkata", "America/New_York", "UTC"):  # the server shares this process's zone
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        cards = {m["id"]: m for m in httpx.get(api.url + "/v1/models", headers=A).json()["data"]}
        assert cards[prefix]["created"] == want, zone
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("use_prefix", [False, True], ids=["bare", "text-prefix"])
def test_echo_logprobs_score_the_prompt_as_hf_does(api, prefix, tiny_model, hf_model, use_prefix):
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 0 or 1, several prompts at once."""
    tok = tiny_model.tokenizer
    prompts = [PROMPT, "The Eagle is a coffee shop", "x y z"]
    for max_tokens in (0, 1):
        r = post(
            api,
            "/v1/completions",
            {
                "model": prefix if use_prefix else model_name(api),
                "prompt": prompts,
                "echo": True,
                "logprobs": 1,
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        for prompt, choice in zip(prompts, body["choices"], strict=True):
            ids = tok.encode(prompt)
            lp = choice["logprobs"]
            assert choice["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            want = hf_log_probs(hf_model, tok, ids, PREFIX_TEXT if use_prefix else None)
            assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=2e-4)
            assert "".join(lp["tokens"]) == choice["text"]
            assert lp["text_offset"] == [
                sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids) + max_tokens)
            ]
            for token, value, top in zip(
                lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
            ):
                assert top[token] == pytest.approx(value) and len(top) <= 2  # the 1 best, and the chosen
                assert max(top.values()) >= value
        assert body["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)


def test_token_id_prompts_n_and_seeds(api, tiny_model):
    tok = tiny_model.tokenizer
    ids = [tok.encode(PROMPT), tok.encode("The Eagle")]
    body = {"model": model_name(api), "prompt": ids, "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 11}
    first = post(api, "/v1/completions", body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    again = post(api, "/v1/completions", body).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]  # seeded
    assert first["choices"][0]["text"] != first["choices"][1]["text"]  # the n choices draw apart
    as_text = post(api, "/v1/completions", {**body, "prompt": [PROMPT, "The Eagle"]}).json()
    assert [c["text"] for c in as_text["choices"]] == [c["text"] for c in first["choices"]]
    assert first["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])  # once per prompt, not per choice
    assert first["usage"]["completion_tokens"] == 20
    one = post(api, "/v1/completions", {**body, "prompt": ids[0], "n": 1}).json()  # a flat id list: 1 prompt
    assert len(one["choices"]) == 1


def test_logit_bias_and_penalties_reach_the_sampler(api, tiny_model):
    base = {"model": model_name(api), "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    forced = post(api, "/v1/completions", {**base, "logit_bias": {"7": 100}}).json()
    assert forced["choices"][0]["text"] == tiny_model.tokenizer.decode([7] * 6)
    plain = post(api, "/v1/completions", base).json()["choices"][0]["text"]
    penalised = post(
        api, "/v1/completions", {**base, "frequency_penalty": 2.0, "presence_penalty": 2.0}
    ).json()
    assert penalised["choices"][0]["text"] != plain


def test_streaming_choices_and_usage(api):
    body = {
        "model": model_name(api),
        "prompt": [PROMPT, "The Eagle"],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": 2,
    }
    whole = post(
        api, "/v1/completions", {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    )
    with httpx.stream("POST", api.url + "/v1/completions", json=body, headers=A, timeout=60) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    for index, want in enumerate(whole.json()["choices"]):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [t for c in mine for t in c["logprobs"]["tokens"]] == want["logprobs"]["tokens"]
        assert [t for c in mine for t in c["logprobs"]["text_offset"]] == want["logprobs"]["text_offset"]
        assert mine[-1]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 6}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"functions": []}, "functions"),  # unknown: refused by name, never dropped
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [1, 10**9]}, "input"),
        ({"n": 10, "prompt": ["a"] * 10}, "n"),
    ],
)
def test_unsupported_or_bad_fields_are_refused_by_name(api, extra, field):
    r = post(api, "/v1/completions", {"model": model_name(api), "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_tokenizer_endpoints(api, tiny_model, prefix):
    tok = tiny_model.tokenizer
    r = post(api, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"]) and r["max_model_len"] > 0
    assert post(api, "/tokenize", {"prompt": "x", "model": prefix}).status_code == 200
    assert post(api, "/tokenize", {"prompt": "x", "model": prefix}, headers=B).status_code == 404  # not bob's
    assert post(api, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": PROMPT}
    bad = post(api, "/detokenize", {"tokens": [1, tiny_model.spec.vocab_size]})
    assert bad.status_code == 422 and "tokens" in bad.json()["error"]["message"]
    info = httpx.get(api.url + "/tokenizer_info", headers=A).json()
    assert info["vocab_size"] == tiny_model.spec.vocab_size and info["eos_token_id"] == tok.eos_token_id
    assert httpx.get(api.url + "/tokenizer_info").status_code == 401


def test_native_generate_logprobs_and_score(api, prefix, tiny_model, hf_model):
    from prefixserve_client import Client

    tok = tiny_model.tokenizer
    gen = post(
        api, "/generate", {"prefix_id": prefix, "input": PROMPT, "max_new_tokens": 4, "logprobs": 3}
    ).json()
    assert [t["token"] for t in gen["logprobs"]] and len(gen["logprobs"]) == 4
    assert "".join(t["token"] for t in gen["logprobs"]) == gen["text"]
    assert all(t["top"][0]["logprob"] >= t["logprob"] - 1e-6 and len(t["top"]) == 3 for t in gen["logprobs"])
    # the greedy tokens' own scores, asked back through /score, are what generation reported
    with Client(api.url, api_key=A["Authorization"].removeprefix("Bearer ")) as client:
        scored = client.score(prefix, PROMPT, gen["text"], top_logprobs=2)
    assert [t.token_id for t in scored.tokens] == tok.encode(gen["text"])
    assert [t.logprob for t in scored.tokens] == pytest.approx(
        [t["logprob"] for t in gen["logprobs"]], abs=2e-4
    )
    ids = tok.encode(PROMPT) + tok.encode(gen["text"])
    want = hf_log_probs(hf_model, tok, ids, PREFIX_TEXT)[len(tok.encode(PROMPT)) - 1 :]
    assert scored.total_logprob == pytest.approx(sum(want), abs=1e-3)
    assert scored.usage.completion_tokens == 0
    r = post(api, "/score", {"prefix_id": prefix, "input": PROMPT, "continuation": "x"}, headers=B)
    assert r.status_code == 404  # another tenant's private prefix


def test_cli_score(api, prefix, capsys):
    from prefixserve_client.cli import main

    key = A["Authorization"].removeprefix("Bearer ")
    assert main(["--base-url", api.url, "--api-key", key, "score", "--prefix", prefix, PROMPT, " is"]) == 0
    out = capsys.readouterr().out
    assert "total logprob" in out and "over 1 tokens" in out


def test_a_choice_refused_for_overload_answers_429_and_stops_its_siblings(api):
    """20 choices against 8 running rows + 4 waiting places: some are refused. The answer is the 429
    (with Retry-After), not a 500, and the choices already running are aborted, not left generating."""
    body = {"model": model_name(api), "prompt": ["x"] * 20, "max_tokens": 200, "temperature": 0}
    r = post(api, "/v1/completions", body)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == "overloaded" and "retry-after" in r.headers
    core = api.state.engine.core
    deadline = time.monotonic() + 30
    while core.num_live:  # aborted within a step or two (200 tokens each would take hundreds)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert post(api, "/v1/completions", {**body, "prompt": "x", "max_tokens": 2}).status_code == 200
