"""Control events the control plane publishes (ModelAvailable, RoundStart): the one place that talks to the bus.

Events are built (and so validated) inside the caller's transaction and written to the outbox in it (apps/outbox):
they leave only if the change commits, and they leave even if the bus is down at that moment, once the relay
(`python -m workers.relay`) gets them through. Each carries its outbox row's id as `event_id`, by which consumers
drop the copy a relay that died after publishing sends again.
"""

import json
import uuid
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery, Undeliverable
from apps.outbox.models import OutboxEvent
from apps.outbox.services import enqueue
from fednested.messaging import (
    EmbeddedBusSettings,
    Event,
    KafkaBusSettings,
    ModelAvailable,
    RoundStart,
    SchemaError,
    Topic,
    TopicError,
    TopicsConfig,
    decode,
)


def bus_settings() -> KafkaBusSettings | EmbeddedBusSettings:
    """The bus described by FEDNESTED_BUS, FEDNESTED_BUS_PATH, FEDNESTED_KAFKA_BOOTSTRAP (and _SSL_*),
    FEDNESTED_TOPIC_PREFIX."""
    topics = TopicsConfig(prefix=settings.FEDNESTED_TOPIC_PREFIX)
    if settings.FEDNESTED_BUS == "kafka":
        return KafkaBusSettings(
            bootstrap_servers=settings.FEDNESTED_KAFKA_BOOTSTRAP,
            topics=topics,
            ssl_ca=Path(settings.FEDNESTED_KAFKA_SSL_CA) if settings.FEDNESTED_KAFKA_SSL_CA else None,
            ssl_certificate=(
                Path(settings.FEDNESTED_KAFKA_SSL_CERTIFICATE) if settings.FEDNESTED_KAFKA_SSL_CERTIFICATE else None
            ),
            ssl_key=Path(settings.FEDNESTED_KAFKA_SSL_KEY) if settings.FEDNESTED_KAFKA_SSL_KEY else None,
        )
    return EmbeddedBusSettings(path=settings.FEDNESTED_BUS_PATH, topics=topics)


def _enqueue(topic: Topic, event: Event, key: str, event_id: uuid.UUID) -> None:
    # Stored as the wire JSON the bus will carry, validated now: a row the relay cannot decode is a defect of ours.
    enqueue(
        OutboxKind.BUS_EVENT,
        topic=topic.value,
        key=key,
        payload=json.loads(event.model_dump_json()),
        event_id=event_id,
    )


def deliver_bus_event(row: OutboxEvent, delivery: Delivery) -> None:
    """Outbox handler of `bus_event` rows: publish the stored event and return once the bus acknowledged it.

    Undeliverable for a payload, topic or key the bus refuses (parked: no retry can fix it); BusError (retried) when
    the bus cannot be reached.
    """
    try:
        event = decode(json.dumps(row.payload).encode())
        topic = Topic(row.topic)
    except (SchemaError, ValueError) as error:
        raise Undeliverable(f"outbox row {row.event_id}: {error}") from None
    try:
        delivery.bus().publish(topic, event, key=row.key)
    except (SchemaError, TopicError) as error:
        raise Undeliverable(f"outbox row {row.event_id}: {error}") from None


def publish_model_available_on_commit(
    *, version_id: str, alias: str, manifest_sha256: str, artifact_uri: str, published_at: datetime | None = None
) -> ModelAvailable:
    """Announce on control.federation_rounds that `alias` now names `version_id`: an outbox row in the caller's
    transaction, published by the relay once that commits."""
    event_id = uuid.uuid4()
    event = ModelAvailable(
        event_id=event_id,
        version_id=version_id,
        alias=alias,
        manifest_sha256=manifest_sha256,
        artifact_uri=artifact_uri,
        published_at=published_at or timezone.now(),
    )
    _enqueue(Topic.CONTROL_ROUNDS, event, version_id, event_id)
    return event


def publish_round_start_on_commit(
    *, round_id: str, base_version: str, deadline: datetime, config: dict[str, object], started_at: datetime
) -> RoundStart:
    """Announce on control.federation_rounds that round `round_id` is open: an outbox row in the caller's
    transaction, published by the relay once that commits."""
    event_id = uuid.uuid4()
    event = RoundStart.model_validate(
        {
            "event_id": str(event_id),
            "schema": RoundStart.SCHEMA,
            "schema_version": RoundStart.SCHEMA_VERSION,
            "round_id": round_id,
            "base_version": base_version,
            "deadline": deadline,
            "config": config,
            "started_at": started_at,
        },
        strict=False,
    )
    _enqueue(Topic.CONTROL_ROUNDS, event, round_id, event_id)
    return event
