"""The system account requests approval of versions that automated rounds produced; an officer still decides, and
the account can do nothing else."""

from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.services import (
    SYSTEM_USERNAME,
    create_user_with_role,
    issue_api_token,
    set_user_role,
    system_user,
)
from apps.governance.actors import Actor
from apps.governance.choices import ApprovalStatus
from apps.governance.models import AuditEvent
from apps.governance.services import approve_version, reject_version, request_approval
from apps.registry.models import Alias, ModelFamily, ModelVersion

pytestmark = pytest.mark.django_db


@pytest.fixture
def candidate(family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]) -> ModelVersion:
    return version_factory(family_factory(), "round-1-candidate")


def test_the_system_account_is_created_once_and_cannot_sign_in() -> None:
    first = system_user()
    assert system_user().pk == first.pk
    assert (first.username, first.role, first.is_active, first.has_usable_password()) == (
        SYSTEM_USERNAME,
        Role.SYSTEM,
        True,
        False,
    )
    assert not first.api_tokens.exists()
    created = AuditEvent.objects.filter(verb="accounts.user.created", object_id=str(first.pk))
    assert [event.data for event in created] == [{"role": "system", "system": True}]


def test_system_requests_and_an_officer_approves(
    candidate: ModelVersion, user_factory: Callable[[str, str], tuple[User, Any]]
) -> None:
    officer = user_factory("olivia-officer", Role.OFFICER)[0]
    request = request_approval(candidate, actor=system_user(), note="automated round 1")
    assert (request.requested_by.username, request.status) == (SYSTEM_USERNAME, ApprovalStatus.PENDING)
    with pytest.raises(PermissionDenied, match="only governance officers decide"):
        approve_version(request, actor=system_user(), reason="self-approval")
    approve_version(request, actor=officer, reason="evaluated per domain")
    assert Alias.objects.get(name="champion").version == candidate
    requested = AuditEvent.objects.get(verb="governance.approval.requested")
    assert requested.actor_label == SYSTEM_USERNAME


def test_officers_reject_system_requests_too(
    candidate: ModelVersion, user_factory: Callable[[str, str], tuple[User, Any]]
) -> None:
    officer = user_factory("otto-officer", Role.OFFICER)[0]
    request = request_approval(candidate, actor=system_user())
    reject_version(request, actor=officer, reason="regresses legal")
    assert ModelVersion.objects.get(pk=candidate.pk).status == "rejected"


def test_nobody_else_gets_the_system_role(user_factory: Callable[[str, str], tuple[User, Any]]) -> None:
    with pytest.raises(ValidationError, match="the system role belongs to the 'fednested-system' account only"):
        create_user_with_role(username="mallory", role=Role.SYSTEM, actor=None)
    engineer = user_factory("eric-engineer", Role.ENGINEER)[0]
    with pytest.raises(ValidationError, match="system role belongs"):
        set_user_role(engineer, Role.SYSTEM, actor=None)
    assert User.objects.get(pk=engineer.pk).role == Role.ENGINEER


def test_an_impostor_account_with_the_system_name_is_refused() -> None:
    create_user_with_role(username=SYSTEM_USERNAME, role=Role.ENGINEER, actor=None)
    with pytest.raises(ValidationError, match="exists but is not the active system account"):
        system_user()


def test_the_system_role_has_no_api_rights(candidate: ModelVersion) -> None:
    # Even a token issued to it by mistake opens nothing but "who am I".
    _, token = issue_api_token(system_user(), actor=Actor.automation("tests"), name="mistake")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/me/").json()["role"] == "system"
    assert client.get("/api/v1/versions/").status_code == 403
    assert client.post("/api/v1/approvals/", {"version": candidate.version_id}, format="json").status_code == 403
