"""What the outer loop's periodic tasks do, as services the Celery tasks in workers/schedules.py call: close the
aggregation windows that are due, start a core update with a schedule's params, evaluate the champion. Each records
its outcome on the schedule (`ScheduleOutcome`), so a schedule whose params are wrong shows as an error in the API
and the admin instead of failing quietly in a worker's log.

Apps never import workers (ARCHITECTURE "Layout"): the Celery task names are declared here, beside what they run,
and the data migration that creates the default schedules names the same tasks.
"""

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from apps.accounts.services import system_user
from apps.federation.choices import TaskKind
from apps.federation.models import TrainingTask
from apps.federation.services import create_training_task
from apps.federation.updates import enqueue_due_windows
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias
from apps.schedules.choices import OutcomeStatus
from apps.schedules.models import MAX_DETAIL_CHARS, ScheduleOutcome

logger = logging.getLogger(__name__)

# The Celery tasks (workers/schedules.py) a periodic task may name; controlplane/celery.py routes workers.schedules.*
# to the `schedules` queue.
CLOSE_DUE_WINDOWS_TASK = "workers.schedules.close_due_windows_task"
START_CORE_UPDATE_TASK = "workers.schedules.start_core_update_task"
EVALUATE_CHAMPION_TASK = "workers.schedules.evaluate_champion_task"
SCHEDULED_TASKS = (CLOSE_DUE_WINDOWS_TASK, START_CORE_UPDATE_TASK, EVALUATE_CHAMPION_TASK)


def record_outcome(
    schedule: str | None,
    *,
    status: OutcomeStatus,
    detail: str,
    now: datetime,
    training_task: TrainingTask | None = None,
) -> ScheduleOutcome | None:
    """Write the last run of periodic task `schedule` (its name). None when the run came from no schedule (a task
    sent by hand) or the schedule was deleted since it fired: there is nothing to show the outcome on."""
    if not schedule:
        return None
    with transaction.atomic():
        periodic = PeriodicTask.objects.filter(name=schedule).first()
        if periodic is None:
            return None
        outcome = ScheduleOutcome.objects.select_for_update().filter(periodic_task=periodic).first()
        errors = (outcome.consecutive_errors if outcome is not None else 0) + 1 if status == OutcomeStatus.ERROR else 0
        values = {
            "ran_at": now,
            "status": status,
            "detail": detail[:MAX_DETAIL_CHARS],
            "training_task": training_task,
            "consecutive_errors": errors,
        }
        outcome, _ = ScheduleOutcome.objects.update_or_create(periodic_task=periodic, defaults=values)
    return outcome


def describe(error: ValidationError) -> str:
    """A ValidationError as one line per field: 'params: …; round: …'."""
    if hasattr(error, "error_dict"):
        return "; ".join(
            f"{field}: {message}" for field, messages in error.message_dict.items() for message in messages
        )
    return "; ".join(error.messages)


def close_due_windows(*, schedule: str | None, now: datetime | None = None) -> list[int]:
    """Aggregation tasks for the windows that became ready without an arrival (a deadline passed, the candidate they
    waited on was decided), after releasing aggregations presumed lost: `enqueue_due_windows`, which the ingest loop
    used to poll. Returns the tasks created."""
    now = now or timezone.now()
    created = enqueue_due_windows(now)
    detail = f"aggregation tasks {', '.join(map(str, created))}" if created else "no window was due"
    last = TrainingTask.objects.filter(pk=created[-1]).first() if created else None
    record_outcome(schedule, status=OutcomeStatus.OK, detail=detail, now=now, training_task=last)
    return created


def _create_scheduled_task(
    schedule: str | None, *, kind: TaskKind, params: dict[str, Any], now: datetime
) -> TrainingTask | None:
    """Create a `kind` task as the system account through `create_training_task` (which checks its params and what
    they refer to); a refusal is recorded on the schedule and logged, never raised, so one bad schedule costs
    nothing but its own runs."""
    try:
        with transaction.atomic():
            task = create_training_task(kind=kind, actor=system_user(), params=params)
            record_outcome(
                schedule, status=OutcomeStatus.OK, detail=f"{kind} task {task.pk} created", now=now, training_task=task
            )
    except ValidationError as error:
        detail = f"no {kind} task created: {describe(error)}"
        logger.error("schedule %r: %s", schedule, detail)
        record_outcome(schedule, status=OutcomeStatus.ERROR, detail=detail, now=now)
        return None
    logger.info("schedule %r: %s task %s created", schedule, kind, task.pk)
    return task


def start_core_update(
    *, schedule: str | None, params: Mapping[str, Any], now: datetime | None = None
) -> TrainingTask | None:
    """A core_update task with the schedule's params (the periodic task's kwargs), checked as the API checks them."""
    return _create_scheduled_task(schedule, kind=TaskKind.CORE_UPDATE, params=dict(params), now=now or timezone.now())


def evaluate_champion(
    *, schedule: str | None, params: Mapping[str, Any], now: datetime | None = None
) -> TrainingTask | None:
    """An evaluation task for the version the champion alias points to when the schedule fires; the schedule's params
    are the evaluation's other params (held-out folder, sequence length)."""
    now = now or timezone.now()
    if "version_id" in params:
        detail = (
            "no evaluation task created: params: version_id is chosen when the schedule fires (the champion); remove it"
        )
        record_outcome(schedule, status=OutcomeStatus.ERROR, detail=detail, now=now)
        logger.error("schedule %r: %s", schedule, detail)
        return None
    champion = Alias.objects.filter(name=CHAMPION_ALIAS).select_related("version").first()
    if champion is None:
        detail = f"no evaluation task created: no version is {CHAMPION_ALIAS} yet"
        record_outcome(schedule, status=OutcomeStatus.ERROR, detail=detail, now=now)
        logger.error("schedule %r: %s", schedule, detail)
        return None
    return _create_scheduled_task(
        schedule, kind=TaskKind.EVALUATION, params={"version_id": champion.version.version_id, **params}, now=now
    )
