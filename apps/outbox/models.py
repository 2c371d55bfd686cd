"""The outbox table: one row per message the control plane owes the outside world."""

import uuid

from django.db import models

from apps.outbox.choices import OutboxKind


class OutboxEvent(models.Model):
    """One message to deliver, written in the transaction of the change it announces (so a rolled-back change leaves
    no row, and a committed one always has its row) and delivered by the relay.

    Pending rows have `sent_at` and `parked_at` null. `event_id` travels with the message (the event's `event_id`
    field, the Celery task id), so a consumer that sees it twice — the relay died between publishing and marking it
    sent — can tell. A row whose delivery can never succeed (a payload its handler refuses) is parked with the
    reason instead of blocking the rows behind it.
    """

    event_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    kind = models.CharField(max_length=32, choices=OutboxKind.choices)
    # Bus events: the logical topic (fednested.messaging.Topic) and the record key. Celery tasks: the task name.
    topic = models.CharField(max_length=200, blank=True)
    key = models.CharField(max_length=200, blank=True)
    payload = models.JSONField(help_text="What the handler of `kind` sends: the encoded event, or the task's args.")
    # W3C trace context (traceparent/tracestate) of the code that wrote the row, so the relay's publish continues
    # the same trace.
    trace_context = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(help_text="Not tried again before this (exponential backoff).")
    last_error = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    parked_at = models.DateTimeField(null=True, blank=True, help_text="Set when the row can never be delivered.")

    class Meta:
        ordering = ("created_at", "id")
        indexes = (
            # The relay's query: pending rows that are due, oldest first.
            models.Index(
                fields=["next_attempt_at", "id"],
                name="outbox_pending_due",
                condition=models.Q(sent_at__isnull=True, parked_at__isnull=True),
            ),
        )

    def __str__(self) -> str:
        state = "sent" if self.sent_at else "parked" if self.parked_at else "pending"
        return f"{self.kind} {self.topic or '-'} {self.event_id} ({state}, {self.attempts} attempts)"

    @property
    def pending(self) -> bool:
        """True while the relay still owes this message."""
        return self.sent_at is None and self.parked_at is None
