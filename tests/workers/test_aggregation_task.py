"""aggregate_round_task end to end: buffered updates of a window → a registered candidate on the champion whose
experts moved by exactly η times the routed-token-weighted mean of the clients' dense deltas."""

import re
import shutil
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.federation.choices import RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.jobs import IN_PROCESS, AggregationParams
from apps.federation.models import Round, TrainingTask, Update
from apps.federation.services import claim_round_for_aggregation, create_training_task, start_training_task
from apps.federation.updates import MAX_AUTOMATIC_AGGREGATION_ATTEMPTS, enqueue_due_windows
from apps.governance.actors import Actor
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.registry.choices import LineageKind
from apps.registry.models import ModelVersion
from apps.registry.storage import artifact_path
from fednested.adapters.lora import adapter_key
from fednested.checkpoints import CheckpointError, file_sha256, load_version
from fednested.messaging import encode
from tests.federation_world import ADAPTER, LAYER0_DOWN, LAYER1_UP, WorkerWorld, as_message, enroll
from workers import aggregation
from workers.aggregation import (
    AggregationReleased,
    CandidateAlreadyRegistered,
    aggregate_round_task,
    candidate_version_id,
)
from workers.evaluation import evaluate_version_task
from workers.ingest.consumer import ingest_message

ETA = 0.5


def dense(adapters: dict[str, torch.Tensor], param: str, expert: int) -> torch.Tensor:
    lora_a, lora_b = adapters[adapter_key(param, expert, "lora_A")], adapters[adapter_key(param, expert, "lora_B")]
    return ADAPTER.scale * lora_b @ lora_a


@pytest.fixture
def buffered_round(
    world: WorkerWorld, make_update: Callable[..., Any], django_capture_on_commit_callbacks: Any
) -> tuple[Round, list[dict[str, torch.Tensor]], TrainingTask]:
    # No share cap: this fixture checks the routed-token weighting itself (the cap has tests of its own).
    round_ = world.open_round(k=2, config={"server_learning_rate": ETA, "max_update_share": None})
    tokens = [{"0.1": 30, "1.2": 10}, {"0.1": 10, "1.2": 30}]
    adapters = []
    with django_capture_on_commit_callbacks(execute=False):
        for index, routed in enumerate(tokens):
            device = enroll(world, f"car-{index}")
            envelope, tensors = make_update(device, seed=index, round_id=round_.round_id, routed_tokens=routed)
            assert ingest_message(as_message(encode(envelope), device.row.client_id)).status == "buffered"
            adapters.append(tensors)
    return round_, adapters, TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION, round=round_)


def test_round_aggregates_into_a_registered_candidate(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
) -> None:
    round_, adapters, task = buffered_round
    with django_capture_on_commit_callbacks(execute=False):
        version_id = aggregate_round_task(task.pk)
    assert version_id == candidate_version_id(round_)
    version = ModelVersion.objects.get(version_id=version_id)
    assert version.parent == world.base
    updates = list(Update.objects.order_by("received_at"))
    assert {update.status for update in updates} == {UpdateStatus.APPLIED}
    assert {update.applied_in for update in updates} == {version}
    edges = set(version.lineage_edges.filter(kind=LineageKind.UPDATE).values_list("source_ref", flat=True))
    assert edges == {update.update_id for update in updates}
    round_.refresh_from_db()
    assert round_.status == RoundStatus.CLOSED
    assert TrainingTask.objects.get(pk=task.pk).status == TaskStatus.SUCCEEDED
    evaluation = TrainingTask.objects.get(kind=TaskKind.EVALUATION)
    assert evaluation.params["version_id"] == version_id

    base_model, _ = load_version(world.root / "versions" / "v1")
    candidate, manifest = load_version(world.root / "versions" / version_id)
    before, after = dict(base_model.named_parameters()), dict(candidate.named_parameters())
    # Expert 0.1: tokens 30 and 10 → weights 3/4 and 1/4; expert 1.2 the other way round.
    expected_01 = 0.75 * dense(adapters[0], LAYER0_DOWN, 1) + 0.25 * dense(adapters[1], LAYER0_DOWN, 1)
    expected_12 = 0.25 * dense(adapters[0], LAYER1_UP, 2) + 0.75 * dense(adapters[1], LAYER1_UP, 2)
    torch.testing.assert_close(after[LAYER0_DOWN][1], before[LAYER0_DOWN][1] + ETA * expected_01)
    torch.testing.assert_close(after[LAYER1_UP][2], before[LAYER1_UP][2] + ETA * expected_12)
    assert torch.equal(after[LAYER0_DOWN][0], before[LAYER0_DOWN][0])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert manifest.lineage["updates"] == [update.update_id for update in updates]
    # What devices will check: manifest_sha256 is the hash of the manifest.json bytes they download.
    assert version.manifest_sha256 == file_sha256(world.root / "versions" / version_id / "manifest.json")
    assert version.artifacts.get(file_name="experts.safetensors").partition == "expert"


def test_candidate_is_evaluated_against_its_parent_and_sent_for_approval(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
) -> None:
    _, _, task = buffered_round
    with django_capture_on_commit_callbacks(execute=False):
        version_id = aggregate_round_task(task.pk)
    evaluation = TrainingTask.objects.get(kind=TaskKind.EVALUATION)
    request_pk = evaluate_version_task(evaluation.pk)
    version = ModelVersion.objects.get(version_id=version_id)
    rows = list(version.evaluations.order_by("domain"))
    assert [row.domain for row in rows] == ["medical", "recipes"]
    assert all(row.parent_version == world.base for row in rows)
    assert all(row.parent_loss is not None and row.loss != row.parent_loss for row in rows)
    request = ApprovalRequest.objects.get(pk=request_pk)
    assert (request.version, request.requested_by) == (version, world.engineer)


def test_a_failed_aggregation_reopens_the_round_and_keeps_its_updates(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
) -> None:
    round_, _, task = buffered_round
    core = world.root / "versions" / "v1" / "core.safetensors"
    content = core.read_bytes()
    core.unlink()
    with pytest.raises(CheckpointError):
        aggregate_round_task(task.pk)
    failed = TrainingTask.objects.get(pk=task.pk)
    assert failed.status == TaskStatus.FAILED
    assert "core.safetensors" in failed.error
    assert Round.objects.get(pk=round_.pk).status == RoundStatus.OPEN
    assert set(Update.objects.values_list("status", flat=True)) == {UpdateStatus.BUFFERED}
    [reopened] = AuditEvent.objects.filter(verb="federation.round.reopened")
    assert reopened.data["reason"].startswith(f"task {task.pk}: CheckpointError")
    # Once the store is repaired, the next attempt aggregates the same updates.
    core.write_bytes(content)
    with django_capture_on_commit_callbacks(execute=False):
        retry = create_training_task(kind=TaskKind.EXPERT_AGGREGATION, actor=None, round_=round_)
        assert aggregate_round_task(retry.pk) == candidate_version_id(round_)
    assert set(Update.objects.values_list("status", flat=True)) == {UpdateStatus.APPLIED}


@pytest.mark.django_db(transaction=True)
def test_ingest_in_the_embedded_mode_goes_on_when_aggregation_fails_and_stops_retrying(
    world: WorkerWorld, make_update: Callable[..., Any], settings: Any
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = True
    (world.root / "versions" / "v1" / "experts.safetensors").unlink()
    round_ = world.open_round(k=2, deadline_in=timedelta(minutes=5))
    outcomes = []
    for index in range(2):
        device = enroll(world, f"car-{index}")
        envelope, _ = make_update(device, seed=index, round_id=round_.round_id)
        # The second message fills the buffer: its aggregation runs (and fails) in the jobs thread once committed.
        outcomes.append(ingest_message(as_message(encode(envelope), device.row.client_id)))
    assert IN_PROCESS.wait_idle(120), "the aggregation still runs after 120 s"
    later = timezone.now() + timedelta(minutes=10)
    retries = []
    for _ in range(MAX_AUTOMATIC_AGGREGATION_ATTEMPTS):
        retries.append(enqueue_due_windows(later))
        assert IN_PROCESS.wait_idle(120), "the retried aggregation still runs after 120 s"
    assert [outcome.status for outcome in outcomes] == ["buffered", "buffered"]
    tasks = TrainingTask.objects.filter(kind=TaskKind.EXPERT_AGGREGATION).order_by("pk")
    assert [task.status for task in tasks] == [TaskStatus.FAILED] * MAX_AUTOMATIC_AGGREGATION_ATTEMPTS
    assert all("experts.safetensors" in task.error for task in tasks)
    # Two automatic retries after the first failure, then none: the failure is not transient.
    assert [len(created) for created in retries] == [1, 1, 0]
    stuck = Round.objects.get(pk=round_.pk)
    assert stuck.status == RoundStatus.OPEN
    assert set(Update.objects.values_list("status", flat=True)) == {UpdateStatus.BUFFERED}
    # The window says why it no longer aggregates, and its series goes on: new updates join the next window.
    assert stuck.record["waiting"].startswith(f"aggregation failed {MAX_AUTOMATIC_AGGREGATION_ATTEMPTS} times (last: ")
    successor = Round.objects.get(series=round_.series, sequence=2)
    assert successor.status == RoundStatus.OPEN
    device = enroll(world, "car-late")
    late, _ = make_update(device, seed=9, round_id=round_.round_id)
    assert ingest_message(as_message(encode(late), "car-late")).round_id == successor.round_id
    assert IN_PROCESS.wait_idle(120)


def test_an_aggregation_whose_worker_died_is_released_after_the_timeout(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    round_, _, task = buffered_round
    # The worker claimed the task and the window, then stalled: both stay as it left them.
    assert start_training_task(task.pk, actor=Actor.automation("worker:aggregation"))
    assert claim_round_for_aggregation(round_, actor=Actor.automation("worker:aggregation"), task_pk=task.pk)
    settings.FEDNESTED_AGGREGATION_TIMEOUT_S = 600
    with django_capture_on_commit_callbacks(execute=False):
        assert enqueue_due_windows(timezone.now() + timedelta(minutes=5)) == []
        assert Round.objects.get(pk=round_.pk).status == RoundStatus.AGGREGATING
        [retry] = enqueue_due_windows(timezone.now() + timedelta(minutes=11))
    lost = TrainingTask.objects.get(pk=task.pk)
    assert lost.status == TaskStatus.FAILED
    assert lost.error.startswith("presumed lost: still running 600 s after it started")
    assert Round.objects.get(pk=round_.pk).status == RoundStatus.OPEN
    # The window is ready again (its updates stayed buffered): the same check starts the next attempt.
    assert TrainingTask.objects.get(pk=retry).round == round_
    # The stalled worker wakes up and finishes its work: it no longer holds the window, so its candidate is
    # discarded and the window is left to the new attempt.
    stalled = TrainingTask.objects.get(pk=task.pk)
    with django_capture_on_commit_callbacks(execute=False), pytest.raises(AggregationReleased):
        aggregation._aggregate_claimed_round(stalled, round_, AggregationParams.of(stalled))
    assert not ModelVersion.objects.filter(version_id=candidate_version_id(round_)).exists()
    assert Round.objects.get(pk=round_.pk).status == RoundStatus.OPEN
    assert not list((world.root / "versions").glob(".*"))  # its staging directory is gone
    with django_capture_on_commit_callbacks(execute=False):
        assert aggregate_round_task(retry) == candidate_version_id(round_)
    assert set(Update.objects.values_list("status", flat=True)) == {UpdateStatus.APPLIED}


def test_a_task_that_never_started_and_a_window_no_task_holds_are_released(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    round_, _, task = buffered_round
    settings.FEDNESTED_AGGREGATION_TIMEOUT_S = 600
    later = timezone.now() + timedelta(minutes=11)
    with django_capture_on_commit_callbacks(execute=False):
        [retry] = enqueue_due_windows(later)
    lost = TrainingTask.objects.get(pk=task.pk)
    assert (lost.status, lost.error.startswith("presumed lost: not started 600 s after it was created")) == (
        TaskStatus.FAILED,
        True,
    )
    # A window left aggregating by nobody (no pending or running task) is reopened by the same check.
    TrainingTask.objects.filter(pk=retry).update(status=TaskStatus.CANCELLED)
    Round.objects.filter(pk=round_.pk).update(status=RoundStatus.AGGREGATING)
    with django_capture_on_commit_callbacks(execute=False):
        enqueue_due_windows(later)
    assert Round.objects.get(pk=round_.pk).status == RoundStatus.OPEN
    assert AuditEvent.objects.filter(
        verb="federation.round.reopened", data__reason="no aggregation task holds it any more"
    ).exists()


def test_a_round_is_aggregated_once(
    world: WorkerWorld, buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask]
) -> None:
    round_, _, task = buffered_round
    round_.status = RoundStatus.AGGREGATING
    Round.objects.filter(pk=round_.pk).update(status=RoundStatus.AGGREGATING)  # another task claimed it
    assert aggregate_round_task(task.pk) is None
    assert TrainingTask.objects.get(pk=task.pk).status == TaskStatus.SUCCEEDED
    assert set(Update.objects.values_list("status", flat=True)) == {UpdateStatus.BUFFERED}
    # The same task delivered again (acks_late redelivery) does nothing: its row is no longer pending.
    assert aggregate_round_task(task.pk) is None
    # Nor is a second task for a window another one holds created at all.
    with pytest.raises(ValidationError, match=re.escape(f"round {round_.round_id!r} is aggregating: only an open")):
        create_training_task(kind=TaskKind.EXPERT_AGGREGATION, actor=None, round_=round_)
    assert TrainingTask.objects.filter(round=round_).count() == 1
    assert not ModelVersion.objects.filter(version_id=candidate_version_id(round_)).exists()


def test_updates_whose_payload_changed_since_ingest_are_rejected_at_aggregation(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
) -> None:
    round_, _, task = buffered_round
    for update in Update.objects.all():
        path = artifact_path(update.envelope["payload"]["uri"], world.root)
        path.write_bytes(path.read_bytes()[:-1] + b"!")
    with django_capture_on_commit_callbacks(execute=False):
        assert aggregate_round_task(task.pk) is None
    assert set(Update.objects.values_list("rejection_code", flat=True)) == {"sha256_mismatch"}
    assert all(
        message.startswith("at aggregation: ") for message in Update.objects.values_list("rejection_message", flat=True)
    )
    round_.refresh_from_db()
    assert round_.status == RoundStatus.CANCELLED
    assert TrainingTask.objects.get(pk=task.pk).status == TaskStatus.SUCCEEDED


def test_aggregation_never_deletes_the_files_of_a_registered_candidate(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
) -> None:
    round_, _, task = buffered_round
    version_id = candidate_version_id(round_)
    world.register_child(world.base, version_id)
    directory = world.root / "versions" / version_id
    directory.mkdir(parents=True)
    (directory / "core.safetensors").write_bytes(b"registered bytes")
    with django_capture_on_commit_callbacks(execute=False), pytest.raises(CandidateAlreadyRegistered):
        aggregate_round_task(task.pk)
    assert (directory / "core.safetensors").read_bytes() == b"registered bytes"
    assert version_id in TrainingTask.objects.get(pk=task.pk).error
    assert Round.objects.get(pk=round_.pk).status == RoundStatus.OPEN


def test_a_candidate_without_held_out_sets_is_kept_and_its_window_says_why_it_is_not_evaluated(
    world: WorkerWorld,
    buffered_round: tuple[Round, list[dict[str, torch.Tensor]], TrainingTask],
    django_capture_on_commit_callbacks: Any,
) -> None:
    """The evaluation task refuses to be created without held-out sets; the devices' updates stay applied."""
    round_, _, task = buffered_round
    shutil.rmtree(world.root / "heldout")
    with django_capture_on_commit_callbacks(execute=False):
        version_id = aggregate_round_task(task.pk)
    assert ModelVersion.objects.filter(version_id=version_id).exists()
    assert {update.status for update in Update.objects.all()} == {UpdateStatus.APPLIED}
    round_.refresh_from_db()
    assert "no held-out sets" in round_.record["evaluation_not_started"]
    assert not TrainingTask.objects.filter(kind=TaskKind.EVALUATION).exists()
