"""The ingest worker's handling of one message at a time, against the real services and a real tiny base version."""

import hashlib
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
from django.utils import timezone

from apps.federation.choices import TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import DeviceKey, StagedPayload, TrainingTask, Update
from apps.federation.services import revoke_device
from apps.federation.updates import enqueue_due_windows
from apps.governance.models import AuditEvent
from apps.registry.services import move_alias
from fednested.aggregation import RejectionCode
from fednested.identity.keys import generate_private_key
from fednested.messaging import encode
from tests.federation_world import (
    LAYER0_DOWN,
    WorkerWorld,
    as_message,
    enroll,
    payload_file,
    random_adapters,
    signed_envelope,
)
from workers.ingest.consumer import ingest_message

MakeUpdate = Callable[..., Any]


def refusals(code: RejectionCode) -> list[dict[str, Any]]:
    return [
        event.data
        for event in AuditEvent.objects.filter(verb="federation.update.refused")
        if event.data["code"] == code
    ]


def test_valid_update_is_recorded_once_as_buffered(world: WorkerWorld, make_update: MakeUpdate) -> None:
    device = enroll(world, "car-1")
    round_ = world.open_round(k=3)
    envelope, _ = make_update(device, round_id=round_.round_id)
    outcome = ingest_message(as_message(encode(envelope), device.row.client_id))
    assert (outcome.status, outcome.code, outcome.aggregation_task_pk) == ("buffered", None, None)
    update = Update.objects.get(update_id=str(envelope.update_id))
    assert update.status == UpdateStatus.BUFFERED
    assert (update.round, update.device, update.routed_tokens) == (round_, device.row, {"0.1": 40, "1.2": 25})
    assert (update.staleness, outcome.staleness, outcome.round_id) == (0, 0, round_.round_id)
    # One transaction, one row, one audit event: every check ran before it.
    verbs = AuditEvent.objects.filter(object_type="federation.update", object_id=str(update.pk)).values_list(
        "verb", flat=True
    )
    assert list(verbs) == ["federation.update.buffered"]


def test_kth_update_starts_one_aggregation_after_commit(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    round_ = world.open_round(k=2)
    devices = [enroll(world, f"car-{index}") for index in range(3)]
    outcomes = []
    with django_capture_on_commit_callbacks(execute=False):
        for seed, device in enumerate(devices):
            envelope, _ = make_update(device, seed=seed, round_id=round_.round_id)
            outcomes.append(ingest_message(as_message(encode(envelope), device.row.client_id)))
    assert [outcome.status for outcome in outcomes] == ["buffered"] * 3
    task = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION)
    # The second update fills the buffer; the third finds the task already pending and creates no other.
    assert [outcome.aggregation_task_pk for outcome in outcomes] == [None, task.pk, None]
    assert (task.round, task.status, task.params["trigger"]) == (round_, TaskStatus.PENDING, "full")
    # The task is handed to its worker through one outbox row, written with it and sent by the relay after commit.
    from apps.outbox.models import OutboxEvent

    assert list(OutboxEvent.objects.filter(kind="celery_task").values_list("key", "sent_at")) == [(str(task.pk), None)]


def test_malformed_json_is_refused_with_its_position_and_the_worker_goes_on(world: WorkerWorld) -> None:
    outcome = ingest_message(as_message(b'{"schema": "UpdateEnvelope", ', "car-1"))
    assert (outcome.status, outcome.code) == ("refused", RejectionCode.MALFORMED)
    assert "malformed JSON at line 1" in outcome.message
    [event] = refusals(RejectionCode.MALFORMED)
    assert event["where"] == outcome.where
    assert Update.objects.count() == 0


def test_schema_violation_names_the_field(world: WorkerWorld, make_update: MakeUpdate) -> None:
    device = enroll(world, "car-1")
    envelope, _ = make_update(device)
    raw = encode(envelope).replace(b'"examples":16', b'"examples":-3')
    outcome = ingest_message(as_message(raw, "car-1"))
    assert outcome.code is RejectionCode.MALFORMED
    assert "field 'examples'" in outcome.message


def test_unknown_revoked_and_forged_senders_are_refused_without_a_row(
    world: WorkerWorld, make_update: MakeUpdate
) -> None:
    device = enroll(world, "car-1")
    stranger_envelope, _ = make_update(device)
    stranger = stranger_envelope.model_copy(update={"client_id": "car-unknown"})
    assert ingest_message(as_message(encode(stranger), "car-unknown")).code is RejectionCode.UNKNOWN_CLIENT

    forged, _ = make_update(device)
    forged = forged.signed(generate_private_key())
    outcome = ingest_message(as_message(encode(forged), "car-1"))
    assert outcome.code is RejectionCode.BAD_SIGNATURE
    assert "car-1" in outcome.message

    unsigned, _ = make_update(device)
    assert ingest_message(as_message(encode(unsigned.model_copy(update={"signature": ""})), "car-1")).code is (
        RejectionCode.BAD_SIGNATURE
    )

    late, _ = make_update(device)  # uploaded before the revocation, published after it
    revoke_device(device.row, actor=world.engineer, reason="stolen")
    assert ingest_message(as_message(encode(late), "car-1")).code is RejectionCode.REVOKED_CLIENT
    assert Update.objects.count() == 0


def test_replayed_update_id_is_applied_once(world: WorkerWorld, make_update: MakeUpdate) -> None:
    device = enroll(world, "car-1")
    envelope, _ = make_update(device)
    raw = encode(envelope)
    assert ingest_message(as_message(raw, "car-1")).status == "buffered"
    again = ingest_message(as_message(raw, "car-1"))
    assert (again.status, again.code) == ("duplicate", None)
    assert "already received (buffered); nothing changed" in again.message
    assert AuditEvent.objects.filter(verb="federation.update.resent").count() == 1
    altered = envelope.model_copy(update={"examples": 99}).signed(device.signing_key)
    different = ingest_message(as_message(encode(altered), "car-1"))
    assert different.code is RejectionCode.REPLAYED
    assert "differs from the recorded one" in different.message
    assert Update.objects.get().examples == 16


def test_unknown_base_version_and_closed_round_are_refused(world: WorkerWorld, make_update: MakeUpdate) -> None:
    device = enroll(world, "car-1")
    envelope, _ = make_update(device, base_version="v9")
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert (outcome.code, outcome.message) == (
        RejectionCode.UNKNOWN_BASE_VERSION,
        "model version 'v9' is not registered",
    )
    envelope, _ = make_update(device, round_id="round-nope")
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert (outcome.status, outcome.code) == ("rejected", RejectionCode.UNKNOWN_ROUND)
    assert outcome.message == "round 'round-nope' does not exist"


def test_update_too_far_behind_the_champion_is_rejected_with_the_distance(
    world: WorkerWorld, make_update: MakeUpdate
) -> None:
    v2 = world.register_child(world.base, "v2")
    v3 = world.register_child(v2, "v3")
    move_alias(name="champion", version=v3, actor=world.engineer)
    round_ = world.open_round(config={"max_staleness": 1})
    device = enroll(world, "car-1")
    envelope, _ = make_update(device, round_id=round_.round_id)
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert (outcome.status, outcome.code) == ("rejected", RejectionCode.TOO_STALE)
    assert "'v1' is τ=2 promotions behind the champion, the limit is 1" in outcome.message
    update = Update.objects.get()
    assert (update.status, update.rejection_code) == (UpdateStatus.REJECTED, "too_stale")


@pytest.mark.parametrize(
    ("damage", "code", "fragment"),
    [
        ("tamper", RejectionCode.SHA256_MISMATCH, "has sha256"),
        ("truncate", RejectionCode.SHA256_MISMATCH, "bytes, the envelope says"),
        ("missing", RejectionCode.MALFORMED, "no payload at artifacts://updates/"),
        ("garbage", RejectionCode.MALFORMED, "not a readable adapter file"),
    ],
)
def test_payload_that_does_not_match_its_claim_check_is_rejected(
    world: WorkerWorld, make_update: MakeUpdate, damage: str, code: RejectionCode, fragment: str
) -> None:
    device = enroll(world, "car-1")
    envelope, _ = make_update(device)
    path = payload_file(world, envelope)
    raw = path.read_bytes()
    if damage == "tamper":
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "truncate":
        path.write_bytes(raw[:-8])
    elif damage == "missing":
        path.unlink()
    else:
        junk = b"\x00" * len(raw)
        path.write_bytes(junk)
        # The device uploaded these bytes: the staged record and the envelope both carry their sha256.
        StagedPayload.objects.filter(update_id=str(envelope.update_id)).update(sha256=hashlib.sha256(junk).hexdigest())
        payload = {**envelope.payload.model_dump(), "sha256": hashlib.sha256(junk).hexdigest()}
        envelope = envelope.model_copy(update={"payload": envelope.payload.model_validate(payload)})
        envelope = envelope.signed(device.signing_key)
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert (outcome.status, outcome.code) == ("rejected", code)
    assert fragment in outcome.message
    assert Update.objects.get().rejection_code == code.value


def test_tensor_checks_reject_with_the_tensor_named(world: WorkerWorld, make_update: MakeUpdate) -> None:
    device = enroll(world, "car-1")
    poisoned = random_adapters(world.shapes, {LAYER0_DOWN: [0]}, seed=4)
    key = f"{LAYER0_DOWN}/expert=0/lora_B"
    poisoned[key][3, 1] = math.nan
    envelope, _ = make_update(device, adapters=poisoned)
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert (outcome.code, outcome.message) == (
        RejectionCode.NON_FINITE,
        f"{key} holds 1 NaN/Inf of {poisoned[key].numel()} values",
    )

    extra = random_adapters(world.shapes, {LAYER0_DOWN: [0]}, seed=5) | {"model.lm_head.weight": torch.zeros(2, 2)}
    envelope, _ = make_update(device, adapters=extra)
    assert ingest_message(as_message(encode(envelope), "car-1")).code is RejectionCode.BAD_TENSOR_NAMES

    huge = {name: tensor * 10 for name, tensor in random_adapters(world.shapes, {LAYER0_DOWN: [0]}, seed=6).items()}
    round_ = world.open_round(config={"max_delta_norm": 50.0})
    envelope, _ = make_update(device, adapters=huge, round_id=round_.round_id)
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert outcome.code is RejectionCode.NORM_EXCEEDED
    assert "the per-delta limit is 50.0" in outcome.message

    # Whatever a window allows, no delta may be long enough for a window's fp32 sums to overflow.
    absurd = {name: tensor * 1e4 for name, tensor in random_adapters(world.shapes, {LAYER0_DOWN: [0]}, seed=6).items()}
    envelope, _ = make_update(device, adapters=absurd)
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert outcome.code is RejectionCode.NORM_EXCEEDED
    assert "no delta may exceed 1e+06, whatever the window's limits" in outcome.message

    small_round = world.open_round(config={"max_payload_bytes": 1024})
    envelope, _ = make_update(device, round_id=small_round.round_id)
    assert ingest_message(as_message(encode(envelope), "car-1")).code is RejectionCode.OVERSIZED
    assert Update.objects.filter(status=UpdateStatus.REJECTED).count() == 5


def test_deadline_starts_aggregation_of_a_partial_buffer(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    round_ = world.open_round(k=5, deadline_in=timedelta(minutes=10))
    device = enroll(world, "car-1")
    envelope, _ = make_update(device, round_id=round_.round_id)
    with django_capture_on_commit_callbacks(execute=False):
        assert ingest_message(as_message(encode(envelope), "car-1")).aggregation_task_pk is None
        assert enqueue_due_windows(timezone.now()) == []
        [task_pk] = enqueue_due_windows(timezone.now() + timedelta(minutes=11))
        assert enqueue_due_windows(timezone.now() + timedelta(minutes=12)) == []
    assert TrainingTask.objects.get(pk=task_pk).params == {"round_id": round_.round_id, "trigger": "deadline"}


def test_only_the_device_key_verifies_not_the_api_token_or_another_device_key(
    world: WorkerWorld, make_update: MakeUpdate
) -> None:
    """docs/api/device-protocol.md §4: envelopes are signed with the device's own key (the CSR's key at enrollment);
    the control plane keeps public keys only, so nothing it holds signs for a device."""
    device = enroll(world, "car-1")
    other = enroll(world, "car-2")
    by_other, _ = make_update(device)
    by_other = by_other.signed(other.signing_key)
    assert ingest_message(as_message(encode(by_other), "car-1")).code is RejectionCode.BAD_SIGNATURE
    unsigned, _ = make_update(device)
    unsigned = unsigned.model_copy(update={"signature": ""})
    assert ingest_message(as_message(encode(unsigned), "car-1")).code is RejectionCode.BAD_SIGNATURE
    own, _ = make_update(device)
    assert ingest_message(as_message(encode(own), "car-1")).status == "buffered"


def test_an_update_without_a_round_joins_the_open_asynchronous_window(
    world: WorkerWorld, make_update: MakeUpdate, django_capture_on_commit_callbacks: Any
) -> None:
    round_ = world.open_round(k=2)
    outcomes = []
    with django_capture_on_commit_callbacks(execute=False):
        for seed in range(2):
            device = enroll(world, f"car-{seed}")
            envelope, _ = make_update(device, seed=seed)
            assert envelope.round_id is None
            outcomes.append(ingest_message(as_message(encode(envelope), device.row.client_id)))
    assert {update.round for update in Update.objects.all()} == {round_}
    task = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION)
    assert [outcome.aggregation_task_pk for outcome in outcomes] == [None, task.pk]


def test_an_envelope_pointing_at_another_devices_upload_is_refused(world: WorkerWorld, make_update: MakeUpdate) -> None:
    owner, thief = enroll(world, "car-owner"), enroll(world, "car-thief")
    owned, _ = make_update(owner)
    # The thief claims the owner's update id and upload as its own.
    stolen = signed_envelope(thief, owned.payload.model_dump(), update_id=str(owned.update_id))
    outcome = ingest_message(as_message(encode(stolen), "car-thief"))
    assert (outcome.status, outcome.code) == ("refused", RejectionCode.NOT_OWNER)
    assert "was uploaded by device 'car-owner', not 'car-thief'" in outcome.message
    assert Update.objects.count() == 0


def test_an_envelope_whose_uri_is_not_its_own_upload_is_refused(world: WorkerWorld, make_update: MakeUpdate) -> None:
    owner, thief = enroll(world, "car-owner"), enroll(world, "car-thief")
    owned, _ = make_update(owner)
    # A fresh update id of the thief's own, pointing at the owner's payload: nothing was uploaded under it.
    borrowed = signed_envelope(thief, owned.payload.model_dump())
    outcome = ingest_message(as_message(encode(borrowed), "car-thief"))
    assert (outcome.status, outcome.code) == ("refused", RejectionCode.MALFORMED)
    assert f"payload uri {owned.payload.uri!r}: device 'car-thief' uploaded no payload" in outcome.message
    # Its own upload, but the envelope points elsewhere (here: the base version's weights).
    own, _ = make_update(thief)
    elsewhere = {**own.payload.model_dump(), "uri": "artifacts://versions/v1/manifest.json"}
    redirected = signed_envelope(thief, elsewhere, update_id=str(own.update_id))
    outcome = ingest_message(as_message(encode(redirected), "car-thief"))
    assert (outcome.status, outcome.code) == ("refused", RejectionCode.MALFORMED)
    assert "'artifacts://versions/v1/manifest.json'" in outcome.message
    assert "is not the upload of update id" in outcome.message
    assert Update.objects.count() == 0


def test_a_payload_uri_that_is_a_directory_is_rejected_not_an_error(
    world: WorkerWorld, make_update: MakeUpdate
) -> None:
    device = enroll(world, "car-1")
    envelope, _ = make_update(device)
    path = payload_file(world, envelope)
    path.unlink()
    path.mkdir()
    outcome = ingest_message(as_message(encode(envelope), "car-1"))
    assert (outcome.status, outcome.code) == ("rejected", RejectionCode.MALFORMED)
    assert "is not a regular file" in outcome.message


def test_envelopes_outside_the_replay_window_are_refused(
    world: WorkerWorld, make_update: MakeUpdate, settings: Any
) -> None:
    """Besides the update id (accepted once), an envelope must be recent and not from the future."""
    settings.FEDNESTED_UPDATE_MAX_AGE_S = 3600
    settings.FEDNESTED_UPDATE_MAX_CLOCK_SKEW_S = 60
    device = enroll(world, "car-1")
    for shift in (timedelta(hours=-2), timedelta(minutes=5)):
        envelope, _ = make_update(device)
        moved = envelope.model_copy(update={"created_at": envelope.created_at + shift}).signed(device.signing_key)
        outcome = ingest_message(as_message(encode(moved), "car-1"))
        assert (outcome.status, outcome.code) == ("refused", RejectionCode.EXPIRED), outcome.message
    within, _ = make_update(device)
    within = within.model_copy(update={"created_at": within.created_at + timedelta(seconds=30)})
    assert ingest_message(as_message(encode(within.signed(device.signing_key)), "car-1")).status == "buffered"


def test_a_key_verifies_only_envelopes_made_while_its_certificate_was_valid(
    world: WorkerWorld, make_update: MakeUpdate
) -> None:
    device = enroll(world, "car-1")
    DeviceKey.objects.filter(device=device.row).update(not_after=timezone.now() - timedelta(minutes=1))
    late, _ = make_update(device)
    assert ingest_message(as_message(encode(late), "car-1")).code is RejectionCode.BAD_SIGNATURE
    DeviceKey.objects.filter(device=device.row).update(not_after=timezone.now() + timedelta(days=1))
    on_time, _ = make_update(device)
    assert ingest_message(as_message(encode(on_time), "car-1")).status == "buffered"
