"""Bad input on decisions, through the console: each is refused with a message on the page and changes nothing.

Approving twice; approving a rejected or a superseded (archived) candidate; a page left open while a second officer
decided; a forged form post without a session, and one without the session's CSRF token.
"""

from typing import Any

from django.test import Client
from django.urls import reverse

from apps.accounts.choices import Role
from apps.governance.actors import Actor
from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalDecision, ApprovalRequest, AuditEvent
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import Alias, ModelVersion
from apps.registry.services import set_version_status
from tests.conftest import Member, make_user


def _signed_in(member: Member, *, enforce_csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf)
    assert member.user is not None
    client.force_login(member.user)
    return client


def _decide(client: Client, approval: ApprovalRequest, decision: str, reason: str = "looked at the table") -> Any:
    url = reverse("console:decide-approval", args=[approval.pk])
    return client.post(url, {"decision": decision, "reason": reason}, follow=True)


def test_approving_twice_is_refused_with_the_decision_it_already_has(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    client = _signed_in(cast["officer"])
    assert "Approved v2" in _decide(client, scene["approval"], "approve").content.decode()
    again = _decide(client, scene["approval"], "approve").content.decode()
    assert f"Not decided: status: approval request #{scene['approval'].pk} was already approved" in again
    assert ApprovalDecision.objects.filter(request=scene["approval"]).count() == 1
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v2"


def test_approving_a_rejected_candidate_is_refused(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    client = _signed_in(cast["officer"])
    _decide(client, scene["approval"], "reject", "legal regresses")
    page = _decide(client, scene["approval"], "approve").content.decode()
    assert "was already rejected" in page
    assert ModelVersion.objects.get(version_id="v2").status == VersionStatus.REJECTED
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v1"


def test_approving_a_superseded_candidate_is_refused(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    # The request stayed pending while the version was set aside (archived): approving it now would move the
    # champion back to it.
    set_version_status(scene["v2"], VersionStatus.ARCHIVED, actor=Actor.automation("tests"))
    page = _decide(_signed_in(cast["officer"]), scene["approval"], "approve").content.decode()
    assert "Not decided: version: version &#x27;v2&#x27; is archived; only a candidate can be approved" in page
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.PENDING
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v1"


def test_a_stale_page_deciding_an_already_decided_request_is_refused(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    first = _signed_in(cast["officer"])
    stale = first.get(reverse("console:version-detail", args=["v2"])).content.decode()
    assert "Approve and promote to champion" in stale  # the page the first officer keeps open
    second_officer, _ = make_user("otto-officer", Role.OFFICER)
    second = Client()
    second.force_login(second_officer)
    _decide(second, scene["approval"], "reject", "legal regresses past the budget")
    page = _decide(first, scene["approval"], "approve", "approving from the page I had open").content.decode()
    assert "was already rejected" in page
    decision = ApprovalDecision.objects.get(request=scene["approval"])
    assert (decision.decided_by, decision.decision) == (second_officer, "rejected")


def test_a_forged_post_without_a_session_is_sent_to_sign_in(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    url = reverse("console:decide-approval", args=[scene["approval"].pk])
    response = Client().post(url, {"decision": "approve", "reason": "forged"})
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("console:sign-in"))
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.PENDING


def test_a_forged_post_without_the_csrf_token_is_refused_on_a_console_page(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    # The officer's own session, but a form built elsewhere: no token from a page of this session.
    client = _signed_in(cast["officer"], enforce_csrf=True)
    url = reverse("console:decide-approval", args=[scene["approval"].pk])
    response = client.post(url, {"decision": "approve", "reason": "forged"})
    assert response.status_code == 403
    page = response.content.decode()
    assert "Not allowed" in page
    assert "Refused: the form was not sent from a console page of your current session" in page
    assert "CSRF cookie not set" in page
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.PENDING
    # Recorded as a refused access (apps.accounts.refusals), against the officer whose session it rode on.
    refusal = AuditEvent.objects.get(verb="accounts.access.refused", data__reason="csrf_failed")
    assert refusal.actor_label == "olivia-officer"
    # With the page's token the same officer's post goes through: the refusal was the token, not the officer.
    token_page = client.get(reverse("console:version-detail", args=["v2"]))
    token = token_page.context["csrf_token"]
    response = client.post(url, {"decision": "approve", "reason": "real", "csrfmiddlewaretoken": str(token)})
    assert response.status_code == 303
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.APPROVED
