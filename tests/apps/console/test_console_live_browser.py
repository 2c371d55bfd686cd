"""The live console in a real browser (Debian's Chromium driven by Playwright) against the ASGI application served by
uvicorn on loopback, so that websockets work (pytest-django's live server speaks WSGI only).

An officer opens the candidate and sees the lineage chart drawn by the vendored Chart.js; an engineer's open pages
(the same candidate, and the queue) follow the officer's approval and a new candidate without a reload; the engineer
is given no button and a forged POST is refused; the officer downloads the audit export and it verifies. The channel
layer is Redis (as in deployments), under a prefix of this test's own, so a broadcast from any thread reaches the
server's sockets. The candidate page's screenshot lands in var/screenshots/candidate.png.
"""

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from django.conf import settings as django_settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.db import connection

from apps.governance.choices import ApprovalStatus
from apps.governance.export import verify_export
from apps.governance.models import ApprovalRequest
from tests.apps.console.conftest import CANDIDATE_SCORES, _register
from tests.apps.console.test_console_browser import SCREENSHOTS, browser
from tests.conftest import Member

pytestmark = pytest.mark.browser

__all__ = ["browser"]  # the module-scoped Chromium of the console's browser tests

SERVER_START_TIMEOUT_S = 15.0
LIVE_TIMEOUT_MS = 10_000


@pytest.fixture
def asgi_server(transactional_db: Any, settings: Any) -> Iterator[str]:
    """controlplane.asgi's application (HTTP, static files and websockets) served by uvicorn in a thread."""
    if not django_settings.REDIS_URL:
        pytest.fail("REDIS_URL is not set: source var/services/env.sh (scripts/services.sh starts Redis)")
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": django_settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"],
                "prefix": f"test-console-{uuid.uuid4().hex[:8]}",
            },
        }
    }
    from controlplane.asgi import application

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(ASGIStaticFilesHandler(application), lifespan="off", log_level="warning", ws="wsproto")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="uvicorn-live", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"uvicorn did not start on 127.0.0.1:{port} within {SERVER_START_TIMEOUT_S} s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def _sign_in(browser: Any, base_url: str, username: str, password: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True).new_page()
    page.goto(f"{base_url}/sign-in/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert page.get_by_text(f"Signed in as {username}").is_visible()
    return page


def _open_live(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-live=connected]", timeout=LIVE_TIMEOUT_MS)
    # A mark that a reload would wipe: the page must change in place.
    page.evaluate("window.__notReloaded = true")


def _register_in_a_thread(scene: dict[str, Any]) -> None:
    """Register v3 from a thread of its own: the test's thread runs Playwright's event loop, where Django's
    async_to_sync (the broadcast) cannot run."""

    def register() -> None:
        try:
            _register(scene["v2"].family, "v3", parent=scene["v2"], scores=CANDIDATE_SCORES, updates=[])
        finally:
            connection.close()

    thread = threading.Thread(target=register)
    thread.start()
    thread.join(timeout=30)


def test_officer_approves_and_other_open_pages_follow_live(
    asgi_server: str, browser: Any, cast: dict[str, Member], scene: dict[str, Any], tmp_path: Path
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    requests: list[str] = []

    # The engineer (who asked for the approval) keeps the candidate and the queue open.
    engineer = _sign_in(browser, asgi_server, "eric-engineer", scene["password"])
    queue = engineer.context.new_page()
    _open_live(engineer, f"{asgi_server}/versions/v2/")
    _open_live(queue, f"{asgi_server}/queue/")
    assert engineer.get_by_role("button", name="Approve and promote to champion").count() == 0
    assert queue.locator(f"tr[data-approval='{scene['approval'].pk}']").is_visible()

    officer = _sign_in(browser, asgi_server, "olivia-officer", scene["password"])
    officer.on("request", lambda request: requests.append(request.url))
    _open_live(officer, f"{asgi_server}/versions/v2/")
    chart = officer.get_by_test_id("lineage-chart")
    officer.wait_for_selector("#lineage-chart[data-points]", timeout=LIVE_TIMEOUT_MS)
    # Two versions (v1, v2) × three domains, and pixels actually drawn on the canvas.
    assert chart.get_attribute("data-points") == "6"
    painted = officer.evaluate(
        """() => {
            const canvas = document.getElementById('lineage-chart');
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < pixels.length; i += 4) { if (pixels[i] > 0) painted++; }
            return painted;
        }"""
    )
    assert painted > 2_000
    officer.screenshot(path=str(SCREENSHOTS / "candidate.png"), full_page=True)
    print(f"candidate page with charts: {SCREENSHOTS / 'candidate.png'}")

    # The engineer forges the post the page did not offer, with their own session's token: refused.
    status = engineer.evaluate(
        """async (pk) => {
            const body = new URLSearchParams({decision: 'approve', reason: 'forged',
                csrfmiddlewaretoken: document.querySelector('input[name=csrfmiddlewaretoken]').value});
            const response = await fetch(`/approvals/${pk}/decide/`, {method: 'POST', body});
            return response.status;
        }""",
        scene["approval"].pk,
    )
    assert status == 403
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.PENDING

    officer.get_by_label("Reason").fill("Cooking improves by 20 %; the legal regression is within budget.")
    with officer.expect_navigation():
        officer.get_by_role("button", name="Approve and promote to champion").click()
    assert officer.get_by_text("Approved v2: it is now the champion").is_visible()

    # The engineer's pages change in place: the badge, a notice, the decision panel, and the queue's row.
    status_badge = engineer.locator("h1 [data-live=version-status]")
    status_badge.get_by_text("Champion").wait_for(timeout=LIVE_TIMEOUT_MS)
    engineer.get_by_test_id("live-notice").get_by_text("v2 was approved by olivia-officer.").wait_for(
        timeout=LIVE_TIMEOUT_MS
    )
    engineer.get_by_test_id("decided-elsewhere").wait_for(timeout=LIVE_TIMEOUT_MS)
    queue.locator("[data-live=queue-approvals-empty]").wait_for(state="visible", timeout=LIVE_TIMEOUT_MS)
    assert queue.locator(f"tr[data-approval='{scene['approval'].pk}']").count() == 0
    assert engineer.evaluate("window.__notReloaded") is True
    assert queue.evaluate("window.__notReloaded") is True

    # A new candidate registered elsewhere is announced on the open pages.
    _register_in_a_thread(scene)
    queue.get_by_test_id("live-notice").get_by_text("New candidate v3 registered").wait_for(timeout=LIVE_TIMEOUT_MS)
    engineer.screenshot(path=str(SCREENSHOTS / "console-live-follower.png"), full_page=True)

    # Everything the officer's page loaded (the chart library included) came from this server.
    assert requests
    assert all(url.startswith(asgi_server) for url in requests)

    # The officer downloads the audit trail as JSON Lines; the file verifies against its hash chain.
    officer.goto(f"{asgi_server}/audit/")
    with officer.expect_download() as download_info:
        officer.locator("#export-jsonl").click()
    exported = tmp_path / "audit.jsonl"
    download_info.value.save_as(exported)
    with exported.open("rb") as lines:
        report = verify_export(lines, source=str(exported))
    assert report.ok, report.problems
    assert report.verified >= 5
    assert report.verified == report.lines - report.unsealed
    # Close the pages (and their sockets) before the server stops, so every consumer leaves its group cleanly.
    for page in (officer, engineer):
        page.context.close()
