"""The ingest worker's batches: one transaction and one offset commit for many messages, with every envelope still
taken through every check, a bad one costing only itself, windows deciding as they did message by message, and a
number of SQL statements that does not grow with the batch."""

from collections.abc import Callable
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.federation.choices import TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import TrainingTask, Update
from apps.federation.services import revoke_device
from apps.governance.models import AuditEvent
from fednested.aggregation import RejectionCode
from fednested.identity.keys import generate_private_key
from fednested.messaging import Message, encode
from tests.federation_world import WorkerWorld, as_message, enroll
from workers.ingest.consumer import ingest_batch

MakeUpdate = Callable[..., Any]


def valid_messages(world: WorkerWorld, make_update: MakeUpdate, count: int, *, prefix: str) -> list[Message]:
    """`count` valid envelopes, each from a device of its own (as a fleet sends them: one update per device)."""
    messages = []
    for index in range(count):
        device = enroll(world, f"{prefix}-{index}")
        envelope, _ = make_update(device, seed=index)
        messages.append(as_message(encode(envelope), device.row.client_id))
    return messages


def test_a_batch_records_valid_envelopes_beside_bad_ones(world: WorkerWorld, make_update: MakeUpdate) -> None:
    round_ = world.open_round(k=50)
    good = enroll(world, "car-good")
    revoked = enroll(world, "car-revoked")
    first, _ = make_update(good, seed=1)
    second, _ = make_update(good, seed=2)
    forged, _ = make_update(good, seed=3)
    late, _ = make_update(revoked, seed=4)
    revoke_device(revoked.row, actor=world.engineer, reason="stolen")
    # The same update id twice in one batch (a redelivery) and once more with other content (a replay): the batch
    # takes its slow path, envelope by envelope under savepoints.
    replayed = first.model_copy(update={"examples": 99}).signed(good.signing_key)
    batch = [
        as_message(encode(first), "car-good"),
        as_message(b'{"schema": "UpdateEnvelope", ', "car-good"),
        as_message(encode(forged.signed(generate_private_key())), "car-good"),
        as_message(encode(late), "car-revoked"),
        as_message(encode(first), "car-good"),
        as_message(encode(replayed), "car-good"),
        as_message(encode(second), "car-good"),
    ]
    outcomes = ingest_batch(batch)
    assert [(outcome.status, outcome.code) for outcome in outcomes] == [
        ("buffered", None),
        ("refused", RejectionCode.MALFORMED),
        ("refused", RejectionCode.BAD_SIGNATURE),
        ("refused", RejectionCode.REVOKED_CLIENT),
        ("duplicate", None),
        ("refused", RejectionCode.REPLAYED),
        ("buffered", None),
    ]
    assert [outcome.where for outcome in outcomes] == [message.where() for message in batch]
    rows = dict(Update.objects.values_list("update_id", "status"))
    assert rows == {str(first.update_id): UpdateStatus.BUFFERED, str(second.update_id): UpdateStatus.BUFFERED}
    assert Update.objects.get(update_id=str(first.update_id)).examples == 16
    assert set(Update.objects.values_list("round_id", flat=True)) == {round_.pk}
    outcome_verbs = [f"federation.update.{name}" for name in ("buffered", "rejected", "refused", "resent")]
    verbs = sorted(AuditEvent.objects.filter(verb__in=outcome_verbs).values_list("verb", flat=True))
    assert verbs == ["federation.update.buffered"] * 2 + ["federation.update.refused"] * 4 + [
        "federation.update.resent"
    ]


def test_a_window_filled_within_a_batch_gets_one_aggregation(world: WorkerWorld, make_update: MakeUpdate) -> None:
    round_ = world.open_round(k=3)
    outcomes = ingest_batch(valid_messages(world, make_update, 5, prefix="car"))
    assert [outcome.status for outcome in outcomes] == ["buffered"] * 5
    task = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION)
    assert (task.round, task.status, task.params["trigger"]) == (round_, TaskStatus.PENDING, "full")
    # The window decides once, with the whole batch in it; the task is reported on the batch's last update into it.
    assert [outcome.aggregation_task_pk for outcome in outcomes] == [None, None, None, None, task.pk]
    assert Update.objects.filter(round=round_, status=UpdateStatus.BUFFERED).count() == 5


def test_statements_per_batch_do_not_grow_with_its_size(world: WorkerWorld, make_update: MakeUpdate) -> None:
    world.open_round(k=1000)
    small = valid_messages(world, make_update, 5, prefix="small")
    large = valid_messages(world, make_update, 25, prefix="large")
    counts = []
    for batch in (small, large):
        with CaptureQueriesContext(connection) as queries:
            outcomes = ingest_batch(batch)
        assert [outcome.status for outcome in outcomes] == ["buffered"] * len(batch)
        counts.append(len(queries.captured_queries))
    # Message by message this was 23 statements per envelope; a batch reads what it shares once, locks once and
    # writes one statement per table.
    assert counts[0] == counts[1], counts
    assert counts[1] <= 25, counts
    assert Update.objects.filter(status=UpdateStatus.BUFFERED).count() == 30
