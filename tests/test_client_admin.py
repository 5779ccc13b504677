"""The client SDK's admin API, `usage()`, quota errors and their CLI commands against a live server (the real
engine, tiny model) with an admin key and a configured tenant key."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from prefixserve_client import (
    ApiKey,
    AsyncClient,
    AuthenticationError,
    Client,
    IssuedKey,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    StorageQuotaExceeded,
    Tenant,
    TransientQuotaExceeded,
    UsageDay,
    UsageReport,
    ValidationError,
)
from prefixserve_client._errors import error_for
from prefixserve_client.cli import main

from prefixserve.training.synthetic import table_to_text

from .helpers import wait_until
from .test_tenants import ADMIN, CONFIGURED, settings_for

INPUT = "name : Aromi"


@pytest.fixture(scope="module")
def live(module_live_server, tmp_path_factory):
    return module_live_server(settings=settings_for(tmp_path_factory.mktemp("sdk-admin")))


@pytest.fixture
def admin(live):
    with Client(live.url, api_key=ADMIN, max_retries=0) as c:
        yield c


def usage_reaches(client: Client, **expected: int) -> UsageReport:
    """The caller's usage report once its totals show `expected` (a request is counted as it ends)."""
    reports: list[UsageReport] = []

    def reached() -> bool:
        reports.append(client.usage())
        return all(getattr(reports[-1].totals, k) == v for k, v in expected.items())

    wait_until(reached, timeout=5)
    return reports[-1]


# ---- the SDK ------------------------------------------------------------------------------------
def test_admin_flow_through_the_sdk(live, admin):
    created = admin.admin.tenants.create(
        "sdk-flow", weight=2.5, limits={"max_concurrent": 3, "requests_per_minute": 100}
    )
    assert isinstance(created, Tenant)
    assert (created.name, created.status, created.weight, created.source) == (
        "sdk-flow",
        "active",
        2.5,
        "registry",
    )
    assert created.limits == {"max_concurrent": 3, "requests_per_minute": 100}
    assert created.effective_limits["max_concurrent"] == 3 and created.keys == 0
    with pytest.raises(ValidationError) as exists:  # 409
        admin.admin.tenants.create("sdk-flow")
    assert exists.value.status == 409 and "already exists" in exists.value.message
    listed = {t.name: t for t in admin.admin.tenants.list()}
    assert listed["sdk-flow"] == created
    assert (listed["configured"].source, listed["configured"].config_keys) == ("config", 1)
    assert admin.admin.tenants.get("sdk-flow") == created
    with pytest.raises(NotFound, match="'nobody' not found"):
        admin.admin.tenants.get("nobody")

    issued = admin.admin.keys.issue("sdk-flow", name="laptop")
    assert isinstance(issued, IssuedKey) and issued.key.startswith(f"psk-{issued.key_id}-")
    assert (issued.tenant, issued.name) == ("sdk-flow", "laptop")
    keys = admin.admin.keys.list("sdk-flow")
    assert keys == [
        ApiKey(key_id=issued.key_id, tenant="sdk-flow", name="laptop", created_at=issued.created_at)
    ]
    assert not hasattr(keys[0], "key") and admin.admin.tenants.get("sdk-flow").keys == 1

    with Client(live.url, api_key=issued.key, max_retries=0) as tenant:
        outs = [tenant.generate(None, INPUT, max_new_tokens=n, ignore_eos=True) for n in (2, 3)]
        prompt = sum(o.usage.prompt_tokens for o in outs)
        report = usage_reaches(tenant, requests=2, generated_tokens=5, prompt_tokens=prompt)
        assert (report.tenant, report.totals.day, report.totals.tenant) == ("sdk-flow", "total", "sdk-flow")
        assert [(d.tenant, d.requests) for d in report.days] == [("sdk-flow", 2)]
        assert (report.stored.prefixes, report.stored.bytes) == (0, 0)
        assert report.limits["max_concurrent"] == 3 and report.limits["requests_per_minute"] == 100
        prefix = tenant.prefixes.from_text("Answer briefly.\n")
        stored = tenant.usage(days=1).stored
        assert (stored.prefixes, stored.bytes) == (1, prefix.size_bytes)
        days = admin.admin.usage(days=1, tenant="sdk-flow")
        assert all(isinstance(d, UsageDay) for d in days)
        assert [(d.tenant, d.requests, d.generated_tokens) for d in days] == [("sdk-flow", 2, 5)]
        assert "sdk-flow" in {d.tenant for d in admin.admin.usage()}

        # only what is given changes; a limit given as None goes back to the server's default
        changed = admin.admin.tenants.update(
            "sdk-flow", limits={"requests_per_minute": None, "max_stored_prefixes": 5}
        )
        assert changed.limits == {"max_concurrent": 3, "max_stored_prefixes": 5}
        assert changed.effective_limits["requests_per_minute"] == 0  # the default here: unlimited
        assert (changed.weight, changed.status) == (2.5, "active")
        reweighed = admin.admin.tenants.update("sdk-flow", weight=1.5)
        assert (reweighed.weight, reweighed.limits) == (1.5, changed.limits)
        assert tenant.usage().limits["max_stored_prefixes"] == 5

        admin.admin.keys.revoke("sdk-flow", issued.key_id)
        assert admin.admin.keys.list("sdk-flow") == []
        with pytest.raises(AuthenticationError, match="revoked"):
            tenant.usage()
        with pytest.raises(NotFound, match="no API key with id"):
            admin.admin.keys.revoke("sdk-flow", issued.key_id)

    second = admin.admin.keys.issue("sdk-flow")
    with Client(live.url, api_key=second.key, max_retries=0) as tenant:
        assert admin.admin.tenants.update("sdk-flow", status="disabled").status == "disabled"
        with pytest.raises(PermissionDenied, match="disabled") as denied:
            tenant.generate(None, INPUT, max_new_tokens=1)
        assert denied.value.type == "forbidden" and not isinstance(denied.value, QuotaExceeded)
        admin.admin.tenants.update("sdk-flow", status="active")
        assert tenant.generate(None, INPUT, max_new_tokens=1).usage.completion_tokens == 1
        with pytest.raises(PermissionDenied) as not_admin:  # a tenant's key on the admin API
            tenant.admin.tenants.list()
        assert not isinstance(not_admin.value, QuotaExceeded)
    with pytest.raises(AuthenticationError), Client(live.url, api_key="", max_retries=0) as anonymous:
        anonymous.admin.tenants.list()


def test_a_storage_quota_is_a_permission_denied_quota_exceeded(live, admin):
    admin.admin.tenants.create("sdk-hoarder", limits={"max_stored_prefixes": 1})
    with Client(live.url, api_key=admin.admin.keys.issue("sdk-hoarder").key, max_retries=3) as tenant:
        tenant.prefixes.from_text("Answer briefly.\n")
        with pytest.raises(PermissionDenied) as refused:  # what caught it before quotas still does
            tenant.prefixes.from_text("Answer briefly.\n")
    exc = refused.value
    assert isinstance(exc, StorageQuotaExceeded) and isinstance(exc, QuotaExceeded)
    assert not isinstance(exc, Overloaded)
    assert (exc.status, exc.type, exc.retry_after) == (403, "quota_exceeded", None)
    assert "max_stored_prefixes quota (1 prefixes stored; the limit is 1)" in exc.message


def test_a_rate_quota_is_an_overloaded_quota_exceeded_with_retry_after(live, admin):
    admin.admin.tenants.create("sdk-limited", limits={"requests_per_minute": 1})
    with Client(live.url, api_key=admin.admin.keys.issue("sdk-limited").key, max_retries=0) as tenant:
        tenant.generate(None, INPUT, max_new_tokens=1)
        with pytest.raises(Overloaded) as refused:  # what caught it before quotas still does
            tenant.generate(None, INPUT, max_new_tokens=1)
    exc = refused.value
    assert isinstance(exc, TransientQuotaExceeded) and isinstance(exc, QuotaExceeded)
    assert not isinstance(exc, PermissionDenied)
    assert (exc.status, exc.type) == (429, "rate_limited") and 1 <= exc.retry_after <= 61
    assert "requests_per_minute quota (2 requests this minute; the limit is 1)" in exc.message


def test_error_types_map_to_the_quota_classes():
    def err(status: int, kind: str, retry_after: float | None = None):
        return error_for(status, {"error": {"type": kind, "message": "m"}}, retry_after)

    assert type(err(403, "quota_exceeded")) is StorageQuotaExceeded
    assert type(err(403, "forbidden")) is PermissionDenied
    assert type(err(429, "quota_exceeded", 30.0)) is TransientQuotaExceeded
    assert err(429, "quota_exceeded", 30.0).retry_after == 30.0
    assert err(429, "rate_limited").retry_after == 1.0  # no Retry-After: as for any Overloaded
    assert type(err(429, "overloaded")) is Overloaded


def test_jobs_carry_started_at(live, admin):
    admin.admin.tenants.create("sdk-trainer")
    with Client(live.url, api_key=admin.admin.keys.issue("sdk-trainer").key) as tenant:
        examples = [{"input": x, "output": y} for x, y in table_to_text(4)]
        job = tenant.prefixes.train(examples, epochs=1, prefix_len=2, hidden=8, batch_size=4)
        assert job.state.started_at is None  # queued
        job.wait(poll_s=0.05, timeout=60)
        started = job.state.started_at
        assert started is not None  # (millisecond precision; created_at has whole seconds)
        assert datetime.fromisoformat(started) >= datetime.fromisoformat(job.state.created_at)


def test_async_admin_calls(live):
    async def run():
        async with AsyncClient(live.url, api_key=ADMIN, max_retries=0) as admin:
            created = await admin.admin.tenants.create("sdk-async", weight=3.0, limits={"max_concurrent": 2})
            assert (created.weight, created.limits) == (3.0, {"max_concurrent": 2})
            assert "sdk-async" in {t.name for t in await admin.admin.tenants.list()}
            issued = await admin.admin.keys.issue("sdk-async", name="async")
            assert [k.key_id for k in await admin.admin.keys.list("sdk-async")] == [issued.key_id]
            async with AsyncClient(live.url, api_key=issued.key, max_retries=0) as tenant:
                await tenant.generate(None, INPUT, max_new_tokens=2, ignore_eos=True)
                report = await tenant.usage(days=1)
                while report.totals.requests == 0:  # counted as the request ends
                    await asyncio.sleep(0.01)
                    report = await tenant.usage(days=1)
                assert (report.tenant, report.totals.requests, report.totals.generated_tokens) == (
                    "sdk-async",
                    1,
                    2,
                )
                updated = await admin.admin.tenants.update("sdk-async", limits={"max_concurrent": None})
                assert updated.limits == {} and (await admin.admin.tenants.get("sdk-async")).limits == {}
                days = await admin.admin.usage(days=1, tenant="sdk-async")
                assert [(d.tenant, d.requests) for d in days] == [("sdk-async", 1)]
                await admin.admin.keys.revoke("sdk-async", issued.key_id)
                with pytest.raises(AuthenticationError):
                    await tenant.usage()

    asyncio.run(run())


# ---- the command line ------------------------------------------------------------------------------
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_admin_and_usage(live, capsys, monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_BASE_URL", live.url)
    monkeypatch.setenv("PREFIXSERVE_API_KEY", CONFIGURED)
    monkeypatch.delenv("PREFIXSERVE_ADMIN_KEY", raising=False)
    code, out, err = run_cli(
        capsys,
        *("--admin-key", ADMIN, "admin", "tenants", "create", "cli-t", "--weight", "2"),
        *("--limit", "max_concurrent=2", "requests_per_minute=50", "--limit", "max_active_jobs=4"),
    )
    assert code == 0, err
    assert '"weight": 2.0' in out and '"requests_per_minute": 50' in out and '"max_active_jobs": 4' in out
    # the admin key from the environment, and --admin-key after `admin`
    monkeypatch.setenv("PREFIXSERVE_ADMIN_KEY", ADMIN)
    code, out, err = run_cli(capsys, "admin", "tenants", "list")
    assert code == 0, err
    head, *rows = out.splitlines()
    assert head.split()[:3] == ["NAME", "STATUS", "WEIGHT"]
    row = next(r for r in rows if r.startswith("cli-t "))
    assert row.split()[:3] == ["cli-t", "active", "2"]
    assert "max_active_jobs=4 max_concurrent=2 requests_per_minute=50" in row
    assert any(r.split()[:4] == ["configured", "active", "1", "config"] for r in rows)
    monkeypatch.delenv("PREFIXSERVE_ADMIN_KEY")
    code, out, err = run_cli(capsys, "admin", "--admin-key", ADMIN, "keys", "issue", "cli-t", "--name", "ci")
    assert code == 0, err
    key = out.strip()
    assert key.startswith("psk-") and "\n" not in key and "will not be shown again" in err

    # the issued key works: generate, then `usage` as that tenant
    code, out, err = run_cli(capsys, "--api-key", key, "generate", INPUT, "--max-new-tokens", "2")
    assert code == 0 and "2 tokens" in err, err
    with Client(live.url, api_key=key) as tenant:
        usage_reaches(tenant, requests=1)
    code, out, err = run_cli(capsys, "--api-key", key, "usage", "--days", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["DAY", "TENANT", "REQUESTS"]
    assert lines[1].split()[1:3] == ["cli-t", "1"] and lines[2].split()[:3] == ["total", "cli-t", "1"]
    assert lines[2].split()[5] == "2"  # GENERATED
    assert "stored now: 0 prefixes, 0 bytes" in out and "max_concurrent=2" in out

    # without an admin key the API key is used: a tenant's key is refused
    code, out, err = run_cli(capsys, "--api-key", key, "admin", "tenants", "list")
    assert code == 1 and "PermissionDenied, 403" in err

    code, out, err = run_cli(
        capsys,
        *("--admin-key", ADMIN, "admin", "tenants", "update", "cli-t", "--status", "disabled"),
        *("--limit", "max_concurrent=5", "--reset-limit", "requests_per_minute", "max_active_jobs"),
    )
    assert code == 0, err
    assert '"status": "disabled"' in out and '"limits": {\n    "max_concurrent": 5\n  }' in out
    code, out, err = run_cli(capsys, "--api-key", key, "usage")
    assert code == 1 and "PermissionDenied, 403" in err and "disabled" in err
    code, out, err = run_cli(capsys, "--admin-key", ADMIN, "admin", "tenants", "get", "cli-t")
    assert code == 0 and '"status": "disabled"' in out and '"keys": 1' in out

    code, out, err = run_cli(capsys, "--admin-key", ADMIN, "admin", "keys", "list", "cli-t")
    assert code == 0 and key not in out
    head, row = out.splitlines()
    key_id = row.split()[0]
    assert (
        head.split() == ["KEY_ID", "NAME", "CREATED"]
        and row.split()[1] == "ci"
        and key.startswith(f"psk-{key_id}-")
    )
    code, out, err = run_cli(
        capsys, "--admin-key", ADMIN, "admin", "usage", "--days", "2", "--tenant", "cli-t"
    )
    assert code == 0, err
    head, *rows = out.splitlines()
    assert head.split()[:3] == ["DAY", "TENANT", "REQUESTS"] and [r.split()[1:3] for r in rows] == [
        ["cli-t", "1"]
    ]
    code, out, err = run_cli(capsys, "--admin-key", ADMIN, "admin", "keys", "revoke", "cli-t", key_id)
    assert code == 0 and out.strip() == f"revoked {key_id}"
    code, out, err = run_cli(capsys, "--admin-key", ADMIN, "admin", "tenants", "get", "nobody")
    assert code == 1 and "NotFound, 404" in err

    with pytest.raises(SystemExit) as bad:  # argparse: a limit must be NAME=VALUE with a whole number
        main(["admin", "tenants", "create", "x", "--limit", "max_concurrent"])
    assert bad.value.code == 2 and "expected NAME=VALUE" in capsys.readouterr().err
