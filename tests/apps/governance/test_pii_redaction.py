"""PII redaction where free text enters storage, on PostgreSQL: audit payloads (single and bulk), update rejection
messages (from a device's own fields), approval, rejection and override reasons, and failed tasks' errors. Each place
stores no planted value and its audit event records which entity types were replaced and how many."""

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import TaskStatus, UpdateStatus
from apps.federation.models import TrainingTask, Update
from apps.federation.services import create_training_task, fail_training_task, reject_update
from apps.federation.updates import Arrival, submit_updates
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.governance.chain import verify_chain
from apps.governance.models import ApprovalDecision, ApprovalRequest, AuditEvent, GateOverride
from apps.governance.services import (
    approve_version,
    grant_gate_override,
    reject_version,
    request_approval,
    request_gate_override,
)
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import move_alias, set_version_status
from fednested.governance.pii import REDACTED_KEY, RedactionConfig
from tests.apps.governance.test_promotion_gate import V1, V2, evaluate
from tests.federation_world import (
    LAYER0_DOWN,
    WorkerWorld,
    base_template,
    enroll,
    random_adapters,
    signed_envelope,
    world,
    write_payload,
)

__all__ = ["base_template", "world"]

pytestmark = pytest.mark.django_db

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"  # passes the Luhn check
IBAN = "GB82 WEST 1234 5698 7654 32"
IPV4 = "192.168.10.7"
IPV6 = "2001:db8::8a2e:370:7334"
PLANTED = (EMAIL, PHONE, CARD, IBAN, IPV4, IPV6)
TEXT = f"contact {EMAIL} or {PHONE}; card {CARD}; IBAN {IBAN}; seen from {IPV4} and {IPV6}"
COUNTS = {"CREDIT_CARD": 1, "EMAIL_ADDRESS": 1, "IBAN_CODE": 1, "IP_ADDRESS": 2, "PHONE_NUMBER": 1}


def assert_clean(stored: Any) -> None:
    """No planted value in `stored` (a text or a whole JSON payload), spaced or not."""
    text = stored if isinstance(stored, str) else json.dumps(stored)
    squeezed = text.replace(" ", "")
    for value in PLANTED:
        assert value not in text, (value, text)
        assert value.replace(" ", "") not in squeezed, (value, text)


@pytest.fixture(autouse=True)
def anchors_in_tmp(settings: Any, tmp_path: Path) -> None:
    settings.FEDNESTED_AUDIT_ANCHOR_FILE = tmp_path / "anchors.jsonl"
    settings.FEDNESTED_JOBS_IN_PROCESS = False


@pytest.fixture
def people(user_factory: Callable[[str, str], tuple[User, str]]) -> dict[str, User]:
    return {
        "engineer": user_factory("eric-engineer", Role.ENGINEER)[0],
        "officer": user_factory("olivia-officer", Role.OFFICER)[0],
        "officer2": user_factory("otto-officer", Role.OFFICER)[0],
    }


def test_audit_data_is_redacted_before_the_row_is_sealed(django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        event = record_audit_event(
            actor=Actor.automation("tests"),
            verb="tests.pii.noted",
            data={"note": TEXT, "nested": {"to": [EMAIL, 7]}, "count": 3},
        )
    stored = AuditEvent.objects.get(pk=event.pk)
    assert stored.data == {
        "note": "contact <EMAIL_ADDRESS> or <PHONE_NUMBER>; card <CREDIT_CARD>; IBAN <IBAN_CODE>; "
        "seen from <IP_ADDRESS> and <IP_ADDRESS>",
        "nested": {"to": ["<EMAIL_ADDRESS>", 7]},
        "count": 3,
        REDACTED_KEY: {**COUNTS, "EMAIL_ADDRESS": 2},
    }
    # The chain sealed the redacted payload: it verifies, and no unredacted copy of it was ever stored.
    assert stored.seq is not None
    report = verify_chain()
    assert report.ok, report.broken


def test_with_redaction_off_audit_data_is_stored_as_given(settings: Any) -> None:
    settings.FEDNESTED_PII_REDACTION = RedactionConfig(enabled=False)
    event = record_audit_event(actor=Actor.automation("tests"), verb="tests.pii.noted", data={"note": TEXT})
    assert AuditEvent.objects.get(pk=event.pk).data == {"note": TEXT}


def test_a_refused_and_a_rejected_update_store_no_pii_from_the_device(world: WorkerWorld) -> None:
    """A bus message whose decoding failed (the problem quotes the device's text) is refused; an envelope naming a
    round that does not exist (its round id is the device's own text) is recorded rejected; one batch, both paths."""
    car = enroll(world, "car-a")
    update_id = str(uuid.uuid4())
    payload = write_payload(world, car, update_id, random_adapters(world.shapes, {LAYER0_DOWN: [1]}, 0))
    # Identifiers carry no whitespace: the planted values run together with commas.
    compact = ",".join(value.replace(" ", "") for value in PLANTED)
    envelope = signed_envelope(car, payload, update_id=update_id, round_id=f"ask,{compact}")
    outcomes = submit_updates(
        [
            Arrival(where="fednested.updates[0]@1", problem=f"field 'note' is not allowed: {TEXT!r}"),
            Arrival(where="fednested.updates[0]@2", envelope=envelope),
        ],
        actor=Actor.automation("worker:ingest"),
    )
    assert [outcome.status for outcome in outcomes] == ["refused", "rejected"]
    refused = AuditEvent.objects.get(verb="federation.update.refused")
    assert_clean(refused.data)
    assert refused.data[REDACTED_KEY] == COUNTS
    row = Update.objects.get(update_id=update_id)
    assert row.status == UpdateStatus.REJECTED
    assert row.rejection_message == (
        "round 'ask,<EMAIL_ADDRESS>,<PHONE_NUMBER>,<CREDIT_CARD>,<IBAN_CODE>,<IP_ADDRESS>,<IP_ADDRESS>' does not exist"
    )
    rejected = AuditEvent.objects.get(verb="federation.update.rejected", object_id=str(row.pk))
    assert rejected.data["message"] == row.rejection_message
    assert rejected.data[REDACTED_KEY] == COUNTS
    # The envelope itself is the device's signed record and is kept as sent: the API serves it to engineers only.


def test_approval_notes_and_decision_reasons_are_redacted(
    people: dict[str, User], family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    family = family_factory()
    v1 = version_factory(family, "tiny-moe-v1")
    v2 = version_factory(family, "tiny-moe-v2", parent=v1)
    asked = request_approval(v1, actor=people["engineer"], note=f"questions to {EMAIL}")
    approve_version(asked, actor=people["officer"], reason=TEXT)
    declined = request_approval(v2, actor=people["engineer"], note="second try")
    reject_version(declined, actor=people["officer"], reason=f"card {CARD} was in the eval set")

    assert ApprovalRequest.objects.get(pk=asked.pk).note == "questions to <EMAIL_ADDRESS>"
    approved = ApprovalDecision.objects.get(request=asked)
    assert_clean(approved.reason)
    assert approved.reason.startswith("contact <EMAIL_ADDRESS> or <PHONE_NUMBER>")
    assert ApprovalDecision.objects.get(request=declined).reason == "card <CREDIT_CARD> was in the eval set"
    events = {event.verb: event for event in AuditEvent.objects.filter(verb__startswith="governance.approval.")}
    assert events["governance.approval.requested"].data[REDACTED_KEY] == {"EMAIL_ADDRESS": 1}
    assert events["governance.approval.approved"].data[REDACTED_KEY] == COUNTS
    assert events["governance.approval.rejected"].data[REDACTED_KEY] == {"CREDIT_CARD": 1}
    for event in events.values():
        assert_clean(event.data)


def test_gate_override_reasons_are_redacted(
    people: dict[str, User],
    family_factory: Callable[..., ModelFamily],
    version_factory: Callable[..., ModelVersion],
    settings: Any,
    tmp_path: Path,
) -> None:
    family = family_factory()
    v1 = version_factory(family, "v1")
    set_version_status(v1, VersionStatus.CHAMPION, actor=Actor.automation("tests"))
    move_alias(name=CHAMPION_ALIAS, version=v1, actor=Actor.automation("tests"))
    evaluate(v1, V1, None)
    v2 = version_factory(family, "v2", parent=v1)
    evaluate(v2, V2, V1)
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"protected": {"code": {"max_increase_nats": 0.1}}}))
    settings.FEDNESTED_PROMOTION_GATE = str(gate)
    approval = request_approval(v2, actor=people["engineer"])
    override = request_gate_override(approval, actor=people["officer"], reason=f"ask {PHONE} first; {IBAN}")
    grant_gate_override(override, actor=people["officer2"], reason=f"agreed with {EMAIL} from {IPV6}")

    stored = GateOverride.objects.get(pk=override.pk)
    assert (stored.reason, stored.grant_reason) == (
        "ask <PHONE_NUMBER> first; <IBAN_CODE>",
        "agreed with <EMAIL_ADDRESS> from <IP_ADDRESS>",
    )
    asked = AuditEvent.objects.get(verb="governance.gate.override_requested")
    granted = AuditEvent.objects.get(verb="governance.gate.override_granted")
    assert asked.data[REDACTED_KEY] == {"IBAN_CODE": 1, "PHONE_NUMBER": 1}
    assert granted.data[REDACTED_KEY] == {"EMAIL_ADDRESS": 1, "IP_ADDRESS": 1}
    assert_clean(asked.data)
    assert_clean(granted.data)


def test_failed_task_errors_and_aggregation_rejections_are_redacted(
    world: WorkerWorld, update_row_factory: Callable[..., Update]
) -> None:
    round_ = world.open_round()
    task = create_training_task(kind="expert_aggregation", actor=world.engineer, round_=round_)
    assert fail_training_task(
        task.pk, error=f"worker on {IPV4} could not mail {EMAIL}", actor=Actor.automation("worker:x")
    )
    failed = TrainingTask.objects.get(pk=task.pk)
    assert (failed.status, failed.error) == (TaskStatus.FAILED, "worker on <IP_ADDRESS> could not mail <EMAIL_ADDRESS>")
    event = AuditEvent.objects.get(verb="federation.task.failed", object_id=str(task.pk))
    assert event.data == {
        "kind": "expert_aggregation",
        "error": failed.error,
        REDACTED_KEY: {"EMAIL_ADDRESS": 1, "IP_ADDRESS": 1},
    }

    car = enroll(world, "car-b")
    update = update_row_factory(car.row, "v1")
    reject_update(update, "non_finite", f"NaN in expert 0.1 from {IPV6}", actor=Actor.automation("worker:aggregation"))
    assert Update.objects.get(pk=update.pk).rejection_message == "NaN in expert 0.1 from <IP_ADDRESS>"
    rejected = AuditEvent.objects.get(verb="federation.update.rejected", object_id=str(update.pk))
    assert rejected.data[REDACTED_KEY] == {"IP_ADDRESS": 1}
    assert_clean(rejected.data)
