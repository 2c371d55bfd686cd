"""Who delivers each kind of outbox row: kind → handler, resolved by dotted path when first used.

A handler delivers one row and returns once the far end acknowledged it (the bus's acks=all write, the broker's
accepted task), or raises: `Undeliverable` when the row can never succeed (the relay parks it), anything else when a
later try may (the relay retries with backoff). Handlers live beside what they deliver (the bus events in
apps/federation/events.py, the jobs in apps/federation/jobs.py), so this app depends on no other; a new way out (an
MLflow or DataHub call) is a kind in `OutboxKind` and a line here.
"""

from collections.abc import Callable
from types import TracebackType
from typing import Self

from django.utils.module_loading import import_string

from apps.outbox.choices import OutboxKind
from apps.outbox.models import OutboxEvent
from fednested.messaging import Bus, make_bus


class Undeliverable(ValueError):
    """The row can never be delivered as it is (malformed payload, unknown topic or task): park it, say why."""


class Delivery:
    """What handlers share within one relay batch: the bus, opened on first use and closed with the batch, so a
    batch of events uses one Kafka producer and an idle relay holds no connection."""

    def __init__(self) -> None:
        self._bus: Bus | None = None

    def bus(self) -> Bus:
        if self._bus is None:
            from apps.federation.events import bus_settings

            self._bus = make_bus(bus_settings())
        return self._bus

    def reset(self) -> None:
        """Drop the bus after a failure: the next try starts with a fresh connection."""
        if self._bus is not None:
            bus, self._bus = self._bus, None
            bus.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.reset()


Handler = Callable[[OutboxEvent, Delivery], None]

HANDLERS: dict[str, str] = {
    OutboxKind.BUS_EVENT: "apps.federation.events.deliver_bus_event",
    OutboxKind.CELERY_TASK: "apps.federation.jobs.deliver_celery_task",
    OutboxKind.MLFLOW: "apps.governance.mlflow_sync.deliver_mlflow",
    OutboxKind.DATAHUB: "apps.governance.datahub.deliver_datahub",
}


def handler_for(kind: str) -> Handler:
    """The handler of `kind`; Undeliverable for a kind no handler takes (a row written by a newer release)."""
    path = HANDLERS.get(kind)
    if path is None:
        raise Undeliverable(f"no handler delivers outbox rows of kind {kind!r} (known: {', '.join(HANDLERS)})")
    handler: Handler = import_string(path)
    return handler
