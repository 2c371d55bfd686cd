"""Apache Kafka bus through confluent-kafka: idempotent producer (acks=all), consumer groups with manual commits,
and the admin calls that create and align the topics.

confluent_kafka is imported here (and by `acls.apply_acls`) only, and this module only by `make_bus`/`bootstrap_topics`
for a Kafka config, so the library core imports without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer as RawConsumer
from confluent_kafka import KafkaError, KafkaException, Producer, TopicCollection, TopicPartition
from confluent_kafka import Message as RawMessage

# confluent_kafka.admin re-exports these without listing them in __all__, which mypy --strict flags.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from fednested.messaging.bus import (
    BootstrapReport,
    Bus,
    BusError,
    Consumer,
    Message,
    TopicOutcome,
    check_group_id,
    describe_duration_ms,
    describe_topic_settings,
    last_per_partition,
    read_message,
)
from fednested.messaging.settings import KafkaBusSettings
from fednested.messaging.topics import Topic, as_topic
from fednested.observability.tracing import trace_headers_of

logger = logging.getLogger(__name__)

METADATA_TIMEOUT_S = 10.0
# Errors that mean the configuration is wrong rather than that the broker is briefly unreachable: the consumer
# cannot make progress by retrying, so poll() raises them.
CONFIGURATION_ERRORS = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
    }
)


def client_config(settings: KafkaBusSettings) -> dict[str, Any]:
    """librdkafka properties every client of `settings` shares: brokers, client id, TLS and the passthrough."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        **settings.tls_properties(),
        **settings.librdkafka,
    }


def _existing_topics(client: Producer | RawConsumer | AdminClient, where: str) -> dict[str, int]:
    """Topic name → partition count, from broker metadata; BusError when the brokers cannot be reached."""
    try:
        metadata = client.list_topics(timeout=METADATA_TIMEOUT_S)
    except KafkaException as error:
        raise BusError(f"Kafka at {where}: cannot read topic metadata: {error.args[0]}") from error
    return {name: len(meta.partitions) for name, meta in metadata.topics.items() if meta.error is None}


def _check_authorized(settings: KafkaBusSettings, missing: Sequence[str]) -> None:
    """Raise BusError when topics absent from the metadata are hidden by the broker's ACLs (which show a principal
    only the topics it may use) rather than never created; asking per topic tells the two apart."""
    where = settings.bootstrap_servers
    admin = AdminClient(client_config(settings))
    denied: list[str] = []
    for name, future in admin.describe_topics(TopicCollection(list(missing))).items():
        try:
            future.result(timeout=METADATA_TIMEOUT_S * 2)
        except KafkaException as error:
            if error.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                denied.append(name)
    if denied:
        raise BusError(
            f"Kafka at {where}: topic authorization failed for {', '.join(denied)}: the broker's ACLs do not let "
            "this client's principal use it (see fednested/messaging/acls.py and `fednested messaging apply-acls`)"
        )


class KafkaBus(Bus):
    """Bus on Apache Kafka. `publish` waits for the acknowledgement of all in-sync replicas."""

    def __init__(self, settings: KafkaBusSettings) -> None:
        super().__init__(settings.topics)
        self.settings = settings
        self._producer: Producer | None = Producer(
            {
                **client_config(settings),
                # Idempotence: broker-side dedup of retried sends, so a retry never writes an event twice or
                # reorders a key's events.
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
            }
        )
        self._known_topics: set[str] = set()

    @property
    def system(self) -> str:
        return "kafka"

    def _produce(self, topic: Topic, key: str, raw: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        if self._producer is None:
            raise BusError(f"Kafka bus for {self.settings.bootstrap_servers} is closed")
        name = self.topics.physical_name(topic)
        if name not in self._known_topics:
            # Checked once per topic: with broker-side auto-creation on, a missing topic would otherwise appear with
            # the broker's default partitions instead of ours.
            self._known_topics = set(_existing_topics(self._producer, self.settings.bootstrap_servers))
            if name not in self._known_topics:
                _check_authorized(self.settings, [name])
                raise BusError(
                    f"topic {name!r} does not exist on Kafka at {self.settings.bootstrap_servers}: "
                    "run `fednested messaging bootstrap-topics`"
                )
        failures: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _message: RawMessage) -> None:
            if error is not None:
                failures.append(error)

        try:
            self._producer.produce(
                name,
                value=raw,
                key=key.encode(),
                headers=[(k, v.encode()) for k, v in headers],
                on_delivery=on_delivery,
            )
        except (KafkaException, BufferError) as error:
            raise BusError(f"Kafka publish to {name} failed: {error}") from error
        pending = self._producer.flush(self.settings.publish_timeout_s)
        if pending:
            raise BusError(
                f"Kafka at {self.settings.bootstrap_servers} did not acknowledge the write to {name} within "
                f"{self.settings.publish_timeout_s}s; it may still arrive: retry with the same event (ids are keys)"
            )
        if failures:
            raise BusError(f"Kafka publish to {name} failed: {failures[0].str()}")

    def consumer(self, group: str, topics: Sequence[Topic | str]) -> KafkaConsumer:
        return KafkaConsumer(self.settings, check_group_id(group), [as_topic(topic) for topic in topics])

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.settings.publish_timeout_s)
            self._producer = None


class KafkaConsumer(Consumer):
    """A consumer-group member on Kafka: manual commits, earliest offset for a new group. Use from one thread."""

    def __init__(self, settings: KafkaBusSettings, group: str, topics: list[Topic]) -> None:
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        self.settings = settings
        self.group = group
        self._topics_config = settings.topics
        names = [self._topics_config.physical_name(topic) for topic in topics]
        self._consumer: RawConsumer | None = RawConsumer(
            {
                **client_config(settings),
                "group.id": group,
                # Commit after processing, never before: at-least-once delivery.
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": settings.session_timeout_ms,
                "heartbeat.interval.ms": max(settings.session_timeout_ms // 3, 100),
                "allow.auto.create.topics": False,
            }
        )
        missing = sorted(set(names) - set(_existing_topics(self._consumer, settings.bootstrap_servers)))
        if missing:
            self._consumer.close()
            _check_authorized(settings, missing)
            raise BusError(
                f"topic(s) {', '.join(missing)} do not exist on Kafka at {settings.bootstrap_servers}: "
                "run `fednested messaging bootstrap-topics`"
            )
        self._consumer.subscribe(names)

    def _live(self) -> RawConsumer:
        if self._consumer is None:
            raise BusError(f"consumer of group {self.group!r} is closed")
        return self._consumer

    def poll(self, timeout_s: float) -> Message | None:
        raw = self._live().poll(timeout_s)
        if raw is None:
            return None
        return self._read(raw)

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        first = self.poll(timeout_s)
        if first is None:
            return []
        batch = [first]
        if max_messages > 1:
            # timeout 0: only what librdkafka has already fetched (it prefetches whole fetch responses), so a batch
            # costs one call and never waits for more messages than are there.
            for raw in self._live().consume(num_messages=max_messages - 1, timeout=0):
                message = self._read(raw)
                if message is not None:
                    batch.append(message)
        return batch

    def _read(self, raw: RawMessage) -> Message | None:
        """The record as a Message; None for a transient error event (raises BusError for a fatal one)."""
        error = raw.error()
        if error is not None:
            if error.fatal() or error.code() in CONFIGURATION_ERRORS:
                raise BusError(f"Kafka consumer of group {self.group!r}: {error.str()}")
            # librdkafka retries transient errors (broker restart, connection loss) by itself; nothing is lost.
            logger.warning("Kafka consumer of group %r: transient error: %s", self.group, error.str())
            return None
        key_bytes = raw.key()
        key = key_bytes.decode("utf-8", errors="replace") if isinstance(key_bytes, bytes) else ""
        value = raw.value()
        _kind, timestamp_ms = raw.timestamp()
        # Only the trace-context headers, bounded and checked (a device writes these records).
        received = raw.headers() or []
        pairs = received.items() if isinstance(received, dict) else received
        headers = tuple(sorted(trace_headers_of(pairs).items()))
        return read_message(
            self._topics_config.logical_topic(str(raw.topic())),
            int(raw.partition() or 0),
            int(raw.offset() or 0),
            key,
            value if isinstance(value, bytes) else b"",
            int(timestamp_ms),
            headers,
        )

    def commit(self, message: Message) -> None:
        name = self._topics_config.physical_name(message.topic)
        try:
            self._live().commit(
                offsets=[TopicPartition(name, message.partition, message.offset + 1)], asynchronous=False
            )
        except KafkaException as error:
            # Typically the partition moved to another member in a rebalance: it will redeliver from the last
            # committed offset, so processing must be idempotent (it is: update ids are keys).
            raise BusError(f"Kafka commit of {message.where()} for group {self.group!r} failed: {error}") from error

    def commit_batch(self, messages: Sequence[Message]) -> None:
        # One synchronous commit for every partition of the batch: a commit waits out the group coordinator's
        # linger (milliseconds), so committing message by message caps throughput far below what the database takes.
        offsets = [
            TopicPartition(self._topics_config.physical_name(message.topic), message.partition, message.offset + 1)
            for message in last_per_partition(messages)
        ]
        if not offsets:
            return
        try:
            self._live().commit(offsets=offsets, asynchronous=False)
        except KafkaException as error:
            where = ", ".join(message.where() for message in last_per_partition(messages))
            raise BusError(f"Kafka commit of {where} for group {self.group!r} failed: {error}") from error

    def assignment(self) -> list[tuple[Topic, int]]:
        return sorted(
            (self._topics_config.logical_topic(str(tp.topic)), int(tp.partition)) for tp in self._live().assignment()
        )

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def bootstrap_kafka_topics(settings: KafkaBusSettings) -> BootstrapReport:
    """Create missing topics, grow partitions and set retention.ms to the configuration; idempotent."""
    admin = AdminClient(client_config(settings))
    where = settings.bootstrap_servers
    existing = _existing_topics(admin, where)
    outcomes: list[TopicOutcome] = []
    for topic in Topic:
        name = settings.topics.physical_name(topic)
        wanted = settings.topics.settings_for(topic)
        if name not in existing:
            new_topic = NewTopic(
                name,
                num_partitions=wanted.partitions,
                replication_factor=settings.topics.replication_factor,
                config={"retention.ms": str(wanted.retention_ms)},
            )
            _wait(admin.create_topics([new_topic], operation_timeout=METADATA_TIMEOUT_S), f"create topic {name}")
            outcomes.append(
                TopicOutcome(
                    name, created=True, changes=(describe_topic_settings(wanted.partitions, wanted.retention_ms),)
                )
            )
            continue
        changes: list[str] = []
        warnings: list[str] = []
        partitions = existing[name]
        if wanted.partitions > partitions:
            _wait(
                admin.create_partitions([NewPartitions(name, wanted.partitions)], operation_timeout=METADATA_TIMEOUT_S),
                f"grow partitions of {name}",
            )
            changes.append(f"partitions {partitions} → {wanted.partitions} (keys map anew from here on)")
        elif wanted.partitions < partitions:
            warnings.append(
                f"has {partitions} partitions, the configuration asks for {wanted.partitions}; "
                f"Kafka cannot remove partitions, left at {partitions}"
            )
        retention_ms = _topic_retention_ms(admin, name)
        if retention_ms != wanted.retention_ms:
            entry = ConfigEntry("retention.ms", str(wanted.retention_ms), incremental_operation=AlterConfigOpType.SET)
            resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=[entry])
            _wait(admin.incremental_alter_configs([resource]), f"set retention.ms of {name}")
            shown = "unlimited" if retention_ms < 0 else describe_duration_ms(retention_ms)
            changes.append(f"retention {shown} → {describe_duration_ms(wanted.retention_ms)}")
        outcomes.append(TopicOutcome(name, changes=tuple(changes), warnings=tuple(warnings)))
    _await_metadata(admin, settings)
    return BootstrapReport(target=f"Kafka at {where}", topics=tuple(outcomes))


def _wait(futures: dict[Any, Any], action: str) -> None:
    for future in futures.values():
        try:
            future.result(timeout=METADATA_TIMEOUT_S * 2)
        except KafkaException as error:
            raise BusError(f"Kafka admin: cannot {action}: {error.args[0].str()}") from error


def _topic_retention_ms(admin: AdminClient, name: str) -> int:
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, name)])
    try:
        entries = next(iter(futures.values())).result(timeout=METADATA_TIMEOUT_S * 2)
    except KafkaException as error:
        raise BusError(f"Kafka admin: cannot read the configuration of {name}: {error.args[0].str()}") from error
    return int(entries["retention.ms"].value)


def _await_metadata(admin: AdminClient, settings: KafkaBusSettings) -> None:
    """Wait until every broker's metadata shows the configured partitions, so an immediate publish finds them."""
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while True:
        existing = _existing_topics(admin, settings.bootstrap_servers)
        lagging = [
            settings.topics.physical_name(topic)
            for topic in Topic
            if existing.get(settings.topics.physical_name(topic), 0) < settings.topics.settings_for(topic).partitions
        ]
        if not lagging:
            return
        if time.monotonic() > deadline:
            raise BusError(f"Kafka at {settings.bootstrap_servers}: topics {lagging} not visible after creation")
        time.sleep(0.1)
