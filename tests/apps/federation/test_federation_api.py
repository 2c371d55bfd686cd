"""Federation REST API: enrollment tokens, rounds, tasks, update submission and listing, device revocation."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from apps.federation.models import Update
from apps.registry.models import ModelFamily, ModelVersion
from fednested.identity.keys import generate_private_key
from tests.device_keys import device_csr
from tests.federation_world import WorkerWorld, enroll

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
    enrolled = cast["anonymous"].client.post(
        "/api/v1/enroll/", {"token": secret, "client_id": "car-9", "csr": device_csr("car-9")}, format="json"
    )
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


def test_a_round_with_unusable_safeguards_is_refused_with_the_reason(cast: dict[str, Any], v1: ModelVersion) -> None:
    engineer = cast["engineer"].client
    body = {"base_version": "tiny-moe-v1", "buffer_size_k": 2, "deadline_at": (timezone.now() + timedelta(hours=1))}
    for safeguards, problem in (
        ({"ewc_lambda": -1}, "ewc_lambda"),
        ({"distill_temprature": 2}, "unknown keys ['distill_temprature']"),
        ("strong", "must be an object of SafeguardConfig fields"),
        ({"ewc_lambda": 1.5}, "version 'tiny-moe-v1' ships no fisher.safetensors: configure FEDNESTED_FISHER"),
    ):
        refused = engineer.post("/api/v1/rounds/", {**body, "config": {"safeguards": safeguards}}, format="json")
        assert refused.status_code == 400, refused.content
        assert problem in str(refused.json()["config"])
    # freezing needs no file: the round opens, its config carries the section to the devices
    opened = engineer.post("/api/v1/rounds/", {**body, "config": {"safeguards": {"freeze_layers": [0]}}}, format="json")
    assert opened.status_code == 201, opened.content
    assert opened.json()["config"] == {"safeguards": {"freeze_layers": [0]}}


def test_engineer_opens_a_synchronous_round_with_a_cohort(cast: dict[str, Any], v1: ModelVersion) -> None:
    engineer = cast["engineer"].client
    deadline = (timezone.now() + timedelta(hours=3)).isoformat()
    body = {"base_version": "tiny-moe-v1", "buffer_size_k": 1, "deadline_at": deadline, "round_id": "sync-1"}
    opened = engineer.post("/api/v1/rounds/", {**body, "mode": "sync", "cohort": ["car-0001"]}, format="json")
    assert opened.status_code == 201, opened.content
    assert {key: opened.json()[key] for key in ("mode", "cohort", "series", "sequence", "candidate", "record")} == {
        "mode": "sync",
        "cohort": ["car-0001"],
        "series": "sync-1",
        "sequence": 1,
        "candidate": None,
        "record": {},
    }
    no_cohort = engineer.post("/api/v1/rounds/", {**body, "round_id": "sync-2", "mode": "sync"}, format="json")
    assert (no_cohort.status_code, no_cohort.json()) == (
        400,
        {"cohort": ["a synchronous round needs a cohort of at least one device"], "code": "invalid"},
    )
    stranger = engineer.post(
        "/api/v1/rounds/", {**body, "round_id": "sync-3", "mode": "sync", "cohort": ["car-9999"]}, format="json"
    )
    assert stranger.status_code == 400
    assert "car-9999" in str(stranger.json()["cohort"])
    huge = engineer.post("/api/v1/rounds/", {**body, "round_id": "big", "buffer_size_k": 10**9}, format="json")
    assert huge.status_code == 400
    assert "buffer_size_k" in huge.json()


def test_device_submits_its_updates_and_sees_rejections(
    world: WorkerWorld, make_update: Callable[..., Any], user_factory: Callable[..., Any]
) -> None:
    """POST /api/v1/updates/ goes through the same update service as the bus: every check, one transaction."""
    car = enroll(world, "car-1")
    device = APIClient()
    device.credentials(HTTP_AUTHORIZATION=f"Token {car.api_token}")
    envelope, _ = make_update(car)
    body = envelope.model_dump(mode="json", by_alias=True)
    first = device.post("/api/v1/updates/", body, format="json")
    assert first.status_code == 201, first.content
    assert (first.json()["status"], first.json()["staleness"], first.json()["rejection"]) == ("buffered", 0, None)
    resend = device.post("/api/v1/updates/", body, format="json")
    assert (resend.status_code, resend.json()["update_id"]) == (200, first.json()["update_id"])
    assert Update.objects.count() == 1

    # Another device's envelope: refused (no row) whatever its signature, since the sender is authenticated.
    other = enroll(world, "car-2")
    theirs, _ = make_update(other)
    impersonation = device.post("/api/v1/updates/", theirs.model_dump(mode="json", by_alias=True), format="json")
    assert (impersonation.status_code, impersonation.json()["code"]) == (403, "not_owner")
    assert "for itself only" in impersonation.json()["detail"]
    # A forged signature on the device's own envelope: refused.
    forged, _ = make_update(car)
    forged = forged.signed(generate_private_key())
    refused = device.post("/api/v1/updates/", forged.model_dump(mode="json", by_alias=True), format="json")
    assert (refused.status_code, refused.json()["code"], refused.json()["status"]) == (403, "bad_signature", "refused")
    # A content problem: recorded as rejected, the row in the answer.
    stale, _ = make_update(car, base_version="v1", round_id="round-unknown")
    rejected = device.post("/api/v1/updates/", stale.model_dump(mode="json", by_alias=True), format="json")
    assert (rejected.status_code, rejected.json()["code"]) == (422, "unknown_round")
    assert rejected.json()["record"]["status"] == "rejected"
    broken = device.post("/api/v1/updates/", dict(body, payload={"uri": "x"}), format="json")
    assert broken.status_code == 400
    assert "payload.sha256" in str(broken.json()["envelope"])
    assert device.post("/api/v1/updates/", [1, 2], format="json").status_code == 400

    engineer = APIClient()
    engineer.credentials(HTTP_AUTHORIZATION=f"Token {user_factory('erik', 'engineer')[1]}")
    listed = engineer.get("/api/v1/updates/", {"status": "rejected"}).json()
    assert [row["rejection"]["code"] for row in listed["results"]] == ["unknown_round"]
    assert engineer.get("/api/v1/updates/", {"client_id": "car-1"}).json()["count"] == 2
    assert engineer.get("/api/v1/updates/", {"status": "buffered"}).json()["count"] == 1
    # Devices see their own updates only.
    assert {row["client_id"] for row in device.get("/api/v1/updates/").json()["results"]} == {"car-1"}


def test_engineer_revokes_a_device_which_then_cannot_authenticate(cast: dict[str, Any]) -> None:
    response = cast["engineer"].client.post("/api/v1/devices/car-0001/revoke/", {"reason": "stolen"}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "revoked"
    assert cast["device"].client.get("/api/v1/me/").status_code == 401
    missing_reason = cast["engineer"].client.post("/api/v1/devices/car-0001/revoke/", {}, format="json")
    assert missing_reason.status_code == 400
    assert "reason" in missing_reason.json()
