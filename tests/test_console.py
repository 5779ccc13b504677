"""The web console (/ui) and the API docs in a real browser: Playwright (pytest-playwright) driving
Debian's chromium against a live server with a real Redis and a training worker.

Screenshots of every page go to build/console-screenshots/ (look at them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect, sync_playwright

from prefix_store.kinds import BottleneckKind
from prefix_store.redis_server import RedisServer
from prefix_store.service import PrefixService, StoreConfig
from prefix_store.state import BottleneckAdapter
from prefixserve.compile import bind_model
from prefixserve.training.jobs import RedisJobQueue
from prefixserve.training.synthetic import table_to_text
from prefixserve.training.worker import Worker, WorkerConfig

from .helpers import ALICE, settings_for
from .live import LiveServer

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("PREFIXSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "build" / "console-screenshots"
EVIL = "<img src=x onerror=alert(1)>"
TIMEOUT_MS = 30_000

if not Path(CHROMIUM).exists():  # scripts/setup.sh --test installs it; say so rather than skip silently
    pytest.fail(
        f"the console tests need Debian's chromium at {CHROMIUM} (scripts/setup.sh --test installs it)"
    )


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """Debian's chromium, not a browser Playwright downloads; no background calls to the outside."""
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update"]  # fmt: skip
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": flags}


@pytest.fixture(scope="module")
def playwright(_pw_api_request_contexts):
    """Module scope (pytest-playwright's own is the session's): while Playwright's sync API runs it keeps
    an event loop on this thread, which the asyncio.run of later test modules would trip over."""
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright, browser_type_launch_args):
    browser = playwright.chromium.launch(**browser_type_launch_args)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def browser_context_args():
    return {"viewport": {"width": 1280, "height": 800}}


@pytest.fixture(scope="module")
def live(module_live_server, tiny_model, tmp_path_factory):
    """A live server on a real Redis (queue, cache, limits) with one training worker beside it."""
    if shutil.which("redis-server") is None:
        pytest.fail("the console tests need a redis-server (scripts/setup.sh --test installs it)")
    redis = RedisServer().start()
    settings = settings_for(tmp_path_factory.mktemp("console"), redis_url=redis.url, max_running=8)
    server = module_live_server(settings=settings)
    service = PrefixService(bind_model(tiny_model), StoreConfig(url=server.state.service.config.url))
    worker = Worker(RedisJobQueue(redis.url), service, WorkerConfig(poll_s=0.2, save_every_s=0.2))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="console-worker")
    thread.start()
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield server
    stop.set()
    thread.join(30)
    service.close()
    redis.kill()


def bottleneck_tensors(live: LiveServer) -> dict:
    """A Houlsby adapter's tensors for the served model (small random weights, as a trained one has)."""
    spec = live.state.model.spec
    g = torch.Generator().manual_seed(0)
    n, c, m = spec.n_layer, spec.n_embd, 8
    parts = (
        torch.randn(n, c, m, generator=g),
        torch.zeros(n, m),
        torch.randn(n, m, c, generator=g),
        torch.zeros(n, c),
    )
    return BottleneckKind.to_tensors(BottleneckAdapter({site: parts for site in ("attn", "mlp")}))


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def log_in(page, live: LiveServer, key: str = ALICE) -> None:
    page.goto(live.url + "/ui/")
    page.fill("#api-key", key)
    page.click("#login button[type=submit]")


def add_text_prefix(page, name: str, text: str = "Answer politely and briefly.") -> str:
    page.click("nav a[data-page=prefixes]")
    page.click("#upload-tabs button[data-tab=text]")
    page.fill("#upload-text", text)
    page.fill("#upload-name", name)
    page.click("#upload-form button[type=submit]")
    added = page.locator("#message.ok", has_text="Added")
    added.wait_for(timeout=TIMEOUT_MS)
    prefix_id = re.search(r"\((pfx-[a-z0-9_-]+)\)\.$", added.inner_text()).group(1)
    page.wait_for_selector(f"#prefix-table tbody tr[data-id='{prefix_id}']", timeout=TIMEOUT_MS)  # listed
    return prefix_id


def test_wrong_key_shows_a_clear_message(page, live):
    log_in(page, live, key="not-a-key")
    message = page.locator("#message.error")  # (the greeting before it is an info message)
    expect(message).to_contain_text("refused the API key (401)", timeout=TIMEOUT_MS)
    assert "invalid API key" in message.inner_text()
    assert page.evaluate("sessionStorage.getItem('prefixserve.key')") is None  # a wrong key is not kept
    shot(page, "wrong-key")


def test_text_prefix_playground_training_and_delete(page, live):
    """The walk a first-time user takes: key, text prefix, prefix vs no prefix side by side, a small
    training job whose loss curve grows while it trains, the server page, then delete the prefix."""
    log_in(page, live)
    page.wait_for_selector("#who:has-text('connected')", timeout=TIMEOUT_MS)
    assert "Bearer" not in page.url and ALICE not in page.url  # the key never goes into a URL
    prefix_id = add_text_prefix(page, "polite")
    row = page.locator(f"#prefix-table tbody tr[data-id='{prefix_id}']")
    assert row.locator("td.name").inner_text() == "polite"
    page.fill("#filter-name", "no-such-name")
    assert page.locator("#prefix-table tbody tr").count() == 0
    page.fill("#filter-name", "")
    shot(page, "prefixes")

    # playground: the prefix, the prefix with an adapter beside it, and the bare model, in one run
    adapter = live.state.service.add_tensors(bottleneck_tensors(live), owner="alice", name="houlsby").id
    page.click("nav a[data-page=playground]")
    columns = page.locator("#columns .column")
    assert columns.count() == 2
    page.click("#play-add")
    columns.nth(0).locator("select.prefix").select_option(prefix_id)
    columns.nth(1).locator("select.prefix").select_option(prefix_id)
    assert columns.nth(1).locator(f"select.adapter option[value='{adapter}']").count() == 1  # adapters only
    assert columns.nth(1).locator(f"select.adapter option[value='{prefix_id}']").count() == 0
    columns.nth(1).locator("select.adapter").select_option(adapter)
    columns.nth(2).locator("select.prefix").select_option("")
    page.fill("#play-input", "name : Aromi | food : Italian")
    page.fill("#play-max-tokens", "12")
    page.click("#play-run")
    for i in range(3):
        page.wait_for_selector(f"#columns .column:nth-child({i + 1})[data-state=done]", timeout=TIMEOUT_MS)
        column = columns.nth(i)
        assert column.locator(".output .tok").count() > 0
        assert "tokens" in column.locator(".finish").inner_text()
        assert column.locator(".tok[title^='p = ']").count() > 0  # shaded by probability
    texts = [columns.nth(i).locator(".output").inner_text() for i in range(3)]
    assert texts[1] != texts[0]  # the adapter steers the row that carries it
    page.click("#play-add")
    assert columns.count() == 4 and page.is_disabled("#play-add")  # at most four columns
    columns.nth(1).locator("button", has_text="copy as curl").click()
    snippet = page.locator("#snippet").inner_text()
    assert "/generate" in snippet and prefix_id in snippet and adapter in snippet and ALICE not in snippet
    shot(page, "playground")

    # jobs: train a small prefix and watch its loss curve gain points
    page.click("nav a[data-page=jobs]")
    examples = "\n".join(json.dumps({"input": x, "output": y}) for x, y in table_to_text(40))
    page.fill("#train-examples", examples)
    page.fill("#train-name", "tiny-run")
    page.fill("#train-prefix-len", "2")
    page.fill("#train-epochs", "30")
    page.fill("#train-lr", "0.001")
    page.fill("#train-val", "0.2")
    page.click("#train-form button[type=submit]")
    chart = page.locator("#job-chart svg.chart")
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if chart.count():
            seen.append(int(chart.get_attribute("data-points")))
        status = page.locator("#job-table tbody tr.selected").get_attribute("data-status")
        if status in ("succeeded", "failed", "cancelled"):
            break
        page.wait_for_timeout(300)
    assert status == "succeeded", page.locator("#job-error").inner_text()
    page.wait_for_timeout(1500)  # one more poll draws the finished curve
    final = int(chart.get_attribute("data-points"))
    growing = sorted(set(seen))
    assert len(growing) >= 2 and growing[0] < final, f"the chart never grew while training: {seen}"
    assert page.locator("#job-chart circle.dot.eval").count() > 0  # validation loss per epoch
    shot(page, "jobs")
    trained = re.search(r"prefix (pfx-\S+)", page.locator("#job-facts").inner_text()).group(1)

    # the trained prefix is listed with its size and its held-out scores
    page.click("nav a[data-page=prefixes]")
    scores = page.locator(f"#prefix-table tbody tr[data-id='{trained}'] td.scores")
    expect(scores).to_contain_text("bleu", timeout=TIMEOUT_MS)
    assert "KiB" in page.locator(f"#prefix-table tbody tr[data-id='{trained}']").inner_text()
    shot(page, "prefixes-scored")

    page.click("nav a[data-page=server]")
    page.wait_for_selector("#server-cards .stat", timeout=TIMEOUT_MS)
    occupancy = page.locator("[data-stat='Batch occupancy'] .stat-value").inner_text()
    assert occupancy.endswith("/ 8")
    compute = page.locator("[data-stat='Compute']").inner_text()
    assert "attention: c" in compute and "CUDA graphs: off" in compute  # the CPU's in-place C kernel
    device = page.locator("#tier-table tbody tr[data-tier=device] td")
    assert int(device.nth(1).inner_text()) + int(device.nth(2).inner_text()) > 0  # the playground's lookups
    shot(page, "server")

    # delete, confirming the dialog
    page.click("nav a[data-page=prefixes]")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f"#prefix-table tbody tr[data-id='{prefix_id}'] button.danger").click()
    page.wait_for_selector(
        f"#prefix-table tbody tr[data-id='{prefix_id}']", state="detached", timeout=TIMEOUT_MS
    )


def test_a_hostile_prefix_name_renders_as_text(page, live):
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    log_in(page, live)
    page.wait_for_selector("#who:has-text('connected')", timeout=TIMEOUT_MS)
    prefix_id = add_text_prefix(page, EVIL)
    cell = page.locator(f"#prefix-table tbody tr[data-id='{prefix_id}'] td.name")
    assert cell.inner_text() == EVIL
    assert page.locator("#prefix-table img").count() == 0
    shot(page, "hostile-name")
    page.click("nav a[data-page=playground]")
    option = page.locator(f"#columns .column select option[value='{prefix_id}']").first
    assert option.inner_text().startswith(EVIL)
    page.wait_for_timeout(500)
    assert dialogs == []  # no script ran


@pytest.mark.parametrize("path, ready", [("/docs", ".swagger-ui .info .title"), ("/redoc", "redoc h1")])
def test_api_docs_render_with_the_network_blocked(page, live, path, ready):
    outside: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(live.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.goto(live.url + path)
    title = page.locator(ready).first
    title.wait_for(timeout=TIMEOUT_MS)
    assert "prefixserve" in title.inner_text()
    assert outside == []
    shot(page, path.strip("/"))
