"""Ingest loop: one bus message → `submit_update` (its checks and one database transaction) → one offset commit, in
that order. The loop is thin: every decision about an envelope belongs to `apps.federation.updates`.

The offset is committed only after the transaction has committed, so a worker killed in between reprocesses the
message; the Update row's unique update id then turns the second pass into a recorded duplicate, never a second
apply. A message that makes the service raise something unexpected is recorded as refused and committed, so no
message can stop the worker; only infrastructure errors (database, artifact store) leave it uncommitted.
"""

import argparse
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from django.db import DatabaseError, InterfaceError, OperationalError
from django.utils import timezone

from apps.federation.events import bus_settings
from apps.federation.identity import refresh_crl_if_due
from apps.federation.updates import UpdateOutcome, enqueue_due_windows, refuse_message, submit_update
from fednested.aggregation import RejectionCode
from fednested.messaging import Consumer, Message, Topic, UpdateEnvelope, make_bus
from fednested.messaging.acls import INGEST_GROUP

logger = logging.getLogger(__name__)

ACTOR_LABEL = "worker:ingest"
DEFAULT_GROUP = INGEST_GROUP
# Test hook: "after_db_commit" makes the worker SIGKILL itself after a message's transaction committed and before its
# offset is committed — the window the at-least-once design must survive.
CRASH_POINT_ENV = "FEDNESTED_INGEST_CRASH_POINT"
CRASH_POINTS = ("after_db_commit",)
# How often an idle worker looks for windows whose deadline passed or whose awaited candidate was decided.
DEADLINE_CHECK_INTERVAL_S = 5.0


@dataclass
class IngestStats:
    """Counts of one run of the loop, by outcome."""

    messages: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    aggregation_tasks: list[int] = field(default_factory=list)

    def add(self, outcome: UpdateOutcome) -> None:
        self.messages += 1
        self.by_status[outcome.status] = self.by_status.get(outcome.status, 0) + 1
        if outcome.aggregation_task_pk is not None:
            self.aggregation_tasks.append(outcome.aggregation_task_pk)


def ingest_message(message: Message) -> UpdateOutcome:
    """Hand one message to the update service; returns what became of it. Never raises for a bad message.

    Raises only when the worker itself cannot go on (database unreachable, artifact store unreadable): the message
    is then left uncommitted and handled again after a restart.
    """
    where = message.where()
    if message.error is not None:
        return refuse_message(
            where=where,
            code=RejectionCode.MALFORMED,
            actor_label=ACTOR_LABEL,
            message=str(message.error),
            key=message.key,
        )
    envelope = message.event
    if not isinstance(envelope, UpdateEnvelope):
        kind = type(envelope).__name__
        return refuse_message(
            where=where,
            code=RejectionCode.MALFORMED,
            actor_label=ACTOR_LABEL,
            message=f"expected an UpdateEnvelope, got {kind}",
            key=message.key,
        )
    try:
        return submit_update(envelope, where=where, actor_label=ACTOR_LABEL, key=message.key)
    except (OperationalError, InterfaceError, OSError):
        raise
    except DatabaseError as error:
        # A value the database refuses (it passed every check we know of): the message is bad, not the worker.
        logger.exception("message at %s broke a database constraint", where)
        return refuse_message(
            where=where,
            code=RejectionCode.MALFORMED,
            actor_label=ACTOR_LABEL,
            message=f"the database refused it: {error}",
            key=message.key,
        )
    except Exception as error:
        # A defect of ours that this message triggers must not stop ingestion for every device: record and move on.
        logger.exception("message at %s: unexpected error", where)
        return refuse_message(
            where=where,
            code=RejectionCode.MALFORMED,
            actor_label=ACTOR_LABEL,
            message=f"could not be processed ({type(error).__name__}: {str(error)[:300]}); reported to operators",
            key=message.key,
        )


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
) -> IngestStats:
    """Consume until `stop` is set, `max_messages` were handled, or nothing arrived for `idle_exit_s` seconds.

    Per message: `ingest_message` (its committed transaction), then the offset commit. Between messages, windows
    that became ready without an arrival get their aggregation task.
    """
    stats = IngestStats()
    stop = stop or threading.Event()
    last_message_at = time.monotonic()
    last_deadline_check = 0.0
    while not stop.is_set() and (max_messages is None or stats.messages < max_messages):
        message = consumer.poll(poll_timeout_s)
        if message is not None:
            outcome = ingest_message(message)
            _crash_if_asked("after_db_commit")
            consumer.commit(message)
            stats.add(outcome)
            last_message_at = time.monotonic()
        elif idle_exit_s is not None and time.monotonic() - last_message_at >= idle_exit_s:
            break
        if time.monotonic() - last_deadline_check >= DEADLINE_CHECK_INTERVAL_S:
            stats.aggregation_tasks.extend(enqueue_due_windows(timezone.now()))
            refresh_crl_if_due()
            last_deadline_check = time.monotonic()
    return stats


def main(argv: list[str]) -> int:
    """Command line of `python -m workers.ingest`."""
    parser = argparse.ArgumentParser(prog="python -m workers.ingest", description=__doc__)
    parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group id (default: %(default)s)")
    parser.add_argument("--max-messages", type=int, default=None, help="exit after this many messages")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="exit when idle this long")
    parser.add_argument("--poll-timeout", type=float, default=1.0, metavar="SECONDS")
    arguments = parser.parse_args(argv)
    point = os.environ.get(CRASH_POINT_ENV)
    if point and point not in CRASH_POINTS:
        parser.error(f"{CRASH_POINT_ENV}={point!r} is not one of {CRASH_POINTS}")
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Finish the message in hand (its transaction and offset commit), then leave the group cleanly.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with make_bus(bus_settings()) as bus, bus.consumer(arguments.group, [Topic.UPDATES]) as consumer:
        logger.info("ingest worker consuming %s as group %s", Topic.UPDATES.value, arguments.group)
        stats = run_ingest(
            consumer,
            stop=stop,
            max_messages=arguments.max_messages,
            idle_exit_s=arguments.idle_exit,
            poll_timeout_s=arguments.poll_timeout,
        )
    logger.info("ingest worker stopped after %d messages: %s", stats.messages, stats.by_status)
    return 0
