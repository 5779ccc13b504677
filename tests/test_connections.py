"""Connections, /metrics privacy and Idempotency-Key, against a live uvicorn (issue 15 part D).

Slow clients are driven with raw sockets; idempotent creations survive a real server restart on the
same data directory. (SIGTERM draining is tested on a real `prefixserve serve` process in
tests/test_serve.py.)
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from prefix_store.format import PrefixMeta, encode_prefix
from prefixserve.idempotency import RECORD_KIND, IdempotencyRecords, Reservation, record_name
from prefixserve.metrics import tenant_label
from prefixserve.training.synthetic import table_to_text

from .helpers import ALICE, A, B, settings_for, wait_until
from .live import LiveServer

QUICK_TRAIN = {"epochs": 1, "prefix_len": 2, "hidden": 8, "batch_size": 4}


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data, time.monotonic()


# ---- slow clients ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(module_live_server):
    return module_live_server(client_header_timeout_s=1.0, client_body_timeout_s=1.0)


def test_slowloris_headers_are_cut_off_while_others_are_served(guarded):
    slow = connect(guarded)
    start = time.monotonic()
    slow.sendall(b"GET /prefixes HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a header byte now and then keeps nothing alive
        time.sleep(0.25)
        slow.sendall(b"X")
        assert httpx.get(guarded.url + "/prefixes", headers=A).status_code == 200  # others are served
    reply, closed_at = read_until_closed(slow)
    held = closed_at - start
    assert reply.startswith(b"HTTP/1.1 408 ") and b"connection: close" in reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "request_timeout"
    assert 0.9 < held < 3.0, held  # the 1 s deadline, not uvicorn's unbounded wait
    idle = connect(guarded)  # connects and never sends a byte: closed without an answer
    start = time.monotonic()
    reply, closed_at = read_until_closed(idle)
    assert reply == b"" and 0.9 < closed_at - start < 3.0


def test_a_body_sent_too_slowly_is_cut_off_and_creates_nothing(guarded):
    before = len(httpx.get(guarded.url + "/prefixes", headers=A).json()["prefixes"])
    body = json.dumps({"text": "a slow upload\n"}).encode()
    head = (
        "POST /prefixes HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {ALICE}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    slow = connect(guarded)
    slow.sendall(head.encode())
    start = time.monotonic()
    for byte in body[:6]:  # one byte every 0.2 s: far below the 500 bytes/s minimum
        slow.sendall(bytes([byte]))
        time.sleep(0.2)
    reply, closed_at = read_until_closed(slow)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"too slowly" in reply, reply
    assert 0.9 < closed_at - start < 3.0
    after = httpx.get(guarded.url + "/prefixes", headers=A).json()["prefixes"]
    assert len(after) == before  # the app saw a disconnect, not a request
    fast = httpx.post(guarded.url + "/prefixes", json={"text": "a quick upload\n"}, headers=A)
    assert fast.status_code == 201


def test_keep_alive_connection_is_held_to_the_header_deadline_on_its_next_request(guarded):
    sock = connect(guarded)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    start = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request starts, and stalls
    reply, closed_at = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 ") and 0.9 < closed_at - start < 3.0


def test_connection_deadlines_default_like_nginx():
    from prefixserve.settings import ServerSettings

    defaults = ServerSettings()
    assert 0 < defaults.client_header_timeout_s <= 15 and 0 < defaults.client_body_timeout_s <= 15
    env = {"PREFIXSERVE_CLIENT_HEADER_TIMEOUT_S": "2.5", "PREFIXSERVE_CLIENT_BODY_MIN_BYTES_PER_S": "0"}
    limits = ServerSettings.from_env(env).connection_limits()
    assert limits.header_timeout_s == 2.5 and limits.body_min_bytes_per_s == 0


# ---- /metrics -----------------------------------------------------------------------------------------
def test_metrics_are_loopback_only_with_auth_on_and_show_no_tenant_names(guarded):
    httpx.post(guarded.url + "/generate", json={"input": "hi", "max_new_tokens": 2}, headers=A)
    local = httpx.get(guarded.url + "/metrics")
    assert local.status_code == 200
    assert 'tenant="alice"' not in local.text and "alice" not in local.text
    assert f'tenant="{tenant_label("alice")}"' in local.text  # a stable pseudonym instead
    # behind a reverse proxy on this host, the client is the forwarded address (uvicorn trusts the
    # loopback proxy's X-Forwarded-For): a remote client is refused, with or without a tenant key
    for headers in ({}, A):
        remote = httpx.get(guarded.url + "/metrics", headers={**headers, "X-Forwarded-For": "203.0.113.7"})
        assert remote.status_code == 403, remote.text
        error = remote.json()["error"]
        assert error["type"] == "forbidden" and "203.0.113.7" in error["message"]


def test_metrics_key_and_tenant_names_when_configured(live_server, tmp_path):
    key = "metrics-key-0123456789"
    settings = settings_for(tmp_path, metrics_key=key, metrics_tenant_labels=True)
    server = live_server(settings=settings)
    httpx.post(server.url + "/prefixes", json={"text": "count me\n"}, headers=B)
    for headers in ({}, A, {"Authorization": "Bearer wrong-metrics-key-000"}):
        refused = httpx.get(server.url + "/metrics", headers=headers)  # loopback is not enough
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    remote = {"Authorization": f"Bearer {key}", "X-Forwarded-For": "203.0.113.7"}
    allowed = httpx.get(server.url + "/metrics", headers=remote)
    assert allowed.status_code == 200 and 'tenant="bob"' in allowed.text


def test_metrics_stay_open_with_auth_off(live_server):
    server = live_server(api_keys="", auth=False)
    headers = {"X-Forwarded-For": "203.0.113.7"}
    assert httpx.get(server.url + "/metrics", headers=headers).status_code == 200


# ---- Idempotency-Key -----------------------------------------------------------------------------------
def native_bytes(model, p: int = 3) -> bytes:
    meta = PrefixMeta(
        id="pfx-native", model_fingerprint=model.fingerprint, prefix_len=p, dtype="float32", owner="x"
    )
    return encode_prefix(torch.randn(model.spec.prefix_shape(p)), meta)


def peft_files(model) -> dict:
    spec = model.spec
    cfg = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 3,
        "num_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "token_dim": spec.n_embd,
    }
    weights = st_save({"prompt_embeddings": torch.randn(3, spec.n_layer * 2 * spec.n_embd)})
    return {
        "adapter_config": ("adapter_config.json", json.dumps(cfg).encode()),
        "adapter_model": ("adapter_model.safetensors", weights),
    }


def creation_forms(model) -> dict[str, dict]:
    """httpx keyword arguments of each form of POST /prefixes."""
    examples = [{"input": x, "output": y} for x, y in table_to_text(8)]
    jsonl = "\n".join(json.dumps(e) for e in examples).encode()
    return {
        "text": {"json": {"text": "Answer briefly.\n", "name": "idem"}},
        "native": {"files": {"file": ("p.safetensors", native_bytes(model))}, "data": {"name": "n"}},
        "peft": {"files": peft_files(model)},
        "train_json": {"json": {"train": {"examples": examples, **QUICK_TRAIN}}},
        "train_multipart": {
            "files": {"train": ("data.jsonl", jsonl)},
            "data": {"hyperparameters": json.dumps(QUICK_TRAIN)},
        },
    }


@pytest.fixture(scope="module")
def idem_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("idempotency")


@pytest.fixture(scope="module")
def idem(module_live_server, idem_dir):
    return module_live_server(data_dir=idem_dir)


def post(server: LiveServer, headers: dict, key: str | None, **kwargs) -> httpx.Response:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return httpx.post(server.url + "/prefixes", headers={**headers, **extra}, timeout=30, **kwargs)


@pytest.mark.parametrize("form", ["text", "native", "peft", "train_json", "train_multipart"])
def test_a_retry_with_the_same_key_returns_the_same_id(idem, tiny_model, form):
    kwargs = creation_forms(tiny_model)[form]
    first = post(idem, A, f"retry-{form}", **kwargs)
    assert first.status_code in (201, 202), first.text
    again = post(idem, A, f"retry-{form}", **kwargs)  # a multipart retry gets a new boundary: same request
    assert (again.status_code, again.json()["id"]) == (first.status_code, first.json()["id"])
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    other = post(idem, A, f"other-{form}", **kwargs)  # a new key is a new creation
    assert other.status_code == first.status_code and other.json()["id"] != first.json()["id"]
    unkeyed = [post(idem, A, None, **kwargs).json()["id"] for _ in range(2)]
    assert len(set(unkeyed)) == 2  # without a key, each request creates


def test_same_key_with_a_different_request_is_422(idem):
    first = post(idem, A, "reused-key", json={"text": "first request\n"})
    assert first.status_code == 201
    reused = post(idem, A, "reused-key", json={"text": "a different request\n"})
    assert reused.status_code == 422, reused.text
    error = reused.json()["error"]
    assert error["type"] == "invalid_request" and error["message"].startswith("Idempotency-Key:")
    bad = post(idem, A, "x" * 256, json={"text": "key too long\n"})
    assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["error"]["message"]


def test_keys_are_per_tenant(idem):
    alice = post(idem, A, "shared-key", json={"text": "same words\n"})
    bob = post(idem, B, "shared-key", json={"text": "same words\n"})
    assert alice.status_code == bob.status_code == 201 and "idempotent-replayed" not in bob.headers
    assert (alice.json()["owner"], bob.json()["owner"]) == ("alice", "bob")
    assert alice.json()["id"] != bob.json()["id"]
    # bob replaying his key never sees alice's prefix; a different body under the same key is his own 422
    assert post(idem, B, "shared-key", json={"text": "same words\n"}).json()["id"] == bob.json()["id"]
    assert post(idem, B, "shared-key", json={"text": "other words\n"}).status_code == 422


def test_a_failed_creation_can_be_retried_with_its_key(idem):
    bad = post(idem, A, "fails-first", files={"file": ("p.safetensors", b"\x80\x04pickle")})
    assert bad.status_code == 422
    fixed = post(idem, A, "fails-first", json={"text": "now valid\n"})  # the failure kept nothing
    assert fixed.status_code == 201 and "idempotent-replayed" not in fixed.headers


def test_the_same_id_after_a_server_restart_even_when_the_reply_was_lost(
    live_server, tiny_model, idem_dir, idem
):
    forms = creation_forms(tiny_model)
    first = {f: post(idem, A, f"restart-{f}", **forms[f]) for f in ("text", "native", "train_json")}
    records = IdempotencyRecords(idem.state.service.store, ttl_s=3600)
    # a crash after publishing but before the reply was stored: only the reservation is left
    records.store.delete_record(RECORD_KIND, record_name("alice", "restart-native") + "-reply")
    # a crash after reserving but before publishing: a reservation whose planned id does not exist
    planned = Reservation("alice", fingerprint_of_text("reserved only\n"), "pfx-planned00000001", time.time())
    records.reserve(record_name("alice", "restart-reserved"), planned)
    second = live_server(settings=settings_for(idem_dir))
    for form, response in first.items():
        again = post(second, A, f"restart-{form}", **forms[form])
        assert (again.status_code, again.json()["id"]) == (response.status_code, response.json()["id"])
        assert again.headers["idempotent-replayed"] == "true"
    resumed = post(second, A, "restart-reserved", json={"text": "reserved only\n"})
    assert resumed.status_code == 201 and resumed.json()["id"] == "pfx-planned00000001"
    assert post(second, A, "restart-reserved", json={"text": "reserved only\n"}).json()["id"] == (
        "pfx-planned00000001"
    )


def fingerprint_of_text(text: str) -> str:
    from prefixserve.idempotency import json_fingerprint

    return json_fingerprint({"text": text})


def test_expired_keys_create_afresh(idem):
    records = idem.state.idempotency.records
    first = post(idem, A, "short-lived", json={"text": "expires\n"})
    assert post(idem, A, "untouched", json={"text": "never retried\n"}).status_code == 201
    clock = records.clock
    records.clock = lambda: clock() + records.ttl_s + 1  # a day later
    try:
        later = post(idem, A, "short-lived", json={"text": "expires\n"})
        assert later.status_code == 201 and later.json()["id"] != first.json()["id"]
        # other keys expired too: the sweep, due after an hour, runs on a thread and removes them
        untouched = record_name("alice", "untouched")
        wait_until(lambda: records.store.get_record(RECORD_KIND, untouched) is None)
        assert records.reservation(record_name("alice", "short-lived")) is not None  # the new one stays
    finally:
        records.clock = clock
