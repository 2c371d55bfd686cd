"""evaluate_version_task: per-domain held-out scores of a version, recorded, and an approval request to officers."""

import math
import shutil
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.services import system_user
from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.models import TrainingTask
from apps.federation.services import create_training_task, open_round
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.governance.services import approve_version
from fednested.checkpoints import load_version
from fednested.data import read_jsonl
from fednested.data.tokenizer import load_tokenizer
from fednested.evaluation.domains import EvalConfig, evaluate_records
from tests.federation_world import WorkerWorld
from workers.evaluation import evaluate_version_task


def evaluation_task(world: WorkerWorld, django_capture_on_commit_callbacks: Any, **params: Any) -> TrainingTask:
    round_ = world.open_round()
    with django_capture_on_commit_callbacks(execute=False):
        return create_training_task(
            kind=TaskKind.EVALUATION,
            actor=None,
            round_=round_,
            params={"version_id": "v1", **params},
        )


def test_version_is_scored_per_domain_and_sent_for_approval(
    world: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    task = evaluation_task(world, django_capture_on_commit_callbacks)
    request_pk = evaluate_version_task(task.pk)
    assert TrainingTask.objects.get(pk=task.pk).status == TaskStatus.SUCCEEDED
    [event] = AuditEvent.objects.filter(verb="registry.version.evaluated")
    scores = event.data["domains"]
    assert sorted(scores) == ["medical", "recipes"]
    model, _ = load_version(world.root / "versions" / "v1")
    tokenizer = load_tokenizer(world.root / "versions" / "v1")
    medical = evaluate_records(
        model, tokenizer, read_jsonl(world.root / "heldout" / "medical.jsonl").records, EvalConfig(seq_len=256)
    )
    assert scores["medical"]["loss"] == pytest.approx(medical.loss, rel=1e-6)
    assert scores["medical"]["perplexity"] == pytest.approx(math.exp(medical.loss), rel=1e-6)
    request = ApprovalRequest.objects.get(pk=request_pk)
    assert (request.version, request.requested_by) == (world.base, world.engineer)
    assert f"medical: loss {medical.loss:.4f}" in request.note
    # The registry holds the scores (v1 has no parent, so no "before" column).
    rows = {row.domain: row for row in world.base.evaluations.all()}
    assert sorted(rows) == ["medical", "recipes"]
    assert rows["medical"].loss == pytest.approx(medical.loss, rel=1e-6)
    assert (rows["medical"].tokens, rows["medical"].parent_loss) == (medical.tokens, None)
    assert rows["medical"].evaluated_by_label == "worker:evaluation"


def test_automated_rounds_are_sent_for_approval_by_the_system_account(
    world: WorkerWorld, django_capture_on_commit_callbacks: Any, user_factory: Any
) -> None:
    round_ = open_round(
        base_version=world.base, buffer_size_k=2, deadline_at=timezone.now() + timedelta(hours=1), actor=None
    )
    with django_capture_on_commit_callbacks(execute=False):
        task = create_training_task(kind=TaskKind.EVALUATION, actor=None, round_=round_, params={"version_id": "v1"})
    request = ApprovalRequest.objects.get(pk=evaluate_version_task(task.pk))
    assert request.requested_by == system_user()
    officer = user_factory("olivia-officer", Role.OFFICER)[0]
    with django_capture_on_commit_callbacks(execute=False):
        approve_version(request, actor=officer, reason="scores look fine")
    assert ApprovalRequest.objects.get(pk=request.pk).status == "approved"


def test_missing_held_out_sets_fail_the_task_with_the_folder_named(
    world: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    task = evaluation_task(world, django_capture_on_commit_callbacks)
    # Present when the task was created (or it would have been refused), gone when it runs.
    shutil.rmtree(world.root / "heldout")
    with pytest.raises(FileNotFoundError):
        evaluate_version_task(task.pk)
    failed = TrainingTask.objects.get(pk=task.pk)
    assert failed.status == TaskStatus.FAILED
    assert "no held-out sets (<domain>.jsonl) in artifacts://heldout" in failed.error
    assert not ApprovalRequest.objects.exists()


@pytest.mark.parametrize("heldout_dir", ["../outside", "/etc", "file:///etc", "artifacts://heldout/../../outside"])
def test_held_out_folder_outside_the_artifact_store_is_refused(
    world: WorkerWorld, django_capture_on_commit_callbacks: Any, heldout_dir: str
) -> None:
    outside = world.root.parent / "outside"
    shutil.copytree(world.root / "heldout", outside)
    with pytest.raises(ValidationError, match=r"heldout_dir: .* points outside the artifact store"):
        evaluation_task(world, django_capture_on_commit_callbacks, heldout_dir=heldout_dir)
    assert not TrainingTask.objects.filter(kind=TaskKind.EVALUATION).exists()
    # A row changed after it was checked is refused again by the worker, before anything is read.
    task = evaluation_task(world, django_capture_on_commit_callbacks)
    TrainingTask.objects.filter(pk=task.pk).update(params={"version_id": "v1", "heldout_dir": heldout_dir})
    with pytest.raises(ValueError, match="points outside the artifact store"):
        evaluate_version_task(task.pk)
    failed = TrainingTask.objects.get(pk=task.pk)
    assert failed.status == TaskStatus.FAILED
    assert "params 'heldout_dir'" in failed.error
    assert not ApprovalRequest.objects.exists()


def test_held_out_folder_is_named_inside_the_artifact_store(
    world: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    shutil.move(world.root / "heldout", world.root / "sets")
    task = evaluation_task(world, django_capture_on_commit_callbacks, heldout_dir="artifacts://sets")
    assert ApprovalRequest.objects.filter(pk=evaluate_version_task(task.pk)).exists()
    assert {row.domain for row in world.base.evaluations.all()} == {"medical", "recipes"}


def test_second_request_for_a_version_is_refused_by_governance(
    world: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    evaluate_version_task(evaluation_task(world, django_capture_on_commit_callbacks).pk)
    again = evaluation_task(world, django_capture_on_commit_callbacks)
    with pytest.raises(ValidationError, match="already has a pending approval request"):
        evaluate_version_task(again.pk)
    assert TrainingTask.objects.get(pk=again.pk).status == TaskStatus.FAILED
