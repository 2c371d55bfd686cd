"""Enrollment: one-time hashed tokens, expiry, reuse, client-id rules, and a race for one token on PostgreSQL."""

import os
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, connections
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import ApiToken, User
from apps.accounts.tokens import secret_sha256
from apps.federation.models import EdgeDevice, EnrollmentToken
from apps.federation.services import device_username, enroll_device, issue_enrollment_token
from apps.governance.models import AuditEvent
from tests.device_keys import device_csr


@pytest.fixture
def engineer(user_factory: Callable[[str, str], tuple[User, str]]) -> User:
    return user_factory("eric-engineer", Role.ENGINEER)[0]


@pytest.mark.django_db
def test_issued_token_is_hashed_audited_and_expires_by_default_setting(engineer: User, settings: Any) -> None:
    settings.FEDNESTED_ENROLLMENT_TOKEN_TTL_S = 600
    token, plaintext = issue_enrollment_token(actor=engineer, note="for car-7", domain="automotive")
    row = EnrollmentToken.objects.get(pk=token.pk)
    assert row.token_sha256 == secret_sha256(plaintext)
    assert plaintext.startswith("fne_")
    assert timedelta(seconds=590) < row.expires_at - timezone.now() <= timedelta(seconds=600)
    event = AuditEvent.objects.get(verb="federation.enrollment_token.issued")
    assert (event.actor, event.object_id, event.data["domain"]) == (engineer, str(token.pk), "automotive")
    with pytest.raises(ValidationError, match="between 1 s and 30 days"):
        issue_enrollment_token(actor=engineer, ttl=timedelta(days=31))


@pytest.mark.django_db
def test_enrollment_creates_a_device_account_with_a_working_token(engineer: User) -> None:
    _, plaintext = issue_enrollment_token(actor=engineer, domain="medical")
    enrollment = enroll_device(
        token=plaintext,
        client_id="scanner:42",
        csr=device_csr("scanner:42"),
        display_name="Scanner 42",
        domain="ignored",
        labels=["ward-3"],
    )
    device = EdgeDevice.objects.get(client_id="scanner:42")
    assert device == enrollment.device
    assert device.domain == "medical"  # the token's domain wins over what the device claims
    assert device.labels == ["ward-3"]
    assert device.status == "active"
    assert device.user.role == Role.DEVICE
    assert device.user.username == device_username("scanner:42")
    assert not device.user.has_usable_password()
    assert ApiToken.objects.get(user=device.user).key_sha256 == secret_sha256(enrollment.api_token)
    token_row = EnrollmentToken.objects.get(token_sha256=secret_sha256(plaintext))
    assert token_row.used_at is not None
    assert token_row.used_by_client_id == "scanner:42"
    enrolled = AuditEvent.objects.get(verb="federation.device.enrolled")
    assert (enrolled.actor_label, enrolled.object_id) == ("device:scanner:42", str(device.pk))

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {enrollment.api_token}")
    me = client.get("/api/v1/me/").json()
    assert me == {"username": "device-scanner+42", "role": "device", "client_id": "scanner:42"}


@pytest.mark.django_db
def test_reused_expired_and_unknown_tokens_are_refused_and_leave_nothing_behind(engineer: User) -> None:
    _, used = issue_enrollment_token(actor=engineer)
    enroll_device(token=used, client_id="car-1", csr=device_csr("car-1"))
    with pytest.raises(ValidationError, match=r"was already used at \d{4}-\d\d-\d\d"):
        enroll_device(token=used, client_id="car-2", csr=device_csr("car-2"))

    expired_row, expired = issue_enrollment_token(actor=engineer, ttl=timedelta(seconds=60))
    EnrollmentToken.objects.filter(pk=expired_row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(ValidationError, match="expired at"):
        enroll_device(token=expired, client_id="car-3", csr=device_csr("car-3"))

    with pytest.raises(ValidationError, match="unknown enrollment token"):
        enroll_device(token="fne_guess", client_id="car-4", csr=device_csr("car-4"))

    assert list(EdgeDevice.objects.values_list("client_id", flat=True)) == ["car-1"]
    assert EnrollmentToken.objects.get(pk=expired_row.pk).used_at is None
    assert not User.objects.filter(username__in=["device-car-2", "device-car-3", "device-car-4"]).exists()


@pytest.mark.django_db
def test_bad_or_taken_client_id_does_not_burn_the_token(engineer: User) -> None:
    _, first = issue_enrollment_token(actor=engineer)
    enroll_device(token=first, client_id="car-1", csr=device_csr("car-1"))
    _, second = issue_enrollment_token(actor=engineer)
    with pytest.raises(ValidationError, match="'car-1' is already enrolled"):
        enroll_device(token=second, client_id="car-1", csr=device_csr("car-1"))
    with pytest.raises(ValidationError, match="must start with a letter or digit"):
        enroll_device(token=second, client_id="bad id with spaces", csr=device_csr("bad id with spaces"))
    with pytest.raises(ValidationError, match=r"labels\[1\] must be a non-empty string"):
        enroll_device(token=second, client_id="car-2", csr=device_csr("car-2"), labels=["ok", ""])
    # The token is still good after all those refusals.
    assert enroll_device(token=second, client_id="car-2", csr=device_csr("car-2")).device.client_id == "car-2"


@pytest.mark.django_db
def test_enroll_endpoint_reports_what_was_wrong(engineer: User) -> None:
    _, plaintext = issue_enrollment_token(actor=engineer)
    client = APIClient()
    missing = client.post("/api/v1/enroll/", {"client_id": "car-1"}, format="json")
    assert missing.status_code == 400
    assert "token" in missing.json()
    created = client.post(
        "/api/v1/enroll/", {"token": plaintext, "client_id": "car-1", "csr": device_csr("car-1")}, format="json"
    )
    assert created.status_code == 201
    assert created.json()["device"]["client_id"] == "car-1"
    assert created.json()["api_token"].startswith("fna_")
    reused = client.post(
        "/api/v1/enroll/", {"token": plaintext, "client_id": "car-2", "csr": device_csr("car-2")}, format="json"
    )
    assert reused.status_code == 400
    assert "already used" in reused.json()["token"][0]
    assert reused.json()["code"] == "token_used"
    unknown = client.post(
        "/api/v1/enroll/", {"token": "fne_nope", "client_id": "car-3", "csr": device_csr("car-3")}, format="json"
    )
    assert (unknown.status_code, unknown.json()["code"]) == (400, "token_invalid")
    _, short_lived = issue_enrollment_token(actor=engineer, ttl=timedelta(seconds=1))
    EnrollmentToken.objects.filter(token_prefix=short_lived[:12]).update(expires_at=timezone.now())
    expired = client.post(
        "/api/v1/enroll/", {"token": short_lived, "client_id": "car-4", "csr": device_csr("car-4")}, format="json"
    )
    assert (expired.status_code, expired.json()["code"]) == (400, "token_expired")
    assert "expired at" in expired.json()["token"][0]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_two_enrollments_racing_for_one_token_on_postgresql_exactly_one_wins(engineer: User) -> None:
    if connection.vendor != "postgresql":
        reason = "the race needs concurrent transactions: run with DATABASE_URL=postgres://… (make test)"
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES"):
            pytest.fail(reason)
        pytest.skip(reason)
    _, plaintext = issue_enrollment_token(actor=engineer)
    start = threading.Barrier(8)
    outcomes: dict[str, str] = {}

    def enroll(client_id: str) -> None:
        try:
            start.wait()
            enroll_device(token=plaintext, client_id=client_id, csr=device_csr(client_id))
            outcomes[client_id] = "enrolled"
        except ValidationError as exc:
            outcomes[client_id] = "; ".join(exc.messages)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=enroll, args=(f"racer-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [client_id for client_id, outcome in outcomes.items() if outcome == "enrolled"]
    assert len(outcomes) == 8, outcomes
    assert len(winners) == 1, outcomes
    assert all("already used" in outcome for client_id, outcome in outcomes.items() if client_id != winners[0])
    assert list(EdgeDevice.objects.values_list("client_id", flat=True)) == winners
    assert AuditEvent.objects.filter(verb="federation.device.enrolled").count() == 1
