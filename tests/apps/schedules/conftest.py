"""What the schedule tests share: periodic tasks that fire every second, and an aggregation task presumed lost (the
one thing the deadline check changes that a test can see without a model: `release_lost_aggregations` fails it)."""

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from apps.federation.models import TrainingTask
from apps.federation.services import create_training_task

# Long enough that nothing the test itself creates is presumed lost by accident; the lost task is backdated past it.
AGGREGATION_TIMEOUT_S = 600


@pytest.fixture
def every_second() -> Callable[..., PeriodicTask]:
    """A periodic task firing `task` every second with `kwargs` (what an operator enters in the admin)."""

    def build(name: str, task: str, **kwargs: Any) -> PeriodicTask:
        interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
        return PeriodicTask.objects.create(name=name, task=task, interval=interval, kwargs=json.dumps(kwargs))

    return build


@pytest.fixture
def lost_aggregation(
    cast: dict[str, Any],
    family_factory: Callable[..., Any],
    version_factory: Callable[..., Any],
    round_factory: Callable[..., Any],
    settings: Any,
) -> TrainingTask:
    """A pending aggregation task created longer than FEDNESTED_AGGREGATION_TIMEOUT_S ago: its message never reached
    a worker (no relay runs here), so the next deadline check fails it."""
    settings.FEDNESTED_AGGREGATION_TIMEOUT_S = AGGREGATION_TIMEOUT_S
    # The task's outbox row waits for a relay that never comes (in the embedded mode it would run at once).
    settings.FEDNESTED_JOBS_IN_PROCESS = False
    engineer = cast["engineer"].user
    v1 = version_factory(family_factory("tiny-moe", actor=engineer), "tiny-moe-v1", actor=engineer)
    window = round_factory(v1, actor=engineer, round_id="window-a")
    task = create_training_task(kind="expert_aggregation", actor=engineer, round_=window)
    backdated = timezone.now() - timedelta(seconds=AGGREGATION_TIMEOUT_S + 120)
    TrainingTask.objects.filter(pk=task.pk).update(created_at=backdated)
    return task
