"""The permission matrix: every endpoint and method, for each member of the fixed cast, driven by one table.

Each row names the request and the status code each member gets; a refused write must leave the database as it was.
"""

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from apps.accounts.models import ApiToken, User
from apps.accounts.refusals import REFUSED_VERB
from apps.dataengine.models import DataEngineRule, DataEngineTrigger, DeviceSignal
from apps.dataengine.services import save_rule
from apps.federation.models import EdgeDevice, EnrollmentToken, Round, StagedPayload, TrainingTask, Update
from apps.federation.services import (
    create_training_task,
    issue_enrollment_token,
    parse_update_envelope,
    store_update_payload,
)
from apps.governance.models import ApprovalDecision, ApprovalRequest, AuditEvent
from apps.governance.services import approve_version, request_approval
from apps.registry.models import Alias, LineageEdge, ModelFamily, ModelVersion, VersionArtifact, VersionEvaluation
from apps.registry.storage import artifact_root
from tests.device_keys import DEVICE_KEYS, device_csr

World = dict[str, Any]
Body = Callable[[World], dict[str, Any]] | None


@dataclass(frozen=True)
class Row:
    """One request and the status code for officer, engineer, device, outsider, anonymous (in that order)."""

    method: str
    path: str
    codes: tuple[int, int, int, int, int]
    body: Body = None
    note: str = field(default="", compare=False)
    # A raw octet-stream body (payload uploads) instead of JSON.
    raw: bytes | None = None
    # The status of an allowed request whose outcome is itself recorded (an update rejected on its content): the
    # database changes although the status is >= 400.
    recorded: int | None = None


READ_ALL_BUT_DEVICE = (200, 200, 403, 403, 401)
READ_WITH_DEVICE = (200, 200, 200, 403, 401)
ENGINEER_WRITES = (403, 201, 403, 403, 401)
ENGINEER_ACTS = (403, 200, 403, 403, 401)
OFFICER_ACTS = (200, 403, 403, 403, 401)
DEVICE_ACTS = (403, 403, 200, 403, 401)
PAYLOAD = b"adapter payload stand-in" * 8


def version_body(world: World) -> dict[str, Any]:
    """A registration of tiny-moe-v9, whose file the artifact store holds (written here)."""
    content = b"core weights of tiny-moe-v9"
    folder = artifact_root() / "versions" / "tiny-moe-v9"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "core.safetensors").write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    return {
        "family": "tiny-moe",
        "version_id": "tiny-moe-v9",
        "parent": "tiny-moe-v1",
        "manifest": {"version_id": "tiny-moe-v9", "files": {"core.safetensors": sha}},
        "artifact_uri": "artifacts://versions/tiny-moe-v9",
        "artifacts": [
            {"file_name": "core.safetensors", "sha256": sha, "size_bytes": len(content), "partition": "core"}
        ],
        "datasets": ["synthetic-v2"],
    }


def envelope_body(world: World) -> dict[str, Any]:
    """car-0001's signed envelope for its own staged upload: the device is allowed to submit it, and the update
    service records it (as rejected: this world's versions are registry entries without model files)."""
    body: dict[str, Any] = world["signed_envelope"]
    return body


ROWS = [
    Row("get", "/api/v1/me/", (200, 200, 200, 403, 401)),
    # registry
    Row("get", "/api/v1/families/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/families/", ENGINEER_WRITES, lambda w: {"name": "other-moe", "architecture": "Qwen2Moe"}),
    Row("get", "/api/v1/families/tiny-moe/", READ_ALL_BUT_DEVICE),
    Row("put", "/api/v1/families/tiny-moe/", (405, 405, 403, 403, 401), lambda w: {"name": "x", "architecture": "y"}),
    Row("delete", "/api/v1/families/tiny-moe/", (405, 405, 403, 403, 401)),
    Row("get", "/api/v1/versions/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/versions/", ENGINEER_WRITES, version_body),
    Row("get", "/api/v1/versions/tiny-moe-v1/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/versions/tiny-moe-v1/lineage/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/versions/tiny-moe-v1/evaluations/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/versions/tiny-moe-v1/files/manifest.json/", READ_WITH_DEVICE, note="v1 is the champion"),
    Row(
        "get",
        "/api/v1/versions/tiny-moe-v2/files/manifest.json/",
        (200, 200, 404, 403, 401),
        note="devices download only the champion",
    ),
    Row("get", "/api/v1/versions/tiny-moe-v1/files/nope.bin/", (404, 404, 404, 403, 401)),
    Row("post", "/api/v1/versions/tiny-moe-v1/files/manifest.json/", (405, 405, 403, 403, 401)),
    Row("patch", "/api/v1/versions/tiny-moe-v1/", (405, 405, 403, 403, 401), lambda w: {"manifest": {"x": 1}}),
    Row("delete", "/api/v1/versions/tiny-moe-v1/", (405, 405, 403, 403, 401)),
    Row("get", "/api/v1/aliases/", READ_WITH_DEVICE),
    Row("get", "/api/v1/aliases/champion/", READ_WITH_DEVICE),
    Row("get", "/api/v1/aliases/candidate/", (200, 200, 404, 403, 401), note="devices see only champion"),
    Row("post", "/api/v1/aliases/candidate/move/", ENGINEER_ACTS, lambda w: {"version": "tiny-moe-v2"}),
    Row("post", "/api/v1/aliases/champion/move/", (403, 403, 403, 403, 401), lambda w: {"version": "tiny-moe-v2"}),
    # federation
    Row("get", "/api/v1/devices/", READ_WITH_DEVICE),
    Row("get", "/api/v1/devices/car-0001/", READ_WITH_DEVICE),
    Row("get", "/api/v1/devices/car-0002/", (200, 200, 404, 403, 401), note="a device sees only itself"),
    Row("post", "/api/v1/devices/car-0002/revoke/", ENGINEER_ACTS, lambda w: {"reason": "lost"}),
    Row("delete", "/api/v1/devices/car-0002/", (405, 405, 405, 403, 401)),
    Row("post", "/api/v1/devices/car-0001/heartbeat/", DEVICE_ACTS, lambda w: {"current_version": "tiny-moe-v1"}),
    Row(
        "post",
        "/api/v1/devices/car-0002/heartbeat/",
        (403, 403, 403, 403, 401),
        lambda w: {"current_version": "tiny-moe-v1"},
        note="a device reports for itself only",
    ),
    Row("get", "/api/v1/devices/car-0001/heartbeat/", (405, 405, 405, 403, 401)),
    Row("get", "/api/v1/enrollment-tokens/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/enrollment-tokens/", ENGINEER_WRITES, lambda w: {"note": "for car-0100"}),
    Row("get", "/api/v1/enrollment-tokens/{enrollment_token}/", READ_ALL_BUT_DEVICE),
    Row(
        "post",
        "/api/v1/enroll/",
        (201, 201, 201, 201, 201),
        lambda w: {"token": w["enrollment_plaintext"], "client_id": "car-0099", "csr": device_csr("car-0099")},
        note="the token is the credential",
    ),
    Row("get", "/api/v1/rounds/", READ_WITH_DEVICE),
    Row(
        "post",
        "/api/v1/rounds/",
        ENGINEER_WRITES,
        lambda w: {
            "base_version": "tiny-moe-v1",
            "buffer_size_k": 3,
            "deadline_at": (timezone.now() + timedelta(hours=2)).isoformat(),
        },
    ),
    Row("get", "/api/v1/rounds/round-a/", READ_WITH_DEVICE),
    Row("post", "/api/v1/rounds/round-a/close/", ENGINEER_ACTS, lambda w: {"reason": "enough"}),
    Row("get", "/api/v1/tasks/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/tasks/", ENGINEER_WRITES, lambda w: {"kind": "expert_aggregation", "round": "round-a"}),
    Row("get", "/api/v1/tasks/{task}/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/updates/", READ_WITH_DEVICE),
    Row("get", "/api/v1/updates/{own_update}/", READ_WITH_DEVICE),
    Row("get", "/api/v1/updates/{other_update}/", (200, 200, 404, 403, 401), note="a device sees only its updates"),
    Row(
        "post",
        "/api/v1/updates/",
        (403, 403, 422, 403, 401),
        envelope_body,
        note="the device may submit; its update is recorded as rejected (no model files behind tiny-moe-v1)",
        recorded=422,
    ),
    Row("delete", "/api/v1/updates/{own_update}/", (405, 405, 405, 403, 401)),
    Row("put", "/api/v1/updates/{new_update}/payload/", (403, 403, 201, 403, 401), raw=PAYLOAD),
    Row(
        "put",
        "/api/v1/updates/{others_payload}/payload/",
        (403, 403, 403, 403, 401),
        raw=PAYLOAD,
        note="another device's update id",
    ),
    Row("get", "/api/v1/updates/{new_update}/payload/", (405, 405, 405, 403, 401)),
    # governance
    Row("get", "/api/v1/approvals/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/approvals/", ENGINEER_WRITES, lambda w: {"version": "tiny-moe-v3", "note": "please"}),
    Row("get", "/api/v1/approvals/{approval}/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/approvals/{approval}/approve/", OFFICER_ACTS, lambda w: {"reason": "evaluated"}),
    Row("post", "/api/v1/approvals/{approval}/reject/", OFFICER_ACTS, lambda w: {"reason": "regresses medical"}),
    Row("delete", "/api/v1/approvals/{approval}/", (405, 405, 403, 403, 401)),
    Row("get", "/api/v1/audit-events/", (200, 403, 403, 403, 401)),
    Row("get", "/api/v1/audit-events/{audit_event}/", (200, 403, 403, 403, 401)),
    Row("delete", "/api/v1/audit-events/{audit_event}/", (405, 403, 403, 403, 401)),
    # schedules (read-only: edited in the admin)
    Row("get", "/api/v1/schedules/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/schedules/{schedule}/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/schedules/", (405, 405, 403, 403, 401), lambda w: {"name": "x", "task": "y"}),
    Row("delete", "/api/v1/schedules/{schedule}/", (405, 405, 403, 403, 401)),
    # data engine: signals and triggers are read-only; engineers write rules
    Row("get", "/api/v1/data-engine/signals/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/data-engine/signals/{signal}/", READ_ALL_BUT_DEVICE),
    Row("post", "/api/v1/data-engine/signals/", (405, 405, 403, 403, 401), lambda w: {"domain": "medical"}),
    Row("get", "/api/v1/data-engine/rules/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/data-engine/rules/{rule}/", READ_ALL_BUT_DEVICE),
    Row(
        "post",
        "/api/v1/data-engine/rules/",
        ENGINEER_WRITES,
        lambda w: {"name": "legal-uncovered", "kind": "uncovered_domain", "task_kind": "evaluation"},
    ),
    Row("patch", "/api/v1/data-engine/rules/{rule}/", ENGINEER_ACTS, lambda w: {"enabled": False}),
    Row("delete", "/api/v1/data-engine/rules/{rule}/", (405, 405, 403, 403, 401)),
    Row("get", "/api/v1/data-engine/triggers/", READ_ALL_BUT_DEVICE),
    Row("get", "/api/v1/data-engine/triggers/{trigger}/", READ_ALL_BUT_DEVICE),
    Row("delete", "/api/v1/data-engine/triggers/{trigger}/", (405, 405, 403, 403, 401)),
    # schema and docs are public
    Row("get", "/api/v1/schema/", (200, 200, 200, 200, 200)),
    Row("get", "/api/v1/docs/", (200, 200, 200, 200, 200)),
]

CAST_ORDER = ("officer", "engineer", "device", "outsider", "anonymous")
CASES = [
    pytest.param(row, member, row.codes[index], id=f"{row.method.upper()} {row.path} as {member}")
    for row in ROWS
    for index, member in enumerate(CAST_ORDER)
]

SNAPSHOT_MODELS = [
    User,
    ModelFamily,
    ModelVersion,
    VersionArtifact,
    LineageEdge,
    Alias,
    VersionEvaluation,
    EdgeDevice,
    EnrollmentToken,
    Round,
    TrainingTask,
    Update,
    StagedPayload,
    ApprovalRequest,
    ApprovalDecision,
    AuditEvent,
    PeriodicTask,
    DeviceSignal,
    DataEngineRule,
    DataEngineTrigger,
]


def snapshot() -> dict[str, list[dict[str, Any]]]:
    """Every row of every domain table (API tokens without last_used_at, which authentication touches)."""
    rows = {model.__name__: list(model.objects.order_by("pk").values()) for model in SNAPSHOT_MODELS}
    rows["ApiToken"] = list(ApiToken.objects.order_by("pk").values("id", "user_id", "key_sha256", "revoked_at"))
    # A refusal is itself an audit event (apps.accounts.refusals); what must not change is everything else.
    rows["AuditEvent"] = list(AuditEvent.objects.exclude(verb=REFUSED_VERB).order_by("pk").values())
    return rows


@pytest.fixture
def world(
    cast: dict[str, Any],
    family_factory: Callable[..., Any],
    version_factory: Callable[..., Any],
    round_factory: Callable[..., Any],
    device_factory: Callable[..., Any],
    envelope_factory: Callable[..., Any],
    update_row_factory: Callable[..., Any],
    settings: Any,
    tmp_path: Path,
) -> World:
    """One of everything, so every detail and action endpoint has a target."""
    settings.FEDNESTED_ARTIFACT_ROOT = tmp_path / "artifacts"
    engineer, officer = cast["engineer"].user, cast["officer"].user
    family = family_factory("tiny-moe", actor=engineer)
    v1 = version_factory(family, "tiny-moe-v1", actor=engineer)
    approve_version(request_approval(v1, actor=engineer), actor=officer, reason="first champion")
    v2 = version_factory(family, "tiny-moe-v2", parent=v1, actor=engineer)
    version_factory(family, "tiny-moe-v3", parent=v1, actor=engineer)
    from apps.registry.services import move_alias

    move_alias(name="candidate", version=v1, actor=engineer)
    approval = request_approval(v2, actor=engineer)
    round_a = round_factory(v1, actor=engineer, round_id="round-a")
    other_device, _ = device_factory(engineer, "car-0002")
    others_payload = str(uuid.uuid4())
    store_update_payload(
        other_device,
        others_payload,
        _Body(b"the other device's payload"),
        declared_sha256=hashlib.sha256(b"the other device's payload").hexdigest(),
        content_length=None,
        max_bytes=1024,
        root=settings.FEDNESTED_ARTIFACT_ROOT,
    )
    own_update = update_row_factory(cast["device"].device, "tiny-moe-v1")
    other_update = update_row_factory(other_device, "tiny-moe-v1")
    staged_id = str(uuid.uuid4())
    staged = store_update_payload(
        cast["device"].device,
        staged_id,
        _Body(b"car-0001's payload"),
        declared_sha256=hashlib.sha256(b"car-0001's payload").hexdigest(),
        content_length=None,
        max_bytes=1024,
        root=settings.FEDNESTED_ARTIFACT_ROOT,
    )
    envelope = envelope_factory(client_id="car-0001", base_version="tiny-moe-v1", round_id="round-a")
    envelope |= {
        "update_id": staged_id,
        "payload": {"uri": staged.uri, "sha256": staged.sha256, "size_bytes": staged.bytes},
    }
    signing_key = DEVICE_KEYS[cast["device"].device.client_id]  # type: ignore[union-attr]
    signed = parse_update_envelope(envelope).signed(signing_key).model_dump(mode="json", by_alias=True)
    task = create_training_task(kind="expert_aggregation", actor=engineer, round_=round_a)
    token, plaintext = issue_enrollment_token(actor=engineer, note="spare")
    every_hour, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.HOURS)
    schedule = PeriodicTask.objects.create(
        name="matrix-deadlines", task="workers.schedules.close_due_windows_task", interval=every_hour
    )
    rule = save_rule(
        actor=engineer,
        name="medical-loss-rising",
        kind="rising_loss",
        task_kind="evaluation",
        task_params={"version_id": "tiny-moe-v1"},
    )
    signal = DeviceSignal.objects.create(
        device=cast["device"].device,
        client_id="car-0001",
        domain="automotive",
        loss=1.5,
        tokens=256,
        version="tiny-moe-v1",
        outcome="succeeded",
        schema_version=2,
        source="telemetry.edge[0]@0",
        report_sha256="0" * 64,
        reported_at=timezone.now(),
    )
    trigger = DataEngineTrigger.objects.create(
        rule=rule,
        domain="automotive",
        evidence={"signal_ids": [signal.pk]},
        task_id="dataengine-1",
        task_kind="evaluation",
    )
    return {
        "cast": cast,
        "envelope_factory": envelope_factory,
        "signal": signal.pk,
        "rule": rule.pk,
        "trigger": trigger.pk,
        "approval": approval.pk,
        "task": task.pk,
        "signed_envelope": signed,
        "own_update": own_update.update_id,
        "other_update": other_update.update_id,
        "enrollment_token": token.pk,
        "enrollment_plaintext": plaintext,
        "new_update": str(uuid.uuid4()),
        "others_payload": others_payload,
        "audit_event": AuditEvent.objects.order_by("pk").first().pk,  # type: ignore[union-attr]
        "schedule": schedule.pk,
    }


class _Body:
    """A request body read once, like a request's input stream."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    def read(self, size: int, /) -> bytes:
        chunk, self.content = self.content[:size], self.content[size:]
        return chunk


@pytest.mark.parametrize(("row", "member", "expected"), CASES)
def test_permission_matrix(world: World, row: Row, member: str, expected: int) -> None:
    client = world["cast"][member].client
    path = row.path.format(**world)
    body = row.body(world) if row.body is not None else None
    before = snapshot()
    if row.raw is not None:
        response = getattr(client, row.method)(
            path,
            data=row.raw,
            content_type="application/octet-stream",
            HTTP_X_CONTENT_SHA256=hashlib.sha256(row.raw).hexdigest(),
        )
    elif body is not None:
        response = getattr(client, row.method)(path, data=body, format="json")
    else:
        response = getattr(client, row.method)(path)
    assert response.status_code == expected, f"{row.method.upper()} {path} as {member}: {response.content[:300]!r}"
    if row.method != "get" and expected >= 400 and expected != row.recorded:
        assert snapshot() == before, f"refused {row.method.upper()} {path} as {member} changed the database"
