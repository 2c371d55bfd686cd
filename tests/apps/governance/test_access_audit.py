"""Access decisions in the audit trail: refused API calls, console posts, forged form posts, failed sign-ins and
refused device certificates are audit events with the party's kind and the reason, never with a secret; the chain
still verifies; and a flood of refusals is bounded to one event per party and reason per window, with a count."""

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from django.core.cache import cache
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.test import Client, RequestFactory
from django.urls import reverse
from rest_framework.test import APIClient

from apps.accounts.models import ApiToken
from apps.accounts.refusals import REFUSED_VERB, record_access_refusal, window_keys
from apps.accounts.services import revoke_api_token
from apps.federation.services import revoke_device
from apps.governance.actors import Actor
from apps.governance.chain import verify_chain
from apps.governance.models import AuditEvent
from controlplane.api_errors import permission_denied
from tests.conftest import Member

pytestmark = pytest.mark.django_db

Capture = Callable[..., AbstractContextManager[Any]]
CONSOLE_PASSWORD = "access-audit-password-1"


def refusals() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(verb=REFUSED_VERB).order_by("id"))


def summary(event: AuditEvent) -> tuple[str, str, str, int | None]:
    return (event.actor_kind, event.actor_label, event.data["reason"], event.data.get("status"))


def test_refused_api_calls_name_the_party_and_the_reason_but_no_token(
    cast: dict[str, Member], django_capture_on_commit_callbacks: Capture
) -> None:
    engineer, device = cast["engineer"], cast["device"]
    assert engineer.user is not None
    forged_token = "fna_" + "x" * 40
    with django_capture_on_commit_callbacks(execute=True):
        unknown = APIClient(HTTP_AUTHORIZATION=f"Token {forged_token}").get("/api/v1/audit-events/")
        anonymous = APIClient().get("/api/v1/audit-events/")
        refused = engineer.client.post("/api/v1/approvals/1/approve/", {"reason": "mine"}, format="json")
        by_device = device.client.get("/api/v1/audit-events/?actor_label=x")
        token = ApiToken.objects.get(user=engineer.user)
        revoke_api_token(token, actor=Actor.automation("tests"))
        revoked = engineer.client.get("/api/v1/approvals/")
    assert [r.status_code for r in (unknown, anonymous, refused, by_device, revoked)] == [401, 401, 403, 403, 401]
    events = refusals()
    assert [summary(e) for e in events] == [
        ("anonymous", "anonymous", "unknown_token", 401),
        ("anonymous", "anonymous", "not_authenticated", 401),
        ("person", "eric-engineer", "permission_denied", 403),
        ("device", "device:car-0001", "permission_denied", 403),
        ("person", "eric-engineer", "token_revoked", 401),
    ]
    assert events[2].actor == engineer.user
    assert events[2].data["where"] == "API POST /api/v1/approvals/1/approve/"
    assert events[2].data["detail"] == "your role may not do this"
    # No token (not even the revoked one's prefix), no query string, no request body.
    stored = json.dumps([(e.actor_label, e.data) for e in events])
    assert forged_token not in stored
    assert token.key_prefix not in stored
    assert "actor_label=x" not in stored
    assert "mine" not in stored
    report = verify_chain()
    assert report.ok, report.broken
    assert report.unsealed == 0


def test_refused_console_posts_forged_posts_and_failed_sign_ins(
    cast: dict[str, Member], django_capture_on_commit_callbacks: Capture
) -> None:
    device, outsider, officer = cast["device"], cast["outsider"], cast["officer"]
    assert device.user is not None
    assert outsider.user is not None
    assert officer.user is not None
    officer.user.set_password(CONSOLE_PASSWORD)
    officer.user.save()
    decide = reverse("console:decide-approval", args=[1])
    with django_capture_on_commit_callbacks(execute=True):
        for member in (device, outsider):
            client = Client()
            assert member.user is not None
            client.force_login(member.user)
            assert client.post(decide, {"decision": "approve", "reason": "ok"}).status_code == 403
        # A forged post: another site's form, with the officer's session cookie but no CSRF token.
        forged = Client(enforce_csrf_checks=True)
        forged.force_login(officer.user)
        assert forged.post(decide, {"decision": "approve", "reason": "ok"}).status_code == 403
        sign_in = reverse("console:sign-in")
        assert Client().post(sign_in, {"username": "olivia-officer", "password": "wrong"}).status_code == 200
        typed = "my-password-typed-as-a-name"
        assert Client().post(sign_in, {"username": typed, "password": "x"}).status_code == 200
    events = refusals()
    assert [summary(e) for e in events] == [
        ("device", "device:car-0001", "forbidden", 403),
        ("person", "oscar-outsider", "forbidden", 403),
        ("person", "olivia-officer", "csrf_failed", 403),
        ("person", "olivia-officer", "sign_in_failed", None),
        ("anonymous", "anonymous", "sign_in_failed", None),
    ]
    assert events[0].data["where"] == f"console POST {decide}"
    assert "This page is for" in events[0].data["detail"]
    assert typed not in json.dumps([e.data for e in events])
    assert verify_chain().ok


def test_a_revoked_device_certificate_is_refused_and_recorded_against_the_device(
    cast: dict[str, Member], settings: Any, django_capture_on_commit_callbacks: Capture
) -> None:
    settings.FEDNESTED_PROXY_SECRET = "proxy-secret-for-tests"
    device = cast["device"].device
    assert device is not None
    revoke_device(device, actor=cast["officer"].user, reason="stolen")
    client = APIClient(
        HTTP_X_FEDNESTED_PROXY_SECRET="proxy-secret-for-tests",
        HTTP_X_FEDNESTED_CLIENT_CN="car-0001",
        # Any well-formed serial: a revoked device is refused before its certificate is looked at.
        HTTP_X_FEDNESTED_CLIENT_SERIAL="abc123",
        HTTP_X_FEDNESTED_CLIENT_OU="device",
    )
    strangers = APIClient(
        HTTP_X_FEDNESTED_PROXY_SECRET="proxy-secret-for-tests",
        HTTP_X_FEDNESTED_CLIENT_CN="car-9999",
        HTTP_X_FEDNESTED_CLIENT_SERIAL="abc123",
        HTTP_X_FEDNESTED_CLIENT_OU="device",
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert client.get("/api/v1/devices/").status_code == 401
        assert strangers.get("/api/v1/devices/").status_code == 401
    # A certificate name that matches no device never becomes a label (it would widen the flood bound's keys).
    assert [summary(e) for e in refusals()] == [
        ("device", "device:car-0001", "revoked_client", 401),
        ("anonymous", "anonymous", "unknown_client", 401),
    ]
    assert verify_chain().ok


def test_a_flood_of_refusals_is_one_event_per_window_with_the_count(
    cast: dict[str, Member], django_capture_on_commit_callbacks: Capture
) -> None:
    flood = APIClient(HTTP_AUTHORIZATION="Token fna_flood")
    engineer = cast["engineer"]
    with django_capture_on_commit_callbacks(execute=True):
        for _ in range(120):
            assert flood.get("/api/v1/audit-events/").status_code == 401
        for _ in range(10):
            assert engineer.client.get("/api/v1/audit-events/").status_code == 403
    # One per party and reason in the window, however many requests.
    assert [summary(e) for e in refusals()] == [
        ("anonymous", "anonymous", "unknown_token", 401),
        ("person", "eric-engineer", "permission_denied", 403),
    ]
    # The window passes (its gate expires): the next refusal is recorded with the count of those not recorded.
    gate, _ = window_keys(Actor.anonymous(), "unknown_token")
    assert cache.get(gate) is not None
    cache.delete(gate)
    with django_capture_on_commit_callbacks(execute=True):
        assert flood.get("/api/v1/audit-events/").status_code == 401
    last = refusals()[-1]
    assert (last.actor_label, last.data["reason"], last.data["repeats_since_last_event"]) == (
        "anonymous",
        "unknown_token",
        119,
    )
    assert len(refusals()) == 3
    assert verify_chain().ok


def test_window_zero_records_every_refusal(settings: Any) -> None:
    settings.FEDNESTED_ACCESS_AUDIT_WINDOW = 0
    party = Actor.device("car-0001")
    for _ in range(3):
        assert record_access_refusal(party, reason="revoked_client", where="API GET /x", status=401) is not None
    assert len(refusals()) == 3
    # A reason that is not a code (it could carry input) is recorded as `other`.
    event = record_access_refusal(party, reason="Token fna_secret", where="API GET /x", status=401)
    assert event is not None
    assert event.data["reason"] == "other"


def test_what_django_refuses_outside_the_api_and_console_is_recorded_too(cast: dict[str, Member]) -> None:
    # handler403: a view outside the API and the console (the admin's, say) raised PermissionDenied.
    request = RequestFactory().post("/admin/accounts/user/1/delete/")
    request.user = cast["outsider"].user  # type: ignore[assignment]
    response = permission_denied(request, DjangoPermissionDenied("not a staff member"))
    assert response.status_code == 403
    (event,) = refusals()
    assert summary(event) == ("person", "oscar-outsider", "forbidden", 403)
    assert event.data["where"] == "web POST /admin/accounts/user/1/delete/"
    assert event.data["detail"] == "not a staff member"
