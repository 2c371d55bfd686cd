"""Data engine loop: a batch of records from telemetry.edge and tasks.training → one service call per record (each its
own transaction) → one offset commit for the batch, in that order.

Offsets are committed only after every record of the batch was written, so a worker killed in between reads the
batch again: a telemetry report is then recognised by its digest and a task event by its trigger's state, never
applied twice. A record the services refuse is recorded (TelemetryRejection) and committed with the rest, so no
message can stop the worker; only infrastructure errors (database down) leave the batch uncommitted.
"""

import argparse
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from apps.dataengine.services import Arrival, TelemetryOutcome, create_task_from_event, record_telemetry
from apps.federation.events import bus_settings
from fednested.messaging import Consumer, Message, Topic, make_bus
from fednested.messaging.acls import DATAENGINE_GROUP

logger = logging.getLogger(__name__)

DEFAULT_GROUP = DATAENGINE_GROUP
TOPICS = (Topic.TELEMETRY, Topic.TASKS)
# Records per offset commit: each is its own short transaction, so the batch only spreads the commit round trip.
DEFAULT_BATCH_SIZE = 200
MAX_BATCH_SIZE = 10_000


@dataclass
class TelemetryStats:
    """Counts of one run of the loop, by outcome status."""

    messages: int = 0
    batches: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    trigger_ids: list[int] = field(default_factory=list)

    def add(self, outcome: TelemetryOutcome) -> None:
        self.messages += 1
        self.by_status[outcome.status] = self.by_status.get(outcome.status, 0) + 1
        self.trigger_ids += outcome.trigger_ids


def arrival_of(message: Message) -> Arrival:
    """What the services need of a bus record: its position, key, bytes, and its event or why it has none."""
    problem = str(message.error) if message.error is not None else None
    return Arrival(where=message.where(), key=message.key, raw=message.raw, event=message.event, problem=problem)


def handle_message(message: Message) -> TelemetryOutcome:
    """One record to the service of its topic; never raises for a bad record."""
    arrival = arrival_of(message)
    if message.topic is Topic.TASKS:
        return create_task_from_event(arrival)
    return record_telemetry(arrival)


def handle_batch(messages: Sequence[Message]) -> list[TelemetryOutcome]:
    return [handle_message(message) for message in messages]


def run_telemetry(
    consumer: Consumer,
    *,
    stop: threading.Event | None = None,
    max_messages: int | None = None,
    idle_exit_s: float | None = None,
    poll_timeout_s: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TelemetryStats:
    """Consume until `stop` is set, `max_messages` were handled, or nothing arrived for `idle_exit_s` seconds."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must lie in [1, {MAX_BATCH_SIZE}], got {batch_size}")
    stats = TelemetryStats()
    stop = stop or threading.Event()
    last_message_at = time.monotonic()
    while not stop.is_set() and (max_messages is None or stats.messages < max_messages):
        wanted = batch_size if max_messages is None else min(batch_size, max_messages - stats.messages)
        messages = consumer.consume(wanted, poll_timeout_s)
        if messages:
            outcomes = handle_batch(messages)
            consumer.commit_batch(messages)
            stats.batches += 1
            for outcome in outcomes:
                stats.add(outcome)
            last_message_at = time.monotonic()
        elif idle_exit_s is not None and time.monotonic() - last_message_at >= idle_exit_s:
            break
    return stats


def main(argv: list[str]) -> int:
    """Command line of `python -m workers.telemetry`."""
    parser = argparse.ArgumentParser(prog="python -m workers.telemetry", description=__doc__)
    parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group id (default: %(default)s)")
    parser.add_argument("--max-messages", type=int, default=None, help="exit after this many messages")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="exit when idle this long")
    parser.add_argument("--poll-timeout", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="records per offset commit (default: %(default)s)"
    )
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.batch_size <= MAX_BATCH_SIZE:
        parser.error(f"--batch-size must lie in [1, {MAX_BATCH_SIZE}], got {arguments.batch_size}")
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Finish the batch in hand (its writes and offset commit), then leave the group cleanly.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with make_bus(bus_settings()) as bus, bus.consumer(arguments.group, list(TOPICS)) as consumer:
        logger.info("data engine consuming %s as group %s", ", ".join(t.value for t in TOPICS), arguments.group)
        stats = run_telemetry(
            consumer,
            stop=stop,
            max_messages=arguments.max_messages,
            idle_exit_s=arguments.idle_exit,
            poll_timeout_s=arguments.poll_timeout,
            batch_size=arguments.batch_size,
        )
    logger.info("data engine stopped after %d messages: %s", stats.messages, stats.by_status)
    print(f"data engine: {stats.messages} messages in {stats.batches} batches: {stats.by_status}", flush=True)
    return 0
