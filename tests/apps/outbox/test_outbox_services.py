"""Outbox services: a row commits with its transaction or not at all, backoff grows and stops at its cap, and a row
is claimed by one deliverer only."""

from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction

from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery
from apps.outbox.models import OutboxEvent
from apps.outbox.services import claim_for_local_run, enqueue, pending_count, retry_delay
from workers.relay.relay import relay_batch

pytestmark = pytest.mark.django_db


@transaction.atomic
def change_that_fails() -> None:
    enqueue(OutboxKind.CELERY_TASK, topic="workers.aggregation.aggregate_round_task", payload={"args": [1]})
    raise RuntimeError("the change failed")


def test_a_row_written_in_a_rolled_back_transaction_does_not_exist() -> None:
    with pytest.raises(RuntimeError, match="the change failed"):
        change_that_fails()
    assert pending_count() == 0


def test_backoff_doubles_from_the_base_and_stops_at_the_cap(settings: Any) -> None:
    settings.FEDNESTED_OUTBOX_RETRY_BASE_S = 2
    settings.FEDNESTED_OUTBOX_RETRY_MAX_S = 60
    delays = [retry_delay(attempts).total_seconds() for attempts in (1, 2, 3, 5, 6, 1000)]
    assert delays == [2, 4, 8, 32, 60, 60]


def test_a_row_claimed_by_its_creator_is_not_delivered_again_by_the_relay(settings: Any) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = True
    row = enqueue(
        OutboxKind.CELERY_TASK,
        topic="workers.aggregation.aggregate_round_task",
        payload={"task": "workers.aggregation.aggregate_round_task", "args": [1]},
    )
    assert claim_for_local_run(row.event_id) is True
    assert claim_for_local_run(row.event_id) is False
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 0
    row.refresh_from_db()
    assert (row.attempts, row.sent_at is not None, pending_count()) == (1, True, 0)


def test_a_row_is_not_due_before_its_next_attempt(settings: Any) -> None:
    row = enqueue(OutboxKind.BUS_EVENT, topic="control.federation_rounds", key="v1", payload={})
    OutboxEvent.objects.filter(pk=row.pk).update(next_attempt_at=row.next_attempt_at + timedelta(hours=1))
    with Delivery() as delivery:
        stats = relay_batch(delivery)
    assert (stats.sent, stats.parked, stats.retried) == (0, 0, 0)
    assert pending_count() == 1
