"""Device endpoints of docs/api/device-protocol.md, server side: payload upload (claim check) and version heartbeat,
over the real REST API with the cast's enrolled device, against the real artifact store on disk."""

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.federation.models import EdgeDevice, StagedPayload
from apps.governance.models import AuditEvent
from apps.registry.models import ModelFamily, ModelVersion

pytestmark = pytest.mark.django_db

PAYLOAD = b"adapters-safetensors-stand-in" * 64


@pytest.fixture
def store(settings: Any, tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    settings.FEDNESTED_ARTIFACT_ROOT = root
    return root


def put_payload(client: APIClient, update_id: str, body: bytes, *, sha256: str | None = None) -> Any:
    return client.put(
        f"/api/v1/updates/{update_id}/payload/",
        data=body,
        content_type="application/octet-stream",
        HTTP_X_CONTENT_SHA256=sha256 if sha256 is not None else hashlib.sha256(body).hexdigest(),
    )


def stray_files(store: Path) -> list[str]:
    """Temporary upload files left behind (there should never be any)."""
    return [path.name for path in store.rglob(".*.part")]


def test_payload_is_stored_atomically_and_a_retry_gets_the_same_receipt(store: Path, cast: dict[str, Any]) -> None:
    device = cast["device"].client
    update_id = str(uuid.uuid4())
    created = put_payload(device, update_id, PAYLOAD)
    assert created.status_code == 201, created.content
    receipt = created.json()
    assert receipt == {
        "update_id": update_id,
        "uri": f"artifacts://updates/car-0001/{update_id}.safetensors",
        "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "bytes": len(PAYLOAD),
    }
    stored = store / "updates" / "car-0001" / f"{update_id}.safetensors"
    assert stored.read_bytes() == PAYLOAD
    row = StagedPayload.objects.get(update_id=update_id)
    assert (row.device, row.uri, row.size_bytes) == (cast["device"].device, receipt["uri"], len(PAYLOAD))

    retry = put_payload(device, update_id, PAYLOAD)
    assert (retry.status_code, retry.json()) == (200, receipt)
    assert StagedPayload.objects.count() == 1
    assert AuditEvent.objects.filter(verb="federation.update.payload_stored").count() == 1
    assert sorted(path.name for path in stored.parent.iterdir()) == [stored.name]
    assert stray_files(store) == []


def test_a_retry_restores_a_stored_copy_that_went_missing(store: Path, cast: dict[str, Any]) -> None:
    update_id = str(uuid.uuid4())
    receipt = put_payload(cast["device"].client, update_id, PAYLOAD).json()
    stored = store / "updates" / "car-0001" / f"{update_id}.safetensors"
    stored.unlink()
    again = put_payload(cast["device"].client, update_id, PAYLOAD)
    assert (again.status_code, again.json()) == (200, receipt)
    assert stored.read_bytes() == PAYLOAD


def test_different_bytes_under_a_stored_update_id_are_a_conflict(store: Path, cast: dict[str, Any]) -> None:
    update_id = str(uuid.uuid4())
    assert put_payload(cast["device"].client, update_id, PAYLOAD).status_code == 201
    conflict = put_payload(cast["device"].client, update_id, PAYLOAD + b"!")
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "conflict"
    assert hashlib.sha256(PAYLOAD).hexdigest() in conflict.json()["detail"]
    assert (store / "updates" / "car-0001" / f"{update_id}.safetensors").read_bytes() == PAYLOAD
    assert stray_files(store) == []


def test_another_devices_update_id_is_refused_and_its_payload_kept(
    store: Path, cast: dict[str, Any], device_factory: Callable[..., Any]
) -> None:
    _, other_token = device_factory(cast["engineer"].user, "car-0002")
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Token {other_token}")
    update_id = str(uuid.uuid4())
    assert put_payload(cast["device"].client, update_id, PAYLOAD).status_code == 201
    for body in (PAYLOAD, b"other bytes"):
        refused = put_payload(other, update_id, body)
        assert refused.status_code == 403
        assert refused.json()["code"] == "not_owner"
    assert not (store / "updates" / "car-0002").exists()
    assert StagedPayload.objects.get(update_id=update_id).device.client_id == "car-0001"


@pytest.mark.parametrize(
    ("update_id", "sha256", "status", "code"),
    [
        ("good", "0" * 64, 400, "sha256_mismatch"),
        ("good", "", 400, "sha256_missing"),
        ("good", "not-hex", 400, "sha256_missing"),
        ("not-a-uuid", None, 400, "invalid_update_id"),
        ("..%2F..%2Fescape", None, 404, None),  # not even routed: an update id has no slashes
    ],
)
def test_bad_uploads_are_refused_with_their_code_and_nothing_is_stored(
    store: Path, cast: dict[str, Any], update_id: str, sha256: str | None, status: int, code: str | None
) -> None:
    target = str(uuid.uuid4()) if update_id == "good" else update_id
    response = put_payload(cast["device"].client, target, PAYLOAD, sha256=sha256)
    assert response.status_code == status, response.content
    if code is not None:
        assert response.json()["code"] == code
    assert not StagedPayload.objects.exists()
    assert [path for path in store.rglob("*") if path.is_file()] == []


def test_oversized_payloads_get_413_before_or_while_reading(store: Path, cast: dict[str, Any], settings: Any) -> None:
    settings.FEDNESTED_MAX_UPDATE_BYTES = len(PAYLOAD) - 1
    response = put_payload(cast["device"].client, str(uuid.uuid4()), PAYLOAD)
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"payload is {len(PAYLOAD)} bytes, the server's limit is {len(PAYLOAD) - 1}",
        "code": "oversized",
    }
    assert not StagedPayload.objects.exists()
    settings.FEDNESTED_MAX_UPDATE_BYTES = len(PAYLOAD)
    assert put_payload(cast["device"].client, str(uuid.uuid4()), PAYLOAD).status_code == 201
    assert stray_files(store) == []


def test_only_devices_upload_payloads(store: Path, cast: dict[str, Any], user_factory: Callable[..., Any]) -> None:
    _, admin_token = user_factory("ada-admin", Role.ADMIN)
    admin = APIClient()
    admin.credentials(HTTP_AUTHORIZATION=f"Token {admin_token}")
    refused = put_payload(admin, str(uuid.uuid4()), PAYLOAD)
    assert (refused.status_code, refused.json()["code"]) == (403, "not_a_device")
    assert put_payload(cast["engineer"].client, str(uuid.uuid4()), PAYLOAD).status_code == 403
    assert put_payload(cast["anonymous"].client, str(uuid.uuid4()), PAYLOAD).status_code == 401
    assert not StagedPayload.objects.exists()


@pytest.fixture
def v1(family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]) -> ModelVersion:
    return version_factory(family_factory(), "tiny-moe-v1")


def test_heartbeat_sets_the_current_version_and_audits_each_change(cast: dict[str, Any], v1: ModelVersion) -> None:
    device = cast["device"].client
    before = EdgeDevice.objects.get(client_id="car-0001").last_seen
    response = device.post("/api/v1/devices/car-0001/heartbeat/", {"current_version": "tiny-moe-v1"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["client_id"], body["status"], body["current_version"]) == ("car-0001", "active", "tiny-moe-v1")
    row = EdgeDevice.objects.get(client_id="car-0001")
    assert row.current_version == v1
    assert before is not None
    assert row.last_seen is not None
    assert row.last_seen > before
    assert body["last_seen"] is not None
    device.post("/api/v1/devices/car-0001/heartbeat/", {"current_version": "tiny-moe-v1"}, format="json")
    events = AuditEvent.objects.filter(verb="federation.device.version_reported")
    assert [(event.actor_label, event.data["from"], event.data["to"]) for event in events] == [
        ("device:car-0001", None, "tiny-moe-v1")
    ]


def test_heartbeat_refuses_unknown_versions_and_other_devices(
    cast: dict[str, Any], v1: ModelVersion, device_factory: Callable[..., Any]
) -> None:
    device = cast["device"].client
    unknown = device.post("/api/v1/devices/car-0001/heartbeat/", {"current_version": "v404"}, format="json")
    assert unknown.status_code == 400
    assert unknown.json()["current_version"] == ["unknown version 'v404': the registry holds no version with that id"]
    device_factory(cast["engineer"].user, "car-0002")
    other = device.post("/api/v1/devices/car-0002/heartbeat/", {"current_version": "tiny-moe-v1"}, format="json")
    assert (other.status_code, other.json()["code"]) == (403, "not_owner")
    engineer = cast["engineer"].client.post(
        "/api/v1/devices/car-0001/heartbeat/", {"current_version": "tiny-moe-v1"}, format="json"
    )
    assert engineer.status_code == 403
    assert EdgeDevice.objects.get(client_id="car-0002").current_version is None
    assert EdgeDevice.objects.get(client_id="car-0001").current_version is None
