"""The web console's Admin page (the admin key only) and a tenant's "Your usage" card, in a real browser:
Playwright driving Debian's chromium (the fixtures of test_console.py) against a live server with an
admin key and a configured tenant key (no Redis: the registry and usage live in the durable store).

Screenshots go to build/console-screenshots/admin-*.png (look at them)."""

from __future__ import annotations

import time

import httpx
import pytest
from playwright.sync_api import expect

from .live import LiveServer
from .test_console import (  # noqa: F401  (fixtures: pytest finds them by name in this module)
    EVIL,
    SHOTS,
    TIMEOUT_MS,
    browser,
    browser_context_args,
    browser_type_launch_args,
    log_in,
    playwright,
    shot,
)
from .test_tenants import ADM, ADMIN, CONFIGURED, bearer, settings_for

pytestmark = pytest.mark.slow

TENANT_LINKS = ("prefixes", "jobs", "playground", "server")


@pytest.fixture(scope="module")
def live(module_live_server, tmp_path_factory):
    server = module_live_server(settings=settings_for(tmp_path_factory.mktemp("console-admin")))
    SHOTS.mkdir(parents=True, exist_ok=True)
    return server


def log_in_as_admin(page, live: LiveServer) -> None:
    log_in(page, live, key=ADMIN)
    page.wait_for_selector("#who:has-text('connected as admin')", timeout=TIMEOUT_MS)
    page.wait_for_selector("#tenant-table tbody tr[data-tenant='configured']", timeout=TIMEOUT_MS)


def tenant_row(page, name: str):
    return page.locator(f"#tenant-table tbody tr[data-tenant='{name}']")


def create_tenant(page, name: str, weight: str = "1", **limits: int) -> None:
    page.fill("#create-name", name)
    page.fill("#create-weight", weight)
    for field, value in limits.items():
        page.fill(f"#create-limits input[data-limit={field}]", str(value))
    page.click("#tenant-create button[type=submit]")
    expect(page.locator("#message.ok")).to_contain_text(f"Created tenant {name}", timeout=TIMEOUT_MS)
    expect(page.locator("#tenant-title")).to_have_text(name, timeout=TIMEOUT_MS)  # its detail opens


def issue_key(page, label: str) -> tuple[str, str]:
    """Issue a key to the open tenant from the page; (key_id, key) as the page shows them once."""
    before = page.locator("#new-key-value").inner_text()  # the box may still show the last key
    page.fill("#key-label", label)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#new-key")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#new-key-value")).not_to_have_text(before or "(none)", timeout=TIMEOUT_MS)
    key_id, key = page.locator("#new-key-id").inner_text(), page.locator("#new-key-value").inner_text()
    page.wait_for_selector(f"#key-table tbody tr[data-key='{key_id}']", timeout=TIMEOUT_MS)
    return key_id, key


def test_the_admin_key_shows_only_the_admin_page(page, live):
    log_in_as_admin(page, live)
    expect(page.locator("nav a[data-page=admin]")).to_be_visible()
    for name in TENANT_LINKS:  # their calls would 403 with the admin key
        expect(page.locator(f"nav a[data-page={name}]")).to_be_hidden()
    expect(page.locator("#page-admin")).to_be_visible()
    assert page.locator(".page:not([hidden])").count() == 1
    configured = tenant_row(page, "configured")
    assert configured.locator("td").nth(3).inner_text() == "config"
    assert "1 configured" in configured.locator("td.keys").inner_text()
    # a tenant page's address falls back to the Admin page
    page.goto(live.url + "/ui/#prefixes")
    page.wait_for_selector("#who:has-text('connected as admin')", timeout=TIMEOUT_MS)
    expect(page.locator("#page-admin")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#page-prefixes")).to_be_hidden()
    page.reload()  # the tab keeps the key: still the admin
    page.wait_for_selector("#who:has-text('connected as admin')", timeout=TIMEOUT_MS)
    expect(page.locator("#page-admin")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("nav a[data-page=prefixes]")).to_be_hidden()
    # forgetting the key brings back the tenant pages and leaves no tenant data in the page
    page.click("#logout")
    expect(page.locator("nav a[data-page=admin]")).to_be_hidden()
    expect(page.locator("nav a[data-page=prefixes]")).to_be_visible()
    assert page.locator("#tenant-table tbody tr").count() == 0


def test_a_tenant_key_gets_the_tenant_pages_and_no_admin_page(page, live):
    log_in(page, live, key=CONFIGURED)
    page.wait_for_selector("#who:has-text('connected')", timeout=TIMEOUT_MS)
    assert page.locator("#who").inner_text() == "connected"
    expect(page.locator("nav a[data-page=admin]")).to_be_hidden()
    for name in TENANT_LINKS:
        expect(page.locator(f"nav a[data-page={name}]")).to_be_visible()
    page.goto(live.url + "/ui/#admin")  # no Admin page for a tenant: its first page instead
    page.wait_for_selector("#who:has-text('connected')", timeout=TIMEOUT_MS)
    expect(page.locator("#page-prefixes")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#page-admin")).to_be_hidden()


def test_a_wrong_key_is_still_refused_with_the_tenant_message(page, live):
    log_in(page, live, key="not-a-key-at-all")
    message = page.locator("#message.error")
    expect(message).to_contain_text("refused the API key (401)", timeout=TIMEOUT_MS)
    assert "invalid API key" in message.inner_text()
    expect(page.locator("nav a[data-page=admin]")).to_be_hidden()


def test_admin_creates_a_tenant_issues_revokes_disables_and_edits_it(page, live):
    log_in_as_admin(page, live)
    create_tenant(page, "acme", weight="2", max_concurrent=3)
    row = tenant_row(page, "acme")
    assert row.locator("td.weight").inner_text() == "2"
    assert row.locator("td.status").inner_text() == "active"
    concurrent = row.locator(".limit[data-limit=max_concurrent]")
    assert concurrent.inner_text() == "concurrent 3" and "set" in concurrent.get_attribute("class")
    assert "set" not in row.locator(".limit[data-limit=max_active_jobs]").get_attribute("class")
    assert page.input_value("#edit-limits input[data-limit=max_concurrent]") == "3"

    # a key shown once, in its box; revoked with a confirm
    key_id, key = issue_key(page, "laptop")
    assert key.startswith(f"psk-{key_id}-")
    assert key not in page.locator("#message").inner_text()  # the box only
    assert "will not be shown again" in page.locator("#new-key").inner_text()
    assert page.locator(f"#key-table tr[data-key='{key_id}'] td.label").inner_text() == "laptop"
    expect(row.locator("td.keys")).to_have_text("1", timeout=TIMEOUT_MS)
    assert httpx.get(live.url + "/prefixes", headers=bearer(key)).status_code == 200
    shot(page, "admin-new-key")
    confirms: list[str] = []
    page.once("dialog", lambda dialog: (confirms.append(dialog.message), dialog.accept()))
    page.locator(f"#key-table tr[data-key='{key_id}'] button.danger").click()
    page.wait_for_selector(f"#key-table tr[data-key='{key_id}']", state="detached", timeout=TIMEOUT_MS)
    assert len(confirms) == 1 and key_id in confirms[0] and "laptop" in confirms[0]
    expect(page.locator("#message.ok")).to_contain_text(f"Revoked key {key_id}")
    assert httpx.get(live.url + "/prefixes", headers=bearer(key)).status_code == 401
    # a dismissed confirm revokes nothing
    key_id, key = issue_key(page, "ci")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator(f"#key-table tr[data-key='{key_id}'] button.danger").click()
    page.wait_for_timeout(300)
    assert page.locator(f"#key-table tr[data-key='{key_id}']").count() == 1
    page.click("#new-key-dismiss")
    expect(page.locator("#new-key")).to_be_hidden()
    assert page.locator("#new-key-value").inner_text() == ""  # gone from the page, not only hidden

    # disable and enable: its keys are refused, then accepted again
    row.locator("button.toggle").click()
    expect(row).to_have_attribute("data-status", "disabled", timeout=TIMEOUT_MS)
    assert row.locator("button.toggle").inner_text() == "Enable"
    r = httpx.get(live.url + "/prefixes", headers=bearer(key))
    assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]
    row.locator("button.toggle").click()
    expect(row).to_have_attribute("data-status", "active", timeout=TIMEOUT_MS)
    assert httpx.get(live.url + "/prefixes", headers=bearer(key)).status_code == 200

    # edit the weight and reset a limit (an empty box: the server's default)
    page.fill("#edit-weight", "3.5")
    page.fill("#edit-limits input[data-limit=max_concurrent]", "")
    page.fill("#edit-limits input[data-limit=requests_per_minute]", "120")
    page.click("#tenant-edit button[type=submit]")
    expect(row.locator("td.weight")).to_have_text("3.5", timeout=TIMEOUT_MS)
    info = httpx.get(live.url + "/admin/tenants/acme", headers=ADM).json()
    assert (info["weight"], info["limits"]) == (3.5, {"requests_per_minute": 120})
    assert "set" not in row.locator(".limit[data-limit=max_concurrent]").get_attribute("class")
    assert row.locator(".limit[data-limit=requests_per_minute]").inner_text() == "req/min 120"
    placeholder = page.get_attribute("#edit-limits input[data-limit=max_concurrent]", "placeholder")
    assert placeholder.startswith("default")

    # the server's refusals land in the message area
    page.fill("#edit-weight", "5000")  # above the server's maximum weight
    page.click("#tenant-edit button[type=submit]")
    expect(page.locator("#message.error")).to_contain_text("422", timeout=TIMEOUT_MS)
    page.fill("#create-name", "acme")
    page.click("#tenant-create button[type=submit]")
    expect(page.locator("#message.error")).to_contain_text("already exists", timeout=TIMEOUT_MS)

    # today's usage, in the tenants' table and the 7 days' table
    body = {"input": "name : Aromi", "max_new_tokens": 3, "ignore_eos": True}
    assert httpx.post(live.url + "/generate", json=body, headers=bearer(key)).status_code == 200
    deadline = time.monotonic() + 20
    while row.locator("td.today-requests").inner_text() == "0" and time.monotonic() < deadline:
        page.wait_for_timeout(300)  # usage is flushed every usage_flush_s
        page.click("#admin-refresh")
    assert row.locator("td.today-requests").inner_text() == "1"
    assert row.locator("td.today-generated").inner_text() == "3"
    usage = page.locator("#admin-usage-table tbody tr[data-tenant='acme']")
    assert usage.count() == 1 and usage.locator("td").nth(2).inner_text() == "1"
    page.click("#tenant-close")
    shot(page, "admin")
    page.click("#tenant-table tr[data-tenant='acme'] button.manage")
    expect(page.locator("#tenant-detail")).to_be_visible()
    shot(page, "admin-tenant")

    # the issued key, in a fresh tab: the tenant pages, no Admin link, and its usage on the Server page
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 800})
    tenant_page = context.new_page()
    try:
        log_in(tenant_page, live, key=key)
        tenant_page.wait_for_selector("#who:has-text('connected')", timeout=TIMEOUT_MS)
        expect(tenant_page.locator("nav a[data-page=admin]")).to_be_hidden()
        expect(tenant_page.locator("nav a[data-page=prefixes]")).to_be_visible()
        tenant_page.click("nav a[data-page=server]")
        card = tenant_page.locator("#my-usage")
        expect(card).to_be_visible(timeout=TIMEOUT_MS)
        assert "Your usage" in card.inner_text() and "tenant acme" in card.inner_text()
        requests = tenant_page.locator("#my-usage-table tr[data-count=requests] td")
        assert [requests.nth(0).inner_text(), requests.nth(1).inner_text()] == ["1", "1"]
        generated = tenant_page.locator("#my-usage-table tr[data-count=generated_tokens] td")
        assert generated.nth(1).inner_text() == "3"
        rpm = tenant_page.locator("#my-limits-table tr[data-limit=requests_per_minute] td")
        assert rpm.nth(0).inner_text() == "120"
        stored = tenant_page.locator("#my-limits-table tr[data-limit=max_stored_prefixes] td")
        assert stored.nth(1).inner_text() == "0"
        tenant_page.wait_for_selector("#server-cards .stat", timeout=TIMEOUT_MS)
        shot(tenant_page, "admin-tenant-server-usage")
    finally:
        context.close()


def test_a_hostile_key_label_renders_as_text(page, live):
    """Tenant names are restricted by the server; a key's label is free text."""
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    log_in_as_admin(page, live)
    create_tenant(page, "labels")
    key_id, _ = issue_key(page, EVIL)
    assert page.locator(f"#key-table tr[data-key='{key_id}'] td.label").inner_text() == EVIL
    assert page.locator("#page-admin img").count() == 0
    shot(page, "admin-hostile-label")
    page.wait_for_timeout(500)
    assert dialogs == []  # no script ran
