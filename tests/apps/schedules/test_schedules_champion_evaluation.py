"""The champion-evaluation schedule end to end through the evaluation worker: the champion (a real tiny model) is
scored and its scores recorded, and no approval is asked for a version that is already champion."""

from typing import Any

from django.db import transaction

from apps.accounts.choices import Role
from apps.federation.choices import TaskStatus
from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalRequest
from apps.governance.services import approve_version, request_approval
from apps.schedules.services import EVALUATE_CHAMPION_TASK, evaluate_champion
from tests.federation_world import WorkerWorld, base_template, world
from workers.evaluation import evaluate_version_task

__all__ = ["base_template", "world"]


def test_the_scheduled_evaluation_scores_the_champion_and_asks_no_approval(
    world: WorkerWorld,
    every_second: Any,
    user_factory: Any,
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = False
    officer, _ = user_factory("olivia-officer", Role.OFFICER)
    with django_capture_on_commit_callbacks(execute=False):
        approve_version(request_approval(world.base, actor=world.engineer), actor=officer, reason="first champion")
    schedule = every_second("champion-evaluation", EVALUATE_CHAMPION_TASK, seq_len=64)
    with django_capture_on_commit_callbacks(execute=False), transaction.atomic():
        task = evaluate_champion(schedule=schedule.name, params={"seq_len": 64})
    assert task is not None
    assert evaluate_version_task(task.pk) is None
    task.refresh_from_db()
    assert (task.status, task.error) == (TaskStatus.SUCCEEDED, "")
    scores = {row.domain: row.loss for row in world.base.evaluations.all()}
    assert sorted(scores) == ["medical", "recipes"]
    assert all(loss > 0 for loss in scores.values())
    # The only approval request is the one that made it champion.
    assert list(ApprovalRequest.objects.values_list("status", flat=True)) == [ApprovalStatus.APPROVED]
