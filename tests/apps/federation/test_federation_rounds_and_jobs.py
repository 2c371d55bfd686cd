"""Round (aggregation window) lifecycle: config and mode checked at opening, waiting updates joining the next window
that fits, reopening after a failed aggregation, refused envelopes on record, and jobs that fail in the embedded mode
without breaking the caller."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import RoundMode, RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.jobs import IN_PROCESS, JOBS, AggregationParams, JobKind
from apps.federation.models import Round, TrainingTask, Update
from apps.federation.services import (
    claim_round_for_aggregation,
    close_round,
    create_training_task,
    open_round,
    record_refused_update,
    reopen_round_after_failure,
    revoke_device,
)
from apps.governance.actors import Actor
from apps.governance.models import AuditEvent
from apps.registry.models import ModelFamily, ModelVersion
from controlplane.celery import app as celery_app

pytestmark = pytest.mark.django_db


@celery_app.task(name="tests.federation.exploding_task")
def exploding_task(task_pk: int) -> None:
    """A real Celery task that fails the way a worker bug does."""
    raise RuntimeError(f"task {task_pk}: the aggregation blew up")


@pytest.fixture
def engineer(user_factory: Callable[[str, str], tuple[User, str]]) -> User:
    return user_factory("eric-engineer", Role.ENGINEER)[0]


@pytest.fixture
def base(family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]) -> ModelVersion:
    return version_factory(family_factory(), "tiny-moe-v1")


def open_on(base: ModelVersion, engineer: User, round_id: str, **config: Any) -> Round:
    deadline = timezone.now() + timedelta(hours=1)
    return open_round(
        base_version=base, buffer_size_k=2, deadline_at=deadline, actor=engineer, round_id=round_id, config=config
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"clip_norm": "big"}, "config: 'clip_norm' must be a number > 0, or null for no clipping, got 'big'"),
        ({"aggregation_method": "vote"}, "config key 'aggregation_method': config: unknown aggregation method 'vote'"),
        ({"max_staleness": -1}, "'max_staleness' must be an integer >= 0"),
        ({"max_payload_bytes": True}, "'max_payload_bytes' must be an integer > 0, got True"),
    ],
)
def test_open_round_checks_its_aggregation_settings(
    engineer: User, base: ModelVersion, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        open_on(base, engineer, "round-bad", **config)
    assert not Round.objects.exists()


def test_updates_waiting_without_a_window_join_the_next_one_that_fits(
    engineer: User,
    base: ModelVersion,
    device_factory: Callable[..., Any],
    update_row_factory: Callable[..., Any],
    version_factory: Callable[..., ModelVersion],
) -> None:
    device, _ = device_factory(engineer, "car-1")
    stranger, _ = device_factory(engineer, "car-2")
    other_base = version_factory(ModelFamily.objects.get(), "tiny-moe-v2", parent=base)
    waiting = update_row_factory(device, "tiny-moe-v1")
    elsewhere = update_row_factory(device, "tiny-moe-v2")
    outsider = update_row_factory(stranger, "tiny-moe-v1")
    rejected = update_row_factory(device, "tiny-moe-v1", status=UpdateStatus.REJECTED, code="too_stale", message="x")
    # A synchronous round takes only its cohort's updates on its base.
    sync = open_round(
        base_version=base,
        buffer_size_k=2,
        deadline_at=timezone.now() + timedelta(hours=1),
        actor=engineer,
        round_id="round-sync",
        mode=RoundMode.SYNC,
        cohort=[device],
    )
    assert list(Update.objects.filter(round=sync).values_list("update_id", flat=True)) == [waiting.update_id]
    # An asynchronous window takes every other waiting update, whatever its base: staleness is counted when it is
    # aggregated. Rejected updates stay where they are.
    window = open_on(other_base, engineer, "round-7")
    adopted = set(Update.objects.filter(round=window).values_list("update_id", flat=True))
    assert adopted == {elsewhere.update_id, outsider.update_id}
    assert Update.objects.get(pk=rejected.pk).round is None
    opened = AuditEvent.objects.get(verb="federation.round.opened", object_id=str(window.pk))
    assert sorted(opened.data["adopted"]) == sorted(adopted)
    assert (window.mode, window.series, window.sequence) == (RoundMode.ASYNC, "round-7", 1)


def test_rounds_are_opened_with_a_mode_that_fits_their_cohort(
    engineer: User, base: ModelVersion, device_factory: Callable[..., Any]
) -> None:
    device, _ = device_factory(engineer, "car-1")
    deadline = timezone.now() + timedelta(hours=1)
    with pytest.raises(ValidationError, match="a synchronous round needs a cohort"):
        open_round(base_version=base, buffer_size_k=1, deadline_at=deadline, actor=engineer, mode=RoundMode.SYNC)
    with pytest.raises(ValidationError, match="only synchronous rounds have a cohort"):
        open_round(base_version=base, buffer_size_k=1, deadline_at=deadline, actor=engineer, cohort=[device])
    with pytest.raises(ValidationError, match="mode must be one of async, sync"):
        open_round(base_version=base, buffer_size_k=1, deadline_at=deadline, actor=engineer, mode="lockstep")
    with pytest.raises(ValidationError, match="a window lasts at most 30 days"):
        open_round(base_version=base, buffer_size_k=1, deadline_at=deadline + timedelta(days=60), actor=engineer)
    with pytest.raises(ValidationError, match=r"K must lie in \[1, 10000\]"):
        open_round(base_version=base, buffer_size_k=10**6, deadline_at=deadline, actor=engineer)
    revoke_device(device, actor=engineer, reason="lost")
    with pytest.raises(ValidationError, match="devices car-1 are revoked"):
        open_round(
            base_version=base,
            buffer_size_k=1,
            deadline_at=deadline,
            actor=engineer,
            mode=RoundMode.SYNC,
            cohort=[device],
        )
    assert Round.objects.count() == 0


def test_a_failed_aggregation_reopens_its_round_once(engineer: User, base: ModelVersion) -> None:
    round_ = open_on(base, engineer, "round-1")
    with pytest.raises(ValidationError, match="say why"):
        reopen_round_after_failure(round_, reason=" ", actor=Actor.automation("worker:aggregation"))
    assert (
        reopen_round_after_failure(round_, reason="not claimed", actor=Actor.automation("worker:aggregation")) is False
    )
    assert claim_round_for_aggregation(round_, actor=Actor.automation("worker:aggregation")) is True
    assert (
        reopen_round_after_failure(round_, reason="OSError: disk full", actor=Actor.automation("worker:aggregation"))
        is True
    )
    assert Round.objects.get(pk=round_.pk).status == RoundStatus.OPEN
    [event] = AuditEvent.objects.filter(verb="federation.round.reopened")
    assert (event.actor_label, event.data) == (
        "worker:aggregation",
        {"round_id": "round-1", "reason": "OSError: disk full"},
    )
    # The round can be claimed again; once closed, a late failure report changes nothing.
    assert claim_round_for_aggregation(round_, actor=Actor.automation("worker:aggregation")) is True
    close_round(round_, actor=Actor.automation("worker:aggregation"))
    assert reopen_round_after_failure(round_, reason="late", actor=Actor.automation("worker:aggregation")) is False
    assert Round.objects.get(pk=round_.pk).status == RoundStatus.CLOSED


def test_refused_envelopes_are_recorded_against_the_device_they_name(
    engineer: User, device_factory: Callable[..., Any]
) -> None:
    device, _ = device_factory(engineer, "car-1")
    event = record_refused_update(
        code="bad_signature",
        message="signature does not verify",
        where="updates.experts.local[0]@17",
        key="car-1",
        update_id="5b1b3c3e-0000-4000-8000-000000000001",
        client_id="car-1",
        actor=Actor.automation("worker:ingest"),
    )
    assert (event.verb, event.object_type, event.object_id) == (
        "federation.update.refused",
        "federation.edgedevice",
        str(device.pk),
    )
    assert event.data["code"] == "bad_signature"
    anonymous = record_refused_update(
        code="malformed",
        message="not JSON",
        where="updates.experts.local[0]@18",
        actor=Actor.automation("worker:ingest"),
    )
    assert (anonymous.object_type, anonymous.data["key"]) == ("", None)
    with pytest.raises(ValidationError, match="lowercase identifier"):
        record_refused_update(code="Bad Code", message="x", where="w", actor=Actor.automation("worker:ingest"))
    assert AuditEvent.objects.filter(verb="federation.update.refused").count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_job_failing_in_the_embedded_mode_is_recorded_and_the_caller_goes_on(
    engineer: User, base: ModelVersion, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = True
    monkeypatch.setitem(
        JOBS, TaskKind.EXPERT_AGGREGATION, JobKind("tests.federation.exploding_task", AggregationParams)
    )
    round_ = open_on(base, engineer, "round-x")
    # Neither call raises, although each job does: they run in the jobs thread, after their rows committed.
    first = create_training_task(kind=TaskKind.EXPERT_AGGREGATION, actor=engineer, round_=round_)
    second = create_training_task(kind=TaskKind.EXPERT_AGGREGATION, actor=engineer, round_=round_)
    assert IN_PROCESS.wait_idle(60), "the jobs still run after 60 s"
    for task in (first, second):
        failed = TrainingTask.objects.get(pk=task.pk)
        assert failed.status == TaskStatus.FAILED
        assert failed.error == f"RuntimeError: task {task.pk}: the aggregation blew up"
    assert AuditEvent.objects.filter(verb="federation.task.failed").count() == 2
    assert Update.objects.filter(status=UpdateStatus.APPLIED).count() == 0
