"""Federation REST API: enrollment tokens, rounds, tasks, update submission and listing, device revocation."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from apps.federation.models import Update
from apps.federation.services import reject_update
from apps.registry.models import ModelFamily, ModelVersion

pytestmark = pytest.mark.django_db


@pytest.fixture
def v1(family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]) -> ModelVersion:
    return version_factory(family_factory(), "tiny-moe-v1")


def test_enrollment_token_secret_appears_only_at_creation(cast: dict[str, Any]) -> None:
    engineer = cast["engineer"].client
    created = engineer.post("/api/v1/enrollment-tokens/", {"note": "for car-9", "ttl_seconds": 3600}, format="json")
    assert created.status_code == 201
    secret = created.json()["token"]
    assert secret.startswith(created.json()["token_prefix"])
    listed = engineer.get("/api/v1/enrollment-tokens/", {"used": "false"}).json()
    assert secret not in str(listed)
    assert "car-9" in str(listed)
    enrolled = cast["anonymous"].client.post("/api/v1/enroll/", {"token": secret, "client_id": "car-9"}, format="json")
    assert enrolled.status_code == 201
    used = engineer.get("/api/v1/enrollment-tokens/", {"used": "true"}).json()["results"]
    # The cast's device enrolled with a token too.
    assert sorted(t["used_by_client_id"] for t in used) == ["car-0001", "car-9"]


def test_engineer_opens_and_closes_rounds_and_creates_tasks(cast: dict[str, Any], v1: ModelVersion) -> None:
    engineer = cast["engineer"].client
    deadline = (timezone.now() + timedelta(hours=3)).isoformat()
    opened = engineer.post(
        "/api/v1/rounds/",
        {"base_version": "tiny-moe-v1", "buffer_size_k": 4, "deadline_at": deadline, "round_id": "round-1"},
        format="json",
    )
    assert opened.status_code == 201, opened.content
    assert (opened.json()["status"], opened.json()["opened_by"]) == ("open", "eric-engineer")
    bad = engineer.post(
        "/api/v1/rounds/", {"base_version": "tiny-moe-v1", "buffer_size_k": 0, "deadline_at": deadline}, format="json"
    )
    assert bad.status_code == 400
    assert "buffer_size_k" in bad.json()
    assert [
        r["round_id"] for r in cast["device"].client.get("/api/v1/rounds/", {"status": "open"}).json()["results"]
    ] == ["round-1"]
    task = engineer.post("/api/v1/tasks/", {"kind": "expert_aggregation", "round": "round-1"}, format="json")
    assert task.status_code == 201
    assert task.json()["status"] == "pending"
    assert task.json()["round"] == "round-1"
    closed = engineer.post("/api/v1/rounds/round-1/close/", {"cancel": True, "reason": "bad data"}, format="json")
    assert closed.json()["status"] == "cancelled"
    again = engineer.post("/api/v1/rounds/round-1/close/", {}, format="json")
    assert again.status_code == 400
    assert "already cancelled" in again.json()["status"][0]


def test_device_submits_its_updates_and_sees_rejections(
    cast: dict[str, Any], v1: ModelVersion, envelope_factory: Callable[..., Any], device_factory: Callable[..., Any]
) -> None:
    device = cast["device"].client
    envelope = envelope_factory(client_id="car-0001", base_version="tiny-moe-v1")
    first = device.post("/api/v1/updates/", envelope, format="json")
    assert first.status_code == 201, first.content
    assert first.json()["status"] == "received"
    assert first.json()["rejection"] is None
    resend = device.post("/api/v1/updates/", envelope, format="json")
    assert resend.status_code == 200
    assert resend.json()["update_id"] == first.json()["update_id"]

    other = envelope_factory(client_id="car-0002", base_version="tiny-moe-v1")
    impersonation = device.post("/api/v1/updates/", other, format="json")
    assert impersonation.status_code == 403
    assert "for itself only" in impersonation.json()["detail"]
    broken = device.post("/api/v1/updates/", dict(envelope, payload={"uri": "x"}), format="json")
    assert broken.status_code == 400
    assert "payload.sha256" in str(broken.json()["envelope"])
    assert device.post("/api/v1/updates/", [1, 2], format="json").status_code == 400

    update = Update.objects.get(update_id=first.json()["update_id"])
    reject_update(update, "norm_exceeded", "expert 0.0 delta norm 41.2 > clip 10.0", actor_label="worker:ingest")
    engineer = cast["engineer"].client
    rejected = engineer.get("/api/v1/updates/", {"status": "rejected"}).json()
    assert rejected["count"] == 1
    detail = engineer.get(f"/api/v1/updates/{update.update_id}/").json()
    assert detail["rejection"] == {"code": "norm_exceeded", "message": "expert 0.0 delta norm 41.2 > clip 10.0"}
    assert engineer.get("/api/v1/updates/", {"status": "received"}).json()["count"] == 0
    assert engineer.get("/api/v1/updates/", {"client_id": "car-0001"}).json()["count"] == 1


def test_engineer_revokes_a_device_which_then_cannot_authenticate(cast: dict[str, Any]) -> None:
    response = cast["engineer"].client.post("/api/v1/devices/car-0001/revoke/", {"reason": "stolen"}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "revoked"
    assert cast["device"].client.get("/api/v1/me/").status_code == 401
    missing_reason = cast["engineer"].client.post("/api/v1/devices/car-0001/revoke/", {}, format="json")
    assert missing_reason.status_code == 400
    assert "reason" in missing_reason.json()
