"""The middle loop end to end on the real services: asynchronous windows applied to the current champion with
staleness weights, windows that wait for an officer, synchronous cohorts, and the hostile inputs of a device that
lies about its base, its claims or its tensors. Each is rejected or bounded with a recorded reason; nothing valid is
lost."""

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import DeviceStatus, RoundMode, RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import EdgeDevice, Round, TrainingTask, Update
from apps.federation.services import create_training_task, open_round, revoke_device
from apps.federation.updates import UpdateOutcome, enqueue_due_windows
from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.governance.services import approve_version, request_approval
from apps.registry.models import ModelVersion
from apps.registry.services import move_alias
from fednested.adapters.lora import adapter_key
from fednested.aggregation import RejectionCode
from fednested.checkpoints import load_version
from fednested.messaging import UpdateEnvelope, encode
from tests.federation_world import (
    ADAPTER,
    LAYER0_DOWN,
    LAYER1_UP,
    Device,
    WorkerWorld,
    as_message,
    enroll,
    random_adapters,
    signed_envelope,
    write_raw_payload,
)
from workers import aggregation
from workers.aggregation import aggregate_round_task
from workers.evaluation import evaluate_version_task
from workers.ingest.consumer import ingest_message

MakeUpdate = Callable[..., tuple[UpdateEnvelope, dict[str, torch.Tensor]]]
# Exact weights: no reliability factor (it depends on each device's history) unless a test is about it.
# Weights from staleness and routed tokens alone, combined by FedAvg's plain weighted mean (the tests compute it).
PLAIN = {
    "weight_by_reliability": False,
    "server_optimizer": "fedavg",
    "norm_bound_multiplier": None,
    "min_cosine": None,
}


@pytest.fixture
def officer(db: Any) -> User:
    user = User(username="olga-officer", role=Role.OFFICER)
    user.set_unusable_password()
    user.save()
    return user


@pytest.fixture
def no_sends(django_capture_on_commit_callbacks: Any) -> Iterator[None]:
    """Tasks are created but not sent to a broker: each test runs them itself, in order."""
    with django_capture_on_commit_callbacks(execute=False):
        yield


def promote(world: WorkerWorld, version: ModelVersion, officer: User) -> None:
    approve_version(request_approval(version, actor=world.engineer), actor=officer, reason="reviewed in a test")


def ingest(envelope: UpdateEnvelope, device: Device) -> UpdateOutcome:
    return ingest_message(as_message(encode(envelope), device.row.client_id))


def run_aggregation(round_: Round) -> ModelVersion:
    task = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION, round=round_, status=TaskStatus.PENDING)
    version_id = aggregate_round_task(task.pk)
    assert version_id is not None, TrainingTask.objects.get(pk=task.pk).error
    return ModelVersion.objects.get(version_id=version_id)


def dense(adapters: dict[str, torch.Tensor], param: str, expert: int) -> torch.Tensor:
    lora_a, lora_b = adapters[adapter_key(param, expert, "lora_A")], adapters[adapter_key(param, expert, "lora_B")]
    return ADAPTER.scale * lora_b @ lora_a


def open_window(world: WorkerWorld, *, k: int, **config: Any) -> Round:
    return open_round(
        base_version=world.base,
        buffer_size_k=k,
        deadline_at=timezone.now() + timedelta(hours=1),
        actor=world.engineer,
        config=config,
        round_id="window",
    )


def test_an_update_on_an_older_champion_is_applied_to_the_current_one_with_its_staleness_weight(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    first = open_window(world, k=2, **PLAIN)
    car_a, car_b, car_c = (enroll(world, name) for name in ("car-a", "car-b", "car-c"))
    for seed, device in enumerate((car_a, car_b)):
        assert ingest(make_update(device, seed=seed)[0], device).status == "buffered"
    c1 = run_aggregation(first)
    assert c1.parent == world.base
    # The series goes on: its next window is open (on the champion of its day) before c1 is even decided.
    second = Round.objects.get(status=RoundStatus.OPEN)
    assert (second.series, second.sequence, second.round_id, second.mode) == ("window", 2, "window.2", "async")
    # car-c trained v1 and is slow: its update arrives after c1 was promoted, as does car-a's next one on c1.
    slow, slow_adapters = make_update(car_c, seed=7, base_version="v1", round_id="window")
    promote(world, c1, officer)
    fresh, fresh_adapters = make_update(car_a, seed=8, base_version=c1.version_id)
    outcomes = [ingest(slow, car_c), ingest(fresh, car_a)]
    # Named after the first window, the slow update still joins the open window of the series.
    assert [(o.status, o.round_id, o.staleness) for o in outcomes] == [
        ("buffered", "window.2", 1),
        ("buffered", "window.2", 0),
    ]
    c2 = run_aggregation(second)
    assert c2.parent == c1
    record = Round.objects.get(pk=second.pk).record
    assert record["parent"] == c1.version_id
    assert {entry["staleness"] for entry in record["updates"].values()} == {0, 1}
    assert record["updates"][str(slow.update_id)]["staleness"] == 1
    assert Update.objects.get(update_id=str(slow.update_id)).staleness == 1
    # Equal claims, so the weights are the staleness weights (1+τ)^-0.5, normalised per expert.
    w_slow = 2**-0.5 / (1 + 2**-0.5)
    w_fresh = 1 / (1 + 2**-0.5)
    weights = record["report"]["experts"]["0.1"]["weights"]
    assert math.isclose(weights[str(slow.update_id)], w_slow, rel_tol=1e-9)
    assert math.isclose(weights[str(fresh.update_id)], w_fresh, rel_tol=1e-9)
    before, _ = load_version(world.root / "versions" / c1.version_id)
    after, manifest = load_version(world.root / "versions" / c2.version_id)
    expected = w_slow * dense(slow_adapters, LAYER0_DOWN, 1) + w_fresh * dense(fresh_adapters, LAYER0_DOWN, 1)
    torch.testing.assert_close(
        dict(after.named_parameters())[LAYER0_DOWN][1], dict(before.named_parameters())[LAYER0_DOWN][1] + expected
    )
    assert manifest.lineage["staleness"] == {str(slow.update_id): 1, str(fresh.update_id): 0}


def test_a_ready_window_waits_while_the_previous_candidate_awaits_a_decision(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    first = open_window(world, k=1, **PLAIN)
    car = enroll(world, "car-a")
    assert ingest(make_update(car, seed=1)[0], car).aggregation_task_pk is not None
    c1 = run_aggregation(first)
    second = Round.objects.get(status=RoundStatus.OPEN)
    # Full, but c1 awaits an officer: a second candidate on v1 would drop one of the two.
    waiting = ingest(make_update(car, seed=2)[0], car)
    assert (waiting.status, waiting.aggregation_task_pk) == ("buffered", None)
    second.refresh_from_db()
    assert second.record["waiting"] == f"candidate {c1.version_id} is being evaluated"
    # The evaluation fails (no held-out sets): the window says who must act, and still waits.
    shutil.move(world.root / "heldout", world.root / "heldout-away")
    evaluation = TrainingTask.objects.get(kind=TaskKind.EVALUATION, params__version_id=c1.version_id)
    with pytest.raises(FileNotFoundError):
        evaluate_version_task(evaluation.pk)
    assert enqueue_due_windows(timezone.now()) == []
    second.refresh_from_db()
    assert second.record["waiting"].startswith(f"candidate {c1.version_id} could not be evaluated (task ")
    assert "evaluate it again (POST /api/v1/tasks/, kind evaluation)" in second.record["waiting"]
    shutil.move(world.root / "heldout-away", world.root / "heldout")
    again = create_training_task(kind=TaskKind.EVALUATION, actor=world.engineer, params={"version_id": c1.version_id})
    assert evaluate_version_task(again.pk) is not None
    assert enqueue_due_windows(timezone.now()) == []
    second.refresh_from_db()
    assert second.record["waiting"] == f"candidate {c1.version_id} awaits an officer's decision"
    approve_version(
        ApprovalRequest.objects.get(version=c1, status=ApprovalStatus.PENDING), actor=officer, reason="reviewed"
    )
    [task_pk] = enqueue_due_windows(timezone.now())
    assert TrainingTask.objects.get(pk=task_pk).round == second
    c2 = run_aggregation(second)
    # Trained on v1, applied to c1, the champion by then.
    assert (c2.parent, Update.objects.get(update_id=waiting.update_id).staleness) == (c1, 1)


def test_an_update_arriving_during_aggregation_joins_the_next_window(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    promote(world, world.base, officer)
    first = open_window(world, k=1)
    car_a, car_b = enroll(world, "car-a"), enroll(world, "car-b")
    ingest(make_update(car_a, seed=1)[0], car_a)
    late, _ = make_update(car_b, seed=2)
    arrivals: list[UpdateOutcome] = []
    original = aggregation.buffered_updates

    def arrive_meanwhile(round_: Round) -> Any:
        # The window is claimed (aggregating) by now: this is the moment the late update arrives.
        assert Round.objects.get(pk=round_.pk).status == RoundStatus.AGGREGATING
        arrivals.append(ingest(late, car_b))
        return original(round_)

    monkeypatch.setattr(aggregation, "buffered_updates", arrive_meanwhile)
    run_aggregation(first)
    [outcome] = arrivals
    assert (outcome.status, outcome.round_id) == ("buffered", None)
    successor = Round.objects.get(status=RoundStatus.OPEN)
    row = Update.objects.get(update_id=str(late.update_id))
    assert (row.status, row.round) == (UpdateStatus.BUFFERED, successor)
    opened = AuditEvent.objects.get(verb="federation.round.opened", object_id=str(successor.pk))
    assert opened.data["adopted"] == [str(late.update_id)]
    assert opened.data["continues"] == first.round_id


def test_a_synchronous_round_takes_its_cohort_on_its_base(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    car_a, car_b, stranger = (enroll(world, name) for name in ("car-a", "car-b", "car-x"))
    sync = open_round(
        base_version=world.base,
        buffer_size_k=2,
        deadline_at=timezone.now() + timedelta(minutes=10),
        actor=world.engineer,
        round_id="sync-1",
        mode=RoundMode.SYNC,
        cohort=[car_a.row, car_b.row],
        config={"min_cohort_fraction": 0.5},
    )
    outsider = ingest(make_update(stranger, round_id="sync-1")[0], stranger)
    assert (outsider.status, outsider.code) == ("rejected", RejectionCode.NOT_IN_COHORT)
    assert outsider.message == "device 'car-x' is not in the cohort of synchronous round 'sync-1'"
    first = ingest(make_update(car_a, seed=1, round_id="sync-1")[0], car_a)
    assert (first.status, first.round_id, first.aggregation_task_pk) == ("buffered", "sync-1", None)
    # Half the cohort has reported: enough only once the deadline has passed.
    assert enqueue_due_windows(timezone.now()) == []
    second = ingest(make_update(car_b, seed=2, round_id="sync-1")[0], car_b)
    task = TrainingTask.objects.get(pk=second.aggregation_task_pk)
    assert task.params["trigger"] == "cohort_complete"
    candidate = run_aggregation(sync)
    assert candidate.parent == world.base
    # No series for a synchronous round: nothing else is open, and a late update for it is refused as such.
    assert not Round.objects.filter(status=RoundStatus.OPEN).exists()
    late = ingest(make_update(car_a, seed=3, round_id="sync-1")[0], car_a)
    assert (late.status, late.code) == ("rejected", RejectionCode.ROUND_CLOSED)


def test_a_synchronous_round_aggregates_at_the_deadline_with_enough_of_its_cohort(
    world: WorkerWorld, make_update: MakeUpdate, no_sends: None
) -> None:
    car_a, car_b, car_c = (enroll(world, name) for name in ("car-a", "car-b", "car-c"))
    sync = open_round(
        base_version=world.base,
        buffer_size_k=3,
        deadline_at=timezone.now() + timedelta(minutes=10),
        actor=world.engineer,
        round_id="sync-2",
        mode=RoundMode.SYNC,
        cohort=[car_a.row, car_b.row, car_c.row],
        config={"min_cohort_fraction": 0.6},
    )
    ingest(make_update(car_a, seed=1, round_id="sync-2")[0], car_a)
    later = timezone.now() + timedelta(minutes=11)
    assert enqueue_due_windows(later) == [], "1 of 3 is under 60 %"
    assert Round.objects.get(pk=sync.pk).record["waiting"] == (
        "the deadline passed with 1 of 3 cohort devices reported; 2 are needed (min_cohort_fraction 0.6)"
    )
    ingest(make_update(car_b, seed=2, round_id="sync-2")[0], car_b)
    [task_pk] = enqueue_due_windows(later)
    assert TrainingTask.objects.get(pk=task_pk).params == {"round_id": "sync-2", "trigger": "deadline"}
    assert run_aggregation(sync).parent == world.base


def test_one_window_aggregates_at_a_time(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    for series in ("alpha", "beta"):
        open_round(
            base_version=world.base,
            buffer_size_k=1,
            deadline_at=timezone.now() + timedelta(hours=1),
            actor=world.engineer,
            round_id=series,
        )
    car_a, car_b = enroll(world, "car-a"), enroll(world, "car-b")
    first = ingest(make_update(car_a, seed=1, round_id="alpha")[0], car_a)
    second = ingest(make_update(car_b, seed=2, round_id="beta")[0], car_b)
    assert (first.round_id, second.round_id) == ("alpha", "beta")
    # beta is full too, but alpha's aggregation is pending: both would build a candidate on v1.
    assert (first.aggregation_task_pk is not None, second.aggregation_task_pk) == (True, None)
    assert Round.objects.get(round_id="beta").record["waiting"] == "window alpha is being aggregated"
    assert TrainingTask.objects.filter(kind=TaskKind.EXPERT_AGGREGATION).count() == 1


def test_updates_off_the_champions_line_or_too_stale_are_rejected_with_their_distance(
    world: WorkerWorld, make_update: MakeUpdate, no_sends: None
) -> None:
    v2 = world.register_child(world.base, "v2")
    v3 = world.register_child(v2, "v3")
    branch = world.register_child(world.base, "v2-branch")
    move_alias(name="champion", version=v3, actor=world.engineer)
    open_window(world, k=5, max_staleness=1)
    car = enroll(world, "car-a")
    stale = ingest(make_update(car, base_version="v1")[0], car)
    assert (stale.status, stale.code) == ("rejected", RejectionCode.TOO_STALE)
    assert stale.message == "base version 'v1' is τ=2 promotions behind the champion, the limit is 1"
    assert ingest(make_update(car, base_version="v2")[0], car).staleness == 1
    off = ingest(make_update(car, base_version=branch.version_id)[0], car)
    assert (off.status, off.code) == ("rejected", RejectionCode.NOT_ON_LINEAGE)
    assert "'v2-branch' is not the champion (v3) or one of its ancestors" in off.message
    # A candidate nobody promoted is not on the line either: devices are never served it.
    candidate = world.register_child(v3, "v4")
    assert ingest(make_update(car, base_version=candidate.version_id)[0], car).code is RejectionCode.NOT_ON_LINEAGE


def test_routed_token_claims_must_fit_the_base_and_the_reported_training(
    world: WorkerWorld, make_update: MakeUpdate, no_sends: None
) -> None:
    open_window(world, k=10)
    car = enroll(world, "car-a")
    # tiny: 2 layers × 4 experts, top-2 routing. 100 trained tokens route at most 200 per layer.
    inflated = ingest(make_update(car, routed_tokens={"0.1": 150, "0.2": 60}, metrics={"tokens": 100.0})[0], car)
    assert (inflated.status, inflated.code) == ("rejected", RejectionCode.IMPLAUSIBLE_CLAIM)
    assert inflated.message == (
        "routed_tokens of layer 0 add up to 210, but 100 trained tokens routed to top-2 experts make at most 200"
    )
    nowhere = ingest(make_update(car, routed_tokens={"0.1": 5, "7.0": 5})[0], car)
    assert (nowhere.code, nowhere.message) == (
        RejectionCode.IMPLAUSIBLE_CLAIM,
        "routed_tokens names experts 7.0 the base (8 experts in all) does not have",
    )
    silent = ingest(make_update(car, metrics={"train_loss": 2.5})[0], car)
    assert (silent.code, silent.message) == (
        RejectionCode.IMPLAUSIBLE_CLAIM,
        "routed_tokens without a 'tokens' metric: say how many tokens the device trained on, so that the counts can "
        "be checked",
    )
    few = ingest(make_update(car, examples=500, metrics={"tokens": 100.0})[0], car)
    assert (few.code, few.message) == (
        RejectionCode.IMPLAUSIBLE_CLAIM,
        "500 examples cannot have been trained on 100 tokens",
    )
    # Counts for experts the update carries no adapter for are kept but earn nothing; the record says which.
    extra = ingest(make_update(car, routed_tokens={"0.1": 40, "1.2": 25, "0.0": 99}, metrics={"tokens": 100.0})[0], car)
    assert extra.status == "buffered"
    event = AuditEvent.objects.get(verb="federation.update.buffered", data__update_id=extra.update_id)
    assert event.data["routed_tokens_without_adapters"] == ["0.0"]


def test_a_device_claiming_a_thousand_times_more_tokens_gets_no_more_than_its_share(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    window = open_window(world, k=4, max_update_share=0.4, **PLAIN)
    devices = [enroll(world, f"car-{index}") for index in range(4)]
    liar = devices[0]
    for index, device in enumerate(devices):
        # The liar's figures fit together (1,000× the tokens, routed consistently): only the cap can bound it.
        routed = {"0.1": 40_000, "1.2": 25_000} if device is liar else {"0.1": 40, "1.2": 25}
        metrics = {"tokens": 64_000.0} if device is liar else {"tokens": 64.0}
        outcome = ingest(make_update(device, seed=index, routed_tokens=routed, metrics=metrics)[0], device)
        assert outcome.status == "buffered"
    run_aggregation(window)
    record = Round.objects.get(pk=window.pk).record
    liar_update = Update.objects.get(device=liar.row).update_id
    assert sorted(record["updates"][liar_update]["share_capped_experts"]) == ["0.1", "1.2"]
    for expert in ("0.1", "1.2"):
        weights = record["report"]["experts"][expert]["weights"]
        assert math.isclose(weights[liar_update], 0.4, rel_tol=1e-9)
        assert math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6)


def test_a_huge_update_is_scaled_to_the_norm_bound_and_the_record_says_so(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    window = open_window(world, k=4, **(PLAIN | {"norm_bound_multiplier": 2.0}))
    devices = [enroll(world, f"car-{index}") for index in range(4)]
    for index, device in enumerate(devices):
        adapters = random_adapters(world.shapes, {LAYER0_DOWN: [1], LAYER1_UP: [2]}, seed=index)
        if index == 3:
            adapters = {name: tensor * 100 if name.endswith("lora_B") else tensor for name, tensor in adapters.items()}
        assert ingest(make_update(device, adapters=adapters)[0], device).status == "buffered"
    run_aggregation(window)
    huge = Update.objects.get(device=devices[3].row).update_id
    for expert in ("0.1", "1.2"):
        entry = Round.objects.get(pk=window.pk).record["report"]["experts"][expert]
        assert list(entry["scaled"]) == [huge]
        scaled = entry["scaled"][huge]
        assert scaled["by"] == "norm_bound"
        assert math.isclose(scaled["limit"], entry["norm_bound"], rel_tol=1e-6)
        assert scaled["factor"] < 0.05


def test_a_sign_flipped_update_barely_moves_a_median_window(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    window = open_window(world, k=5, aggregation_method="coordinate_median", **PLAIN)
    honest = random_adapters(world.shapes, {LAYER0_DOWN: [1]}, seed=11)
    devices = [enroll(world, f"car-{index}") for index in range(5)]
    for index, device in enumerate(devices):
        # Honest devices agree up to a little noise; the last one sends the honest direction negated.
        noise = random_adapters(world.shapes, {LAYER0_DOWN: [1]}, seed=100 + index)
        adapters = {name: tensor + 0.05 * noise[name] for name, tensor in honest.items()}
        if index == 4:
            adapters = {name: -tensor if name.endswith("lora_B") else tensor for name, tensor in adapters.items()}
        ingest(make_update(device, adapters=adapters, routed_tokens={"0.1": 40})[0], device)
    candidate = run_aggregation(window)
    before, _ = load_version(world.root / "versions" / "v1")
    after, _ = load_version(world.root / "versions" / candidate.version_id)
    moved = dict(after.named_parameters())[LAYER0_DOWN][1] - dict(before.named_parameters())[LAYER0_DOWN][1]
    target = dense(honest, LAYER0_DOWN, 1)
    cosine = float(((moved * target).sum() / (moved.norm() * target.norm())).detach())
    assert cosine > 0.95


def test_an_update_of_a_device_revoked_after_buffering_is_not_applied(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    window = open_window(world, k=2)
    good, bad = enroll(world, "car-good"), enroll(world, "car-stolen")
    late, other = enroll(world, "car-late"), enroll(world, "car-other")
    ingest(make_update(bad, seed=1)[0], bad)
    # Revoking rejects what the device has buffered at once: it no longer counts towards K.
    revoke_device(bad.row, actor=world.engineer, reason="stolen")
    stolen = Update.objects.get(device=bad.row)
    assert (stolen.status, stolen.rejection_code) == (UpdateStatus.REJECTED, "revoked_client")
    assert "was revoked before this update was aggregated: stolen" in stolen.rejection_message
    ingest(make_update(good, seed=2)[0], good)
    ingest(make_update(late, seed=3)[0], late)
    # A revocation that lands while the window is being aggregated (here: the row changed behind the service's
    # back) is caught by the aggregation's own re-check of each device.
    EdgeDevice.objects.filter(pk=late.row.pk).update(status=DeviceStatus.REVOKED)
    ingest(make_update(other, seed=4)[0], other)
    candidate = run_aggregation(window)
    dropped = Update.objects.get(device=late.row)
    assert (dropped.status, dropped.rejection_code) == (UpdateStatus.REJECTED, "revoked_client")
    assert "was revoked after this update was buffered" in dropped.rejection_message
    assert Update.objects.get(device=good.row).applied_in == candidate
    assert Update.objects.get(device=other.row).applied_in == candidate


def test_one_device_sending_many_update_ids_weighs_no_more_than_one(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    window = open_window(world, k=3, **PLAIN)
    flooder = enroll(world, "car-flood")
    honest = [enroll(world, f"car-{index}") for index in range(3)]
    for seed in range(3):
        outcome = ingest(make_update(flooder, seed=seed)[0], flooder)
        # K counts devices: three update ids from one device do not fill the window.
        assert (outcome.status, outcome.aggregation_task_pk) == ("buffered", None)
    for seed, device in enumerate(honest[:2], start=10):
        ingest(make_update(device, seed=seed)[0], device)
    run_aggregation(window)
    record = Round.objects.get(pk=window.pk).record
    weights = record["report"]["experts"]["0.1"]["weights"]
    flooded = Update.objects.filter(device=flooder.row).values_list("update_id", flat=True)
    assert math.isclose(sum(weights[update_id] for update_id in flooded), 0.4, rel_tol=1e-6)
    assert math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6)


def test_the_same_update_id_across_windows_is_applied_once(
    world: WorkerWorld, make_update: MakeUpdate, officer: User, no_sends: None
) -> None:
    promote(world, world.base, officer)
    window = open_window(world, k=1)
    car = enroll(world, "car-a")
    envelope, _ = make_update(car)
    ingest(envelope, car)
    candidate = run_aggregation(window)
    again = ingest(envelope, car)
    assert (again.status, again.round_id) == ("duplicate", window.round_id)
    altered = envelope.model_copy(update={"examples": 99}).signed(car.signing_key)
    assert ingest(altered, car).code is RejectionCode.REPLAYED
    row = Update.objects.get()
    assert (row.status, row.applied_in, row.examples) == (UpdateStatus.APPLIED, candidate, 16)
    assert not Update.objects.filter(round__sequence=2).exists()


@pytest.mark.parametrize(
    ("field", "raw_value"),
    [("examples", b"4294967296"), ("examples", b"1e400"), ("routed_tokens", b'{"0.1": 1e400}')],
)
def test_counts_no_database_column_can_hold_are_refused_and_the_worker_goes_on(
    world: WorkerWorld, make_update: MakeUpdate, field: str, raw_value: bytes
) -> None:
    car = enroll(world, "car-a")
    envelope, _ = make_update(car)
    document = json.loads(encode(envelope))
    document[field] = "PLACEHOLDER"
    raw = json.dumps(document).encode().replace(b'"PLACEHOLDER"', raw_value)
    outcome = ingest_message(as_message(raw, "car-a"))
    assert (outcome.status, outcome.code) == ("refused", RejectionCode.MALFORMED)
    assert field in outcome.message
    good, _ = make_update(car, seed=3)
    assert ingest(good, car).status == "buffered"


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F4", "I64"])
def test_a_payload_with_a_dtype_adapters_never_use_is_rejected_not_a_crash(
    world: WorkerWorld, dtype: str, no_sends: None
) -> None:
    car = enroll(world, "car-a")
    key_a, key_b = adapter_key(LAYER0_DOWN, 1, "lora_A"), adapter_key(LAYER0_DOWN, 1, "lora_B")
    _, out_features, in_features = world.shapes[LAYER0_DOWN]
    a_bytes, b_bytes = ADAPTER.rank * in_features, out_features * ADAPTER.rank
    header = {
        key_a: {"dtype": dtype, "shape": [ADAPTER.rank, in_features], "data_offsets": [0, a_bytes]},
        key_b: {"dtype": dtype, "shape": [out_features, ADAPTER.rank], "data_offsets": [a_bytes, a_bytes + b_bytes]},
    }
    encoded = json.dumps(header).encode()
    raw = struct.pack("<Q", len(encoded)) + encoded + b"\x01" * (a_bytes + b_bytes)
    update_id = "7f3c8a52-1c55-4c43-9d43-3a8b1f7f0e01"
    payload = write_raw_payload(world, car, update_id, raw)
    outcome = ingest(signed_envelope(car, payload, update_id=update_id), car)
    assert (outcome.status, outcome.code) == ("rejected", RejectionCode.BAD_DTYPE)
    assert f"dtype '{dtype}' is not one of F32, F16, BF16" in outcome.message
