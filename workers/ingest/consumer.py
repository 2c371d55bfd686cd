"""Ingest loop: a batch of bus messages → `submit_updates` (their checks, then one database transaction for the
batch) → one offset commit for the batch, in that order. The loop is thin: every decision about an envelope belongs to
`apps.federation.updates`.

The offsets are committed only after the transaction has committed, so a worker killed in between reprocesses the
batch; the Update rows' unique update ids then turn the second pass into recorded duplicates, never a second apply.
A message that makes the service raise something unexpected is recorded as refused and committed with the rest, so
no message can stop the worker; only infrastructure errors (database, artifact store) leave the batch uncommitted.

Windows that become ready without an arrival (a deadline passed) are not this loop's business: the periodic task
`workers.schedules.close_due_windows_task` closes them, fired by `celery beat`, or in the embedded mode (no broker) by
the schedule thread `main` starts beside the loop (docs/schedules.md).
"""

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from django.conf import settings

from apps.federation.events import bus_settings
from apps.federation.identity import refresh_crl_if_due
from apps.federation.updates import Arrival, UpdateOutcome, submit_updates
from apps.governance.actors import Actor
from controlplane.metrics.exposition import serve_metrics
from controlplane.metrics.families import record_outcome
from controlplane.metrics.lag import ingest_collectors
from fednested.messaging import Consumer, Message, Topic, UpdateEnvelope, make_bus
from fednested.messaging.acls import INGEST_GROUP
from fednested.observability.tracing import traced_batch
from workers.schedules import start_schedule_thread

logger = logging.getLogger(__name__)

ACTOR = Actor.automation("worker:ingest")
DEFAULT_GROUP = INGEST_GROUP
# Test hook: "after_db_commit" makes the worker SIGKILL itself after a batch's transaction committed and before its
# offsets are committed — the window the at-least-once design must survive.
CRASH_POINT_ENV = "FEDNESTED_INGEST_CRASH_POINT"
CRASH_POINTS = ("after_db_commit",)
# How often the loop asks whether the CRL is due to be signed again (at half its lifetime: a cheap file check).
CRL_CHECK_INTERVAL_S = 5.0
# Messages taken per batch: one transaction and one offset commit each. Large enough that the fixed cost of a batch
# (its locks, window decision and commit round trips) is spread thin; small enough that a batch's transaction stays
# short and a crash re-reads little (bench/ingest.py measures the effect: docs/benchmarks.md).
DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000


@dataclass
class IngestStats:
    """Counts of one run of the loop, by outcome."""

    messages: int = 0
    batches: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    aggregation_tasks: list[int] = field(default_factory=list)

    def add(self, outcome: UpdateOutcome) -> None:
        """Count one message's outcome: the one place every outcome of the loop passes through."""
        self.messages += 1
        record_outcome(outcome, source="bus")
        self.by_status[outcome.status] = self.by_status.get(outcome.status, 0) + 1
        if outcome.aggregation_task_pk is not None:
            self.aggregation_tasks.append(outcome.aggregation_task_pk)


def arrival_of(message: Message, traceparent: str = "") -> Arrival:
    """What the update service needs of a bus message: its envelope (decoded once, by the bus), or why it has none;
    `traceparent` is the message's ingestion span."""
    where = message.where()
    if message.error is not None:
        return Arrival(where=where, key=message.key, problem=str(message.error), traceparent=traceparent)
    if not isinstance(message.event, UpdateEnvelope):
        return Arrival(
            where=where,
            key=message.key,
            problem=f"expected an UpdateEnvelope, got {type(message.event).__name__}",
            traceparent=traceparent,
        )
    return Arrival(where=where, key=message.key, envelope=message.event, traceparent=traceparent)


def ingest_batch(messages: Sequence[Message]) -> list[UpdateOutcome]:
    """Hand a batch of messages to the update service (one transaction); one outcome per message, in order. Never
    raises for a bad message.

    Raises only when the worker itself cannot go on (database unreachable, artifact store unreadable): the batch is
    then left uncommitted and handled again after a restart.
    """
    with traced_batch(settings.FEDNESTED_BUS, INGEST_GROUP, Topic.UPDATES.value, messages) as batch:
        arrivals = [arrival_of(message, batch.traceparents[i]) for i, message in enumerate(messages)]
        outcomes = submit_updates(arrivals, actor=ACTOR)
        batch.record(outcomes)
    return outcomes


def ingest_message(message: Message) -> UpdateOutcome:
    """`ingest_batch` of one message."""
    return ingest_batch([message])[0]


def _crash_if_asked(point: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == point:
        logger.warning("test hook %s=%s: killing this process", CRASH_POINT_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


def run_ingest(
    consumer: Consumer,
    *,
    stop: threading.Event | None = None,
    max_messages: int | None = None,
    idle_exit_s: float | None = None,
    poll_timeout_s: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> IngestStats:
    """Consume until `stop` is set, `max_messages` were handled, or nothing arrived for `idle_exit_s` seconds.

    Per batch (up to `batch_size` messages: whatever has arrived once the first one is there, so a lone message is
    never held back): `ingest_batch` (its committed transaction), then one offset commit. Between batches, the CRL
    is signed again when due.
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must lie in [1, {MAX_BATCH_SIZE}], got {batch_size}")
    stats = IngestStats()
    stop = stop or threading.Event()
    last_message_at = time.monotonic()
    last_crl_check = 0.0
    while not stop.is_set() and (max_messages is None or stats.messages < max_messages):
        wanted = batch_size if max_messages is None else min(batch_size, max_messages - stats.messages)
        messages = consumer.consume(wanted, poll_timeout_s)
        if messages:
            outcomes = ingest_batch(messages)
            _crash_if_asked("after_db_commit")
            consumer.commit_batch(messages)
            stats.batches += 1
            for outcome in outcomes:
                stats.add(outcome)
            last_message_at = time.monotonic()
        elif idle_exit_s is not None and time.monotonic() - last_message_at >= idle_exit_s:
            break
        if time.monotonic() - last_crl_check >= CRL_CHECK_INTERVAL_S:
            refresh_crl_if_due()
            last_crl_check = time.monotonic()
    return stats


def main(argv: list[str]) -> int:
    """Command line of `python -m workers.ingest`."""
    parser = argparse.ArgumentParser(prog="python -m workers.ingest", description=__doc__)
    parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group id (default: %(default)s)")
    parser.add_argument("--max-messages", type=int, default=None, help="exit after this many messages")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="exit when idle this long")
    parser.add_argument("--poll-timeout", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="messages per transaction and offset commit, at most (default: %(default)s; 1: one at a time)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=settings.FEDNESTED_INGEST_METRICS_PORT,
        help="serve Prometheus metrics on this port of FEDNESTED_METRICS_ADDRESS; 0 for none (default: %(default)s)",
    )
    arguments = parser.parse_args(argv)
    point = os.environ.get(CRASH_POINT_ENV)
    if point and point not in CRASH_POINTS:
        parser.error(f"{CRASH_POINT_ENV}={point!r} is not one of {CRASH_POINTS}")
    if not 1 <= arguments.batch_size <= MAX_BATCH_SIZE:
        parser.error(f"--batch-size must lie in [1, {MAX_BATCH_SIZE}], got {arguments.batch_size}")
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Finish the batch in hand (its transaction and offset commit), then leave the group cleanly.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if arguments.metrics_port:
        extra = ingest_collectors(bus_settings(), arguments.group)
        serve_metrics(arguments.metrics_port, settings.FEDNESTED_METRICS_ADDRESS, process="ingest worker", extra=extra)
    # Without a broker there is no `celery beat`: this process runs the schedule (deadlines, core updates, champion
    # evaluations) in a thread, as it runs the jobs those create (apps/federation/jobs.py).
    schedules = start_schedule_thread(stop) if settings.FEDNESTED_JOBS_IN_PROCESS else None
    try:
        with make_bus(bus_settings()) as bus, bus.consumer(arguments.group, [Topic.UPDATES]) as consumer:
            logger.info("ingest worker consuming %s as group %s", Topic.UPDATES.value, arguments.group)
            stats = run_ingest(
                consumer,
                stop=stop,
                max_messages=arguments.max_messages,
                idle_exit_s=arguments.idle_exit,
                poll_timeout_s=arguments.poll_timeout,
                batch_size=arguments.batch_size,
            )
    finally:
        stop.set()
        if schedules is not None:
            schedules.join()
    logger.info("ingest worker stopped after %d messages: %s", stats.messages, stats.by_status)
    return 0
