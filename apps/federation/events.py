"""Control events the control plane publishes (ModelAvailable, RoundStart): the one place that talks to the bus.

Events are built (and so validated) inside the caller's transaction and published only after it commits, so no
event announces a change that was rolled back.
"""

from datetime import datetime
from functools import partial
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fednested.messaging import (
    EmbeddedBusSettings,
    Event,
    KafkaBusSettings,
    ModelAvailable,
    RoundStart,
    Topic,
    TopicsConfig,
    make_bus,
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


def _publish(topic: Topic, event: Event, key: str) -> None:
    # Control events are rare (a promotion, a round), so a bus per event keeps no connection open between them.
    with make_bus(bus_settings()) as bus:
        bus.publish(topic, event, key=key)


def publish_model_available_on_commit(
    *, version_id: str, alias: str, manifest_sha256: str, artifact_uri: str, published_at: datetime | None = None
) -> ModelAvailable:
    """Announce on control.federation_rounds, once the transaction commits, that `alias` now names `version_id`."""
    event = ModelAvailable(
        version_id=version_id,
        alias=alias,
        manifest_sha256=manifest_sha256,
        artifact_uri=artifact_uri,
        published_at=published_at or timezone.now(),
    )
    transaction.on_commit(partial(_publish, Topic.CONTROL_ROUNDS, event, version_id))
    return event


def publish_round_start_on_commit(
    *, round_id: str, base_version: str, deadline: datetime, config: dict[str, object], started_at: datetime
) -> RoundStart:
    """Announce on control.federation_rounds, once the transaction commits, that round `round_id` is open."""
    event = RoundStart.model_validate(
        {
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
    transaction.on_commit(partial(_publish, Topic.CONTROL_ROUNDS, event, round_id))
    return event
