"""Tenants, keys, quotas and usage as live data: the registry, the admin API (live uvicorn), the quotas'
refusals, usage metering across a restart, and revocation across two server processes on one Redis."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime

import httpx
import pytest

from prefix_store.store import DurableStore
from prefixserve.auth import Authenticator, AuthForbidden, Unauthorized
from prefixserve.model import load_model
from prefixserve.settings import ServerSettings
from prefixserve.tenants import TenantExists, TenantNotFound, TenantRegistry
from prefixserve.tiny import TinyModelConfig, write_tiny_model

from .helpers import start_server as serve_process

ADMIN = "admin-key-0123456789abcdef"
ADM = {"Authorization": f"Bearer {ADMIN}"}
CONFIGURED = "cfg-key-0123456789abcd"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settings_for(tmp_path, **over) -> ServerSettings:
    base = dict(
        data_dir=str(tmp_path),
        api_keys=f"configured:{CONFIGURED}",
        admin_key=ADMIN,
        max_running=4,
        max_waiting=16,
        max_upload_bytes=256 * 1024,
        max_prefix_len=64,
        usage_flush_s=0.2,
    )
    return ServerSettings(**{**base, **over})


# ---- the registry on its own -----------------------------------------------------------------------
def test_registry_issues_looks_up_and_revokes_keys_in_the_store(tmp_path):
    store = DurableStore(tmp_path / "store")
    registry = TenantRegistry(store, {"configured": [CONFIGURED]})
    registry.reload()
    acme = registry.create("acme", weight=2.0, limits={"max_concurrent": 3})
    assert (acme.weight, acme.limits, acme.status) == (2.0, {"max_concurrent": 3}, "active")
    with pytest.raises(TenantExists, match="'acme' already exists"):
        registry.create("acme")
    record, key = registry.issue_key("acme", "ci")
    assert key.startswith(f"psk-{record.key_id}-") and record.digest not in key
    assert registry.lookup(key) == "acme" and registry.lookup(CONFIGURED) == "configured"
    assert registry.lookup(key[:-1] + ("x" if key[-1] != "x" else "y")) is None  # same id, wrong secret
    assert key not in (tmp_path / "store" / "keys" / f"{record.key_id}.json").read_text()  # digest only
    # another process (a replica) sees the same registry from the store
    other = TenantRegistry(store, {"configured": [CONFIGURED]})
    other.reload()
    assert other.lookup(key) == "acme" and other.tenant("acme").weight == 2.0
    registry.revoke_key("acme", record.key_id)
    assert registry.lookup(key) is None
    with pytest.raises(Exception, match="has no API key with id"):
        registry.revoke_key("acme", record.key_id)
    # a configured tenant becomes a registry tenant when it is changed; a null limit resets
    changed = registry.update("configured", weight=3.0, limits={"requests_per_minute": 5})
    assert (changed.source, changed.weight) == ("registry", 3.0)
    assert registry.update("configured", limits={"requests_per_minute": None}).limits == {}
    with pytest.raises(TenantNotFound):
        registry.update("nobody", weight=1.0)


def test_registry_validates_what_an_admin_sends(tmp_path):
    registry = TenantRegistry(DurableStore(tmp_path))
    for kwargs, field in [
        ({"name": "bad name!"}, "name"),
        ({"name": "ok", "weight": 0}, "weight"),
        ({"name": "ok", "weight": float("nan")}, "weight"),
        ({"name": "ok", "status": "paused"}, "status"),
        ({"name": "ok", "limits": {"max_gpus": 1}}, "limits.max_gpus"),
        ({"name": "ok", "limits": {"max_concurrent": -1}}, "limits.max_concurrent"),
    ]:
        with pytest.raises(Exception, match=f"^{field}: expected|^{field}: unknown"):
            registry.create(**kwargs)


def test_authenticator_refuses_disabled_tenants_the_admin_key_and_tenant_keys_on_admin(tmp_path):
    registry = TenantRegistry(DurableStore(tmp_path))
    registry.create("acme")
    _, key = registry.issue_key("acme")
    auth = Authenticator(registry, "auto", ADMIN)
    assert auth.enabled and auth.tenant(f"Bearer {key}").name == "acme"
    with pytest.raises(AuthForbidden, match="admin key: it is for /admin calls"):
        auth.tenant(f"Bearer {ADMIN}")
    with pytest.raises(AuthForbidden, match="not a tenant's API key"):
        auth.admin(f"Bearer {key}")
    with pytest.raises(Unauthorized, match="invalid admin key"):
        auth.admin("Bearer something-else-entirely")
    registry.update("acme", status="disabled")
    with pytest.raises(AuthForbidden, match="tenant 'acme' is disabled"):
        auth.tenant(f"Bearer {key}")
    with pytest.raises(AuthForbidden, match="the admin API is off"):
        Authenticator(registry, "auto", "").admin(f"Bearer {ADMIN}")


# ---- the admin API over HTTP ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(module_live_server, tmp_path_factory):
    return module_live_server(settings=settings_for(tmp_path_factory.mktemp("tenants")))


def test_admin_flow_create_issue_use_revoke_disable(api):
    url = api.url
    assert httpx.get(url + "/admin/tenants").status_code == 401
    assert httpx.get(url + "/admin/tenants", headers=bearer(CONFIGURED)).status_code == 403
    r = httpx.post(
        url + "/admin/tenants",
        json={"name": "flow", "weight": 2, "limits": {"max_concurrent": 4}},
        headers=ADM,
    )
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["weight"], info["limits"], info["effective_limits"]["max_concurrent"]) == (
        2.0,
        {"max_concurrent": 4},
        4,
    )
    assert httpx.post(url + "/admin/tenants", json={"name": "flow"}, headers=ADM).status_code == 409
    r = httpx.post(url + "/admin/tenants/flow/keys", json={"name": "laptop"}, headers=ADM)
    assert r.status_code == 201, r.text
    key, key_id = r.json()["key"], r.json()["key_id"]
    listed = httpx.get(url + "/admin/tenants/flow/keys", headers=ADM).json()
    assert [k["key_id"] for k in listed["keys"]] == [key_id] and key not in json.dumps(listed)
    r = httpx.post(
        url + "/generate", json={"input": "name : Aromi", "max_new_tokens": 2}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    assert httpx.delete(url + f"/admin/tenants/flow/keys/{key_id}", headers=ADM).status_code == 204
    r = httpx.post(
        url + "/generate", json={"input": "name : Aromi", "max_new_tokens": 2}, headers=bearer(key)
    )
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    key2 = httpx.post(url + "/admin/tenants/flow/keys", headers=ADM).json()["key"]
    r = httpx.patch(url + "/admin/tenants/flow", json={"status": "disabled"}, headers=ADM)
    assert r.status_code == 200 and r.json()["status"] == "disabled"
    r = httpx.get(url + "/prefixes", headers=bearer(key2))
    assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]
    httpx.patch(url + "/admin/tenants/flow", json={"status": "active"}, headers=ADM)
    assert httpx.get(url + "/prefixes", headers=bearer(key2)).status_code == 200
    tenants = {t["name"]: t for t in httpx.get(url + "/admin/tenants", headers=ADM).json()["tenants"]}
    assert tenants["configured"]["source"] == "config" and tenants["configured"]["config_keys"] == 1
    assert tenants["flow"]["keys"] == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("post", "/admin/tenants", {"name": "has space"}, 422, "name"),
        ("post", "/admin/tenants", {"name": "w", "weight": -1}, 422, "weight"),
        ("post", "/admin/tenants", {"name": "w", "limits": {"max_gpus": 2}}, 422, "max_gpus"),
        ("patch", "/admin/tenants/nobody", {"weight": 2}, 404, "'nobody' not found"),
        ("post", "/admin/tenants/nobody/keys", {}, 404, "'nobody' not found"),
        ("delete", "/admin/tenants/configured/keys/0123456789abcdef", None, 404, "no API key with id"),
    ],
)
def test_admin_errors_name_what_was_wrong(api, method, path, body, status, needle):
    kwargs = {"json": body} if body is not None else {}
    r = httpx.request(method.upper(), api.url + path, headers=ADM, **kwargs)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_the_admin_key_is_not_a_tenant_key(api):
    r = httpx.get(api.url + "/prefixes", headers=ADM)
    assert r.status_code == 403 and "/admin calls" in r.json()["error"]["message"]


# ---- quotas -----------------------------------------------------------------------------------------
def new_tenant(api, name: str, **limits) -> dict[str, str]:
    r = httpx.post(api.url + "/admin/tenants", json={"name": name, "limits": limits}, headers=ADM)
    assert r.status_code == 201, r.text
    return bearer(httpx.post(api.url + f"/admin/tenants/{name}/keys", headers=ADM).json()["key"])


def test_storage_quotas_refuse_with_a_clear_403_and_leave_other_tenants_uploading(api):
    full = new_tenant(api, "hoarder", max_stored_prefixes=1)
    other = new_tenant(api, "neighbour")
    text = {"text": "Answer briefly.\n"}
    assert httpx.post(api.url + "/prefixes", json=text, headers=full).status_code == 201
    r = httpx.post(api.url + "/prefixes", json=text, headers=full)
    assert r.status_code == 403 and r.json()["error"]["type"] == "quota_exceeded"
    assert "max_stored_prefixes quota (1 prefixes stored; the limit is 1)" in r.json()["error"]["message"]
    assert httpx.post(api.url + "/prefixes", json=text, headers=other).status_code == 201
    # bytes: a limit below one prefix's size refuses before anything is stored
    tight = new_tenant(api, "tight", max_stored_bytes=100)
    r = httpx.post(api.url + "/prefixes", json=text, headers=tight)
    assert r.status_code == 403 and "max_stored_bytes quota" in r.json()["error"]["message"]
    assert "the limit is 100" in r.json()["error"]["message"]
    assert httpx.get(api.url + "/usage", headers=tight).json()["stored"] == {"prefixes": 0, "bytes": 0}


def test_a_training_job_counts_against_the_storage_quota(api):
    """A training job is a prefix to come: one stored prefix and a quota of 2 leave room for one job."""
    key = new_tenant(api, "trainer", max_stored_prefixes=2)
    assert httpx.post(api.url + "/prefixes", json={"text": "Be brief.\n"}, headers=key).status_code == 201
    examples = [{"input": "name : Aromi", "output": "Aromi is a pub."}]
    train = {"train": {"examples": examples, "epochs": 100, "prefix_len": 2}}
    first = httpx.post(api.url + "/prefixes", json=train, headers=key)
    assert first.status_code == 202, first.text
    r = httpx.post(api.url + "/prefixes", json=train, headers=key)
    assert r.status_code == 403 and r.json()["error"]["type"] == "quota_exceeded"
    assert "(2 prefixes stored or being trained; the limit is 2)" in r.json()["error"]["message"]
    httpx.delete(api.url + f"/jobs/{first.json()['id']}", headers=key)


def test_rate_concurrency_and_job_quotas_answer_429_naming_the_quota(api):
    limited = new_tenant(api, "limited", requests_per_minute=1, max_active_jobs=1)
    body = {"input": "name : Aromi", "max_new_tokens": 1}
    assert httpx.post(api.url + "/generate", json=body, headers=limited).status_code == 200
    r = httpx.post(api.url + "/generate", json=body, headers=limited)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert (
        "requests_per_minute quota (2 requests this minute; the limit is 1)" in r.json()["error"]["message"]
    )
    examples = [{"input": f"name : {n}", "output": f"{n} is a pub."} for n in ("Aromi", "Cotto")]
    train = {"train": {"examples": examples, "epochs": 50, "prefix_len": 2}}
    assert httpx.post(api.url + "/prefixes", json=train, headers=limited).status_code == 202
    r = httpx.post(api.url + "/prefixes", json=train, headers=limited)
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    assert "max_active_jobs quota (1 jobs queued or running; the limit is 1)" in r.json()["error"]["message"]
    for job in httpx.get(api.url + "/jobs", headers=limited).json()["jobs"]:
        httpx.delete(api.url + f"/jobs/{job['id']}", headers=limited)


def test_max_concurrent_over_http(live_server, tmp_path):
    """A model slow enough that a long generation is still running when the next request arrives."""
    slow = load_model(
        write_tiny_model(
            tmp_path / "slow", TinyModelConfig(n_layer=8, n_head=8, n_embd=384, n_positions=1024)
        )
    )
    server = live_server(slow, settings=settings_for(tmp_path))
    capped = new_tenant(server, "capped", max_concurrent=1)
    body = {"input": "name : Aromi", "max_new_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/generate", json=body, headers=capped, timeout=60) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # (kept: a dropped iterator closes the stream, which aborts it)
        next(lines)
        r = httpx.post(server.url + "/generate", json={**body, "stream": False}, headers=capped)
        assert r.status_code == 429 and r.json()["error"]["type"] == "quota_exceeded"
        assert "max_concurrent quota (1 requests in the engine; the limit is 1)" in r.text


def test_a_tenants_first_training_job_starts_right_after_the_running_one(api):
    """Through the API and the server's training worker: 3 jobs of one tenant, then 1 of another. No job
    of the first tenant starts between the other's submission and its start (round-robin, new tenants
    first): it waits for at most the job running when it came, not for the whole backlog."""
    heavy, light = new_tenant(api, "trains-a-lot"), new_tenant(api, "trains-once")
    examples = [{"input": f"name : {n}", "output": f"{n} is a pub."} for n in ("Aromi", "Cotto", "Wildwood")]
    train = {"train": {"examples": examples, "epochs": 20, "prefix_len": 2}}
    jobs = [httpx.post(api.url + "/prefixes", json=train, headers=heavy).json()["id"] for _ in range(3)]
    submitted = datetime.now(UTC).isoformat(timespec="milliseconds")
    jobs.append(httpx.post(api.url + "/prefixes", json=train, headers=light).json()["id"])
    started = {}
    deadline = time.monotonic() + 120
    for job_id, headers in zip(jobs, [heavy] * 3 + [light], strict=True):
        while (job := httpx.get(api.url + f"/jobs/{job_id}", headers=headers).json())[
            "status"
        ] != "succeeded":
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.05)
        started[job_id] = job["started_at"]
    jumped = [j for j in jobs[:3] if submitted < started[j] < started[jobs[3]]]
    assert not jumped, (submitted, started)
    assert sorted(jobs[:3], key=started.__getitem__) == jobs[:3]  # the first tenant's own in order


# ---- usage ------------------------------------------------------------------------------------------
def test_usage_is_exact_after_a_restart(live_server, tmp_path):
    settings = settings_for(tmp_path)
    server = live_server(settings=settings)
    key = new_tenant(server, "metered")
    outs = [
        httpx.post(
            server.url + "/generate",
            json={"input": f"name : {w}", "max_new_tokens": n, "ignore_eos": True},
            headers=key,
        ).json()
        for w, n in (("Aromi", 3), ("Cotto", 5))
    ]
    score = httpx.post(
        server.url + "/score", json={"input": "name : Aromi", "continuation": "a pub"}, headers=key
    ).json()
    idem = {**key, "Idempotency-Key": "once"}
    created = [
        httpx.post(server.url + "/prefixes", json={"text": "Be brief.\n"}, headers=idem) for _ in range(2)
    ]
    assert [r.status_code for r in created] == [201, 201] and created[1].headers[
        "idempotent-replayed"
    ] == "true"
    size = created[0].json()["size_bytes"]
    httpx.post(
        server.url + "/generate", json={"input": "x"}, headers=bearer("wrong-key-0123456789")
    )  # not counted
    expected = {
        "requests": 3,
        "prompt_tokens": sum(o["usage"]["prompt_tokens"] for o in outs) + score["usage"]["prompt_tokens"],
        "generated_tokens": 8,
        "stored_bytes": size,
    }
    server = live_server(settings=settings_for(tmp_path))
    report = httpx.get(server.url + "/usage", headers=key).json()
    assert {k: report["totals"][k] for k in expected} == expected
    assert report["stored"] == {"prefixes": 1, "bytes": size} and len(report["days"]) == 1
    admin = httpx.get(server.url + "/admin/usage?tenant=metered", headers=ADM).json()["days"]
    assert [(d["tenant"], d["requests"]) for d in admin] == [("metered", 3)]
    metrics = httpx.get(server.url + "/metrics").text
    assert "prefixserve_usage_total" in metrics


# ---- two server processes on one Redis ----------------------------------------------------------------
def start_server(model_dir, data_dir, redis_url: str) -> tuple[subprocess.Popen, str]:
    """A server process with auth on, the admin key, the engine on a thread, on the shared Redis."""
    return serve_process(
        model_dir,
        data_dir,
        quiet=True,
        ready_s=120,
        PREFIXSERVE_AUTH=None,
        PREFIXSERVE_REDIS_URL=redis_url,
        PREFIXSERVE_ADMIN_KEY=ADMIN,
        PREFIXSERVE_ENGINE_PROCESS="false",
        PREFIXSERVE_REGISTRY_REFRESH_S="0.5",
    )


def refused_within(url: str, headers: dict, status: int, timeout_s: float) -> float:
    start = time.monotonic()
    while (r := httpx.get(url + "/prefixes", headers=headers)).status_code != status:
        assert r.status_code == 200, r.text
        assert time.monotonic() - start < timeout_s, f"still {r.status_code} after {timeout_s}s"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.slow
def test_revocation_and_disabling_reach_every_replica_within_2s(tiny_model_dir, tmp_path, redis_url):
    import redis as redis_lib

    redis_lib.Redis.from_url(redis_url).flushdb()
    servers = [start_server(tiny_model_dir, tmp_path, redis_url) for _ in range(2)]
    try:
        (_, a), (_, b) = servers
        assert httpx.post(a + "/admin/tenants", json={"name": "shared"}, headers=ADM).status_code == 201
        key = httpx.post(a + "/admin/tenants/shared/keys", headers=ADM).json()
        headers = bearer(key["key"])
        deadline = time.monotonic() + 5
        while httpx.get(b + "/prefixes", headers=headers).status_code != 200:  # issued on a, known on b
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.delete(b + f"/admin/tenants/shared/keys/{key['key_id']}", headers=ADM).status_code == 204
        assert refused_within(a, headers, 401, 2.0) < 2.0  # revoked on b: refused by a within 2 s
        key2 = bearer(httpx.post(a + "/admin/tenants/shared/keys", headers=ADM).json()["key"])
        deadline = time.monotonic() + 5
        while httpx.get(b + "/prefixes", headers=key2).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (
            httpx.patch(a + "/admin/tenants/shared", json={"status": "disabled"}, headers=ADM).status_code
            == 200
        )
        assert refused_within(b, key2, 403, 2.0) < 2.0
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            proc.wait(30)
