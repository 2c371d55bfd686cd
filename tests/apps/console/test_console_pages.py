"""Console pages through Django's test client: who sees what, what the pages show, and decisions via the services."""

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.console.evaluation import DomainComparison, domain_losses
from apps.federation.models import EdgeDevice, Round, Update
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.governance.services import request_approval
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import Alias, ModelVersion
from apps.registry.services import DomainEvaluation, record_version_evaluation, register_version
from tests.conftest import Member, make_artifacts, make_manifest, write_artifacts


def _signed_in(member: Member) -> Client:
    client = Client()
    assert member.user is not None
    client.force_login(member.user)
    return client


def test_anonymous_visitors_are_sent_to_sign_in(db: Any) -> None:
    response = Client().get(reverse("console:dashboard"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("console:sign-in"))


@pytest.mark.parametrize("member", ["device", "outsider"])
def test_devices_and_outsiders_get_no_pages(cast: dict[str, Member], scene: dict[str, Any], member: str) -> None:
    client = _signed_in(cast[member])
    for url in (
        reverse("console:dashboard"),
        reverse("console:version-detail", args=["v2"]),
        reverse("console:update-list"),
    ):
        response = client.get(url)
        assert response.status_code == 403, url
        assert b"/versions/v2/" not in response.content  # (a bare "v2" can occur in the random CSRF token)


def test_sign_in_and_out_with_a_password(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    client = Client()
    wrong = client.post(reverse("console:sign-in"), {"username": "olivia-officer", "password": "nope"})
    assert wrong.status_code == 200
    assert b"Please enter a correct username and password" in wrong.content
    response = client.post(reverse("console:sign-in"), {"username": "olivia-officer", "password": scene["password"]})
    assert response.status_code == 302
    assert response["Location"] == reverse("console:dashboard")
    assert client.get(reverse("console:dashboard")).status_code == 200
    assert client.get(reverse("console:sign-out")).status_code == 405  # signing out is a POST, never a link
    client.post(reverse("console:sign-out"))
    assert client.get(reverse("console:dashboard")).status_code == 302


def test_dashboard_lists_versions_devices_updates_and_pending_approvals(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    html = _signed_in(cast["officer"]).get(reverse("console:dashboard")).content.decode()
    assert 'href="/versions/v2/"' in html
    assert 'href="/versions/v1/"' in html
    assert '<span class="badge badge-info">champion</span>' in html
    assert '<span class="badge badge-warn">' not in html.split('id="versions-title"')[1].split("</section>")[0]
    pending = html.split('id="pending-title"')[1].split("</section>")[0]
    assert "v2" in pending
    assert "eric-engineer" in pending
    assert "round 1 of the demo" in pending
    assert "car-0001" in html
    assert "non_finite" in html
    assert "12 NaN values" in html


def test_dashboard_shows_each_windows_mode_and_why_a_ready_one_waits(
    cast: dict[str, Member], scene: dict[str, Any], round_factory: Any
) -> None:
    window = round_factory(scene["v1"], round_id="window-7")
    Round.objects.filter(pk=window.pk).update(record={"waiting": "candidate v2 awaits an officer's decision"})
    html = _signed_in(cast["officer"]).get(reverse("console:dashboard")).content.decode()
    panel = html.split('id="rounds-title"')[1].split("</section>")[0]
    assert "<code>window-7</code>" in panel
    assert "Asynchronous (buffered)" in panel
    assert "waiting: candidate v2 awaits an officer&#x27;s decision" in panel


def test_version_page_shows_manifest_lineage_and_per_domain_deltas(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    html = _signed_in(cast["officer"]).get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert scene["v2"].manifest_sha256 in html
    assert 'href="/versions/v1/"' in html  # parent
    assert f'href="/updates/{scene["good"].update_id}/"' in html  # contributing update
    assert "trained on <code>v1</code>, τ=0" in html  # its base and staleness
    table = html.split('id="evaluation-title"')[1].split("</table>")[0]
    # cooking: 3.0 → 2.4 is better by 20 %; legal: 2.5 → 2.75 worse by 10 %; medical moved by 0.05 %: unchanged.
    assert '<td class="num delta-better">−0.600</td>' in table
    assert '<td class="num delta-better">−20.0 %</td>' in table
    assert '<td class="num delta-worse">+0.250</td>' in table
    assert "▲ worse" in table
    assert "▼ better" in table
    assert "= unchanged" in table


def test_officer_approves_with_a_reason_and_the_champion_moves(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    client = _signed_in(cast["officer"])
    page = client.get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "Approve and promote to champion" in page
    url = reverse("console:decide-approval", args=[scene["approval"].pk])
    response = client.post(url, {"decision": "approve", "reason": "cooking improves, legal within budget"}, follow=True)
    assert response.redirect_chain[-1] == ("/versions/v2/", 303)
    assert "Approved v2" in response.content.decode()
    approval = ApprovalRequest.objects.get(pk=scene["approval"].pk)
    assert approval.status == ApprovalStatus.APPROVED
    assert approval.decision.reason == "cooking improves, legal within budget"
    assert approval.decision.decided_by == cast["officer"].user
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v2"
    assert ModelVersion.objects.get(version_id="v1").status == VersionStatus.ARCHIVED
    assert AuditEvent.objects.filter(verb="governance.approval.approved", actor=cast["officer"].user).count() == 1
    # Decided once: the buttons are gone and a second POST is refused with a message, changing nothing.
    assert "Approve and promote to champion" not in response.content.decode()
    again = client.post(url, {"decision": "reject", "reason": "changed my mind"}, follow=True)
    assert "Not decided" in again.content.decode()
    assert "already approved" in again.content.decode()
    assert ModelVersion.objects.get(version_id="v2").status == VersionStatus.CHAMPION


def test_requester_sees_no_buttons_and_a_forged_post_is_refused(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    client = _signed_in(cast["engineer"])
    page = client.get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "Approve and promote to champion" not in page
    assert "You requested this approval, so another officer must decide it." in page
    response = client.post(
        reverse("console:decide-approval", args=[scene["approval"].pk]), {"decision": "approve", "reason": "mine"}
    )
    assert response.status_code == 403
    assert "Not decided: only governance officers decide approval requests" in response.content.decode()
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.PENDING
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v1"
    assert not AuditEvent.objects.filter(verb__startswith="governance.approval.approved").exists()


def test_an_officer_cannot_decide_a_request_they_made(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    # Admins may request approvals; one who is later made an officer still may not decide their own request.
    admin = User.objects.create_user(username="ada-admin", password=scene["password"], role=Role.ADMIN)
    scene["approval"].delete()
    own = request_approval(scene["v2"], actor=admin)
    admin.role = Role.OFFICER
    admin.save()
    client = Client()
    client.force_login(admin)
    page = client.get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "Approve and promote to champion" not in page
    response = client.post(reverse("console:decide-approval", args=[own.pk]), {"decision": "approve", "reason": "ok"})
    assert response.status_code == 403
    assert "cannot decide their own approval request" in response.content.decode()
    assert ApprovalRequest.objects.get(pk=own.pk).status == ApprovalStatus.PENDING


def test_a_decision_without_a_reason_is_refused_and_changes_nothing(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    client = _signed_in(cast["officer"])
    response = client.post(
        reverse("console:decide-approval", args=[scene["approval"].pk]), {"decision": "reject", "reason": "  "}
    )
    assert response.status_code == 400
    assert "Give a reason for the decision" in response.content.decode()
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.PENDING


def test_update_list_filters_and_detail_shows_the_rejection(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    client = _signed_in(cast["engineer"])
    rejected = client.get(reverse("console:update-list"), {"status": "rejected"}).content.decode()
    assert scene["bad"].update_id[:10] in rejected
    assert scene["good"].update_id[:10] not in rejected
    assert "non_finite" in rejected
    by_device = client.get(reverse("console:update-list"), {"device": "nobody"}).content.decode()
    assert "No updates." in by_device
    detail = client.get(reverse("console:update-detail", args=[scene["bad"].update_id])).content.decode()
    assert "<code>non_finite</code>: tensor &#x27;lora_A.expert3&#x27; has 12 NaN values" in detail
    assert "federation.update.rejected" in detail  # history from the audit trail
    assert client.get(reverse("console:update-detail", args=["no-such-update"])).status_code == 404


def test_audit_log_is_for_officers(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    assert _signed_in(cast["engineer"]).get(reverse("console:audit-log")).status_code == 403
    html = _signed_in(cast["officer"]).get(reverse("console:audit-log"), {"verb": "approval"}).content.decode()
    assert "governance.approval.requested" in html
    assert "eric-engineer" in html
    assert "registry.alias.moved" not in html


def test_audit_log_filters_by_actor_kind(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    record_audit_event(actor=Actor.automation("worker:console-test"), verb="tests.console.automation_acted")
    record_audit_event(actor=Actor.device("car-0042"), verb="tests.console.device_acted")
    client = _signed_in(cast["officer"])
    automation = client.get(reverse("console:audit-log"), {"actor_kind": "automation"}).content.decode()
    assert "tests.console.automation_acted" in automation
    assert "tests.console.device_acted" not in automation
    assert "governance.approval.requested" not in automation  # the engineer's, a person's
    people = client.get(reverse("console:audit-log"), {"actor_kind": "person"}).content.decode()
    assert "governance.approval.requested" in people
    assert "tests.console." not in people
    # The export takes the same filter: only the device's event, and the filter is named in the export's record.
    export = client.get(reverse("console:audit-export-jsonl"), {"actor_kind": "device", "verb": "tests.console"})
    lines = b"".join(export.streaming_content).decode().splitlines()
    assert [json.loads(line)["verb"] for line in lines] == ["tests.console.device_acted"]
    exported = AuditEvent.objects.filter(verb="governance.audit.exported").latest("id")
    assert exported.data["filters"] == {"actor_kind": "device", "verb": "tests.console"}
    refused = client.get(reverse("console:audit-log"), {"actor_kind": "robot"})
    assert refused.status_code == 200
    assert "Select a valid choice. robot is not one of the available choices." in refused.content.decode()


def test_comparison_verdicts_follow_the_relative_change() -> None:
    better = DomainComparison("a", loss=1.0, parent_loss=2.0, perplexity=2.7, parent_perplexity=7.4)
    assert better.loss_delta == -1.0
    assert better.relative_change == -0.5
    assert better.verdict == "better"
    assert DomainComparison("b", 2.004, 2.0, None, None).verdict == "same"  # within evaluation noise
    assert DomainComparison("c", 2.2, 2.0, None, None).verdict == "worse"
    unknown = DomainComparison("d", 1.0, None, None, None)
    assert unknown.loss_delta is None
    assert unknown.verdict == "unknown"


def test_devices_show_their_current_version(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    EdgeDevice.objects.filter(pk=scene["device"].pk).update(current_version=scene["v1"])
    html = _signed_in(cast["officer"]).get(reverse("console:dashboard")).content.decode()
    devices = html.split('id="devices-title"')[1].split("</section>")[0]
    assert 'href="/versions/v1/"' in devices
    assert "up to date" in devices
    assert Update.objects.count() == 2


def test_a_new_evaluation_replaces_the_old_and_unevaluated_versions_say_so(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    v2 = scene["v2"]
    # Recorded without the parent's scores: the page falls back to the parent's own evaluation of the domain.
    record_version_evaluation(
        v2,
        [DomainEvaluation(domain="cooking", loss=1.5, perplexity=4.48, tokens=100)],
        actor=Actor.automation("worker:evaluation"),
    )
    assert domain_losses(v2) == {"cooking": 1.5}
    table = _signed_in(cast["officer"]).get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert '<td class="num delta-better">−1.500</td>' in table
    assert "legal" not in table.split('id="evaluation-title"')[1].split("</table>")[0]
    fresh = version_factory_free(scene["v1"])
    page = _signed_in(cast["officer"]).get(reverse("console:version-detail", args=[fresh.version_id])).content.decode()
    assert "This version has not been evaluated yet." in page
    assert domain_losses(fresh) == {}


def version_factory_free(parent: ModelVersion) -> ModelVersion:
    """A child version that nobody evaluated."""
    artifacts = make_artifacts("v3")
    return register_version(
        family=parent.family,
        version_id="v3",
        manifest=make_manifest("v3", parent.version_id, artifacts),
        artifacts=artifacts,
        artifact_uri=write_artifacts("v3", artifacts),
        parent=parent,
        actor=Actor.automation("tests"),
    )
