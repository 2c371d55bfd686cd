"""The schedules' services: the default schedules, a core update started with a schedule's params (refused params
recorded on the schedule, never raised), the champion's evaluation, the deadline check."""

import importlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from django.apps import apps as django_apps
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.models import TrainingTask
from apps.governance.services import approve_version, request_approval
from apps.schedules.choices import OutcomeStatus
from apps.schedules.models import ScheduleOutcome
from apps.schedules.services import (
    CLOSE_DUE_WINDOWS_TASK,
    EVALUATE_CHAMPION_TASK,
    SCHEDULED_TASKS,
    START_CORE_UPDATE_TASK,
    close_due_windows,
    evaluate_champion,
    start_core_update,
)

pytestmark = pytest.mark.django_db

defaults = importlib.import_module("apps.schedules.migrations.0002_default_schedules")


def test_the_data_migration_creates_the_defaults_once_and_leaves_an_operators_edits_alone() -> None:
    # A transactional test elsewhere may have flushed the rows the migration made: make them again, as it does.
    PeriodicTask.objects.filter(name__in=[d["name"] for d in defaults.DEFAULTS]).delete()
    defaults.create_defaults(django_apps, None)
    rows = {row.name: row for row in PeriodicTask.objects.filter(name__in=[d["name"] for d in defaults.DEFAULTS])}
    assert {name: (row.task, row.enabled) for name, row in rows.items()} == {
        "aggregation-deadlines": (CLOSE_DUE_WINDOWS_TASK, True),
        "core-update-nightly": (START_CORE_UPDATE_TASK, False),
        "champion-evaluation-nightly": (EVALUATE_CHAMPION_TASK, False),
    }
    assert {row.task for row in rows.values()} == set(SCHEDULED_TASKS)
    assert rows["aggregation-deadlines"].interval is not None
    assert rows["aggregation-deadlines"].interval.every == 5
    assert str(rows["core-update-nightly"].crontab).startswith("0 2 * * *")
    # An operator enables the core update with params; running the migration's function again changes nothing.
    PeriodicTask.objects.filter(name="core-update-nightly").update(enabled=True, kwargs='{"max_steps": 3}')
    defaults.create_defaults(django_apps, None)
    again = PeriodicTask.objects.get(name="core-update-nightly")
    assert (again.enabled, again.kwargs) == (True, '{"max_steps": 3}')
    assert PeriodicTask.objects.filter(task__in=SCHEDULED_TASKS).count() == 3


def test_a_core_update_schedule_with_bad_params_records_an_error_and_creates_nothing(
    every_second: Callable[..., PeriodicTask],
) -> None:
    schedule = every_second("core-update-bad", START_CORE_UPDATE_TASK, datasets="not a list", bogus=1)
    params = json.loads(schedule.kwargs)
    for run in (1, 2):
        assert start_core_update(schedule=schedule.name, params=params) is None
        outcome = ScheduleOutcome.objects.get(periodic_task=schedule)
        assert outcome.status == OutcomeStatus.ERROR
        assert outcome.consecutive_errors == run
    assert outcome.detail.startswith("no core_update task created: ")
    # What was wrong is named: either the params, or (on a control plane without the core-update worker) the kind.
    assert "bogus" in outcome.detail or "no worker runs core_update" in outcome.detail, outcome.detail
    assert not TrainingTask.objects.filter(kind=TaskKind.CORE_UPDATE).exists()


def test_a_run_sent_by_hand_records_nothing_and_an_unknown_schedule_is_ignored() -> None:
    assert start_core_update(schedule=None, params={"bogus": 1}) is None
    assert start_core_update(schedule="deleted-since-it-fired", params={"bogus": 1}) is None
    assert not ScheduleOutcome.objects.exists()


def test_the_champion_evaluation_evaluates_whatever_champion_is_current(
    cast: dict[str, Any],
    family_factory: Callable[..., Any],
    version_factory: Callable[..., Any],
    every_second: Callable[..., PeriodicTask],
    artifact_store: Any,
    settings: Any,
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = False
    engineer, officer = cast["engineer"].user, cast["officer"].user
    schedule = every_second("champion-evaluation", EVALUATE_CHAMPION_TASK)
    assert evaluate_champion(schedule=schedule.name, params={}) is None
    outcome = ScheduleOutcome.objects.get(periodic_task=schedule)
    assert (outcome.status, outcome.detail) == (
        OutcomeStatus.ERROR,
        "no evaluation task created: no version is champion yet",
    )

    family = family_factory("tiny-moe", actor=engineer)
    v1 = version_factory(family, "tiny-moe-v1", actor=engineer)
    approve_version(request_approval(v1, actor=engineer), actor=officer, reason="first champion")
    # No held-out sets in the store yet: the evaluation is refused at creation, as through the API.
    assert evaluate_champion(schedule=schedule.name, params={}) is None
    outcome.refresh_from_db()
    assert "heldout_dir: no held-out sets" in outcome.detail
    assert outcome.consecutive_errors == 2

    (artifact_store / "heldout").mkdir()
    (artifact_store / "heldout" / "medical.jsonl").write_text('{"text": "a held-out row", "domain": "medical"}\n')
    task = evaluate_champion(schedule=schedule.name, params={"seq_len": 64})
    assert task is not None
    assert (task.kind, task.status, task.params) == (
        TaskKind.EVALUATION,
        TaskStatus.PENDING,
        {"version_id": "tiny-moe-v1", "seq_len": 64},
    )
    outcome.refresh_from_db()
    assert (outcome.status, outcome.training_task, outcome.consecutive_errors) == (OutcomeStatus.OK, task, 0)
    # The version is chosen when it fires; a schedule that names one is refused.
    assert evaluate_champion(schedule=schedule.name, params={"version_id": "tiny-moe-v1"}) is None
    outcome.refresh_from_db()
    assert "version_id is chosen when the schedule fires" in outcome.detail


def test_the_deadline_check_fails_a_lost_aggregation_and_records_its_run(
    lost_aggregation: TrainingTask, every_second: Callable[..., PeriodicTask]
) -> None:
    schedule = every_second("deadlines", CLOSE_DUE_WINDOWS_TASK)
    assert close_due_windows(schedule=schedule.name, now=timezone.now()) == []
    lost_aggregation.refresh_from_db()
    assert lost_aggregation.status == TaskStatus.FAILED
    assert "presumed lost" in lost_aggregation.error
    outcome = ScheduleOutcome.objects.get(periodic_task=schedule)
    assert (outcome.status, outcome.detail) == (OutcomeStatus.OK, "no window was due")
