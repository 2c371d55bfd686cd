"""The promotion gate and the forgetting charts in a real browser (Debian's Chromium driven by Playwright).

An officer sees Approve disabled with the domain and figures that hold the candidate, and the forgetting charts drawn
from inline SVG; a page whose button is forced back on (a stale page) posts Approve and is refused.
"""

import json
from pathlib import Path
from typing import Any

import pytest

from apps.governance.actors import Actor
from apps.governance.models import ApprovalRequest
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.forgetting import record_forgetting_report
from apps.registry.models import Alias
from fednested.evaluation.forgetting import forgetting_report
from tests.apps.console.conftest import CANDIDATE_SCORES, PARENT_SCORES
from tests.apps.console.test_console_browser import SCREENSHOTS, _sign_in, browser
from tests.conftest import Member

pytestmark = pytest.mark.browser

__all__ = ["browser"]  # the module-scoped Chromium of the console's browser tests


def test_gated_candidate_in_the_browser(
    transactional_db: Any,
    live_server: Any,
    browser: Any,
    cast: dict[str, Member],
    scene: dict[str, Any],
    settings: Any,
    tmp_path: Path,
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"protected": {"legal": {"max_increase_nats": 0.1}}}))
    settings.FEDNESTED_PROMOTION_GATE = str(gate)
    losses = {
        "v1": {domain: score["loss"] for domain, score in PARENT_SCORES.items()},
        "v2": {domain: score["loss"] for domain, score in CANDIDATE_SCORES.items()},
    }
    report = forgetting_report(["v1", "v2"], losses, parent="v1", champions=["v1"])
    record_forgetting_report(
        scene["v2"], report, heldout="artifacts://heldout", actor=Actor.automation("tests"), scored={}
    )

    officer = _sign_in(browser, live_server.url, "olivia-officer", scene["password"])
    requests: list[str] = []
    officer.on("request", lambda request: requests.append(request.url))
    officer.goto(f"{live_server.url}/versions/v2/")
    approve = officer.get_by_role("button", name="Approve and promote to champion")
    assert approve.is_disabled()
    assert officer.get_by_text("Approve is disabled: the promotion gate holds this candidate").is_visible()
    assert officer.get_by_role("row", name="legal").first.is_visible()
    for chart in ("loss-chart", "forgetting-chart"):
        box = officer.get_by_test_id(chart).bounding_box()
        assert box is not None
        assert box["width"] > 100
    # Everything the page loaded came from the live server: no chart library from anywhere else.
    assert requests
    assert all(url.startswith(live_server.url) for url in requests)
    officer.screenshot(path=str(SCREENSHOTS / "console-gate-held.png"), full_page=True)

    # A stale page: the button as it was before the gate held the candidate.
    officer.evaluate("document.querySelector('button[value=approve]').removeAttribute('disabled')")
    officer.get_by_label("Reason", exact=True).fill("looked fine this morning")
    with officer.expect_navigation():
        approve.click()
    assert officer.get_by_text("Not approved: version 'v2' is held by the promotion gate").is_visible()
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == "pending"
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v1"
