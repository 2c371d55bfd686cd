"""Accounts: role_of, user and token services (each audited), hashed token authentication, create_user command."""

from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import ApiToken, User
from apps.accounts.roles import role_of
from apps.accounts.services import (
    create_user_with_role,
    deactivate_user,
    issue_api_token,
    revoke_api_token,
    set_user_role,
)
from apps.accounts.tokens import secret_sha256
from apps.governance.actors import Actor
from apps.governance.models import AuditEvent

pytestmark = pytest.mark.django_db


def test_role_of_each_kind_of_user() -> None:
    officer = create_user_with_role(username="o", role=Role.OFFICER, actor=None)
    nobody = create_user_with_role(username="n", role="", actor=None)
    inactive = create_user_with_role(username="i", role=Role.ENGINEER, actor=None)
    User.objects.filter(pk=inactive.pk).update(is_active=False)
    inactive.refresh_from_db()
    assert role_of(officer) is Role.OFFICER
    assert role_of(nobody) is None
    assert role_of(inactive) is None
    assert role_of(AnonymousUser()) is None
    assert role_of(None) is None


def test_create_user_is_audited_and_refuses_bad_roles_and_duplicates() -> None:
    user = create_user_with_role(username="eve", role=Role.ENGINEER, actor=Actor.automation("tests"))
    event = AuditEvent.objects.get(verb="accounts.user.created")
    assert (event.object_id, event.actor_label, event.data) == (str(user.pk), "tests", {"role": "engineer"})
    assert not user.has_usable_password()
    with pytest.raises(ValidationError, match="unknown role 'wizard'"):
        create_user_with_role(username="x", role="wizard", actor=None)
    with pytest.raises(ValidationError, match="'eve' already exists"):
        create_user_with_role(username="eve", role=Role.OFFICER, actor=None)
    assert User.objects.filter(username="eve").get().role == Role.ENGINEER


def test_set_user_role_records_old_and_new_role() -> None:
    admin = create_user_with_role(username="root", role=Role.ADMIN, actor=None)
    user = create_user_with_role(username="eve", role=Role.ENGINEER, actor=None)
    set_user_role(user, Role.OFFICER, actor=admin)
    assert User.objects.get(pk=user.pk).role == Role.OFFICER
    event = AuditEvent.objects.get(verb="accounts.user.role_changed")
    assert (event.actor, event.data) == (admin, {"from": "engineer", "to": "officer"})


def test_api_token_is_stored_hashed_and_shown_once() -> None:
    user = create_user_with_role(username="eve", role=Role.ENGINEER, actor=None)
    token, plaintext = issue_api_token(user, actor=user, name="laptop")
    assert plaintext.startswith("fna_")
    assert len(plaintext) > 40
    row = ApiToken.objects.get(pk=token.pk)
    assert row.key_sha256 == secret_sha256(plaintext)
    assert plaintext not in str(ApiToken.objects.filter(pk=token.pk).values().get())
    assert AuditEvent.objects.filter(verb="accounts.api_token.issued", object_id=str(token.pk)).count() == 1
    with pytest.raises(ValidationError, match="needs a name"):
        issue_api_token(user, actor=user, name="  ")


def _me(token: str) -> Any:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client.get("/api/v1/me/")


def test_token_authentication_accepts_valid_and_refuses_revoked_unknown_and_deactivated() -> None:
    user = create_user_with_role(username="eve", role=Role.ENGINEER, actor=None)
    token, plaintext = issue_api_token(user, actor=user, name="laptop")
    response = _me(plaintext)
    assert response.status_code == 200
    assert response.json() == {"username": "eve", "role": "engineer", "client_id": None}
    assert ApiToken.objects.get(pk=token.pk).last_used_at is not None

    bearer = APIClient()
    bearer.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert bearer.get("/api/v1/me/").status_code == 200

    unknown = _me("fna_not-a-real-token")
    assert (unknown.status_code, unknown.json()["detail"]) == (401, "unknown API token")

    assert revoke_api_token(token, actor=user) is True
    assert revoke_api_token(token, actor=user) is False  # already revoked: no second audit row
    assert AuditEvent.objects.filter(verb="accounts.api_token.revoked").count() == 1
    revoked = _me(plaintext)
    assert revoked.status_code == 401
    assert "was revoked at" in revoked.json()["detail"]

    _, second = issue_api_token(user, actor=user, name="ci")
    deactivate_user(user, actor=None, reason="left the project")
    assert _me(second).status_code == 401
    assert ApiToken.objects.filter(user=user, revoked_at__isnull=True).count() == 0
    assert AuditEvent.objects.filter(verb="accounts.user.deactivated", object_id=str(user.pk)).exists()


def test_malformed_authorization_header_is_a_clear_401() -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token two parts")
    response = client.get("/api/v1/me/")
    assert response.status_code == 401
    assert "no spaces in the token" in response.json()["detail"]


def test_create_user_command_prints_only_the_token(tmp_path: Any) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("a-long-enough-passphrase\n", encoding="utf-8")
    out, err = StringIO(), StringIO()
    call_command(
        "create_user",
        "olga",
        "--role",
        "officer",
        "--password-file",
        str(password_file),
        "--token",
        "cli",
        stdout=out,
        stderr=err,
    )
    plaintext = out.getvalue().strip()
    user = User.objects.get(username="olga")
    assert user.role == Role.OFFICER
    assert user.check_password("a-long-enough-passphrase")
    assert ApiToken.objects.get(user=user).key_sha256 == secret_sha256(plaintext)
    assert AuditEvent.objects.filter(actor_label="manage.py create_user").count() == 2
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_user", "olga", "--role", "engineer", stdout=StringIO(), stderr=StringIO())
