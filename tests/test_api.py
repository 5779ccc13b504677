"""The HTTP API against a live uvicorn (tiny model, real engine and store)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from prefixserve.api.errors import ClientGone, DeadlineExceeded
from prefixserve.metrics import tenant_label
from prefixserve.settings import ServerSettings

from .helpers import ALICE, BOB, A, B, native_file, settings_for, text_prefix, wait_until
from .live import LiveServer
from .reference import hf_greedy


# ---- ops and auth ----------------------------------------------------------------------------
def test_health_ready_metrics(api):
    assert httpx.get(api.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(api.url + "/ready").json()
    assert ready["status"] == "ready"
    models = httpx.get(api.url + "/v1/models", headers=A).json()["data"]
    assert ready["model"]["name"] == models[0]["id"] and "/" not in models[0]["id"]  # one name, no path
    httpx.post(api.url + "/generate", json={"input": "hi", "max_new_tokens": 2}, headers=A)
    text = httpx.get(api.url + "/metrics").text
    for name in (
        "prefixserve_requests_total",
        "prefixserve_queue_depth",
        "prefixserve_running_sequences",
        "prefixserve_batch_size",
        "prefixserve_generated_tokens_total",
        "prefixserve_time_to_first_token_seconds",
        "prefixserve_inter_token_latency_seconds",
        "prefixserve_prefix_loads_total",
        "prefixserve_kv_blocks_total",
        "prefixserve_kv_blocks_free",
        "prefixserve_preemptions",
        "prefixserve_prefix_requests_info",
    ):
        assert name in text, name
    # tenants appear as pseudonyms (tests/test_connections.py: access rules, names when configured)
    assert f'tenant="{tenant_label("alice")}"' in text and "alice" not in text


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": "Basic x"}]
)
def test_missing_or_invalid_key_is_401(api, headers):
    r = httpx.post(api.url + "/generate", json={"input": "hi"}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "unauthorized"
    assert httpx.get(api.url + "/prefixes", headers=headers).status_code == 401


# ---- generate ------------------------------------------------------------------------------------
def test_generate_with_a_text_prefix_matches_the_reference(api, tiny_model, hf_model):
    text = "name : Aromi | food : Italian\nAromi serves Italian food.\n"
    p = text_prefix(api, A, text)
    assert (
        p["source"] == "text"
        and p["owner"] == "alice"
        and p["prefix_len"] == len(tiny_model.tokenizer.encode(text))
    )
    r = httpx.post(
        api.url + "/generate",
        headers=A,
        json={"prefix_id": p["id"], "input": "name : Cotto", "max_new_tokens": 10},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tiny_model.tokenizer.encode(text) + tiny_model.tokenizer.encode("name : Cotto")
    ref, _ = hf_greedy(hf_model, ids, None, 10)
    assert body["text"] == tiny_model.tokenizer.decode(ref)
    assert body["usage"] == {
        "prefix_tokens": p["prefix_len"],
        "prompt_tokens": 4,
        "completion_tokens": 10,
    } or (body["usage"]["completion_tokens"] == 10 and body["usage"]["prefix_tokens"] == p["prefix_len"])
    assert body["finish_reason"] in ("length", "eos") and body["prefix_id"] == p["id"]


def test_streaming_sends_token_events_then_done(api):
    req = {"input": "The Eagle", "max_new_tokens": 8, "temperature": 0.8, "seed": 3}
    plain = httpx.post(api.url + "/generate", json=req, headers=A).json()
    events = []
    with httpx.stream("POST", api.url + "/generate", json={**req, "stream": True}, headers=A) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    tokens = [e for k, e in events if k == "token"]
    assert len(tokens) == 8 and all(len(e["token_ids"]) == 1 for e in tokens)
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == plain["finish_reason"]
    assert "".join(e["text"] for e in tokens) == plain["text"]  # seeded: same text streamed or not
    assert events[-1][1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize(
    ("body", "needle", "status"),
    [
        ({"input": "x", "max_new_tokens": 300}, "= 301 exceeds the model's n_positions of 256", 422),
        ({"input": "x", "top_p": 0}, "top_p", 422),
        ({"input": "x", "temperature": -1}, "temperature", 422),
        ({"input": ""}, "input", 422),
        ({"input": "x", "unknown": 1}, "unknown", 422),
        ({"input": "x", "stop": [""]}, "stop", 422),
        ({"max_new_tokens": 3}, "input", 422),
        ({"input": "x", "prefix_id": "pfx-nope"}, "not found", 404),
    ],
)
def test_bad_requests_are_4xx_with_a_clear_reason(api, body, needle, status):
    r = httpx.post(api.url + "/generate", json=body, headers=A)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_not_json_and_wrong_types_are_422(api):
    r = httpx.post(
        api.url + "/generate", content=b"{not json", headers={**A, "content-type": "application/json"}
    )
    assert r.status_code == 422
    r = httpx.post(api.url + "/generate", json={"input": "x", "max_new_tokens": "many"}, headers=A)
    assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"]


def test_upload_native_and_peft_and_errors(api, tiny_model):
    r = httpx.post(
        api.url + "/prefixes",
        headers=A,
        files={"file": ("p.safetensors", native_file(tiny_model))},
        data={"name": "uploaded", "visibility": "public"},
    )
    assert r.status_code == 201, r.text
    assert (
        r.json()["name"] == "uploaded" and r.json()["owner"] == "alice" and r.json()["visibility"] == "public"
    )
    spec = tiny_model.spec
    cfg = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 3,
        "num_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "token_dim": spec.n_embd,
    }
    weights = st_save({"prompt_embeddings": torch.randn(3, spec.n_layer * 2 * spec.n_embd)})
    r = httpx.post(
        api.url + "/prefixes",
        headers=A,
        files={
            "adapter_config": ("adapter_config.json", json.dumps(cfg)),
            "adapter_model": ("m.safetensors", weights),
        },
    )
    assert r.status_code == 201 and r.json()["source"] == "peft" and r.json()["prefix_len"] == 3
    bad = httpx.post(api.url + "/prefixes", headers=A, files={"file": ("p.safetensors", b"\x80\x04pickle")})
    assert bad.status_code == 422 and "pickle" in bad.json()["error"]["message"]
    big = httpx.post(api.url + "/prefixes", headers=A, files={"file": ("p.safetensors", bytes(400 * 1024))})
    assert big.status_code == 413 and big.json()["error"]["type"] == "payload_too_large"
    odd = httpx.post(api.url + "/prefixes", headers=A, files={"other": ("x", b"123")})
    assert odd.status_code == 422 and "upload either" in odd.json()["error"]["message"]
    wrong = httpx.post(api.url + "/prefixes", headers={**A, "content-type": "text/plain"}, content=b"hello")
    assert wrong.status_code == 422


def test_tenant_isolation_matrix(api):
    private = text_prefix(api, A, "alice's secret instructions\n")
    public = text_prefix(api, A, "alice's public instructions\n", visibility="public")

    def gen(pid: str, h: dict) -> httpx.Response:
        body = {"prefix_id": pid, "input": "x", "max_new_tokens": 2}
        return httpx.post(api.url + "/generate", json=body, headers=h)

    # owner: everything
    assert httpx.get(api.url + f"/prefixes/{private['id']}", headers=A).status_code == 200
    assert gen(private["id"], A).status_code == 200
    # other tenant on a private prefix: indistinguishable from an unknown id, on every endpoint
    unknown = "pfx-0000000000000000"
    for method, path in [("GET", "/prefixes/{}"), ("DELETE", "/prefixes/{}")]:
        foreign = httpx.request(method, api.url + path.format(private["id"]), headers=B)
        missing = httpx.request(method, api.url + path.format(unknown), headers=B)
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["message"].replace(private["id"], "?") == missing.json()["error"][
            "message"
        ].replace(unknown, "?")
    assert gen(private["id"], B).status_code == gen(unknown, B).status_code == 404
    ids_b = {p["id"] for p in httpx.get(api.url + "/prefixes", headers=B).json()["prefixes"]}
    assert private["id"] not in ids_b and public["id"] in ids_b
    # public: readable and usable by all, deletable by its owner only
    assert httpx.get(api.url + f"/prefixes/{public['id']}", headers=B).status_code == 200
    assert gen(public["id"], B).status_code == 200
    r = httpx.delete(api.url + f"/prefixes/{public['id']}", headers=B)
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    assert httpx.delete(api.url + f"/prefixes/{public['id']}", headers=A).status_code == 204
    assert httpx.get(api.url + f"/prefixes/{public['id']}", headers=A).status_code == 404
    assert httpx.get(api.url + f"/prefixes/{private['id']}", headers=A).status_code == 200  # untouched
    assert httpx.get(api.url + "/prefixes/..%2F..%2Fetc", headers=A).status_code == 404


# ---- disconnects, overload, limits ------------------------------------------------------------
def test_streaming_client_disconnect_frees_the_slot(api):
    core = api.state.engine.core
    wait_until(lambda: core.num_running == 0)
    req = {"input": "The Mill", "max_new_tokens": 200, "stream": True}
    with httpx.stream("POST", api.url + "/generate", json=req, headers=A) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("event: token")
        assert core.num_running == 1
    wait_until(lambda: core.num_running == 0 and core.num_live == 0)


def test_streaming_client_that_leaves_while_queued_is_dropped_from_the_queue(live_server, tmp_path):
    from prefixserve.model import load_model
    from prefixserve.tiny import TinyModelConfig, write_tiny_model

    slow = load_model(  # slow enough that one request holds the only slot for seconds
        write_tiny_model(
            tmp_path / "slow", TinyModelConfig(n_layer=8, n_head=8, n_embd=384, n_positions=1024)
        )
    )
    server = live_server(slow, max_running=1)
    core = server.state.engine.core
    long = {"input": "The Mill", "max_new_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/generate", json=long, headers=A) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        assert next(lines).startswith("event: token")  # holds the one running slot
        quick = httpx.Timeout(5, read=0.3)  # a second stream waits in the queue, then leaves
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream("POST", server.url + "/generate", json=long, headers=A, timeout=quick),
        ):
            pass
        wait_until(lambda: core.num_live == 1, timeout=2)  # gone from the queue within moments
        assert core.num_running == 1 and next(lines).startswith("data: ")  # the first still runs
    wait_until(lambda: core.num_live == 0 and core.num_running == 0)


def generated_tokens(api, tenant: str) -> float:
    for line in httpx.get(api.url + "/metrics").text.splitlines():
        if line.startswith(f'prefixserve_generated_tokens_total{{tenant="{tenant_label(tenant)}"}}'):
            return float(line.split()[-1])
    return 0.0


class _Connection:
    """The ASGI server's side of one connection whose request body has been read: `receive` blocks
    until the client goes (as uvicorn's does), and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.closed = asyncio.Event()

    async def receive(self) -> dict:
        self.calls += 1
        await self.closed.wait()
        return {"type": "http.disconnect"}


def test_a_waiting_request_watches_its_client_without_polling():
    from starlette.requests import Request

    from prefixserve.api.generation import while_connected

    async def scenario() -> None:
        conn = _Connection()
        request = Request({"type": "http", "method": "POST", "headers": []}, conn.receive)
        assert await while_connected(request, asyncio.sleep(0.4, "first token")) == "first token"
        assert conn.calls == 1  # one wait for the disconnect, not a probe every few ms

        conn = _Connection()
        request = Request({"type": "http", "method": "POST", "headers": []}, conn.receive)
        waiting = asyncio.ensure_future(asyncio.sleep(30))
        asyncio.get_running_loop().call_later(0.1, conn.closed.set)  # the client leaves
        with pytest.raises(ClientGone, match="the client left"):  # a 499, not a traceback in the log
            await while_connected(request, waiting)
        assert waiting.cancelled()  # noticed while the 30 s wait still ran, which it then ended

        with pytest.raises(DeadlineExceeded):
            await while_connected(Request({"type": "http"}, _Connection().receive), asyncio.sleep(5), 0.1)

    asyncio.run(scenario())


def test_non_streaming_client_disconnect_frees_the_slot(api):
    core = api.state.engine.core
    wait_until(lambda: core.num_running == 0)
    before = generated_tokens(api, "alice")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            api.url + "/generate",
            json={"input": "The Mill", "max_new_tokens": 240},
            headers=A,
            timeout=httpx.Timeout(5, read=0.02),
        )
    wait_until(lambda: core.num_live == 0 and core.num_running == 0)
    assert generated_tokens(api, "alice") - before < 240  # aborted, not run to the end


def test_overload_answers_429_with_retry_after_never_5xx(api):
    req = {"input": "Blue Spice", "max_new_tokens": 200}

    def call(_):
        return httpx.post(api.url + "/generate", json=req, headers=A, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(16)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["type"] == "overloaded"


def test_per_tenant_rate_limit(live_server):
    server = live_server(requests_per_minute=2)
    if time.time() % 60 > 50:  # the limiter's windows are whole minutes: not across a boundary
        time.sleep(60.5 - time.time() % 60)
    ok = [
        httpx.post(server.url + "/generate", json={"input": "x", "max_new_tokens": 1}, headers=A)
        for _ in range(2)
    ]
    assert [r.status_code for r in ok] == [200, 200]
    r = httpx.post(server.url + "/generate", json={"input": "x", "max_new_tokens": 1}, headers=A)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    other = httpx.post(server.url + "/generate", json={"input": "x", "max_new_tokens": 1}, headers=B)
    assert other.status_code == 200  # limits are per tenant


def test_redis_killed_during_a_load_still_serves(live_server, own_redis):
    server = live_server(redis_url=own_redis.url)
    p = text_prefix(server, A, "name : Zizzi\n")
    server.state.service.pool.evict(p["id"])  # cold: the next request loads it through the tiers
    own_redis.kill()
    r = httpx.post(
        server.url + "/generate",
        json={"prefix_id": p["id"], "input": "x", "max_new_tokens": 3},
        headers=A,
    )
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/ready").status_code == 200
    assert httpx.get(server.url + "/prefixes", headers=A).status_code == 200


def test_openapi_documents_every_endpoint(api):
    spec = httpx.get(api.url + "/openapi.json").json()
    for path in ("/generate", "/prefixes", "/prefixes/{prefix_id}", "/health", "/ready", "/metrics"):
        assert path in spec["paths"], path
    gen = spec["paths"]["/generate"]["post"]
    assert "examples" in json.dumps(spec["components"]["schemas"]["GenerateRequest"])
    assert {"401", "404", "422", "429"} <= set(gen["responses"])


# ---- OpenAI compatibility (the official SDK, unchanged) --------------------------------------------
def test_openai_sdk_models_completions_and_streaming(api, tiny_model):
    from pathlib import Path

    import openai

    client = openai.OpenAI(base_url=api.url + "/v1", api_key=ALICE, max_retries=0)
    p = text_prefix(api, A, "name : The Punter | food : English\n")
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == Path(tiny_model.name).name  # the bare model, by its checkpoint's name
    assert p["id"] in ids
    done = client.completions.create(
        model=p["id"], prompt="name : Aromi", max_tokens=6, temperature=0, seed=1
    )
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens == 6 and done.usage.total_tokens == done.usage.prompt_tokens + 6
    native = httpx.post(
        api.url + "/generate",
        headers=A,
        json={"prefix_id": p["id"], "input": "name : Aromi", "max_new_tokens": 6},
    ).json()
    assert done.choices[0].text == native["text"]
    chunks = list(
        client.completions.create(
            model=p["id"], prompt="name : Aromi", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == native["text"]
    assert chunks[-1].choices[0].finish_reason == "length" and all(
        c.choices[0].finish_reason is None for c in chunks[:-1]
    )
    bare = client.completions.create(model=ids[0], prompt="Hello", max_tokens=3)
    assert len(bare.choices) == 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="pfx-unknown00", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api.url + "/v1", api_key="nope-nope-nope-nope", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=ids[0], prompt="x", max_tokens=10_000)


def test_openai_endpoint_keeps_tenants_apart(api):
    import openai

    private = text_prefix(api, A, "alice only\n")
    bob = openai.OpenAI(base_url=api.url + "/v1", api_key=BOB, max_retries=0)
    assert private["id"] not in [m.id for m in bob.models.list().data]
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=private["id"], prompt="x", max_tokens=2)


def test_deadline_and_auth_off_and_keys_file(live_server, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"carol": ["carol-key-0123456789"]}))
    server = live_server(api_keys="", api_keys_file=str(keys), request_timeout_s=0.02)
    carol = {"Authorization": "Bearer carol-key-0123456789"}
    assert httpx.get(server.url + "/prefixes", headers=carol).status_code == 200
    assert httpx.get(server.url + "/prefixes", headers=A).status_code == 401  # not in the file
    r = httpx.post(server.url + "/generate", json={"input": "x", "max_new_tokens": 240}, headers=carol)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    wait_until(lambda: server.state.engine.core.num_live == 0)  # the sequence was aborted
    open_server = live_server(settings=settings_for(tmp_path / "open", auth=False))
    r = httpx.post(open_server.url + "/prefixes", json={"text": "no keys here\n"})
    assert r.status_code == 201 and r.json()["owner"] == "default"


def test_rate_limits_are_shared_across_replicas_through_redis(tiny_model, tmp_path, redis_url):
    replicas = [
        LiveServer(
            settings_for(
                tmp_path / f"r{i}",
                redis_url=redis_url,
                requests_per_minute=3,
                api_keys=f"shared-{tmp_path.name}:{ALICE}",
            ),
            tiny_model,
        ).start()
        for i in range(2)
    ]
    try:
        body = {"input": "x", "max_new_tokens": 1}
        codes = [
            httpx.post(replicas[i % 2].url + "/generate", json=body, headers=A).status_code for i in range(4)
        ]
        assert codes == [200, 200, 200, 429]  # 3 per minute for the tenant, whichever replica it hits
    finally:
        for r in replicas:
            r.stop()


def test_error_after_streaming_began_is_an_error_event(live_server):
    server = live_server()
    req = {"input": "The Mill", "max_new_tokens": 240, "stream": True}
    with httpx.stream("POST", server.url + "/generate", json=req, headers=A) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("event: token")
        server.state.engine.stop()  # the engine goes away mid-stream
        rest = list(lines)
    kinds = [line[7:] for line in rest if line.startswith("event: ")]
    assert kinds[-1] == "error" and "done" not in kinds
    error = json.loads([line for line in rest if line.startswith("data: ")][-1][6:])
    assert error["error"]["type"] == "unavailable" and "engine stopped" in error["error"]["message"]


def test_auto_model_falls_back_to_the_offline_tiny_model(tmp_path, caplog):
    from prefixserve.loading import load_configured_model

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the hub is unreachable for this test
    with caplog.at_level("WARNING"):
        model = load_configured_model(ServerSettings(model="auto", data_dir=str(tmp_path)))
    assert model.name == str(tmp_path / "tiny-gpt2") and model.spec.n_layer == 3
    assert "OFFLINE TINY MODEL" in caplog.text


def test_ignore_eos_generates_past_the_end_of_text_token(live_server, tiny_model, hf_model):
    import dataclasses

    ids = tiny_model.tokenizer.encode("The Mill")
    first, _ = hf_greedy(hf_model, ids, None, 1)
    eos_model = dataclasses.replace(tiny_model, eos_token_id=first[0])  # greedy's first token ends it
    server = live_server(eos_model)
    req = {"input": "The Mill", "max_new_tokens": 6}
    stopped = httpx.post(server.url + "/generate", json=req, headers=A).json()
    assert stopped["finish_reason"] == "eos" and stopped["usage"]["completion_tokens"] == 1
    full = httpx.post(server.url + "/generate", json={**req, "ignore_eos": True}, headers=A).json()
    assert full["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 6
