"""The one bus interface (publish, consumer groups, commits) that the Kafka and embedded implementations share.

Delivery is at least once: a consumer commits a message after processing it, and whatever was polled but not
committed when a consumer dies is delivered again to the group. Payloads that fail validation never crash a
consumer: `poll` hands them back as a `Message` with `error` set, and the caller records the rejection and commits
past it, like any processed message.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from fednested.messaging.schemas import Event, SchemaError, decode, encode
from fednested.messaging.settings import EmbeddedBusSettings, KafkaBusSettings
from fednested.messaging.topics import Topic, TopicError, TopicsConfig, as_topic, resolve_key
from fednested.observability.tracing import publish_span

# ':' too: an edge client's group is "edge-<client id>", and client ids may hold ':' (CLIENT_ID_REGEX).
GROUP_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


class BusError(RuntimeError):
    """The bus could not do what was asked: broker unreachable, write not acknowledged, topic missing."""


@dataclass(frozen=True)
class Message:
    """One record read from a topic: either a valid `event` or, for a rejected payload, `error` and the raw bytes.

    Exactly one of `event` and `error` is set.
    """

    topic: Topic
    partition: int
    offset: int
    key: str
    raw: bytes
    timestamp_ms: int
    event: Event | None = None
    error: SchemaError | None = None
    # The record's text headers as sent (trace context: fednested.observability.tracing reads only what it knows).
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if (self.event is None) == (self.error is None):
            raise ValueError("a Message carries exactly one of event and error")

    @property
    def valid(self) -> bool:
        """True when the payload decoded into a valid event allowed on this topic under this key."""
        return self.event is not None

    def where(self) -> str:
        """Position of the record, for error messages and audit rows: "topic[partition]@offset"."""
        return f"{self.topic.value}[{self.partition}]@{self.offset}"


def read_message(
    topic: Topic,
    partition: int,
    offset: int,
    key: str,
    raw: bytes,
    timestamp_ms: int,
    headers: tuple[tuple[str, str], ...] = (),
) -> Message:
    """Decode a stored record into a Message, checking the schema and key against the topic's rules.

    Never raises for bad payloads: the problem lands in `Message.error`.
    """
    try:
        event = decode(raw)
    except SchemaError as error:
        return Message(topic, partition, offset, key, raw, timestamp_ms, error=error, headers=headers)
    except Exception as error:  # no record may stop a consumer: say what it was instead
        failure = SchemaError(f"payload could not be decoded ({type(error).__name__}: {str(error)[:200]})")
        return Message(topic, partition, offset, key, raw, timestamp_ms, error=failure, headers=headers)
    try:
        resolve_key(topic, event, key)
    except TopicError as error:  # a valid event on the wrong topic or under the wrong key
        rejection = SchemaError(str(error), schema_name=event.SCHEMA, schema_version=event.SCHEMA_VERSION)
        return Message(topic, partition, offset, key, raw, timestamp_ms, error=rejection, headers=headers)
    return Message(topic, partition, offset, key, raw, timestamp_ms, event=event, headers=headers)


def last_per_partition(messages: Sequence[Message]) -> list[Message]:
    """The message with the highest offset of each (topic, partition) among `messages`: committing it commits the
    ones before it in that partition."""
    last: dict[tuple[Topic, int], Message] = {}
    for message in messages:
        held = last.get((message.topic, message.partition))
        if held is None or message.offset > held.offset:
            last[(message.topic, message.partition)] = message
    return [last[position] for position in sorted(last, key=lambda item: (item[0].value, item[1]))]


def check_group_id(group: str) -> str:
    """`group` if it is a usable consumer-group id; raises ValueError saying what is allowed otherwise."""
    if not GROUP_ID_PATTERN.fullmatch(group):
        raise ValueError(f"consumer group id {group!r} must be 1-200 characters of letters, digits, '.', '_', ':', '-'")
    return group


class Consumer(ABC):
    """A member of a consumer group: the group's partitions are split among its members."""

    @abstractmethod
    def poll(self, timeout_s: float) -> Message | None:
        """The next record of an assigned partition, or None if none arrived within `timeout_s`."""

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to `max_messages` records: waits up to `timeout_s` for the first, then takes only what has already
        arrived, so a batch never holds a lone message back waiting for company. Empty when nothing came in time.

        This default polls one record at a time; an implementation that can fetch several at once overrides it.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        first = self.poll(timeout_s)
        if first is None:
            return []
        batch = [first]
        while len(batch) < max_messages:
            message = self.poll(0.0)
            if message is None:
                break
            batch.append(message)
        return batch

    @abstractmethod
    def commit(self, message: Message) -> None:
        """Record that `message` (and everything before it in its partition) is processed; synchronous.

        Commit after processing, never before: that is what makes delivery at least once.
        """

    def commit_batch(self, messages: Sequence[Message]) -> None:
        """Commit every message of a processed batch: per partition, the highest offset; synchronous, and one
        round trip where the implementation allows (this default commits partition by partition)."""
        for message in last_per_partition(messages):
            self.commit(message)

    @abstractmethod
    def assignment(self) -> list[tuple[Topic, int]]:
        """The (topic, partition) pairs this member reads now, sorted; changes as members join and leave."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group so its partitions move to the other members at once. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class Bus(ABC):
    """Publish validated events and open consumer-group members on the four topics."""

    def __init__(self, topics: TopicsConfig) -> None:
        self.topics = topics

    def publish(self, topic: Topic | str, event: Event, *, key: str | None = None) -> None:
        """Validate `event`, check that `topic` carries it under `key`, and write it durably.

        `key` defaults to the topic's key for the event (client id, task id, ...). Returns once the write is
        acknowledged (Kafka: acks=all; embedded: SQLite commit), so the caller may then drop its own copy. Raises
        SchemaError for an invalid event, TopicError for a wrong topic or key, BusError when the write failed.

        The write is a PRODUCER span, and the record carries its trace context in its headers (`traceparent`), so
        the consumer's span continues this trace.
        """
        logical = as_topic(topic)
        raw = encode(event)
        resolved = resolve_key(logical, event, key)
        with publish_span(self.system, logical.value, resolved) as headers:
            self._produce(logical, resolved, raw, tuple(headers))

    @property
    @abstractmethod
    def system(self) -> str:
        """The messaging system, as traces name it ("kafka", "embedded")."""

    @abstractmethod
    def _produce(self, topic: Topic, key: str, raw: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        """Write one already validated record with its text headers and wait for the acknowledgement."""

    @abstractmethod
    def consumer(self, group: str, topics: Sequence[Topic | str]) -> Consumer:
        """Join consumer group `group` on `topics`; starts from the group's committed offsets (earliest if none)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class TopicOutcome:
    """What bootstrapping did to one topic."""

    name: str
    created: bool = False
    changes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class BootstrapReport:
    """Outcome of `bootstrap_topics`: per topic, created / altered / unchanged, and what could not be aligned."""

    target: str
    topics: tuple[TopicOutcome, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        """True when the run created or altered anything."""
        return any(outcome.created or outcome.changes for outcome in self.topics)

    def lines(self) -> list[str]:
        """Human-readable report, one line per topic and warning, then a summary line."""
        out = []
        for outcome in self.topics:
            if outcome.created:
                out.append(f"created {outcome.name}: " + "; ".join(outcome.changes))
            elif outcome.changes:
                out.append(f"altered {outcome.name}: " + "; ".join(outcome.changes))
            else:
                out.append(f"unchanged {outcome.name}")
            out.extend(f"warning: {outcome.name}: {warning}" for warning in outcome.warnings)
        if not self.changed:
            out.append(f"nothing to change on {self.target}: all {len(self.topics)} topics match the configuration")
        return out


def describe_topic_settings(partitions: int, retention_ms: int) -> str:
    """ "6 partitions, retention 7d" — the form used in bootstrap reports."""
    return f"{partitions} partition{'s' if partitions != 1 else ''}, retention {describe_duration_ms(retention_ms)}"


def describe_duration_ms(duration_ms: int) -> str:
    """Milliseconds as the largest whole unit: 604800000 → "7d", 90000 → "90s"."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if duration_ms % size == 0:
            return f"{duration_ms // size}{unit}"
    return f"{duration_ms}ms"


def make_bus(settings: KafkaBusSettings | EmbeddedBusSettings) -> Bus:
    """The bus the settings describe. Kafka's client library is imported only when a Kafka bus is made."""
    if isinstance(settings, KafkaBusSettings):
        from fednested.messaging.kafka import KafkaBus

        return KafkaBus(settings)
    from fednested.messaging.embedded import EmbeddedBus

    return EmbeddedBus(settings)


def bootstrap_topics(settings: KafkaBusSettings | EmbeddedBusSettings) -> BootstrapReport:
    """Create the four topics with their partitions and retention, or align existing ones; idempotent.

    Partitions can only grow (Kafka cannot remove them): a topic with more partitions than configured is left as
    is and reported as a warning.
    """
    if isinstance(settings, KafkaBusSettings):
        from fednested.messaging.kafka import bootstrap_kafka_topics

        return bootstrap_kafka_topics(settings)
    from fednested.messaging.embedded import bootstrap_embedded_topics

    return bootstrap_embedded_topics(settings)
