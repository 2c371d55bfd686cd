"""Writes of the outbox: `enqueue` (inside the caller's transaction) and what the relay records about a delivery.

A row is written in the transaction of the change it announces, never in an on_commit callback: the change and its
message commit together or not at all. Delivery happens later, outside that transaction, in the relay
(workers/relay/), which locks one due row at a time (`lock_due`), hands it to its kind's handler and records the
outcome (`mark_sent`, `schedule_retry`, `park`) before it lets the lock go.
"""

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from opentelemetry import propagate

from apps.outbox.choices import OutboxKind
from apps.outbox.models import OutboxEvent

# Longest error text kept on a row: enough for a traceback's last line and a broker's message.
MAX_ERROR_CHARS = 2000


def enqueue(
    kind: OutboxKind,
    *,
    payload: Mapping[str, object],
    topic: str = "",
    key: str = "",
    event_id: uuid.UUID | None = None,
) -> OutboxEvent:
    """Write one message to deliver, in the caller's transaction (it is delivered only if that commits).

    The current W3C trace context is stored with it, so the relay's delivery joins the trace of the change.
    """
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return OutboxEvent.objects.create(
        event_id=event_id or uuid.uuid4(),
        kind=kind,
        topic=topic,
        key=key,
        payload=dict(payload),
        trace_context=carrier,
        next_attempt_at=timezone.now(),
    )


def due_ids(now: datetime, *, limit: int, kinds: frozenset[str] | None = None) -> list[int]:
    """Up to `limit` pending rows that are due, oldest first (a read without locks: `lock_due` decides)."""
    rows = OutboxEvent.objects.filter(sent_at=None, parked_at=None, next_attempt_at__lte=now)
    if kinds is not None:
        rows = rows.filter(kind__in=kinds)
    return list(rows.order_by("id").values_list("id", flat=True)[:limit])


def lock_due(pk: int, now: datetime) -> OutboxEvent | None:
    """Row `pk`, locked for this transaction, if it is still pending and due; None when another relay holds it (its
    lock is skipped, not waited for) or it was delivered meanwhile. Call inside `transaction.atomic()`.

    On PostgreSQL this is `SELECT … FOR UPDATE SKIP LOCKED`, so two relays never deliver one row at once; SQLite
    has no row locks (Django drops the clause there) but its write transactions exclude each other.
    """
    return (
        OutboxEvent.objects.select_for_update(skip_locked=True)
        .filter(pk=pk, sent_at=None, parked_at=None, next_attempt_at__lte=now)
        .first()
    )


def mark_sent(row: OutboxEvent, now: datetime) -> None:
    """Record that `row` was delivered (the broker acknowledged it)."""
    row.attempts += 1
    row.sent_at = now
    row.save(update_fields=["attempts", "sent_at"])


def retry_delay(attempts: int) -> timedelta:
    """Exponential backoff after `attempts` failed tries: base × 2^(attempts-1), capped."""
    base = settings.FEDNESTED_OUTBOX_RETRY_BASE_S
    cap = settings.FEDNESTED_OUTBOX_RETRY_MAX_S
    # The exponent is bounded before it is raised: a row that failed a thousand times must not overflow a float.
    return timedelta(seconds=min(cap, base * 2 ** min(max(attempts - 1, 0), 32)))


def schedule_retry(row: OutboxEvent, now: datetime, error: str) -> None:
    """Record a failed try of `row` that may succeed later (broker down) and when to try again."""
    row.attempts += 1
    row.last_error = error[:MAX_ERROR_CHARS]
    row.next_attempt_at = now + retry_delay(row.attempts)
    row.save(update_fields=["attempts", "last_error", "next_attempt_at"])


def park(row: OutboxEvent, now: datetime, error: str) -> None:
    """Set `row` aside for good with the reason (its payload can never be delivered); the relay moves on."""
    row.attempts += 1
    row.last_error = error[:MAX_ERROR_CHARS]
    row.parked_at = now
    row.save(update_fields=["attempts", "last_error", "parked_at"])


@transaction.atomic
def claim_for_local_run(event_id: uuid.UUID) -> bool:
    """Claim a pending row for delivery by this process itself (the embedded mode's job thread, which runs the job
    it announces right away); False when the relay or another process delivered it already."""
    claimed = OutboxEvent.objects.filter(event_id=event_id, sent_at=None, parked_at=None).update(
        sent_at=timezone.now(), attempts=F("attempts") + 1
    )
    return bool(claimed)


def pending_count() -> int:
    """How many messages are still owed (neither sent nor parked): the backlog."""
    return OutboxEvent.objects.filter(sent_at=None, parked_at=None).count()
