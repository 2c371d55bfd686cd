"""The console in a real browser (Debian's Chromium driven by Playwright) against Django's live server.

An officer signs in, finds the pending approval, reads the per-domain table and approves with a reason; the engineer
who asked sees no buttons, and a POST forged in their browser is refused. Screenshots land in var/screenshots/.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalRequest
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias
from tests.conftest import Member

pytestmark = pytest.mark.browser

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(settings.BASE_DIR) / "var" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Playwright's sync API keeps an asyncio loop running in this thread; the test's ORM calls are still plain
    # synchronous code between browser steps, so Django's guard against ORM use inside a loop does not apply.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/services.sh does)")
    with playwright_api.sync_playwright() as playwright:
        # Never Playwright's own download: the system Chromium, with everything that phones home switched off.
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def _sign_in(browser: Any, base_url: str, username: str, password: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{base_url}/")
    # Anonymous visitors land on the sign-in page, which brings them back afterwards.
    assert "/sign-in/" in page.url
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert page.get_by_text(f"Signed in as {username}").is_visible()
    return page


def test_officer_approves_in_the_browser_and_the_requester_cannot(
    transactional_db: Any, live_server: Any, browser: Any, cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    approval_pk = scene["approval"].pk

    engineer = _sign_in(browser, live_server.url, "eric-engineer", scene["password"])
    engineer.goto(f"{live_server.url}/versions/v2/")
    assert engineer.get_by_text("You requested this approval, so another officer must decide it.").is_visible()
    assert engineer.get_by_role("button", name="Approve and promote to champion").count() == 0
    engineer.screenshot(path=str(SCREENSHOTS / "console-requester-no-buttons.png"), full_page=True)
    # Forge the form the engineer was not given, with their own CSRF token, and submit it from their page.
    with engineer.expect_navigation():
        engineer.evaluate(
            """(pk) => {
                const token = document.querySelector('input[name=csrfmiddlewaretoken]').value;
                const form = document.createElement('form');
                form.method = 'post';
                form.action = `/approvals/${pk}/decide/`;
                const fields = [['csrfmiddlewaretoken', token], ['decision', 'approve'], ['reason', 'forged']];
                for (const [name, value] of fields) {
                    const input = document.createElement('input');
                    input.type = 'hidden'; input.name = name; input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }""",
            approval_pk,
        )
    assert engineer.get_by_role("heading", name="Not allowed").is_visible()
    assert engineer.get_by_text("Not decided: only governance officers decide approval requests").is_visible()
    engineer.screenshot(path=str(SCREENSHOTS / "console-forged-post-refused.png"), full_page=True)
    assert ApprovalRequest.objects.get(pk=approval_pk).status == ApprovalStatus.PENDING

    officer = _sign_in(browser, live_server.url, "olivia-officer", scene["password"])
    pending = officer.locator("section", has=officer.get_by_role("heading", name="Pending approvals"))
    assert pending.get_by_role("link", name="v2").is_visible()
    assert pending.get_by_text("eric-engineer").is_visible()
    officer.screenshot(path=str(SCREENSHOTS / "console-dashboard.png"), full_page=True)

    with officer.expect_navigation():
        pending.get_by_role("link", name="v2").click()
    table = officer.locator("table", has=officer.get_by_text("Held-out loss per domain"))
    cooking = table.get_by_role("row", name="cooking")
    assert "3.000" in cooking.inner_text()
    assert "2.400" in cooking.inner_text()
    assert "better" in cooking.inner_text()
    assert "worse" in table.get_by_role("row", name="legal").inner_text()
    officer.screenshot(path=str(SCREENSHOTS / "console-version-detail.png"), full_page=True)

    officer.get_by_label("Reason").fill("Cooking improves by 20 %; the legal regression is within budget.")
    with officer.expect_navigation():
        officer.get_by_role("button", name="Approve and promote to champion").click()
    assert officer.get_by_text("Approved v2: it is now the champion").is_visible()
    history = officer.locator("section", has=officer.get_by_role("heading", name="Approval history"))
    assert "olivia-officer" in history.inner_text()
    assert "legal regression is within budget" in history.inner_text()
    officer.screenshot(path=str(SCREENSHOTS / "console-approved.png"), full_page=True)

    assert ApprovalRequest.objects.get(pk=approval_pk).status == ApprovalStatus.APPROVED
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v2"
    for name in ("console-dashboard", "console-version-detail", "console-approved", "console-forged-post-refused"):
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000
