"""Federation services: device revocation, rounds, training tasks and their dispatch, edge updates — each audited."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import RoundStatus, TaskStatus, UpdateStatus
from apps.federation.models import EdgeDevice, Round, TrainingTask, Update
from apps.federation.services import (
    claim_round_for_aggregation,
    close_round,
    create_training_task,
    fail_training_task,
    finish_training_task,
    mark_updates_applied,
    open_round,
    parse_update_envelope,
    reject_update,
    revoke_device,
    start_training_task,
)
from apps.governance.actors import Actor
from apps.governance.models import AuditEvent
from apps.registry.models import ModelFamily, ModelVersion

pytestmark = pytest.mark.django_db


@pytest.fixture
def engineer(user_factory: Callable[[str, str], tuple[User, str]]) -> User:
    return user_factory("eric-engineer", Role.ENGINEER)[0]


@pytest.fixture
def base(family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]) -> ModelVersion:
    return version_factory(family_factory(), "tiny-moe-v1")


def open_on(base: ModelVersion, engineer: User) -> Round:
    return open_round(
        base_version=base, buffer_size_k=2, deadline_at=timezone.now() + timedelta(hours=1), actor=engineer
    )


def test_revoked_device_loses_its_token_and_cannot_submit(
    engineer: User, base: ModelVersion, device_factory: Callable[..., Any], envelope_factory: Callable[..., Any]
) -> None:
    device, token = device_factory(engineer, "car-1")
    revoke_device(device, actor=engineer, reason="stolen")
    row = EdgeDevice.objects.get(pk=device.pk)
    assert (row.status, row.revoked_at is not None, row.user.is_active) == ("revoked", True, False)
    event = AuditEvent.objects.get(verb="federation.device.revoked")
    assert (event.actor, event.data) == (
        engineer,
        {"client_id": "car-1", "reason": "stolen", "keys_revoked": 1, "updates_rejected": []},
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/me/").status_code == 401
    with pytest.raises(ValidationError, match="already revoked"):
        revoke_device(device, actor=engineer, reason="again")
    with pytest.raises(ValidationError, match="say why"):
        revoke_device(device, actor=engineer, reason=" ")


def test_round_lifecycle_claims_once_and_is_audited(engineer: User, base: ModelVersion) -> None:
    round_ = open_round(
        base_version=base,
        buffer_size_k=3,
        deadline_at=timezone.now() + timedelta(hours=1),
        actor=engineer,
        round_id="round-1",
        config={"staleness_exponent": 0.5},
    )
    assert AuditEvent.objects.get(verb="federation.round.opened").data == {
        "round_id": "round-1",
        "mode": "async",
        "base_version": "tiny-moe-v1",
        "k": 3,
        "cohort": [],
        "adopted": [],
    }
    assert claim_round_for_aggregation(round_, actor=Actor.automation("worker:aggregation")) is True
    assert claim_round_for_aggregation(round_, actor=Actor.automation("worker:aggregation-2")) is False
    assert AuditEvent.objects.filter(verb="federation.round.aggregating").count() == 1
    close_round(round_, actor=Actor.automation("worker:aggregation"))
    assert round_.status == RoundStatus.CLOSED
    assert round_.closed_at is not None
    with pytest.raises(ValidationError, match="already closed"):
        close_round(round_, actor=engineer)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"buffer_size_k": 0}, r"K must lie in \[1, 10000\], got 0"),
        ({"deadline_at": timezone.now() - timedelta(seconds=1)}, "is not in the future"),
        ({"round_id": "bad id"}, "must use only"),
    ],
)
def test_open_round_rejects_bad_settings(
    engineer: User, base: ModelVersion, changes: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {
        "base_version": base,
        "buffer_size_k": 2,
        "deadline_at": timezone.now() + timedelta(hours=1),
        "actor": engineer,
    }
    arguments.update(changes)
    with pytest.raises(ValidationError, match=message):
        open_round(**arguments)


def test_round_start_is_published_after_commit_only(
    engineer: User, base: ModelVersion, settings: Any, tmp_path: Any
) -> None:
    from apps.federation.events import bus_settings
    from fednested.messaging import Topic, make_bus

    settings.FEDNESTED_BUS = "embedded"
    settings.FEDNESTED_BUS_PATH = tmp_path / "bus.sqlite3"
    from apps.outbox.handlers import Delivery
    from workers.relay.relay import relay_batch

    deadline = timezone.now() + timedelta(hours=1)
    open_round(base_version=base, buffer_size_k=2, deadline_at=deadline, actor=engineer, round_id="round-7")
    # The RoundStart waits in the outbox, written with the round; the relay publishes it.
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 1
    with make_bus(bus_settings()) as bus, bus.consumer("tests-round-start", [Topic.CONTROL_ROUNDS]) as consumer:
        message = consumer.poll(5.0)
    assert message is not None
    assert message.event is not None
    assert message.key == "round-7"
    assert message.event.model_dump()["round_id"] == "round-7"
    assert message.event.model_dump()["base_version"] == "tiny-moe-v1"


def test_training_task_is_started_only_after_commit(
    engineer: User, base: ModelVersion, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    from apps.outbox.models import OutboxEvent

    settings.FEDNESTED_JOBS_IN_PROCESS = False
    round_ = open_on(base, engineer)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        task = create_training_task(kind="expert_aggregation", actor=engineer, round_=round_)
    # The job is handed over through the outbox (the relay sends it once the row committed): nothing of it ran
    # inside the transaction, and with a broker nothing waits for the commit in this process either — only the
    # audit trail's sealer, which chains the task's audit event once it is committed.
    from apps.governance.chain import _seal_after_commit

    assert [callback for callback in callbacks if callback is not _seal_after_commit] == []
    row = OutboxEvent.objects.get(kind="celery_task", key=str(task.pk))
    assert (row.topic, row.payload, row.sent_at) == (
        "workers.aggregation.aggregate_round_task",
        {"task": "workers.aggregation.aggregate_round_task", "args": [task.pk]},
        None,
    )
    assert TrainingTask.objects.get(pk=task.pk).status == TaskStatus.PENDING


def test_training_task_status_moves_once(engineer: User, base: ModelVersion) -> None:
    task = create_training_task(kind="expert_aggregation", actor=engineer, round_=open_on(base, engineer))
    assert start_training_task(task.pk, actor=Actor.automation("worker:training")) is True
    assert start_training_task(task.pk, actor=Actor.automation("worker:training-2")) is False
    assert finish_training_task(task.pk, actor=Actor.automation("worker:training")) is True
    assert TrainingTask.objects.get(pk=task.pk).status == TaskStatus.SUCCEEDED
    assert fail_training_task(task.pk, error="late failure", actor=Actor.automation()) is False
    verbs = list(
        AuditEvent.objects.filter(object_id=str(task.pk), object_type="federation.trainingtask").values_list(
            "verb", flat=True
        )
    )
    assert sorted(verbs) == ["federation.task.created", "federation.task.running", "federation.task.succeeded"]
    with pytest.raises(ValidationError, match="unknown task kind 'dance'"):
        create_training_task(kind="dance", actor=engineer)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"update_id": "not-a-uuid"}, "field 'update_id'"),
        ({"routed_tokens": {"expert-0": 3}}, "routed_tokens"),
        ({"examples": 2**31}, "field 'examples'"),
        ({"schema_version": 9}, "unknown version 9 of schema 'UpdateEnvelope'"),
        ({"metrics": {"loss": float("nan")}}, "not JSON-serialisable"),
    ],
)
def test_envelopes_that_break_the_wire_schema_are_refused_with_the_field(
    envelope_factory: Callable[..., Any], changes: dict[str, Any], message: str
) -> None:
    envelope = dict(envelope_factory(client_id="car-1", base_version="tiny-moe-v1"), **changes)
    with pytest.raises(ValidationError, match=message):
        parse_update_envelope(envelope)


def test_update_status_transitions_and_rejection_are_audited(
    engineer: User,
    base: ModelVersion,
    device_factory: Callable[..., Any],
    update_row_factory: Callable[..., Any],
    version_factory: Callable[..., ModelVersion],
) -> None:
    device, _ = device_factory(engineer, "car-1")
    first, second = update_row_factory(device, "tiny-moe-v1"), update_row_factory(device, "tiny-moe-v1")
    v2 = version_factory(base.family, "tiny-moe-v2", parent=base)
    mark_updates_applied([first], version=v2, actor=Actor.automation("worker:aggregation"))
    assert (first.status, first.applied_in) == (UpdateStatus.APPLIED, v2)
    with pytest.raises(ValidationError, match="is applied; only buffered can become rejected"):
        reject_update(first, "stale_base", "too old", actor=Actor.automation())
    with pytest.raises(ValidationError, match="is applied; only buffered can become applied"):
        mark_updates_applied([first], version=v2, actor=Actor.automation("worker:aggregation"))

    reject_update(second, "non_finite", "expert 0.1 delta has NaN at row 3", actor=Actor.automation("worker:ingest"))
    row = Update.objects.get(pk=second.pk)
    assert (row.status, row.rejection_code, row.rejection_message) == (
        "rejected",
        "non_finite",
        "expert 0.1 delta has NaN at row 3",
    )
    rejected = AuditEvent.objects.get(verb="federation.update.rejected")
    assert (rejected.actor_label, rejected.data["code"], rejected.data["from"]) == (
        "worker:ingest",
        "non_finite",
        "buffered",
    )
    with pytest.raises(ValidationError, match="lowercase identifier"):
        reject_update(second, "Bad Code", "x", actor=Actor.automation())
    applied_verbs = AuditEvent.objects.filter(object_id=str(first.pk), object_type="federation.update").values_list(
        "verb", flat=True
    )
    assert list(applied_verbs) == ["federation.update.applied"]
