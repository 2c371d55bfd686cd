"""The version page under the promotion gate (Approve disabled, why, overrides) and its forgetting charts."""

import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from apps.accounts.choices import Role
from apps.governance.actors import Actor
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.forgetting import record_forgetting_report
from apps.registry.models import Alias, ModelVersion
from fednested.evaluation.forgetting import forgetting_report
from tests.apps.console.conftest import CANDIDATE_SCORES, PARENT_SCORES
from tests.conftest import Member, make_user

pytestmark = pytest.mark.django_db


def _signed_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def gate(scene: dict[str, Any], settings: Any, tmp_path: Path) -> Path:
    """Protects legal, which v2 makes worse by 0.25 nats (+10 %) against v1, its parent and the champion."""
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"protected": {"legal": {"max_increase_nats": 0.1}}}))
    settings.FEDNESTED_PROMOTION_GATE = str(path)
    return path


def _approve_button(page: str) -> str:
    match = re.search(r'<button type="submit" name="decision" value="approve"[^>]*>', page)
    assert match is not None
    return match.group(0)


def test_approve_is_disabled_and_the_page_says_which_domain_and_by_how_much(
    cast: dict[str, Member], scene: dict[str, Any], gate: Path
) -> None:
    page = _signed_in(cast["officer"].user).get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "disabled" in _approve_button(page)
    assert "Approve is disabled: the promotion gate holds this candidate" in page
    held = page.split('data-testid="promotion-gate"')[1]
    assert '<th scope="row">legal</th>' in held
    assert '<td class="num delta-worse">+0.250</td>' in held
    assert "at most +0.1 nats" in held
    assert 'data-testid="request-override"' in held
    # Without the gate, the same page offers Approve.
    gate.write_text(json.dumps({"protected": {"legal": {"max_increase_nats": 0.3}}}))
    page = _signed_in(cast["officer"].user).get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "disabled" not in _approve_button(page)


def test_a_stale_page_posting_approve_is_refused_like_the_api(
    cast: dict[str, Member], scene: dict[str, Any], gate: Path
) -> None:
    # The form as it was drawn before the gate held v2: the POST goes straight to the decision.
    response = _signed_in(cast["officer"].user).post(
        reverse("console:decide-approval", args=[scene["approval"].pk]), {"decision": "approve", "reason": "fine"}
    )
    assert response.status_code == 409
    text = response.content.decode()
    assert "Not approved: version &#x27;v2&#x27; is held by the promotion gate: legal: loss 2.7500" in text
    assert ModelVersion.objects.get(version_id="v2").status == VersionStatus.CANDIDATE
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v1"
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == "pending"


def test_an_override_through_the_console_needs_a_second_officer(
    cast: dict[str, Member], scene: dict[str, Any], gate: Path
) -> None:
    first = _signed_in(cast["officer"].user)
    url = reverse("console:gate-override", args=[scene["approval"].pk])
    assert first.post(url, {"step": "request", "reason": ""}).status_code == 400
    assert first.post(url, {"step": "request", "reason": "legal is retrained next round"}).status_code == 303
    page = first.get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "You asked for this override, so a second officer must grant it." in page
    assert 'data-testid="grant-override"' not in page
    own = first.post(url, {"step": "grant", "reason": "granting my own"})
    assert own.status_code == 403
    assert "cannot grant the gate override they asked for" in own.content.decode()

    second_user, _ = make_user("oona-officer", Role.OFFICER)
    second = _signed_in(second_user)
    page = second.get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert 'data-testid="grant-override"' in page
    assert second.post(url, {"step": "grant", "reason": "agreed"}).status_code == 303
    page = first.get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "disabled" not in _approve_button(page)
    assert "Override granted by <strong>oona-officer</strong>" in page
    decided = first.post(
        reverse("console:decide-approval", args=[scene["approval"].pk]), {"decision": "approve", "reason": "override"}
    )
    assert decided.status_code == 303
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v2"
    assert AuditEvent.objects.filter(verb="governance.gate.override_granted", actor_label="oona-officer").exists()


def test_forgetting_report_is_drawn_as_inline_svg(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    losses = {
        "v1": {domain: score["loss"] for domain, score in PARENT_SCORES.items()},
        "v2": {domain: score["loss"] for domain, score in CANDIDATE_SCORES.items()},
    }
    report = forgetting_report(["v1", "v2"], losses, parent="v1", champions=["v1"])
    record_forgetting_report(
        scene["v2"], report, heldout="artifacts://heldout", actor=Actor.automation("tests"), scored={}
    )
    page = _signed_in(cast["engineer"].user).get(reverse("console:version-detail", args=["v2"])).content.decode()
    section = page.split('data-testid="forgetting-report"')[1].split("</section>")[0]
    # cooking −0.6 (0 forgotten), legal +0.25, medical +0.001: mean forgetting (0 + 0.25 + 0.001) / 3.
    assert '<dd data-testid="average-forgetting">0.084 nats</dd>' in section
    assert '<dd data-testid="backward-transfer">+0.116 nats</dd>' in section
    for chart in ("loss-chart", "forgetting-chart"):
        svg = section.split(f'data-testid="{chart}"')[1].split("</svg>")[0]
        assert "<rect" in svg
        assert "http" not in svg.replace("http://www.w3.org", "")  # nothing fetched from anywhere
    assert "<title>legal · v2: loss 2.7500</title>" in section
    assert "<title>legal: forgetting +0.2500 nats</title>" in section
