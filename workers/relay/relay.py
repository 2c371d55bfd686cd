"""Relay loop: pending outbox rows → their kind's handler → marked sent, one row per short transaction.

Each row is locked (`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL) for the time of its delivery, so two relays
never deliver it at once and a relay that dies mid-delivery releases it at once. A row is marked sent only after
the far end acknowledged it; a relay killed in between delivers it again, and consumers drop the copy by its event
id. A failure that a later try may fix (the bus is down) is retried with exponential backoff, and that kind of row is
left alone for the rest of the batch rather than hammering a dead broker row by row; a row that can never be
delivered is parked with its error and the rows behind it go on.
"""

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType

from django.db import transaction
from django.utils import timezone
from opentelemetry import context, propagate, trace

from apps.federation.jobs import IN_PROCESS
from apps.outbox.handlers import Delivery, Undeliverable, handler_for
from apps.outbox.models import OutboxEvent
from apps.outbox.services import due_ids, lock_due, mark_sent, park, schedule_retry

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# Test hook: "after_publish" makes the relay SIGKILL itself after a row was delivered (the broker acknowledged it)
# and before it is marked sent — the window in which a message goes out twice and consumers must drop the copy.
CRASH_POINT_ENV = "FEDNESTED_RELAY_CRASH_POINT"
CRASH_POINTS = ("after_publish",)
DEFAULT_BATCH_SIZE = 100
DEFAULT_POLL_INTERVAL_S = 1.0
# How long a relay asked to stop waits for jobs it started in its own thread (the embedded mode) before it exits.
JOBS_DRAIN_S = 3600.0


@dataclass
class RelayStats:
    """What one run of the relay did, by outcome."""

    sent: int = 0
    retried: int = 0
    parked: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


def _crash_if_asked(point: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == point:
        logger.warning("test hook %s=%s: killing this process", CRASH_POINT_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


def _deliver(row: OutboxEvent, delivery: Delivery) -> None:
    # The row carries the trace context of the code that wrote it: the publish continues that trace.
    token = context.attach(propagate.extract(row.trace_context or {}))
    try:
        with tracer.start_as_current_span(f"outbox deliver {row.kind}") as span:
            span.set_attribute("fednested.outbox.event_id", str(row.event_id))
            span.set_attribute("fednested.outbox.topic", row.topic)
            handler_for(row.kind)(row, delivery)
    finally:
        context.detach(token)


def relay_batch(
    delivery: Delivery,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: threading.Event | None = None,
    now: Callable[[], datetime] = timezone.now,
) -> RelayStats:
    """Deliver up to `batch_size` due rows, oldest first; stops between rows once `stop` is set (the row in hand is
    delivered and recorded first)."""
    stats = RelayStats(batches=1)
    unavailable: set[str] = set()
    for pk in due_ids(now(), limit=batch_size):
        if stop is not None and stop.is_set():
            break
        with transaction.atomic():
            row = lock_due(pk, now())
            if row is None or row.kind in unavailable:
                continue  # another relay has it, it went out meanwhile, or its way out just failed
            try:
                _deliver(row, delivery)
            except Undeliverable as error:
                logger.error("outbox row %s (%s) parked: %s", row.event_id, row.kind, error)
                park(row, now(), str(error))
                stats.parked += 1
                stats.errors.append(str(error))
                continue
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
                logger.warning("outbox row %s (%s) not delivered, will retry: %s", row.event_id, row.kind, message)
                schedule_retry(row, now(), message)
                stats.retried += 1
                stats.errors.append(message)
                unavailable.add(row.kind)
                delivery.reset()
                continue
            _crash_if_asked("after_publish")
            mark_sent(row, now())
            stats.sent += 1
    return stats


def run_relay(
    *,
    stop: threading.Event | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    idle_exit_s: float | None = None,
) -> RelayStats:
    """Deliver due rows until `stop` is set (or nothing was due for `idle_exit_s` seconds); sleeps `poll_interval_s`
    between batches that found nothing to do."""
    stop = stop or threading.Event()
    total = RelayStats()
    last_work = time.monotonic()
    while not stop.is_set():
        with Delivery() as delivery:
            stats = relay_batch(delivery, batch_size=batch_size, stop=stop)
        total.batches += 1
        total.sent += stats.sent
        total.retried += stats.retried
        total.parked += stats.parked
        if stats.sent or stats.parked:
            last_work = time.monotonic()
            continue  # there may be more due right away
        if idle_exit_s is not None and time.monotonic() - last_work >= idle_exit_s:
            break
        stop.wait(poll_interval_s)
    return total


def main(argv: list[str]) -> int:
    """Command line of `python -m workers.relay`."""
    parser = argparse.ArgumentParser(prog="python -m workers.relay", description=__doc__)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per batch (1-10000)")
    parser.add_argument(
        "--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S, metavar="SECONDS", help="idle wait (0.05-60)"
    )
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="exit when idle this long")
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.batch_size <= 10_000:
        parser.error(f"--batch-size {arguments.batch_size} must be between 1 and 10000")
    if not 0.05 <= arguments.poll_interval <= 60:
        parser.error(f"--poll-interval {arguments.poll_interval} must be between 0.05 and 60 seconds")
    point = os.environ.get(CRASH_POINT_ENV)
    if point and point not in CRASH_POINTS:
        parser.error(f"{CRASH_POINT_ENV}={point!r} is not one of {CRASH_POINTS}")
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Finish the row in hand (delivered and recorded), then exit; the rest stays for the next run.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    logger.info("outbox relay started (batch %d, poll %.2f s)", arguments.batch_size, arguments.poll_interval)
    stats = run_relay(
        stop=stop,
        batch_size=arguments.batch_size,
        poll_interval_s=arguments.poll_interval,
        idle_exit_s=arguments.idle_exit,
    )
    # Jobs this relay started itself (the embedded mode, no broker) finish before it exits, as in the ingest worker.
    if not IN_PROCESS.wait_idle(JOBS_DRAIN_S):
        logger.error("jobs still running after %.0f s; exiting anyway", JOBS_DRAIN_S)
    logger.info(
        "outbox relay stopped: %d sent, %d retried, %d parked in %d batches",
        stats.sent,
        stats.retried,
        stats.parked,
        stats.batches,
    )
    return 0
