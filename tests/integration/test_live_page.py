"""The live page end to end in headless Chromium: HTTP load, then /v1/live.

Needs Debian's `chromium` (or DD_CHROMIUM pointing at a Chromium) and the
`playwright` package that drives it; skipped, with the reason, without them.
"""

from __future__ import annotations

import os
import shutil

import pytest

from .conftest import two_regions, unique
from .test_live import token_for

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

PAGE_WAIT_MS = 15_000
CHROMIUM = os.environ.get("DD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's `chromium` package or set DD_CHROMIUM")
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def console_errors() -> list[str]:
    """What the page reported as errors: uncaught exceptions and console errors."""
    return []


@pytest.fixture
def page(browser, console_errors):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(PAGE_WAIT_MS)
    page.on("pageerror", lambda exc: console_errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()


@pytest.fixture(params=["home region", "another region"])
def region_api_url(request, api) -> str:
    """The page of the home region, at the root, or of another under /regions/<name>."""
    if request.param == "home region":
        return api.engine.url
    [_, (_, other_url)] = two_regions(api)
    return other_url


def cell(page, currency: str, field: str):
    return page.locator(f'#balances tr[data-currency="{currency}"] td[data-field="{field}"]')


def test_page_shows_balance_network_and_events_live(api, region_api_url, page, console_errors):
    expect = playwright_sync.expect
    root, mid = api.chain(2, "page")
    assert api.purchase(mid, 2_500_000).status_code == 201  # root earns 20 %: 0.50 USD before the page opens
    api.settle()
    page.goto(f"{region_api_url}/live#token={token_for(api, root)}")

    expect(page.locator("#status")).to_have_text("live")
    assert "token=" not in page.url  # the token left the address bar
    expect(cell(page, "USD", "pending")).to_have_text("0.50")
    expect(page.locator("#graph circle")).to_have_count(2)
    expect(page.locator("#user-id")).to_have_text(root)

    # A purchase two levels down: a live commission, balance and feed update.
    buyer = api.register(unique("page"), api.service.get(f"/v1/users/{mid}").json()["referral_code"])["user_id"]
    assert api.purchase(buyer, 1_000_000).status_code == 201
    expect(cell(page, "USD", "pending")).to_have_text("0.60")  # + 10 % of 1.00
    expect(cell(page, "USD", "earned")).to_have_text("0.60")
    earned = page.locator('#feed li[data-kind="commission.earned"]')
    expect(earned).to_have_count(1)
    expect(earned).to_contain_text("level 2")
    joined = page.locator('#feed li[data-kind="referral.joined"]')
    expect(joined).to_contain_text(buyer)
    # The new member appears in the graph, marked as new.
    expect(page.locator(f'#graph circle.fresh[data-user="{buyer}"]')).to_have_count(1)
    expect(page.locator("#graph circle")).to_have_count(3)
    expect(page.locator('#stats dd[data-stat="members by level"]')).to_have_text("1 · 1 · 0 · 0 · 0 · 0 · 0")

    # Reload: state comes over HTTP again, the stream resumes from there, and
    # nothing is counted twice.
    page.reload()
    expect(page.locator("#status")).to_have_text("live")
    expect(cell(page, "USD", "pending")).to_have_text("0.60")
    assert api.purchase(buyer, 3_000_000).status_code == 201
    expect(cell(page, "USD", "pending")).to_have_text("0.90")
    expect(page.locator('#feed li[data-kind="commission.earned"]')).to_have_count(1)
    offsets = [int(o) for o in page.locator("#feed li").evaluate_all("items => items.map(i => i.dataset.offset)")]
    assert offsets == sorted(offsets, reverse=True) and len(set(offsets)) == len(offsets)
    assert console_errors == []


def test_page_refuses_a_forged_token(api, page, console_errors):
    expect = playwright_sync.expect
    root = api.register(unique("page"))["user_id"]
    token = token_for(api, root)
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    page.goto(f"{api.engine.url}/live")
    page.fill("#token-input", forged)
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    page.fill("#token-input", "not a token")
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_contain_text("cannot be read")
    # The browser logs the refused request itself; nothing else went wrong.
    assert [e for e in console_errors if "status of 401" not in e] == []


def test_page_is_served_with_a_strict_content_security_policy(api):
    r = api.anonymous.get("/live")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert api.anonymous.get("/live/live.js").headers["content-type"].startswith("text/javascript")
    assert api.anonymous.get("/live/nothing.js").status_code == 404
