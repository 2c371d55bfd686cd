"""The four topics of the bus: which schemas each may carry, what its key means, and its partitions and retention.

Topic names here are logical; `TopicsConfig.prefix` maps them to physical names, so several deployments (or test
runs) can share one broker without seeing each other's events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from fednested.messaging.schemas import (
    ConfigChange,
    Event,
    ModelAvailable,
    RoundStart,
    Telemetry,
    TelemetryV2,
    TrainingTask,
    UpdateEnvelope,
)

DAY_MS = 24 * 60 * 60 * 1000


class Topic(StrEnum):
    """Logical topic names, as in the architecture's Events table."""

    CONTROL_ROUNDS = "control.federation_rounds"
    UPDATES = "updates.experts.local"
    TELEMETRY = "telemetry.edge"
    TASKS = "tasks.training"


@dataclass(frozen=True)
class TopicSpec:
    """What a topic may carry and how its key is chosen.

    `keys_for(event)` lists the keys the event may be published under, the default first: the key decides the
    partition, so it is what per-key ordering is about (all of one client's updates stay in order).
    """

    topic: Topic
    schemas: frozenset[str]
    key_meaning: str
    keys_for: Callable[[Event], tuple[str, ...]]


def _control_keys(event: Event) -> tuple[str, ...]:
    if isinstance(event, RoundStart):
        return (event.round_id, event.base_version)
    if isinstance(event, ModelAvailable):
        return (event.version_id,)
    if isinstance(event, ConfigChange):
        return (event.change_id,)
    return ()


def _client_keys(event: Event) -> tuple[str, ...]:
    return (event.client_id,) if isinstance(event, UpdateEnvelope | Telemetry | TelemetryV2) else ()


def _task_keys(event: Event) -> tuple[str, ...]:
    return (event.task_id,) if isinstance(event, TrainingTask) else ()


TOPIC_SPECS: dict[Topic, TopicSpec] = {
    Topic.CONTROL_ROUNDS: TopicSpec(
        Topic.CONTROL_ROUNDS,
        frozenset({RoundStart.SCHEMA, ModelAvailable.SCHEMA, ConfigChange.SCHEMA}),
        "round id or base version (RoundStart), version id (ModelAvailable), change id (ConfigChange)",
        _control_keys,
    ),
    Topic.UPDATES: TopicSpec(Topic.UPDATES, frozenset({UpdateEnvelope.SCHEMA}), "client id", _client_keys),
    Topic.TELEMETRY: TopicSpec(Topic.TELEMETRY, frozenset({Telemetry.SCHEMA}), "client id", _client_keys),
    Topic.TASKS: TopicSpec(Topic.TASKS, frozenset({TrainingTask.SCHEMA}), "task id", _task_keys),
}


class TopicSettings(BaseModel):
    """Partitions and retention of one topic on the broker."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    partitions: int = Field(ge=1, le=1000, description="Number of partitions; the key hashes onto one of them.")
    retention_ms: int = Field(ge=60_000, description="How long the broker keeps an event, in milliseconds.")


class TopicsConfig(BaseModel):
    """Per-topic broker settings. Defaults suit a small federation; raise partitions to add consumer parallelism."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prepended to every topic name (e.g. 'staging.'), so deployments can share a broker.",
    )
    replication_factor: int = Field(default=1, ge=1, description="Kafka replication factor for created topics.")
    # One partition keeps control events in one total order: a RoundStart never overtakes its ModelAvailable.
    control_rounds: TopicSettings = Field(
        default=TopicSettings(partitions=1, retention_ms=90 * DAY_MS),
        description="control.federation_rounds: RoundStart, ModelAvailable, ConfigChange.",
    )
    updates: TopicSettings = Field(
        default=TopicSettings(partitions=6, retention_ms=7 * DAY_MS),
        description="updates.experts.local: update envelopes, keyed by client id.",
    )
    telemetry: TopicSettings = Field(
        default=TopicSettings(partitions=3, retention_ms=3 * DAY_MS),
        description="telemetry.edge: training outcomes, keyed by client id.",
    )
    tasks: TopicSettings = Field(
        default=TopicSettings(partitions=3, retention_ms=7 * DAY_MS),
        description="tasks.training: Tier-1 jobs, keyed by task id.",
    )

    def settings_for(self, topic: Topic) -> TopicSettings:
        """Partitions and retention configured for `topic`."""
        by_topic = {
            Topic.CONTROL_ROUNDS: self.control_rounds,
            Topic.UPDATES: self.updates,
            Topic.TELEMETRY: self.telemetry,
            Topic.TASKS: self.tasks,
        }
        return by_topic[topic]

    def physical_name(self, topic: Topic) -> str:
        """The topic's name on the broker."""
        return f"{self.prefix}{topic.value}"

    def logical_topic(self, physical_name: str) -> Topic:
        """Inverse of `physical_name`; raises ValueError for a name outside this configuration."""
        for topic in Topic:
            if self.physical_name(topic) == physical_name:
                return topic
        raise ValueError(f"topic {physical_name!r} is not one of this bus's topics (prefix {self.prefix!r})")


class TopicError(ValueError):
    """An event published to a topic that may not carry it, or under a key that breaks the topic's key rule."""


def as_topic(name: Topic | str) -> Topic:
    """The logical topic named `name`; raises TopicError listing the known topics otherwise."""
    try:
        return Topic(name)
    except ValueError:
        known = ", ".join(topic.value for topic in Topic)
        raise TopicError(f"unknown topic {name!r} (known: {known})") from None


def resolve_key(topic: Topic, event: Event, key: str | None) -> str:
    """The key to publish `event` under on `topic`: `key` if the topic allows it, else the default key.

    Raises TopicError when the topic may not carry the event's schema or the key is not one the topic allows.
    """
    spec = TOPIC_SPECS[topic]
    if event.SCHEMA not in spec.schemas:
        allowed = ", ".join(sorted(spec.schemas))
        raise TopicError(f"topic {topic.value} does not carry {event.SCHEMA} events (it carries: {allowed})")
    allowed_keys = spec.keys_for(event)
    if key is None:
        return allowed_keys[0]
    if key not in allowed_keys:
        raise TopicError(
            f"key {key!r} for {event.SCHEMA} on {topic.value} must be the {spec.key_meaning}: "
            + " or ".join(repr(k) for k in allowed_keys)
        )
    return key
